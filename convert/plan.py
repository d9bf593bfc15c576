"""The conversion plan: a file's detection, a yaml and the flags, reconciled into every config before a byte is
written; one error names every disagreement, each with the yaml or flag to use instead.

The steps, in order: choose the yaml (the one given or beside the file; else the shipped one of the family and
prediction type when the weights have its shapes, else that one with the weights' shapes written in); hold
the yaml and flags against the weights (family, input channels, prediction type); settle the image size
and attention upcasting; build the diffusers configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convert.configs import (
    fitting_original_config,
    is_real_text_encoder,
    scheduler_class,
    text_encoder_config,
    text_encoder_layers,
    unet_config_from_ldm,
    vae_config_from_ldm,
    yaml_family,
    yaml_prediction_type,
    yaml_text_layer,
)
from convert.detect import Detection
from convert.errors import ConversionError
from convert.read import LoadedCheckpoint, load_original_config, sidecar_yaml_path
from convert.tables import (
    FAMILIES,
    INPAINT_IN_CHANNELS,
    LDM_PARAMETERIZATION,
    STOCK_CONFIGS,
    Family,
    PredictionType,
    native_image_size,
    stock_config_path,
)

WANTED_YAML: dict[Family, str] = {  # what to pass instead, per family of the weights
    "sd1": "v1-inference.yaml",
    "sd2": "v2-inference.yaml (512, epsilon) or v2-inference-v.yaml (768, v_prediction)",
}


@dataclass
class ChosenConfig:
    """The LDM yaml a conversion follows, and where it came from."""

    config: dict[str, Any]
    path: Path | None  # None: read from the weights' shapes
    name: str  # for messages
    given: bool  # given by the user or beside the file: its statements (text layer) are about this file
    evidence: list[str] = field(default_factory=list)


@dataclass
class ConversionPlan:
    """Everything decided before a byte is written."""

    family: Family
    prediction_type: PredictionType
    image_size: int
    upcast_attention: bool
    original_config_path: Path | None
    config_source: str  # the yaml's name, or the weights' shapes, for messages
    original_config: dict[str, Any]
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    text_config: dict[str, Any]
    scheduler_type: str
    extract_ema: bool = False
    evidence: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def plan_conversion(
    ckpt: LoadedCheckpoint,
    detection: Detection,
    *,
    original_config_path: Path | None,
    image_size: int | None,
    upcast_attention: bool | None,
    num_in_channels: int | None,
    scheduler_type: str,
    extract_ema: bool = False,
) -> ConversionPlan:
    """Check the yaml and flags against the weights and settle every config (the steps in the module docstring)."""
    chosen = choose_original_config(ckpt, detection, original_config_path)
    problems = [p for p in (family_problem(detection, chosen), channels_problem(detection, chosen, num_in_channels),
                            prediction_problem(detection, chosen)) if p is not None]
    if problems:
        raise ConversionError("\n".join(problems))
    if extract_ema and not detection.has_ema:
        raise ConversionError("--extract_ema was given but this checkpoint holds no EMA weights (model_ema.*); "
                              "drop --extract_ema")
    prediction = detection.stated_prediction or detection.requested or yaml_prediction_type(chosen.config)
    evidence = [*detection.evidence, *chosen.evidence]
    image_size, upcast_attention = settle_defaults(detection.family, prediction, image_size, upcast_attention,
                                                   evidence)
    text_layer = yaml_text_layer(chosen.config) if chosen.given else None
    evidence.append(text_encoder_evidence(detection, text_layer, chosen, ckpt.path))
    scheduler_class(scheduler_type)  # validates the name
    return ConversionPlan(
        family=detection.family,
        prediction_type=prediction,
        image_size=image_size,
        upcast_attention=upcast_attention,
        original_config_path=chosen.path,
        config_source=chosen.name,
        original_config=chosen.config,
        unet_config=unet_config_from_ldm(chosen.config, image_size, upcast_attention, num_in_channels),
        vae_config=vae_config_from_ldm(chosen.config, image_size),
        text_config=text_encoder_config(detection.family, detection.text_width, detection.text_blocks, text_layer),
        scheduler_type=scheduler_type,
        extract_ema=extract_ema,
        evidence=evidence,
        notes=list(ckpt.notes),
    )


def choose_original_config(ckpt: LoadedCheckpoint, detection: Detection, given: Path | None) -> ChosenConfig:
    """The yaml given (or beside the file); else the shipped one for the family and prediction type, if the
    weights have its shapes; else that one with the UNet and VAE read from the weights' shapes."""
    if given is not None:
        return ChosenConfig(load_original_config(given), given, given.name, given=True)
    family = detection.family
    prediction = detection.requested or detection.stated_prediction
    if prediction is None:
        if family == "sd2":
            raise ConversionError(
                "this is an SD2.x checkpoint and nothing in the file says whether it predicts epsilon "
                "(SD2.0 512-base) or v (SD2.x 768-v); pass prediction_type 'epsilon' or 'v_prediction', "
                "or original_config v2-inference.yaml / v2-inference-v.yaml"
            )
        prediction = "epsilon"
    stock = stock_config_path(family, prediction if family == "sd2" else "epsilon")
    config, differences, heads = fitting_original_config(ckpt.state, stock)
    if not differences:
        return ChosenConfig(config, stock, stock.name, given=False,
                            evidence=[f"original config: {stock.name} chosen from the weights"])
    shown = "; ".join(differences[:3]) + ("; ..." if len(differences) > 3 else "")
    name = f"the configuration read from the weights' shapes ({stock.name} does not fit them)"
    read = (f"original config: {stock.name} with the UNet and VAE read from the weights' shapes, which differ "
            f"from it ({shown}); {heads}")
    return ChosenConfig(config, None, name, given=False, evidence=[read])


# -------------------------------------------------------------------------------- yaml vs the weights


def family_problem(detection: Detection, chosen: ChosenConfig) -> str | None:
    """The yaml's family must be the weights' family (other size differences surface in the shape check)."""
    yaml_fam = yaml_family(chosen.config)
    if yaml_fam is None or yaml_fam == detection.family:
        return None
    return (f"{chosen.name} describes {FAMILIES[yaml_fam].title}, but this checkpoint is "
            f"{FAMILIES[detection.family].title}; use --original_config_file {WANTED_YAML[detection.family]}")


def channels_problem(detection: Detection, chosen: ChosenConfig, num_in_channels: int | None) -> str | None:
    """Inpainting UNets take 9 channels: the yaml (or --num_in_channels) must say so."""
    yaml_in = num_in_channels if num_in_channels is not None else \
        chosen.config["model"]["params"]["unet_config"]["params"].get("in_channels")
    if yaml_in == detection.in_channels:
        return None
    source = f"--num_in_channels {num_in_channels}" if num_in_channels is not None else \
        f"{chosen.name} (in_channels: {yaml_in})"
    if detection.inpainting:
        return (f"this is an inpainting checkpoint (the UNet takes {INPAINT_IN_CHANNELS} input channels) but "
                f"{source} says {yaml_in}; use the inpainting yaml of its family "
                f"({FAMILIES[detection.family].inpainting_yaml}) or add --num_in_channels {INPAINT_IN_CHANNELS}")
    return (f"the UNet takes {detection.in_channels} input channels but {source} says {yaml_in}; "
            f"use a yaml with in_channels: {detection.in_channels}")


def prediction_problem(detection: Detection, chosen: ChosenConfig) -> str | None:
    """The flag (or the choice made for the file), the yaml and the file's own statements must agree."""
    yaml_pred = yaml_prediction_type(chosen.config)
    file_pred, flag_pred = detection.stated_prediction, detection.requested
    file_disagrees = file_pred is not None and (flag_pred or yaml_pred) != file_pred
    if not file_disagrees and (flag_pred is None or flag_pred == yaml_pred):
        return None
    truth = file_pred or flag_pred
    claims = [f"{chosen.name} says {yaml_pred}"]
    if flag_pred is not None:
        claims.insert(0, f"--prediction_type {flag_pred}")
    claims += [f"{where} says {value}" for value, where in detection.stated]
    fix = f"--prediction_type {truth}"
    if (detection.family, truth) in STOCK_CONFIGS:
        fix += f" with --original_config_file {STOCK_CONFIGS[(detection.family, truth)].yaml}"
    else:
        fix += f' with a yaml whose model.params.parameterization is "{LDM_PARAMETERIZATION[truth]}"'
    return f"conflicting prediction types ({'; '.join(claims)}); use {fix}"


def text_encoder_evidence(detection: Detection, layer: str | None, chosen: ChosenConfig, checkpoint: Path) -> str:
    """How many of the file's text-encoder blocks the model keeps, and why; where that is a guess (SD2, no yaml
    names the layer, a depth not OpenCLIP ViT-H's), how to choose the other reading."""
    spec, family = FAMILIES[detection.family].text_encoder, detection.family.upper()
    blocks = detection.text_blocks
    kept = text_encoder_layers(spec, detection.text_width, blocks, layer)
    real = is_real_text_encoder(spec, detection.text_width, blocks)
    said = (f"text encoder: {kept} of the file's {blocks} blocks kept" if kept < blocks else
            f"text encoder: all {blocks} blocks kept")
    never_run = "so the last block is never run (kept for the way back)"
    if layer == "last":
        return f"{said}: {chosen.name} reads the last layer (layer: last)"
    if layer == "penultimate" and kept < blocks:
        return f"{said}: {chosen.name} reads the penultimate layer (layer: penultimate), {never_run}"
    if layer == "penultimate":
        return (f"{said}: {chosen.name} reads the penultimate layer of {spec.name}'s {spec.blocks} blocks, and the "
                f"file holds only the {kept} that run")
    if spec.used_blocks == spec.blocks:  # SD1's CLIP is read at its last layer
        return f"{said} ({family} reads the text encoder's last layer)"
    unsaid = (f"{chosen.name} names no text-encoder layer" if chosen.given else
              "no yaml of this file names the text-encoder layer")
    if real and kept < blocks:
        return (f"{said}: {unsaid}, and these are the {blocks} blocks of {spec.name}, which {family} reads at its "
                f"penultimate layer, {never_run}")
    if real:
        return f"{said}: the {kept} of {spec.name}'s {spec.blocks} blocks that {family} runs (the file lacks the last)"
    said = (f"{said}: {unsaid}, and {blocks} is not {spec.name}'s depth ({spec.blocks} blocks, of which {family} "
            f"runs {spec.used_blocks}), so every block is kept, as a file written from a diffusers model holds only "
            "the blocks that run")
    return said if blocks < 2 else f"{said}. {_penultimate_advice(chosen, checkpoint, blocks - 1, family)}"


def _penultimate_advice(chosen: ChosenConfig, checkpoint: Path, kept: int, family: str) -> str:
    """How to have a file's text encoder read at its penultimate layer: a yaml the converter (and ckpt_cache, which
    reads only the yaml beside the file) takes, saying so."""
    setting = "layer: penultimate under model.params.cond_stage_config.params"
    if chosen.given:
        how = f"add {setting} to {chosen.name}"
    else:
        says_so = chosen.path is not None and yaml_text_layer(chosen.config) == "penultimate"
        yaml = (f"a copy of {chosen.name} (it fits these weights and says so)" if says_so else
                f"the model's yaml with {setting}")
        beside = sidecar_yaml_path(checkpoint).name if checkpoint.name else "<file>.yaml"
        how = f"put {yaml} beside the file as {beside} (the converter also takes it as --original_config_file)"
    # train.py's ckpt_cache/ converts again when the yaml beside the file appears or changes
    return f"To keep {kept} instead, read at the penultimate layer as {family} does: {how} and convert again"


def settle_defaults(family: Family, prediction: PredictionType, image_size: int | None,
                    upcast_attention: bool | None, evidence: list[str]) -> tuple[int, bool]:
    """The image size and attention upcasting not given, from the family and prediction type (said in
    `evidence`)."""
    if image_size is None:
        image_size = native_image_size(family, prediction)
        evidence.append(f"image_size {image_size}: native size of {FAMILIES[family].title} {prediction}")
    if upcast_attention is None:
        # SD2.1 768-v overflows fp16 attention without upcasting; it only costs speed elsewhere
        upcast_attention = family == "sd2" and prediction == "v_prediction"
        evidence.append(f"upcast_attention {upcast_attention}: default for {family} {prediction}")
    return image_size, upcast_attention
