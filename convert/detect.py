"""What a loaded single file is: one function, `detect`, over the tables in convert/tables.py, run once per file.

It answers, each with its evidence:

* the family (SD1.x or SD2.x), from the text encoder's keys (`FAMILIES[...].sentinel`);
* the UNet's input channels (9 is an inpainting UNet), the text encoder's width and depth;
* the prediction type, in this order: an override (the config's `prediction_type`, the converter's
  `--prediction_type`); what the file states (safetensors metadata `modelspec.prediction_type`, a sidecar
  `<file>.yaml`'s parameterization, ComfyUI's `v_pred` key); and, only when asked to decide for a file that
  states nothing (`infer=True`, as ckpt_cache/ does): epsilon for SD1.x (every SD1 base predicts epsilon),
  the SD2 native image size the file names (metadata `modelspec.resolution`, or 512/768 in its name), and
  last AUTOMATIC1111's one-forward probe of the UNet;
* the image size the file names, and the EMA copy of the UNet it may hold.

The converter holds this against a yaml and flags (convert/plan.py); nothing here writes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from common.console import first_line
from convert.configs import fitting_original_config, unet_config_from_ldm, yaml_prediction_type
from convert.errors import ConversionError
from convert.read import LoadedCheckpoint, load_sidecar_config, sidecar_yaml_path
from convert.shapes import block_indices
from convert.tables import (
    EMA_BOOKKEEPING,
    EMA_PREFIX,
    FAMILIES,
    INPAINT_IN_CHANNELS,
    LDM_PARAMETERIZATION,
    UNET_PREFIX,
    Family,
    PredictionType,
    parse_prediction_type,
    prediction_for_size,
    stock_config_path,
)

Claim = tuple[PredictionType, str]  # a prediction type and where the file states it
# AUTOMATIC1111's probe: at t=999 with a constant input, an epsilon UNet returns about the input (the noise),
# a v UNet about minus the image; the mean of (output - input) falls below this for v.
PROBE_TIMESTEP = 999
PROBE_V_THRESHOLD = -1.0
EMA_COPY_MIN_TENSORS = 100  # a few model_ema.* entries are bookkeeping; a UNet copy has hundreds
# How the prediction type was decided; the first three are choices the converter checks like a flag.
REQUESTED = ("override", "image size", "probe")


@dataclass(frozen=True)
class Detection:
    """What one single file is, and why."""

    family: Family
    in_channels: int
    text_width: int
    text_blocks: int
    stated: tuple[Claim, ...]  # every place the file states its prediction type (they agree)
    prediction: PredictionType | None  # None: left to a yaml (the converter without `infer`)
    decided_by: str  # "override", "file", "family", "image size", "probe", or "" when left open
    decision: tuple[str, ...]  # why, when the prediction type is not simply what the file states
    size_hint: tuple[int, str] | None  # a native image size the file names, and where
    ema_tensors: int  # model_ema.* tensors beyond its bookkeeping
    sidecar: Path | None  # <file>.yaml beside it

    @property
    def inpainting(self) -> bool:
        return self.in_channels == INPAINT_IN_CHANNELS

    @property
    def has_ema(self) -> bool:
        return self.ema_tensors > EMA_COPY_MIN_TENSORS

    @property
    def stated_prediction(self) -> PredictionType | None:
        return self.stated[0][0] if self.stated else None

    @property
    def requested(self) -> PredictionType | None:
        """A prediction type chosen beyond the file's statements, which a yaml must agree with."""
        return self.prediction if self.decided_by in REQUESTED else None

    @property
    def evidence(self) -> list[str]:
        spec = FAMILIES[self.family]
        return [f"{spec.title}: found {spec.sentinel}", *(f"{value}: {where}" for value, where in self.stated)]


def detect(ckpt: LoadedCheckpoint, *, override: str | None = None, infer: bool = False) -> Detection:
    """Family, input channels, text-encoder shape, prediction type, image size and EMA of a loaded file."""
    state = ckpt.state
    family = detect_family(state)
    in_channels = unet_input_channels(state)
    spec = FAMILIES[family]
    sidecar = sidecar_yaml_path(ckpt.path) if ckpt.path.name else None
    sidecar = sidecar if sidecar is not None and sidecar.is_file() else None
    stated = stated_predictions(ckpt, sidecar)
    hint = image_size_hint(ckpt.metadata, ckpt.path, family)
    prediction, decided_by, decision = decide_prediction(ckpt, family, stated, _parse_override(override), infer, hint)
    return Detection(
        family=family,
        in_channels=in_channels,
        text_width=int(state[spec.sentinel].shape[1]),
        text_blocks=len(block_indices(state, spec.text_blocks)),
        stated=stated,
        prediction=prediction,
        decided_by=decided_by,
        decision=decision,
        size_hint=hint,
        ema_tensors=sum(k.startswith(EMA_PREFIX) and k not in EMA_BOOKKEEPING for k in state),
        sidecar=sidecar,
    )


def detect_family(state: Mapping[str, Tensor]) -> Family:
    if not any(k.startswith(UNET_PREFIX) for k in state):
        hint = ""
        if any(k.startswith("conditioner.embedders.") for k in state):
            hint = " It looks like an SDXL checkpoint, which this trainer does not support."
        elif any("lora" in k.lower() for k in list(state)[:50]):
            hint = (" It looks like a LoRA adapter, not a full model: train.py takes it as lora_init (with its base "
                    "model as resume_ckpt), and utils/merge_lora.py merges it into its base.")
        raise ConversionError(
            f"no Stable Diffusion UNet weights ({UNET_PREFIX}*) in this checkpoint.{hint} Expected an SD1.x "
            "or SD2.x single-file model."
        )
    families = [family for family, spec in FAMILIES.items() if spec.sentinel in state]
    if len(families) != 1:
        raise ConversionError(
            "cannot tell SD1 from SD2: expected exactly one of the text-encoder keys "
            f"{', '.join(spec.sentinel for spec in FAMILIES.values())} but found {len(families)}"
        )
    return families[0]


def unet_input_channels(state: Mapping[str, Tensor]) -> int:
    conv_in = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
    has_cross_attention = any(k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight") for k in state)
    if conv_in is None or not has_cross_attention:
        raise ConversionError("this UNet has no input_blocks.0.0 convolution or no cross-attention; "
                              "expected an SD1.x/SD2.x text-to-image UNet")
    return int(conv_in.shape[1])


# ----------------------------------------------------------------------------------- prediction type


def stated_predictions(ckpt: LoadedCheckpoint, sidecar_yaml: Path | None) -> tuple[Claim, ...]:
    """Every place the file itself states its prediction type; refused when they disagree."""
    found: list[Claim] = []
    meta = ckpt.metadata.get("modelspec.prediction_type")
    if meta is not None:
        value = parse_prediction_type(meta)
        if value is None:
            raise ConversionError(f"safetensors metadata modelspec.prediction_type = {meta!r} is not one of "
                                  "'epsilon', 'v'; cannot tell how this model predicts noise")
        found.append((value, f'safetensors metadata modelspec.prediction_type = "{meta}"'))
    if sidecar_yaml is not None:
        value = yaml_prediction_type(load_sidecar_config(sidecar_yaml))
        found.append((value, f'sidecar {sidecar_yaml.name} (parameterization "{LDM_PARAMETERIZATION[value]}")'))
    if "v_pred" in ckpt.state:  # ComfyUI's marker for v-prediction models
        found.append(("v_prediction", 'a "v_pred" key in the state dict'))
    if len({value for value, _ in found}) > 1:
        claims = "; ".join(f"{where} says {value}" for value, where in found)
        raise ConversionError(f"the checkpoint contradicts itself about its prediction type: {claims}")
    return tuple(found)


def _parse_override(override: str | None) -> PredictionType | None:
    if override is None:
        return None
    value = parse_prediction_type(override)
    if value is None:
        raise ConversionError(f"--prediction_type {override!r} is not one of epsilon, v_prediction")
    return value


def decide_prediction(ckpt: LoadedCheckpoint, family: Family, stated: tuple[Claim, ...],
                      override: PredictionType | None, infer: bool,
                      hint: tuple[int, str] | None) -> tuple[PredictionType | None, str, tuple[str, ...]]:
    """(value, how it was decided, why) by the order in this module's docstring."""
    if override is not None:
        return override, "override", (f"{override}: set by prediction_type in the config",)
    if stated:
        return stated[0][0], "file", ()
    if not infer:
        return None, "", ()
    if family == "sd1":
        return "epsilon", "family", (("epsilon: SD1.x and nothing in the file says otherwise (set prediction_type "
                                      "for a v-prediction fine-tune)"),)
    if hint is not None:
        size, where = hint
        value = prediction_for_size(family)[size]
        return value, "image size", (f"{value}: image size {size} ({where}); SD2 at {size} predicts {value}",)
    value, score = probe_prediction_type(ckpt.state, probe_unet_config(ckpt.state, family))
    return value, "probe", ((f"{value}: one-forward UNet probe (mean of output - input at t={PROBE_TIMESTEP} is "
                             f"{score:.3f}; v-prediction below {PROBE_V_THRESHOLD})"),)


def image_size_hint(metadata: Mapping[str, str], checkpoint: Path, family: Family) -> tuple[int, str] | None:
    """A native size of the family (SD2: 512 or 768) named by the file: metadata first, then its name."""
    sizes = prediction_for_size(family)
    resolution = metadata.get("modelspec.resolution", "")
    found = re.match(r"\s*(\d+)", resolution)
    if found and int(found.group(1)) in sizes:
        return int(found.group(1)), f'safetensors metadata modelspec.resolution = "{resolution}"'
    named = "|".join(str(size) for size in sizes)
    in_name = {int(m) for m in re.findall(rf"(?<!\d)({named})(?!\d)", checkpoint.stem)}
    if len(in_name) == 1:
        (size,) = in_name
        return size, f"the file name {checkpoint.name} says {size}"
    return None


def probe_unet_config(state: Mapping[str, Tensor], family: Family) -> dict[str, Any]:
    """The UNet config to probe with: the family's shipped yaml, or the weights' shapes where it does not fit."""
    original, _, _ = fitting_original_config(state, stock_config_path(family, "epsilon"))
    return unet_config_from_ldm(original, 512, False, None)


@torch.no_grad()
def probe_prediction_type(state: Mapping[str, Tensor], unet_config: Mapping[str, Any]) -> tuple[PredictionType, float]:
    """AUTOMATIC1111's test: run the UNet once on a constant latent at t=999 and look at the output's sign."""
    from diffusers import UNet2DConditionModel

    from convert.to_diffusers import convert_unet

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(unet_config))
    try:
        unet.load_state_dict(convert_unet(state, unet_config), strict=True, assign=True)
    except RuntimeError as err:  # shapes that do not fit the yaml: say what to set instead of probing
        raise ConversionError(
            f"cannot probe the UNet for its prediction type, its weights do not fit the yaml "
            f"({first_line(err)}); set prediction_type (epsilon or v_prediction) in the config, or put the "
            "model's yaml beside the file as <file>.yaml"
        ) from None
    unet = unet.float().eval()
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5)
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5)
    out = unet(x, torch.tensor([PROBE_TIMESTEP]), encoder_hidden_states=context).sample
    score = float((out - x[:, : out.shape[1]]).mean())
    return ("v_prediction" if score < PROBE_V_THRESHOLD else "epsilon"), score
