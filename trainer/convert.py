"""Original single-file Stable Diffusion checkpoints <-> diffusers folders, exact and offline.

This module owns both directions of the conversion and the detection around it:

* reading a `.ckpt` (torch zip/pickle, `weights_only=True` only) or `.safetensors` file, memory-mapped,
  judged by its content rather than its name or a flag; a file cut short (trainer/model_checks.py reads
  its header) or a pickle named `.safetensors` is refused before any tensor is read;
* telling SD1.x (OpenAI CLIP text encoder) from SD2.x (OpenCLIP), inpainting UNets (9 input channels), and
  v-prediction models (file metadata, a sidecar yaml, a `v_pred` key), and refusing a yaml or flag that
  contradicts the weights before anything is written;
* original (LDM/CompVis) state dict + its yaml -> diffusers configs and state dicts for unet, vae and
  text_encoder. UNet, VAE and text-encoder tensors go through diffusers' own `single_file_utils` building
  blocks, so the result is what diffusers itself produces; configs come from the yaml and tensor shapes,
  never from the network;
* the way back, diffusers -> the original single-file layout AUTOMATIC1111 and ComfyUI load;
* one entry point, `convert_checkpoint_file`, that writes a diffusers folder atomically.

Tensors present in the original file that a diffusers model has no place for (the LDM noise-schedule
buffers, CLIP's `position_ids`, OpenCLIP's unused last block, `text_projection`, `logit_scale`, ...) are
kept in `original_extras.safetensors` inside the folder, so original -> diffusers -> original gives back
the same keys and bit-identical tensors. Only a second full copy of the UNet (the EMA or the non-EMA one,
whichever was not converted) is dropped, and the result says so.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import struct
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import Tensor

from common.files import atomic_file, atomic_folder
from common.safetensors_header import MAX_HEADER
from trainer.model_checks import INPAINT_IN_CHANNELS, safetensors_problem, torch_zip_problem

Family = Literal["sd1", "sd2"]
PredictionType = Literal["epsilon", "v_prediction"]
FileFormat = Literal["safetensors", "torch-zip", "torch-pickle"]

REPO_ROOT = Path(__file__).resolve().parents[1]
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."  # SD1: a transformers CLIPTextModel
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD2: an open_clip text tower
EMA_PREFIX = "model_ema."
EXTRAS_FILE = "original_extras.safetensors"


class ConversionError(Exception):
    """A checkpoint, yaml or flag that cannot be converted as asked; the message says what to do."""


# --------------------------------------------------------------------------------------------- tables

# The text encoder tells the family: SD1 conditions on OpenAI CLIP ViT-L/14, SD2 on OpenCLIP ViT-H/14.
FAMILY_SENTINELS: dict[Family, str] = {
    "sd1": CLIP_PREFIX + "embeddings.token_embedding.weight",
    "sd2": OPENCLIP_PREFIX + "token_embedding.weight",
}
# ... and so does the yaml's cond_stage_config target.
YAML_TEXT_ENCODER_FAMILY: dict[str, Family] = {
    "FrozenCLIPEmbedder": "sd1",
    "FrozenOpenCLIPEmbedder": "sd2",
}
FAMILY_NAMES: dict[Family, str] = {
    "sd1": "SD1.x (CLIP ViT-L/14 text encoder)",
    "sd2": "SD2.x (OpenCLIP ViT-H text encoder)",
}
# The shipped yaml for each (family, prediction type), with the image size that model was trained at.
STOCK_CONFIGS: dict[tuple[Family, PredictionType], tuple[str, int]] = {
    ("sd1", "epsilon"): ("v1-inference.yaml", 512),
    ("sd2", "epsilon"): ("v2-inference.yaml", 512),
    ("sd2", "v_prediction"): ("v2-inference-v.yaml", 768),
}
PREDICTION_ALIASES: dict[str, PredictionType] = {
    "epsilon": "epsilon",
    "eps": "epsilon",
    "v": "v_prediction",
    "v_prediction": "v_prediction",
    "v-prediction": "v_prediction",
}
# LDM's yaml spells the prediction type "parameterization"
LDM_PARAMETERIZATION: dict[PredictionType, str] = {"epsilon": "eps", "v_prediction": "v"}


@dataclass(frozen=True)
class TextEncoderSpec:
    """The real text encoder of a family; a file whose shapes differ is converted from its shapes."""

    name: str
    width: int
    blocks: int  # blocks in the original file
    used_blocks: int  # SD2 reads OpenCLIP's penultimate layer, so its 24th block is never run
    hidden_act: str
    projection_dim: int
    pad_token: str


TEXT_ENCODERS: dict[Family, TextEncoderSpec] = {
    "sd1": TextEncoderSpec("CLIP ViT-L/14", 768, 12, 12, "quick_gelu", 768, "<|endoftext|>"),
    # SD2's tokenizer pads with "!" (id 0), as the stabilityai/stable-diffusion-2* repos do
    "sd2": TextEncoderSpec("OpenCLIP ViT-H/14", 1024, 24, 23, "gelu", 512, "!"),
}
CLIP_HEAD_WIDTH = 64  # both encoders use 64-wide attention heads: heads = width / 64

SCHEDULER_TYPES = ("pndm", "lms", "ddim", "euler", "euler-ancestral", "dpm")


def _scheduler_class(scheduler_type: str) -> type:
    import diffusers

    names = {
        "pndm": "PNDMScheduler",
        "lms": "LMSDiscreteScheduler",
        "ddim": "DDIMScheduler",
        "euler": "EulerDiscreteScheduler",
        "euler-ancestral": "EulerAncestralDiscreteScheduler",
        "dpm": "DPMSolverMultistepScheduler",
    }
    if scheduler_type not in names:
        raise ConversionError(
            f"unknown scheduler type {scheduler_type!r}; expected one of {', '.join(SCHEDULER_TYPES)}"
        )
    return getattr(diffusers, names[scheduler_type])


# ---------------------------------------------------------------------------------------- reading

def sniff_format(path: Path) -> FileFormat:
    """What the file really is, from its first bytes (names and flags can lie)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise ConversionError(f"could not read {path}: {e.strerror or e}; check its permissions") from None
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        # a header longer than the file is a cut-off safetensors file, which _check_whole reports as such
        if 0 < header_len <= MAX_HEADER and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "torch-pickle"
    raise ConversionError(
        f"{path} is neither a safetensors file nor a torch checkpoint (it starts with {head[:8]!r}); "
        "expected a Stable Diffusion .ckpt or .safetensors file"
    )


@dataclass
class LoadedCheckpoint:
    """A flat original state dict (memory-mapped tensors) plus what the file says about itself."""

    state: dict[str, Tensor]
    file_format: FileFormat
    metadata: dict[str, str]
    notes: list[str]
    global_step: int | None = None


def load_checkpoint(path: Path, from_safetensors: bool | None = None) -> LoadedCheckpoint:
    """Read an original checkpoint without executing anything and without copying it into memory.

    `from_safetensors` is what the user claimed; the content decides, and a disagreement becomes a note.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint {path} does not exist; pass the path of a .ckpt or .safetensors file")
    file_format = sniff_format(path)
    notes: list[str] = []
    is_safetensors = file_format == "safetensors"
    if from_safetensors is True and not is_safetensors:
        notes.append(f"--from_safetensors was given, but {path.name} is a torch checkpoint ({file_format}); "
                     "loaded it as a .ckpt with weights_only=True")
    elif from_safetensors is False and is_safetensors:
        notes.append(f"{path.name} is a safetensors file although --from_safetensors was not given; "
                     "loaded it as safetensors")

    _check_whole(path, file_format)
    if is_safetensors:
        metadata, state = _load_safetensors(path)
        return LoadedCheckpoint(state, file_format, metadata, notes)

    obj = _torch_load_weights_only(path, mmap=file_format == "torch-zip")
    global_step = obj.get("global_step") if isinstance(obj, dict) else None
    # Lightning checkpoints wrap the weights in "state_dict" (some tools nest it twice)
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not state:
        raise ConversionError(f"{path} contains no tensors; expected a Stable Diffusion state dict")
    return LoadedCheckpoint(state, file_format, {}, notes, global_step if isinstance(global_step, int) else None)


def _check_whole(path: Path, file_format: FileFormat) -> None:
    """Refuse a pickle that calls itself .safetensors, and a file cut short, before reading any tensor."""
    if path.suffix.lower() == ".safetensors" and file_format != "safetensors":
        raise ConversionError(
            f"{path} is named .safetensors but is a torch pickle checkpoint ({file_format}), not a safetensors "
            "file. A pickle can run code when loaded, which the .safetensors name promises this file cannot, so "
            "it is not loaded under that name. Get the real .safetensors file or, if you trust where this one "
            f"came from, rename it to {path.stem}.ckpt (a .ckpt is loaded with weights_only=True)."
        )
    if file_format == "safetensors":
        problem = safetensors_problem(path)
    else:
        problem = torch_zip_problem(path) if file_format == "torch-zip" else None
    if problem is not None:
        raise ConversionError(f"{problem} Download or copy the file again.")


def _load_safetensors(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        # load_file memory-maps: each tensor's bytes are read once, when the conversion writes them
        return metadata, load_file(str(path))
    except SafetensorError as e:  # a header that is whole but wrong (an unknown dtype, overlapping tensors)
        raise ConversionError(f"could not read {path} as safetensors ({e}); download or copy the file again") from None


def _torch_load_weights_only(path: Path, mmap: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # the weights-only unpickler stops at the first global it does not allow, before calling it
        found = re.search(r"(?:Unsupported global|unsupported GLOBAL|GLOBAL)[:\s]+([\w.]+(?:\s[\w.]+)?)", str(e))
        what = f" ({found.group(1).strip()})" if found else ""
        raise ConversionError(
            f"refused to load {path}: it is a pickle that needs Python objects beyond tensors{what}, and "
            "only weights_only=True loading is allowed, so nothing in it was run. Get a .safetensors "
            "version of this model, or re-save its state_dict with a tool you trust."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise ConversionError(f"could not read {path} as a torch checkpoint ({_first_line(e)}); expected a complete "
                              "file: download or copy it again") from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def load_original_config(path: Path) -> dict[str, Any]:
    """An LDM/CompVis inference yaml (v1-inference.yaml, v2-inference.yaml, ...), parsed."""
    path = Path(path)
    if not path.is_file():
        shipped = ", ".join(name for name, _ in STOCK_CONFIGS.values())
        raise ConversionError(f"original config {path} does not exist; the repository ships {shipped}")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConversionError(f"{path} is not valid yaml: {e}") from None
    params = config.get("model", {}).get("params", {}) if isinstance(config, dict) else {}
    if not isinstance(params, dict) or "unet_config" not in params or "first_stage_config" not in params:
        raise ConversionError(
            f"{path} is not a Stable Diffusion inference config: expected model.params.unet_config and "
            "model.params.first_stage_config, like v1-inference.yaml"
        )
    return config


# -------------------------------------------------------------------------------------- detection

@dataclass
class Detected:
    """What the weights themselves say."""

    family: Family
    in_channels: int
    context_dim: int
    text_width: int
    text_blocks: int
    prediction_evidence: list[tuple[PredictionType, str]]  # (value, where it was found)


def detect_model(ckpt: LoadedCheckpoint, sidecar_yaml: Path | None = None) -> Detected:
    """Family, input channels and prediction-type evidence from keys, shapes and metadata."""
    state = ckpt.state
    if not any(k.startswith(UNET_PREFIX) for k in state):
        hint = ""
        if any(k.startswith("conditioner.embedders.") for k in state):
            hint = " It looks like an SDXL checkpoint, which this trainer does not support."
        elif any("lora" in k.lower() for k in list(state)[:50]):
            hint = " It looks like a LoRA, not a full model."
        raise ConversionError(
            f"no Stable Diffusion UNet weights ({UNET_PREFIX}*) in this checkpoint.{hint} Expected an SD1.x "
            "or SD2.x single-file model."
        )
    families = [family for family, key in FAMILY_SENTINELS.items() if key in state]
    if len(families) != 1:
        raise ConversionError(
            "cannot tell SD1 from SD2: expected exactly one of the text-encoder keys "
            f"{', '.join(FAMILY_SENTINELS.values())} but found {len(families)}"
        )
    family = families[0]
    conv_in = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
    cross_attn = [v for k, v in state.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
    if conv_in is None or not cross_attn:
        raise ConversionError("this UNet has no input_blocks.0.0 convolution or no cross-attention; "
                              "expected an SD1.x/SD2.x text-to-image UNet")
    token_embedding = state[FAMILY_SENTINELS[family]]
    if family == "sd1":
        text_blocks = _count_indices(state, CLIP_PREFIX + "encoder.layers.")
    else:
        text_blocks = _count_indices(state, OPENCLIP_PREFIX + "transformer.resblocks.")
    return Detected(
        family=family,
        in_channels=int(conv_in.shape[1]),
        context_dim=int(cross_attn[0].shape[1]),
        text_width=int(token_embedding.shape[1]),
        text_blocks=text_blocks,
        prediction_evidence=prediction_evidence(ckpt, sidecar_yaml),
    )


def _count_indices(keys: Iterable[str], prefix: str) -> int:
    return len({k[len(prefix):].split(".", 1)[0] for k in keys if k.startswith(prefix)})


def prediction_evidence(ckpt: LoadedCheckpoint, sidecar_yaml: Path | None) -> list[tuple[PredictionType, str]]:
    """Every place the file itself states its prediction type (the checkpoint's own claims only)."""
    found: list[tuple[PredictionType, str]] = []
    meta = ckpt.metadata.get("modelspec.prediction_type")
    if meta is not None:
        value = PREDICTION_ALIASES.get(meta.strip().lower())
        if value is None:
            raise ConversionError(f"safetensors metadata modelspec.prediction_type = {meta!r} is not one of "
                                  "'epsilon', 'v'; cannot tell how this model predicts noise")
        found.append((value, f'safetensors metadata modelspec.prediction_type = "{meta}"'))
    if sidecar_yaml is not None and sidecar_yaml.is_file():
        config = load_original_config(sidecar_yaml)
        value = yaml_prediction_type(config)
        found.append((value, f'sidecar {sidecar_yaml.name} (parameterization "{LDM_PARAMETERIZATION[value]}")'))
    if "v_pred" in ckpt.state:  # ComfyUI's marker for v-prediction models
        found.append(("v_prediction", 'a "v_pred" key in the state dict'))
    return found


def yaml_prediction_type(original_config: Mapping[str, Any]) -> PredictionType:
    # LDM's default parameterization is "eps"
    raw = str(original_config["model"]["params"].get("parameterization", "eps"))
    if raw not in PREDICTION_ALIASES:
        raise ConversionError(f'yaml parameterization "{raw}" is not supported; expected "eps" or "v"')
    return PREDICTION_ALIASES[raw]


def yaml_family(original_config: Mapping[str, Any]) -> Family | None:
    target = str(original_config["model"]["params"].get("cond_stage_config", {}).get("target", ""))
    return YAML_TEXT_ENCODER_FAMILY.get(target.rsplit(".", 1)[-1])


def sidecar_yaml_path(checkpoint: Path) -> Path:
    """AUTOMATIC1111's convention: `model.safetensors` is described by `model.yaml` beside it."""
    return Path(checkpoint).with_suffix(".yaml")


def stock_config_for(family: Family, prediction_type: PredictionType) -> tuple[Path, int]:
    """The shipped yaml for a family and prediction type, and its native image size."""
    if (family, prediction_type) not in STOCK_CONFIGS:
        raise ConversionError(
            f"no shipped yaml for {FAMILY_NAMES[family]} with {prediction_type}; pass an original config "
            "whose model.params.parameterization matches"
        )
    name, size = STOCK_CONFIGS[(family, prediction_type)]
    return REPO_ROOT / name, size


# -------------------------------------------------------------------------------------- the plan

@dataclass
class ConversionPlan:
    """Everything decided before a byte is written."""

    family: Family
    prediction_type: PredictionType
    image_size: int
    upcast_attention: bool
    original_config_path: Path | None
    original_config: dict[str, Any]
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    text_config: dict[str, Any]
    scheduler_type: str
    evidence: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def plan_conversion(
    ckpt: LoadedCheckpoint,
    detected: Detected,
    *,
    original_config_path: Path | None,
    prediction_type: str | None,
    image_size: int | None,
    upcast_attention: bool | None,
    num_in_channels: int | None,
    scheduler_type: str,
) -> ConversionPlan:
    """Check the yaml and flags against the weights and settle every config. Raises one error naming
    every problem found, each with the yaml or flag to use instead."""
    problems: list[str] = []
    evidence = [f"{FAMILY_NAMES[detected.family]}: found {FAMILY_SENTINELS[detected.family]}"]
    flag_pred = None
    if prediction_type is not None:
        flag_pred = PREDICTION_ALIASES.get(prediction_type)
        if flag_pred is None:
            raise ConversionError(f"--prediction_type {prediction_type!r} is not one of epsilon, v_prediction")
    file_preds = {value for value, _ in detected.prediction_evidence}
    if len(file_preds) > 1:
        claims = "; ".join(f"{where} says {value}" for value, where in detected.prediction_evidence)
        raise ConversionError(f"the checkpoint contradicts itself about its prediction type: {claims}")
    file_pred = next(iter(file_preds), None)
    evidence += [f"{value}: {where}" for value, where in detected.prediction_evidence]

    if original_config_path is None:
        chosen = flag_pred or file_pred
        if chosen is None:
            if detected.family == "sd2":
                raise ConversionError(
                    "this is an SD2.x checkpoint and nothing in the file says whether it predicts epsilon "
                    "(SD2.0 512-base) or v (SD2.x 768-v); pass prediction_type 'epsilon' or 'v_prediction', "
                    "or original_config v2-inference.yaml / v2-inference-v.yaml"
                )
            chosen = "epsilon"
        original_config_path, _ = stock_config_for(detected.family, chosen if detected.family == "sd2" else "epsilon")
        evidence.append(f"original config: {original_config_path.name} chosen from the weights")
    original_config = load_original_config(original_config_path)
    yaml_name = original_config_path.name
    params = original_config["model"]["params"]
    unet_params = params["unet_config"]["params"]

    # the yaml's family must be the weights' family (other size differences surface in the shape check)
    yaml_fam = yaml_family(original_config)
    if yaml_fam is not None and yaml_fam != detected.family:
        want = {"sd1": "v1-inference.yaml", "sd2": "v2-inference.yaml (512, epsilon) or v2-inference-v.yaml "
                "(768, v_prediction)"}[detected.family]
        problems.append(
            f"{yaml_name} describes {FAMILY_NAMES[yaml_fam]}, but this checkpoint is "
            f"{FAMILY_NAMES[detected.family]}; use --original_config_file {want}"
        )

    # inpainting UNets take 9 channels: the yaml (or --num_in_channels) must say so
    yaml_in = num_in_channels if num_in_channels is not None else unet_params.get("in_channels")
    if yaml_in != detected.in_channels:
        source = f"--num_in_channels {num_in_channels}" if num_in_channels is not None else \
            f"{yaml_name} (in_channels: {yaml_in})"
        if detected.in_channels == INPAINT_IN_CHANNELS:
            problems.append(
                f"this is an inpainting checkpoint (the UNet takes {INPAINT_IN_CHANNELS} input channels) but "
                f"{source} says {yaml_in}; use the inpainting yaml of its family "
                f"({'v1-inpainting-inference.yaml' if detected.family == 'sd1' else 'v2-inpainting-inference.yaml'}) "
                f"or add --num_in_channels {INPAINT_IN_CHANNELS}"
            )
        else:
            problems.append(f"the UNet takes {detected.in_channels} input channels but {source} says {yaml_in}; "
                            f"use a yaml with in_channels: {detected.in_channels}")

    # prediction type: the flag, the yaml and the file must agree
    yaml_pred = yaml_prediction_type(original_config)
    if file_pred is not None and (flag_pred or yaml_pred) != file_pred or flag_pred is not None and flag_pred != yaml_pred:
        truth = file_pred or flag_pred
        claims = [f"{yaml_name} says {yaml_pred}"]
        if flag_pred is not None:
            claims.insert(0, f"--prediction_type {flag_pred}")
        claims += [f"{where} says {value}" for value, where in detected.prediction_evidence]
        fix = f"--prediction_type {truth}"
        if (detected.family, truth) in STOCK_CONFIGS:
            fix += f" with --original_config_file {STOCK_CONFIGS[(detected.family, truth)][0]}"
        else:
            fix += f' with a yaml whose model.params.parameterization is "{LDM_PARAMETERIZATION[truth]}"'
        problems.append(f"conflicting prediction types ({'; '.join(claims)}); use {fix}")
    resolved_pred: PredictionType = file_pred or flag_pred or yaml_pred

    if problems:
        raise ConversionError("\n".join(problems))

    if image_size is None:
        image_size = STOCK_CONFIGS.get((detected.family, resolved_pred), ("", 512))[1]
        evidence.append(f"image_size {image_size}: native size of {FAMILY_NAMES[detected.family]} {resolved_pred}")
    if upcast_attention is None:
        # SD2.1 768-v overflows fp16 attention without upcasting; it only costs speed elsewhere
        upcast_attention = detected.family == "sd2" and resolved_pred == "v_prediction"
        evidence.append(f"upcast_attention {upcast_attention}: default for {detected.family} {resolved_pred}")

    unet_config = unet_config_from_ldm(original_config, image_size, upcast_attention, num_in_channels)
    vae_config = vae_config_from_ldm(original_config, image_size)
    text_config = text_encoder_config(detected, original_config)
    _scheduler_class(scheduler_type)  # validates the name
    return ConversionPlan(
        family=detected.family,
        prediction_type=resolved_pred,
        image_size=image_size,
        upcast_attention=upcast_attention,
        original_config_path=original_config_path,
        original_config=original_config,
        unet_config=unet_config,
        vae_config=vae_config,
        text_config=text_config,
        scheduler_type=scheduler_type,
        evidence=evidence,
        notes=list(ckpt.notes),
    )


# ------------------------------------------------------------------------------- configs, forward

def unet_config_from_ldm(
    original_config: Mapping[str, Any], image_size: int, upcast_attention: bool, num_in_channels: int | None
) -> dict[str, Any]:
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    with warnings.catch_warnings():  # diffusers deprecates these arguments for from_single_file only
        warnings.simplefilter("ignore", FutureWarning)
        config = create_unet_diffusers_config_from_ldm(
            original_config, {}, image_size=image_size, upcast_attention=upcast_attention,
            num_in_channels=num_in_channels,
        )
    return config


def vae_config_from_ldm(original_config: Mapping[str, Any], image_size: int) -> dict[str, Any]:
    from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return create_vae_diffusers_config_from_ldm(original_config, {}, image_size=image_size)


def text_encoder_config(detected: Detected, original_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """CLIPTextConfig kwargs: the family's real encoder, with width and depth read from the shapes."""
    spec = TEXT_ENCODERS[detected.family]
    width, blocks = detected.text_width, detected.text_blocks
    if width % CLIP_HEAD_WIDTH:
        raise ConversionError(f"text encoder width {width} is not a multiple of the {CLIP_HEAD_WIDTH}-wide "
                              "CLIP heads; expected 768 (SD1) or 1024 (SD2)")
    standard = width == spec.width and blocks == spec.blocks
    # diffusers drops exactly OpenCLIP ViT-H's 24th block (SD2 reads the penultimate layer); files written
    # from a diffusers model (ours, diffusers') hold only the used blocks, so keep every block otherwise
    layers = spec.used_blocks if standard else blocks
    return dict(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=width // CLIP_HEAD_WIDTH,
        max_position_embeddings=77,
        hidden_act=spec.hidden_act,
        projection_dim=spec.projection_dim if width == spec.width else width,
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407 if spec.pad_token == "<|endoftext|>" else 0,
    )


def scheduler_config(original_config: Mapping[str, Any], prediction_type: PredictionType) -> dict[str, Any]:
    """The noise schedule of the yaml (LDM's "linear" schedule is diffusers' scaled_linear)."""
    from diffusers.loaders.single_file_utils import SCHEDULER_DEFAULT_CONFIG

    params = original_config["model"]["params"]
    return {
        **SCHEDULER_DEFAULT_CONFIG,
        "num_train_timesteps": int(params.get("timesteps", 1000)),
        "beta_start": float(params.get("linear_start", 0.00085)),
        "beta_end": float(params.get("linear_end", 0.012)),
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "prediction_type": prediction_type,
    }


def convert_unet(state: Mapping[str, Tensor], unet_config: Mapping[str, Any], extract_ema: bool = False) -> dict[str, Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    has_ema = sum(k.startswith(EMA_PREFIX) for k in state) > 100
    if extract_ema and not has_ema:
        raise ConversionError("--extract_ema was given but this checkpoint holds no EMA weights (model_ema.*); "
                              "drop --extract_ema")
    logging.getLogger("diffusers.loaders.single_file_utils").setLevel(logging.ERROR)
    return convert_ldm_unet_checkpoint(state, dict(unet_config), extract_ema=extract_ema)


def convert_vae(state: Mapping[str, Tensor], vae_config: Mapping[str, Any]) -> dict[str, Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae_state = {k: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    return convert_ldm_vae_checkpoint(vae_state, dict(vae_config))


def convert_text_encoder(state: Mapping[str, Tensor], family: Family, text_config: Mapping[str, Any]) -> dict[str, Tensor]:
    """Original text encoder -> transformers CLIPTextModel keys (without the `text_model.` prefix that
    transformers >= 5.6 no longer uses)."""
    from types import SimpleNamespace

    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    if family == "sd1":
        converted = convert_ldm_clip_checkpoint({k: v for k, v in state.items() if k.startswith(CLIP_PREFIX)})
    else:
        text_state = {k: v for k, v in state.items() if k.startswith(OPENCLIP_PREFIX)}
        width_holder = SimpleNamespace(config=SimpleNamespace(hidden_size=text_config["hidden_size"]))
        converted = convert_open_clip_checkpoint(width_holder, text_state, prefix=OPENCLIP_PREFIX)
        # a nonstandard-depth OpenCLIP keeps every block (see text_encoder_config)
        converted = {k: v for k, v in converted.items()
                     if _layer_index(k) is None or _layer_index(k) < text_config["num_hidden_layers"]}
    return {k.removeprefix("text_model."): v for k, v in converted.items()}


def _layer_index(key: str) -> int | None:
    m = re.search(r"encoder\.layers\.(\d+)\.", key)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------ the way back

RESNET_TO_LDM = {  # diffusers ResnetBlock2D (UNet) -> LDM ResBlock
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
VAE_RESNET_TO_LDM = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPENCLIP_LAYER_TO_LDM = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                         "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
OPENCLIP_TOP_TO_LDM = {"embeddings.token_embedding.weight": "token_embedding.weight",
                       "embeddings.position_embedding.weight": "positional_embedding",
                       "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def unet_block_map(unet_config: Mapping[str, Any]) -> dict[str, tuple[str, dict[str, str]]]:
    """diffusers block prefix -> (LDM block prefix, inner renames) for a UNet of this config.

    LDM numbers its blocks flat: input_blocks.0 is conv_in, then each level has `layers_per_block`
    (resnet, attention) pairs followed by a downsampler; output_blocks mirror it with one more layer
    per level, the upsampler sitting after the attention when there is one.
    """
    per_level = unet_config["layers_per_block"]
    levels = len(unet_config["block_out_channels"])
    m: dict[str, tuple[str, dict[str, str]]] = {
        "time_embedding.linear_1.": ("time_embed.0.", {}), "time_embedding.linear_2.": ("time_embed.2.", {}),
        "conv_in.": ("input_blocks.0.0.", {}), "conv_norm_out.": ("out.0.", {}), "conv_out.": ("out.2.", {}),
        "mid_block.resnets.0.": ("middle_block.0.", RESNET_TO_LDM),
        "mid_block.attentions.0.": ("middle_block.1.", {}),
        "mid_block.resnets.1.": ("middle_block.2.", RESNET_TO_LDM),
    }
    for level in range(levels):
        first = 1 + level * (per_level + 1)
        for j in range(per_level):
            m[f"down_blocks.{level}.resnets.{j}."] = (f"input_blocks.{first + j}.0.", RESNET_TO_LDM)
            m[f"down_blocks.{level}.attentions.{j}."] = (f"input_blocks.{first + j}.1.", {})
        if level < levels - 1:
            m[f"down_blocks.{level}.downsamplers.0.conv."] = (f"input_blocks.{first + per_level}.0.op.", {})
        first_up = level * (per_level + 1)
        for j in range(per_level + 1):
            m[f"up_blocks.{level}.resnets.{j}."] = (f"output_blocks.{first_up + j}.0.", RESNET_TO_LDM)
            m[f"up_blocks.{level}.attentions.{j}."] = (f"output_blocks.{first_up + j}.1.", {})
        if level < levels - 1:
            slot = 2 if "CrossAttn" in unet_config["up_block_types"][level] else 1
            m[f"up_blocks.{level}.upsamplers.0."] = (f"output_blocks.{first_up + per_level}.{slot}.", {})
    return m


def vae_block_map(vae_config: Mapping[str, Any]) -> dict[str, tuple[str, dict[str, str]]]:
    """diffusers VAE block prefix -> (LDM prefix, inner renames). LDM's decoder counts its levels from
    the bottom (up.0 is the last, full-resolution level)."""
    levels = len(vae_config["block_out_channels"])
    per_level = vae_config["layers_per_block"]
    m: dict[str, tuple[str, dict[str, str]]] = {
        "encoder.conv_norm_out.": ("encoder.norm_out.", {}), "decoder.conv_norm_out.": ("decoder.norm_out.", {}),
    }
    for part in ("encoder", "decoder"):
        for k in range(2):
            m[f"{part}.mid_block.resnets.{k}."] = (f"{part}.mid.block_{k + 1}.", VAE_RESNET_TO_LDM)
        m[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", VAE_ATTENTION_TO_LDM)
    for level in range(levels):
        for j in range(per_level):
            m[f"encoder.down_blocks.{level}.resnets.{j}."] = (f"encoder.down.{level}.block.{j}.", VAE_RESNET_TO_LDM)
        m[f"encoder.down_blocks.{level}.downsamplers.0."] = (f"encoder.down.{level}.downsample.", {})
        ldm_level = levels - 1 - level
        for j in range(per_level + 1):
            m[f"decoder.up_blocks.{level}.resnets.{j}."] = (f"decoder.up.{ldm_level}.block.{j}.", VAE_RESNET_TO_LDM)
        m[f"decoder.up_blocks.{level}.upsamplers.0."] = (f"decoder.up.{ldm_level}.upsample.", {})
    return m


def _rename(key: str, block_map: Mapping[str, tuple[str, dict[str, str]]]) -> str:
    parts = key.split(".")
    for n in range(min(len(parts) - 1, 6), 0, -1):  # longest matching block prefix wins
        prefix = ".".join(parts[:n]) + "."
        if prefix in block_map:
            ldm_prefix, inner = block_map[prefix]
            rest = key[len(prefix):]
            for old, new in inner.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            return ldm_prefix + rest
    return key  # same name in both layouts (encoder.conv_in, quant_conv, ...)


def unet_to_ldm(unet_state: Mapping[str, Tensor], unet_config: Mapping[str, Any]) -> dict[str, Tensor]:
    block_map = unet_block_map(unet_config)
    return {UNET_PREFIX + _rename(k, block_map): v for k, v in unet_state.items()}


def vae_to_ldm(vae_state: Mapping[str, Tensor], vae_config: Mapping[str, Any]) -> dict[str, Tensor]:
    block_map = vae_block_map(vae_config)
    out = {}
    for key, value in vae_state.items():
        if ".mid_block.attentions." in key and key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's VAE attention is made of 1x1 convolutions
        out[VAE_PREFIX + _rename(key, block_map)] = value
    return out


def text_encoder_to_ldm(text_state: Mapping[str, Tensor], family: Family) -> dict[str, Tensor]:
    text_state = {k.removeprefix("text_model."): v for k, v in text_state.items()}
    if family == "sd1":
        return {CLIP_PREFIX + k: v for k, v in text_state.items()}
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    for key, value in text_state.items():
        if key in OPENCLIP_TOP_TO_LDM:
            out[OPENCLIP_PREFIX + OPENCLIP_TOP_TO_LDM[key]] = value
            continue
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key)
        if m is None:
            raise ConversionError(f"text encoder key {key!r} has no place in the OpenCLIP layout")
        block, rest = f"{OPENCLIP_PREFIX}transformer.resblocks.{m.group(1)}.", m.group(2)
        proj = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if proj:  # OpenCLIP keeps q, k and v in one in_proj matrix
            qkv.setdefault(f"{block}attn.in_proj_{proj.group(2)}", {})[proj.group(1)] = value
            continue
        for old, new in OPENCLIP_LAYER_TO_LDM.items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
                break
        out[block + rest] = value
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def original_config_from_diffusers(
    family: Family, unet_config: Mapping[str, Any], vae_config: Mapping[str, Any],
    scheduler: Mapping[str, Any],
) -> dict[str, Any]:
    """The LDM yaml describing a diffusers model: the shipped yaml of its family, with every value the
    diffusers configs determine written in (so tiny or nonstandard models get a yaml that fits them)."""
    prediction: PredictionType = scheduler.get("prediction_type", "epsilon")
    stock = STOCK_CONFIGS.get((family, prediction)) or STOCK_CONFIGS[(family, "epsilon")]
    config = yaml.safe_load((REPO_ROOT / stock[0]).read_text())
    params = config["model"]["params"]
    if prediction == "v_prediction":
        params["parameterization"] = "v"
    else:
        params.pop("parameterization", None)
    params["linear_start"] = scheduler.get("beta_start", params["linear_start"])
    params["linear_end"] = scheduler.get("beta_end", params["linear_end"])
    params["timesteps"] = scheduler.get("num_train_timesteps", params["timesteps"])
    params["scale_factor"] = vae_config.get("scaling_factor", params["scale_factor"])

    unet = params["unet_config"]["params"]
    base = unet_config["block_out_channels"][0]
    unet["in_channels"] = unet_config["in_channels"]
    unet["out_channels"] = unet_config["out_channels"]
    unet["model_channels"] = base
    unet["channel_mult"] = [c // base for c in unet_config["block_out_channels"]]
    unet["num_res_blocks"] = unet_config["layers_per_block"]
    unet["attention_resolutions"] = sorted(  # the stock yamls list them coarsest first
        (2**i for i, t in enumerate(unet_config["down_block_types"]) if t.startswith("CrossAttn")), reverse=True)
    unet["context_dim"] = unet_config["cross_attention_dim"]
    depth = unet_config.get("transformer_layers_per_block", 1)
    unet["transformer_depth"] = depth
    heads = unet_config["attention_head_dim"]  # diffusers' name; it holds the number of heads
    if unet_config.get("use_linear_projection"):
        unet["use_linear_in_transformer"] = True
        unet.pop("num_heads", None)
        heads_list = heads if isinstance(heads, (list, tuple)) else [heads] * len(unet_config["block_out_channels"])
        unet["num_head_channels"] = unet_config["block_out_channels"][0] // heads_list[0]
    else:
        unet.pop("use_linear_in_transformer", None)
        unet.pop("num_head_channels", None)
        unet["num_heads"] = heads if isinstance(heads, int) else heads[0]

    dd = params["first_stage_config"]["params"]["ddconfig"]
    vbase = vae_config["block_out_channels"][0]
    dd["ch"] = vbase
    dd["ch_mult"] = [c // vbase for c in vae_config["block_out_channels"]]
    dd["num_res_blocks"] = vae_config["layers_per_block"]
    dd["z_channels"] = vae_config["latent_channels"]
    dd["in_channels"] = vae_config["in_channels"]
    dd["out_ch"] = vae_config["out_channels"]
    params["first_stage_config"]["params"]["embed_dim"] = vae_config["latent_channels"]
    return config


# ------------------------------------------------------------------------------------- validation

def check_against_model(name: str, converted: Mapping[str, Tensor], expected: Mapping[str, Tensor],
                        config_source: str) -> None:
    """The converted tensors must be exactly the parameters of the model the config builds."""
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong = [(k, tuple(converted[k].shape), tuple(expected[k].shape))
             for k in sorted(set(expected) & set(converted)) if converted[k].shape != expected[k].shape]
    if not (missing or unexpected or wrong):
        return
    details = []
    if wrong:
        details.append("shape mismatches: " + ", ".join(f"{k} is {a} in the checkpoint, {b} per the config"
                                                         for k, a, b in wrong[:3]))
    if missing:
        details.append(f"{len(missing)} weights the config needs are not in the checkpoint (e.g. {missing[0]})")
    if unexpected:
        details.append(f"{len(unexpected)} checkpoint weights have no place in the model (e.g. {unexpected[0]})")
    raise ConversionError(f"the {name} in the checkpoint does not match {config_source}: " + "; ".join(details)
                          + ". Use the yaml this checkpoint was made with.")


def _meta_model(kind: str, config: Mapping[str, Any]) -> torch.nn.Module:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        if kind == "unet":
            return UNet2DConditionModel.from_config(dict(config))
        if kind == "vae":
            return AutoencoderKL.from_config(dict(config))
        return CLIPTextModel(CLIPTextConfig(**config))


# ------------------------------------------------------------------------------------------ writing

@dataclass
class ConversionResult:
    """What `convert_checkpoint_file` found and did."""

    dump_path: Path
    family: Family
    prediction_type: PredictionType
    image_size: int
    upcast_attention: bool
    in_channels: int
    original_config: str
    evidence: list[str]
    notes: list[str]


def convert_checkpoint_file(
    checkpoint_path: str | os.PathLike,
    dump_path: str | os.PathLike,
    *,
    original_config: str | os.PathLike | None = None,
    prediction_type: str | None = None,
    image_size: int | None = None,
    upcast_attention: bool | None = None,
    num_in_channels: int | None = None,
    extract_ema: bool = False,
    half: bool = False,
    scheduler_type: str = "pndm",
    from_safetensors: bool | None = None,
) -> ConversionResult:
    """Convert an original SD1.x/SD2.x single file into a diffusers folder at `dump_path`, atomically.

    Without `original_config`, a sidecar `<file>.yaml` is used if present, else the shipped yaml that the
    weights call for. Every check runs before anything is written; the folder is assembled beside
    `dump_path` under a hidden temporary name and renamed into place at the end.
    """
    checkpoint_path, dump_path = Path(checkpoint_path), Path(dump_path)
    if dump_path.exists():
        raise ConversionError(f"{dump_path} already exists; remove it or choose another --dump_path")
    ckpt = load_checkpoint(checkpoint_path, from_safetensors)
    sidecar = sidecar_yaml_path(checkpoint_path)
    detected = detect_model(ckpt, sidecar if sidecar.is_file() else None)
    config_path = Path(original_config) if original_config is not None else None
    if config_path is None and sidecar.is_file():
        config_path = sidecar
    plan = plan_conversion(
        ckpt, detected, original_config_path=config_path, prediction_type=prediction_type,
        image_size=image_size, upcast_attention=upcast_attention, num_in_channels=num_in_channels,
        scheduler_type=scheduler_type,
    )
    state = ckpt.state
    config_source = plan.original_config_path.name if plan.original_config_path else "the yaml"

    # convert everything up front (views of the memory-mapped file, nothing copied yet) and check shapes
    unet = convert_unet(state, plan.unet_config, extract_ema)
    vae = convert_vae(state, plan.vae_config)
    text = convert_text_encoder(state, plan.family, plan.text_config)
    expected = {name: _meta_model(name, cfg) for name, cfg in
                (("unet", plan.unet_config), ("vae", plan.vae_config), ("text_encoder", plan.text_config))}
    text_expected = expected["text_encoder"].state_dict()
    # CLIP's position_ids buffer is not a parameter in current transformers: it goes to the extras
    if "embeddings.position_ids" not in text_expected:
        text.pop("embeddings.position_ids", None)
    check_against_model("UNet", unet, expected["unet"].state_dict(), config_source)
    check_against_model("VAE", vae, expected["vae"].state_dict(), config_source)
    check_against_model("text encoder", text, text_expected, f"the {TEXT_ENCODERS[plan.family].name} layout")

    extras, dropped = _leftovers(state, plan, unet, vae, text, extract_ema)
    if dropped:
        plan.notes.append(dropped)

    dump_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(dump_path) as tmp:  # appears whole at dump_path, or not at all
        dtype = torch.float16 if half else None
        _write_weights(tmp / "unet" / "diffusion_pytorch_model.safetensors", unet, dtype)
        expected["unet"].save_config(tmp / "unet")
        del unet
        _write_weights(tmp / "vae" / "diffusion_pytorch_model.safetensors", vae, dtype)
        expected["vae"].save_config(tmp / "vae")
        del vae
        _write_weights(tmp / "text_encoder" / "model.safetensors", text, dtype)
        text_cfg = expected["text_encoder"].config
        text_cfg.architectures = ["CLIPTextModel"]
        text_cfg.dtype = dtype or next(iter(text.values())).dtype
        text_cfg.save_pretrained(tmp / "text_encoder")
        del text
        if extras:
            _write_weights(tmp / EXTRAS_FILE, extras, None)
        from trainer.tokenizer import clip_tokenizer

        clip_tokenizer(TEXT_ENCODERS[plan.family].pad_token).save_pretrained(tmp / "tokenizer")
        scheduler = _scheduler_class(plan.scheduler_type).from_config(
            scheduler_config(plan.original_config, plan.prediction_type))
        scheduler.save_pretrained(tmp / "scheduler")
        _write_model_index(tmp, type(scheduler).__name__, inpainting=detected.in_channels == INPAINT_IN_CHANNELS)
    return ConversionResult(
        dump_path=dump_path, family=plan.family, prediction_type=plan.prediction_type,
        image_size=plan.image_size, upcast_attention=plan.upcast_attention,
        in_channels=plan.unet_config["in_channels"],
        original_config=str(plan.original_config_path), evidence=plan.evidence, notes=plan.notes,
    )


def _leftovers(state: Mapping[str, Tensor], plan: ConversionPlan, unet: Mapping[str, Tensor],
               vae: Mapping[str, Tensor], text: Mapping[str, Tensor], extract_ema: bool) -> tuple[dict[str, Tensor], str]:
    """Tensors of the original file the diffusers model has no place for (kept), and the second UNet
    copy (dropped: keeping it would double the folder for weights that are not trained)."""
    used = set(unet_to_ldm(unet, plan.unet_config)) | set(vae_to_ldm(vae, plan.vae_config))
    used |= set(text_encoder_to_ldm(text, plan.family))
    assert used <= set(state), sorted(used - set(state))[:5]  # the way back inverts the way there
    extras: dict[str, Tensor] = {}
    dropped = 0
    for key, value in state.items():
        if key in used:
            continue
        if key.startswith(EMA_PREFIX) and key not in ("model_ema.decay", "model_ema.num_updates"):
            dropped += 1
            continue
        extras[key] = value
    note = ""
    if dropped:
        which = "the non-EMA UNet was" if extract_ema else f"{dropped} EMA tensors (model_ema.*) were"
        note = (f"converted the {'EMA' if extract_ema else 'non-EMA'} UNet weights; {which} not kept"
                + ("" if extract_ema else " (add --extract_ema to convert the EMA weights instead)"))
    return extras, note


def _write_weights(path: Path, tensors: Mapping[str, Tensor], dtype: torch.dtype | None,
                   metadata: Mapping[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    for key, value in tensors.items():
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.contiguous()
    save_file(out, str(path), metadata={"format": "pt", **(metadata or {})})


def _write_model_index(folder: Path, scheduler_class: str, inpainting: bool) -> None:
    import diffusers

    index = {
        "_class_name": "StableDiffusionInpaintPipeline" if inpainting else "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- diffusers -> single file

@dataclass
class ExportResult:
    checkpoint_path: Path
    sidecar_yaml: Path | None
    family: Family
    prediction_type: PredictionType
    num_tensors: int


def family_of_diffusers(text_config: Mapping[str, Any]) -> Family:
    """SD2's text encoder is OpenCLIP (gelu); SD1's is OpenAI CLIP (quick_gelu)."""
    act = text_config.get("hidden_act")
    for family, spec in TEXT_ENCODERS.items():
        if spec.hidden_act == act:
            return family
    raise ConversionError(f"text encoder hidden_act {act!r} is neither quick_gelu (SD1) nor gelu (SD2)")


def diffusers_to_original(
    unet: Mapping[str, Tensor], unet_config: Mapping[str, Any],
    vae: Mapping[str, Tensor], vae_config: Mapping[str, Any],
    text: Mapping[str, Tensor], family: Family,
    extras: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """diffusers state dicts -> one original (LDM) state dict, plus any extras kept at conversion."""
    out = {**unet_to_ldm(unet, unet_config), **vae_to_ldm(vae, vae_config), **text_encoder_to_ldm(text, family)}
    for key, value in (extras or {}).items():
        out.setdefault(key, value)
    return out


def export_single_file(model_path: str | os.PathLike, checkpoint_path: str | os.PathLike, *,
                       half: bool = False) -> ExportResult:
    """Write a diffusers folder as one original-layout .safetensors (+ `<file>.yaml` for SD2), atomically."""
    from safetensors.torch import load_file

    model_path, checkpoint_path = Path(model_path), Path(checkpoint_path)
    if checkpoint_path.suffix != ".safetensors":
        raise ConversionError(f"{checkpoint_path} should end in .safetensors; only safetensors is written")
    files = {
        "unet": model_path / "unet" / "diffusion_pytorch_model.safetensors",
        "vae": model_path / "vae" / "diffusion_pytorch_model.safetensors",
        "text_encoder": model_path / "text_encoder" / "model.safetensors",
    }
    for name, f in files.items():
        if not f.is_file() or not (f.parent / "config.json").is_file():
            raise ConversionError(f"{model_path} is not a diffusers Stable Diffusion folder: {f} or its config.json "
                                  "is missing (models saved with safe_serialization=True are expected)")
    configs = {name: json.loads((f.parent / "config.json").read_text()) for name, f in files.items()}
    scheduler_file = model_path / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else {}
    family = family_of_diffusers(configs["text_encoder"])
    extras_file = model_path / EXTRAS_FILE
    state = diffusers_to_original(
        load_file(str(files["unet"])), configs["unet"], load_file(str(files["vae"])), configs["vae"],
        load_file(str(files["text_encoder"])), family,
        load_file(str(extras_file)) if extras_file.is_file() else None,
    )
    prediction: PredictionType = scheduler.get("prediction_type", "epsilon")
    ldm_yaml = original_config_from_diffusers(family, configs["unet"], configs["vae"], scheduler)
    stock_name = STOCK_CONFIGS.get((family, prediction), ("",))[0]
    is_stock = stock_name and yaml.safe_load((REPO_ROOT / stock_name).read_text()) == ldm_yaml
    # A1111 needs the yaml to know an SD2 model's parameterization; SD1 only when it is not the stock one
    write_sidecar = family == "sd2" or not is_stock

    checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = sidecar_yaml_path(checkpoint_path)
    with atomic_file(checkpoint_path) as weights:  # the file and its yaml appear whole, or not at all
        # the file states its own prediction type, as modelspec does
        _write_weights(weights, state, torch.float16 if half else None,
                       {"modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon"})
        if write_sidecar:
            with atomic_file(sidecar) as partial_yaml:
                if stock_name and is_stock:
                    shutil.copyfile(REPO_ROOT / stock_name, partial_yaml)  # the shipped yaml, comments and all
                else:
                    partial_yaml.write_text(yaml.safe_dump(ldm_yaml, sort_keys=False))
    return ExportResult(checkpoint_path, sidecar if write_sidecar else None, family, prediction, len(state))

