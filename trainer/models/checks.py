"""What can be known about a diffusers SD folder before any weight is read, and the refusals that follow.

Two kinds of checks, both cheap and run before `from_pretrained`:

* integrity: every json file the loaders read parses, and every weight file is whole. A safetensors file
  declares its own size (an 8-byte header length, a json header, the data offsets in it), so a cut-off
  download shows from the header alone; a torch zip shows from the zip directory at its end.
  `folder_damage` returns the first problem found as text (ckpt_cache/ decides from it whether to convert
  again); `check_model_folder` raises it as a UserError.
* architecture: small pure functions over the component configs that refuse what is not an SD1.x/2.x
  text-to-image model (SDXL, unconditional or inpainting UNets, components of different models), and a
  scheduler prediction type training cannot use.

Every problem text names the file, what was found and what was expected; callers add what to do where it
depends on where the folder came from. A single file's integrity is convert/read.py's, shared with the
converter; the components a folder has are convert/tables.py's. This module reads configs and file headers,
never a weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from common.files import read_json_object
from convert.read import TORCH_ZIP_MAGIC, safetensors_problem, torch_zip_problem
from convert.tables import (
    COMPONENT_NAMES,
    INPAINT_IN_CHANNELS,
    MODEL_COMPONENTS,
    WEIGHTED_COMPONENTS,
    PredictionType,
)
from trainer.errors import UserError
from trainer.models.hub import WEIGHT_FORMATS, WEIGHT_STEMS, pick_weights

CONFIG_FILES = {c.name: c.config for c in MODEL_COMPONENTS if c.config}  # the tokenizer's are optional
DAMAGED_FIX = ("The model folder is damaged (cut off while downloading or copying, or edited); copy, download or "
               "convert the model again.")
SDXL_CROSS_ATTENTION_DIM = 2048  # SDXL's two text encoders, concatenated
PREDICTION_TYPES = get_args(PredictionType)


# ------------------------------------------------------------------------------------------ integrity


def json_problem(path: Path) -> str | None:
    return read_json_object(path)[1]


def read_json(path: Path) -> dict:
    """A json object from a model folder, or a UserError saying the file is damaged."""
    data, problem = read_json_object(path)
    if problem is not None:
        raise UserError(f"{problem} {DAMAGED_FIX}")
    return data


def weight_file_problem(path: Path) -> str | None:
    if path.name.endswith(".json"):  # a shard index
        return json_problem(path)
    if path.suffix == ".safetensors":
        return safetensors_problem(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        return f"could not read {path}: {err.strerror or err}."
    return torch_zip_problem(path) if head == TORCH_ZIP_MAGIC else None  # a legacy pickle has no directory


def config_damage(model_dir: Path) -> str | None:
    """The first missing sub-folder, missing config or json file that does not parse, or None."""
    missing = [c for c in COMPONENT_NAMES if not (model_dir / c).is_dir()]
    if missing:
        return (f"{model_dir} lacks the sub-folder(s) {', '.join(missing)}; a Stable Diffusion diffusers folder has "
                f"{', '.join(COMPONENT_NAMES)}.")
    for component, name in CONFIG_FILES.items():
        if not (model_dir / component / name).is_file():
            return f"{model_dir / component} has no {name}; expected the {component}'s diffusers config there."
    index = model_dir / "model_index.json"
    jsons = [index] if index.is_file() else []
    jsons += [model_dir / c / n for c, n in CONFIG_FILES.items()] + sorted((model_dir / "tokenizer").glob("*.json"))
    return next((p for p in map(json_problem, jsons) if p is not None), None)


def weights_damage(model_dir: Path) -> str | None:
    """The first weight file (of those the loaders would read) that is missing or not whole, or None."""
    for component in WEIGHTED_COMPONENTS:
        folder = model_dir / component.name
        names = sorted(p.name for p in folder.iterdir() if p.is_file())
        files = pick_weights(names)
        if not files:
            wanted = ", ".join(f"{stem}{suffix}" for suffix in WEIGHT_FORMATS for stem in WEIGHT_STEMS)
            return (f"{folder} has no weights file; expected one of {wanted} (or a sharded index), found: "
                    f"{', '.join(names) or 'nothing'}.")
        problem = next((p for p in (weight_file_problem(folder / f) for f in files) if p is not None), None)
        if problem is not None:
            return problem
    return None


def folder_damage(model_dir: Path) -> str | None:
    """What makes `model_dir` unreadable as a diffusers SD folder (file damage, not architecture), or None."""
    return config_damage(model_dir) or weights_damage(model_dir)


# --------------------------------------------------------------------------------------- architecture


@dataclass(frozen=True)
class ModelConfigs:
    """A folder's parsed configs; `folder` only names the files in messages."""

    folder: Path
    unet: dict
    vae: dict
    text_encoder: dict
    scheduler: dict
    model_index: dict | None = None

    def file(self, component: str) -> Path:
        return self.folder / component / CONFIG_FILES[component]

    @property
    def scheduler_class(self) -> str:
        """The class name in model_index.json's ["diffusers", "<class>"] entry; DDIM without an index."""
        entry = (self.model_index or {}).get("scheduler", ["diffusers", "DDIMScheduler"])
        return entry[1] if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str) else repr(entry)


def read_model_configs(model_dir: Path) -> ModelConfigs:
    index = model_dir / "model_index.json"
    return ModelConfigs(
        model_dir, *(read_json(model_dir / c / n) for c, n in CONFIG_FILES.items()),
        model_index=read_json(index) if index.is_file() else None,
    )


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, list | tuple) else [value]


def unconditional_problem(c: ModelConfigs) -> str | None:
    unet = c.unet
    # a key left out means diffusers' default, which for UNet2DConditionModel has cross-attention
    blocks = [*_as_list(unet.get("down_block_types", ["CrossAttnDownBlock2D"])),
              unet.get("mid_block_type", "UNetMidBlock2DCrossAttn") or "", *_as_list(unet.get("up_block_types", []))]
    if unet.get("_class_name") != "UNet2DModel" and any("CrossAttn" in str(b) for b in blocks):
        return None
    kind = "a UNet2DModel" if unet.get("_class_name") == "UNet2DModel" else "a UNet without cross-attention blocks"
    return (f"{c.file('unet')} describes {kind} (blocks: {', '.join(map(str, filter(None, blocks)))}): an "
            "unconditional UNet, which cannot see the caption, so text-to-image training would not learn from "
            "it. Expected a UNet2DConditionModel with CrossAttn blocks, as SD1.x/2.x have; use an SD1.x/2.x "
            "text-to-image model.")


def component_class_problem(c: ModelConfigs) -> str | None:
    expected = {"unet": ("_class_name", "UNet2DConditionModel"), "vae": ("_class_name", "AutoencoderKL"),
                "text_encoder": ("model_type", "clip_text_model")}
    for component, (key, wanted) in expected.items():
        found = getattr(c, component).get(key)
        if found is not None and found != wanted:
            return (f"{c.file(component)} describes a {found} ({key}); SD1.x/2.x training expects {wanted} "
                    f"there. Use a Stable Diffusion 1.x/2.x model.")
    return None


def sdxl_problem(c: ModelConfigs) -> str | None:
    unet = c.unet
    signs = []
    if unet.get("addition_embed_type") == "text_time":
        signs.append('addition_embed_type "text_time"')
    if SDXL_CROSS_ATTENTION_DIM in _as_list(unet.get("cross_attention_dim")):
        signs.append(f"cross_attention_dim {SDXL_CROSS_ATTENTION_DIM}")
    layers = unet.get("transformer_layers_per_block", 1)
    flat = [n for item in _as_list(layers) for n in _as_list(item)]
    if any(isinstance(n, int) and n > 1 for n in flat):
        signs.append(f"transformer_layers_per_block {layers}")
    if not signs:
        return None
    return (f"{c.file('unet')} describes an SDXL UNet ({', '.join(signs)}); this trainer trains Stable Diffusion "
            "1.x and 2.x only. Use an SD1.x/2.x base model, or an SDXL trainer for this one.")


def extra_conditioning_problem(c: ModelConfigs) -> str | None:
    extras = {k: c.unet.get(k) for k in ("addition_embed_type", "class_embed_type", "num_class_embeds",
                                         "encoder_hid_dim")}
    found = {k: v for k, v in extras.items() if v is not None}
    if not found:
        return None
    listed = ", ".join(f"{k} {v!r}" for k, v in found.items())
    return (f"{c.file('unet')} has conditioning inputs that SD1.x/2.x UNets lack ({listed}); this trainer feeds "
            "the UNet only the caption's text embedding, so expected them all null. Use an SD1.x/2.x "
            "text-to-image model.")


def inpainting_problem(c: ModelConfigs) -> str | None:
    if c.unet.get("in_channels") != INPAINT_IN_CHANNELS:
        return None
    return (f"{c.file('unet')} has in_channels {INPAINT_IN_CHANNELS}: an inpainting UNet (4 latent + 4 masked-image "
            "+ 1 mask channels). Training inpainting models is not supported; use the text-to-image version of "
            "the model (in_channels 4).")


def latent_channels_problem(c: ModelConfigs) -> str | None:
    latent = c.vae.get("latent_channels", 4)
    unet_in, unet_out = c.unet.get("in_channels", 4), c.unet.get("out_channels", 4)
    if unet_in == latent and unet_out == latent:
        return None
    return (f"{c.file('unet')} has in_channels {unet_in} and out_channels {unet_out}, but the VAE "
            f"({c.file('vae')}) makes latents of latent_channels {latent}; expected all three equal (4 for "
            "SD1.x/2.x). The folder mixes components of different models: use the unet and vae of one model.")


def cross_attention_problem(c: ModelConfigs) -> str | None:
    # missing keys: the loaders' defaults (CLIPTextConfig 512, UNet2DConditionModel 1280)
    width = c.text_encoder.get("hidden_size", 512)
    dims = set(_as_list(c.unet.get("cross_attention_dim", 1280)))
    if dims == {width}:
        return None
    shown = dims.pop() if len(dims) == 1 else sorted(dims, key=str)
    return (f"{c.file('unet')} has cross_attention_dim {shown}, but the text encoder ({c.file('text_encoder')}) "
            f"has hidden_size {width}; expected them equal (768 for SD1.x, 1024 for SD2.x). The folder mixes "
            "components of different models: use the unet and text_encoder of one model.")


# In order: the first that applies is the clearest (an SDXL UNet also has the wrong cross-attention width).
ARCHITECTURE_CHECKS: tuple[Callable[[ModelConfigs], str | None], ...] = (
    unconditional_problem, component_class_problem, sdxl_problem, extra_conditioning_problem,
    inpainting_problem, latent_channels_problem, cross_attention_problem,
)


def architecture_problem(c: ModelConfigs) -> str | None:
    return next((p for p in (check(c) for check in ARCHITECTURE_CHECKS) if p is not None), None)


def prediction_type_problem(c: ModelConfigs, override: str | None) -> str | None:
    found = c.scheduler.get("prediction_type", "epsilon")
    if override is not None or found in PREDICTION_TYPES:
        return None
    return (f"{c.file('scheduler')} says prediction_type {found!r}; SD1.x/2.x training supports "
            f"{' and '.join(PREDICTION_TYPES)}. Set prediction_type in the config to the one the model was trained "
            "with.")


# ------------------------------------------------------------------------------------------ together


def check_model_folder(model_dir: Path, prediction_override: str | None = None) -> ModelConfigs:
    """Refuse a damaged or foreign model folder before any weight loads; returns its parsed configs.

    Order: configs parse, the architecture is SD1.x/2.x text-to-image, then the weight files are whole."""
    problem = config_damage(model_dir)
    if problem is not None:
        raise UserError(f"{problem} {DAMAGED_FIX}")
    configs = read_model_configs(model_dir)
    problem = architecture_problem(configs) or prediction_type_problem(configs, prediction_override)
    if problem is not None:
        raise UserError(problem)
    problem = weights_damage(model_dir)
    if problem is not None:
        raise UserError(f"{problem} {DAMAGED_FIX}")
    return configs
