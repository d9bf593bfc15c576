"""Resolve `resume_ckpt` to a diffusers model folder and load it as one typed bundle.

Resolution follows explicit rules, in order, each with its own error:
  1. an existing local diffusers folder;
  2. a name in ckpt_cache/ ("my_model" -> ckpt_cache/my_model; "ckpt_cache/my_model" works too).
Nothing is tried silently: when no rule matches, the error lists what was looked at.
The training loop only ever sees `SDModels`, never a file format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import diffusers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextModel, CLIPTokenizer

from trainer.errors import UserError

CKPT_CACHE = Path("ckpt_cache")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
ORIGINAL_CONFIGS = {  # (family, prediction_type) -> the original inference yaml of that family
    ("sd1", "epsilon"): "v1-inference.yaml",
    ("sd1", "v_prediction"): "v1-inference.yaml",
    ("sd2", "epsilon"): "v2-inference.yaml",
    ("sd2", "v_prediction"): "v2-inference-v.yaml",
}

Family = Literal["sd1", "sd2"]
PredictionType = Literal["epsilon", "v_prediction"]


@dataclass(frozen=True)
class ModelInfo:
    """What the model is, read from its configs; logged at start and saved with the run."""

    path: str
    family: Family
    prediction_type: PredictionType
    upcast_attention: bool
    native_resolution: int
    original_config: str

    def describe(self) -> str:
        return (
            f"{self.family.upper()} model at {self.path}: prediction type {self.prediction_type}, "
            f"native resolution {self.native_resolution}, upcast attention {'on' if self.upcast_attention else 'off'}, "
            f"original config {self.original_config}"
        )


@dataclass
class SDModels:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler  # training: adds noise, defines the target
    sample_scheduler: SchedulerMixin  # the model's own inference scheduler, saved with it unchanged
    info: ModelInfo


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (
        (path / "model_index.json").is_file() or all((path / c).is_dir() for c in ("unet", "vae", "text_encoder"))
    )


def resolve_model_dir(resume_ckpt: str, cache_dir: Path = CKPT_CACHE) -> Path:
    """The diffusers folder that `resume_ckpt` names, by the rules in this module's docstring."""
    given = Path(resume_ckpt).expanduser()
    if is_diffusers_folder(given):
        return given
    cached = cache_dir / given
    if is_diffusers_folder(cached):
        return cached
    tried = [f"a diffusers folder at {given.resolve()}", f"a name in {cache_dir}/: {cached.resolve()}"]
    hint = ""
    if given.is_dir():
        hint = (
            f"\n{given} exists but is not a diffusers model: it needs model_index.json or unet/, vae/ and "
            "text_encoder/ sub-folders."
        )
    elif given.suffix in (".ckpt", ".safetensors"):
        hint = (
            "\nTo train on a single .ckpt/.safetensors file, convert it once with "
            "utils/convert_original_stable_diffusion_to_diffusers.py --dump_path ckpt_cache/<name> "
            "(see docs/BASEMODELS.md), then pass --resume_ckpt <name>."
        )
    elif "/" in resume_ckpt and not given.exists():
        hint = (
            "\nHugging Face repo ids are not downloaded by this version; download the model's diffusers folder "
            "and pass its path."
        )
    raise UserError(
        f"resume_ckpt {resume_ckpt!r} was not found. Looked for:\n  - " + "\n  - ".join(tried) + hint
    )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"could not read {path}: {err}. The model folder looks damaged; convert or download it again.")


def _load_sample_scheduler(model_dir: Path) -> SchedulerMixin:
    """The scheduler class named in model_index.json (DDIM, PNDM, ...), with the folder's settings."""
    index = model_dir / "model_index.json"
    class_name = _read_json(index)["scheduler"][1] if index.is_file() else "DDIMScheduler"
    scheduler_class = getattr(diffusers, class_name, None)
    if scheduler_class is None:
        raise UserError(f"{index} names scheduler class {class_name!r}, which diffusers {diffusers.__version__} lacks.")
    return scheduler_class.from_pretrained(model_dir, subfolder="scheduler")


def describe_model(model_dir: Path, unet: UNet2DConditionModel, vae: AutoencoderKL, scheduler: SchedulerMixin) -> ModelInfo:
    # SD2's UNet uses linear projections in its transformer blocks; SD1's use 1x1 convs. This holds for every
    # SD2 fine-tune, and for our tiny models, where widths (768 vs 1024) would not tell.
    family: Family = "sd2" if unet.config.use_linear_projection else "sd1"
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise UserError(
            f"{model_dir}/scheduler says prediction_type {prediction_type!r}; SD1/SD2 training supports "
            "'epsilon' and 'v_prediction'."
        )
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return ModelInfo(
        path=str(model_dir.resolve()),
        family=family,
        prediction_type=prediction_type,
        upcast_attention=bool(unet.config.upcast_attention),
        native_resolution=int(unet.config.sample_size) * vae_scale,
        original_config=ORIGINAL_CONFIGS[(family, prediction_type)],
    )


def load_model_dir(model_dir: Path) -> SDModels:
    """Load every component of a diffusers SD folder in fp32 (the trainer casts for mixed precision)."""
    missing = [c for c in COMPONENTS if not (model_dir / c).is_dir()]
    if missing:
        raise UserError(
            f"{model_dir} lacks the sub-folder(s) {', '.join(missing)}; a Stable Diffusion diffusers folder has "
            f"{', '.join(COMPONENTS)}. Convert or download the model again."
        )
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    sample_scheduler = _load_sample_scheduler(model_dir)
    # Training always uses DDPM's forward process with the model's own betas and prediction type.
    noise_scheduler = DDPMScheduler.from_config(sample_scheduler.config)
    info = describe_model(model_dir, unet, vae, sample_scheduler)
    return SDModels(unet, vae, text_encoder, tokenizer, noise_scheduler, sample_scheduler, info)


def load_models(resume_ckpt: str) -> SDModels:
    return load_model_dir(resolve_model_dir(resume_ckpt))
