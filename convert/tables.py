"""The small tables everything about Stable Diffusion 1.x/2.x files is read from, and the lookups over them.

* `FAMILIES`: what tells SD1.x from SD2.x wherever a model is met (a single file's text-encoder keys, a diffusers
  text encoder's activation, a yaml's text-encoder class) and each family's real text encoder;
* `STOCK_CONFIGS`: the shipped yaml of each (family, prediction type) with the image size that model was
  trained at;
* `MODEL_COMPONENTS`: the components a diffusers model folder has, with their config and weights files;
* the single-file key prefixes, prediction-type spellings and inference schedulers.

Data only; nothing here reads a file or loads a library.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from convert.errors import ConversionError

Family = Literal["sd1", "sd2"]
PredictionType = Literal["epsilon", "v_prediction"]

REPO_ROOT = Path(__file__).resolve().parents[1]  # the stock yamls ship at the repository root
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."  # SD1: a transformers CLIPTextModel
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD2: an open_clip text tower
EMA_PREFIX = "model_ema."
EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")  # not a UNet copy: kept with the extras
EXTRAS_FILE = "original_extras.safetensors"  # what a diffusers folder has no place for, kept for the way back
INPAINT_IN_CHANNELS = 9  # 4 noisy latents + 4 masked-image latents + 1 mask
CLIP_HEAD_WIDTH = 64  # both text encoders use 64-wide attention heads: heads = width / 64


@dataclass(frozen=True)
class TextEncoderSpec:
    """The real text encoder of a family; a file whose shapes differ is converted from its shapes."""

    name: str
    width: int
    blocks: int  # the architecture's depth (what the yaml's `layer` counts from)
    used_blocks: int  # SD2 reads OpenCLIP's penultimate layer, so its 24th block is never run
    hidden_act: str
    projection_dim: int
    pad_token: str


@dataclass(frozen=True)
class FamilySpec:
    title: str
    sentinel: str  # the token embedding: only this family's single files have this key
    text_blocks: str  # the prefix of its numbered text-encoder blocks in a single file
    yaml_text_encoder: str  # the class a yaml's cond_stage_config names
    inpainting_yaml: str
    text_encoder: TextEncoderSpec


# The text encoder tells the family: SD1 conditions on OpenAI CLIP ViT-L/14, SD2 on OpenCLIP ViT-H/14.
FAMILIES: dict[Family, FamilySpec] = {
    "sd1": FamilySpec(
        "SD1.x (CLIP ViT-L/14 text encoder)", CLIP_PREFIX + "embeddings.token_embedding.weight",
        CLIP_PREFIX + "encoder.layers.", "FrozenCLIPEmbedder", "v1-inpainting-inference.yaml",
        TextEncoderSpec("CLIP ViT-L/14", 768, 12, 12, "quick_gelu", 768, "<|endoftext|>"),
    ),
    "sd2": FamilySpec(
        "SD2.x (OpenCLIP ViT-H text encoder)", OPENCLIP_PREFIX + "token_embedding.weight",
        OPENCLIP_PREFIX + "transformer.resblocks.", "FrozenOpenCLIPEmbedder", "v2-inpainting-inference.yaml",
        # SD2's tokenizer pads with "!" (id 0), as the stabilityai/stable-diffusion-2* repos do
        TextEncoderSpec("OpenCLIP ViT-H/14", 1024, 24, 23, "gelu", 512, "!"),
    ),
}


class StockConfig(NamedTuple):
    yaml: str
    image_size: int


# The shipped yaml for each (family, prediction type), with the image size that model was trained at.
STOCK_CONFIGS: dict[tuple[Family, PredictionType], StockConfig] = {
    ("sd1", "epsilon"): StockConfig("v1-inference.yaml", 512),
    ("sd2", "epsilon"): StockConfig("v2-inference.yaml", 512),
    ("sd2", "v_prediction"): StockConfig("v2-inference-v.yaml", 768),
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

SCHEDULER_CLASSES = {
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}
SCHEDULER_TYPES = tuple(SCHEDULER_CLASSES)


@dataclass(frozen=True)
class Component:
    """One sub-folder of a diffusers Stable Diffusion folder."""

    name: str
    config: str | None  # its config file (the tokenizer has several, each optional)
    weights: str | None  # the weights file the converter writes; None for parts without weights


MODEL_COMPONENTS: tuple[Component, ...] = (
    Component("unet", "config.json", "diffusion_pytorch_model.safetensors"),
    Component("vae", "config.json", "diffusion_pytorch_model.safetensors"),
    Component("text_encoder", "config.json", "model.safetensors"),
    Component("tokenizer", None, None),
    Component("scheduler", "scheduler_config.json", None),
)
COMPONENT_NAMES = tuple(c.name for c in MODEL_COMPONENTS)
WEIGHTED_COMPONENTS = tuple(c for c in MODEL_COMPONENTS if c.weights)


# ---------------------------------------------------------------------------------------------- lookups


def stock_config_path(family: Family, prediction_type: PredictionType) -> Path:
    """The shipped yaml for a family and prediction type."""
    if (family, prediction_type) not in STOCK_CONFIGS:
        raise ConversionError(
            f"no shipped yaml for {FAMILIES[family].title} with {prediction_type}; pass an original config "
            "whose model.params.parameterization matches"
        )
    return REPO_ROOT / STOCK_CONFIGS[(family, prediction_type)].yaml


def original_config_name(family: Family, prediction_type: PredictionType) -> str:
    """The stock yaml that describes a model of this family (SD1 has one yaml for both prediction types)."""
    stock = STOCK_CONFIGS.get((family, prediction_type)) or STOCK_CONFIGS[(family, "epsilon")]
    return stock.yaml


def native_image_size(family: Family, prediction_type: PredictionType) -> int:
    return STOCK_CONFIGS.get((family, prediction_type), StockConfig("", 512)).image_size


def prediction_for_size(family: Family) -> dict[int, PredictionType]:
    """The native sizes that tell a family's prediction types apart (SD2: 512-base epsilon, 768-v v)."""
    return {stock.image_size: prediction for (fam, prediction), stock in STOCK_CONFIGS.items() if fam == family}


def parse_prediction_type(text: str) -> PredictionType | None:
    return PREDICTION_ALIASES.get(text.strip().lower())


def family_of_hidden_act(hidden_act: object) -> Family:
    """A diffusers text encoder's family: SD2's OpenCLIP uses gelu, SD1's OpenAI CLIP quick_gelu."""
    for family, spec in FAMILIES.items():
        if spec.text_encoder.hidden_act == hidden_act:
            return family
    raise ConversionError(f"text encoder hidden_act {hidden_act!r} is neither quick_gelu (SD1) nor gelu (SD2)")


def family_of_yaml_target(target: str) -> Family | None:
    """The family a yaml's cond_stage_config target names (`ldm.modules.encoders.modules.FrozenCLIPEmbedder`)."""
    name = target.rsplit(".", 1)[-1]
    return next((family for family, spec in FAMILIES.items() if spec.yaml_text_encoder == name), None)
