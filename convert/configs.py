"""Configurations: an LDM yaml (given, shipped, or read from the weights' shapes) -> diffusers configs, and back.

* what a yaml says about the model: family, prediction type, the text-encoder layer it reads;
* UNet and VAE configs through diffusers' own `create_*_diffusers_config_from_ldm`, so they are what diffusers
  itself builds; the text encoder's from the family's real encoder and the tensor shapes; the noise schedule;
* `fitting_original_config`: the shipped yaml when the weights have its shapes, else the same yaml with the
  shapes of the weights written in (convert/shapes.py), and the differences that decided it;
* the way back: the LDM yaml that describes a diffusers model, so tiny or nonstandard models get one that fits.

Pure functions over dicts; nothing here reads tensors' values.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from convert import shapes
from convert.errors import ConversionError
from convert.read import load_original_config
from convert.tables import (
    CLIP_HEAD_WIDTH,
    FAMILIES,
    PREDICTION_ALIASES,
    REPO_ROOT,
    SCHEDULER_CLASSES,
    SCHEDULER_TYPES,
    Family,
    PredictionType,
    TextEncoderSpec,
    family_of_yaml_target,
    original_config_name,
)

if TYPE_CHECKING:
    from torch import Tensor

# The diffusers config keys that decide the shapes of the weights (heads, sizes and flags do not).
UNET_SHAPE_KEYS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "down_block_types",
                   "up_block_types", "cross_attention_dim", "use_linear_projection", "transformer_layers_per_block")
VAE_SHAPE_KEYS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels")


# ------------------------------------------------------------------------------- what a yaml says


def yaml_prediction_type(original_config: Mapping[str, Any]) -> PredictionType:
    # LDM's default parameterization is "eps"
    raw = str(original_config["model"]["params"].get("parameterization", "eps"))
    if raw not in PREDICTION_ALIASES:
        raise ConversionError(f'yaml parameterization "{raw}" is not supported; expected "eps" or "v"')
    return PREDICTION_ALIASES[raw]


def _text_encoder_params(original_config: Mapping[str, Any]) -> Mapping[str, Any]:
    return original_config["model"]["params"].get("cond_stage_config") or {}


def yaml_family(original_config: Mapping[str, Any]) -> Family | None:
    return family_of_yaml_target(str(_text_encoder_params(original_config).get("target", "")))


def yaml_text_layer(original_config: Mapping[str, Any]) -> str | None:
    """The text-encoder output the model reads: OpenCLIP's "last" or "penultimate" layer (SD2 yamls say)."""
    layer = (_text_encoder_params(original_config).get("params") or {}).get("layer")
    return layer if layer in ("last", "penultimate") else None


# ------------------------------------------------------------------------------------ yaml -> diffusers


def unet_config_from_ldm(
    original_config: Mapping[str, Any], image_size: int, upcast_attention: bool, num_in_channels: int | None
) -> dict[str, Any]:
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    with warnings.catch_warnings():  # diffusers deprecates these arguments for from_single_file only
        warnings.simplefilter("ignore", FutureWarning)
        return create_unet_diffusers_config_from_ldm(
            original_config, {}, image_size=image_size, upcast_attention=upcast_attention,
            num_in_channels=num_in_channels,
        )


def vae_config_from_ldm(original_config: Mapping[str, Any], image_size: int) -> dict[str, Any]:
    from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return create_vae_diffusers_config_from_ldm(original_config, {}, image_size=image_size)


def is_real_text_encoder(spec: TextEncoderSpec, width: int, blocks: int) -> bool:
    """Whether a file holds the family's real text encoder: its width, with all its blocks or only the ones the
    family runs (OpenCLIP ViT-H has 24 blocks whether a file holds all 24 or only the 23 SD2 runs)."""
    return width == spec.width and blocks in (spec.blocks, spec.used_blocks)


def text_encoder_layers(spec: TextEncoderSpec, width: int, blocks: int, layer: str | None) -> int:
    """How many of the file's `blocks` text-encoder blocks the model runs (and diffusers keeps).

    A yaml's `layer: penultimate` (SD2's) means the architecture's last block is never run; `last` runs them
    all. The architecture is the family's real encoder when the file holds it, else the file's own blocks (a
    1024-wide encoder of 12 blocks is no ViT-H). When no yaml says, the real encoder drops its unused blocks and
    any other keeps them all: files written from a diffusers model (ours, diffusers') hold only the blocks that
    are used.
    """
    real = is_real_text_encoder(spec, width, blocks)
    depth = spec.blocks if real else blocks
    if layer == "penultimate":
        return depth - 1
    if layer == "last":
        return depth
    return spec.used_blocks if real else blocks


def text_encoder_config(family: Family, width: int, blocks: int, layer: str | None = None) -> dict[str, Any]:
    """CLIPTextConfig kwargs: the family's real encoder, with width and depth read from the shapes."""
    spec = FAMILIES[family].text_encoder
    if width % CLIP_HEAD_WIDTH:
        raise ConversionError(f"text encoder width {width} is not a multiple of the {CLIP_HEAD_WIDTH}-wide "
                              "CLIP heads; expected 768 (SD1) or 1024 (SD2)")
    return dict(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=text_encoder_layers(spec, width, blocks, layer),
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


def scheduler_class(scheduler_type: str) -> type:
    """The diffusers class of a `--scheduler_type`; refused before anything is written when the package it needs
    is missing (diffusers then hands out a placeholder that fails only when the scheduler is built)."""
    import importlib.util

    import diffusers
    from diffusers.utils import DummyObject

    if scheduler_type not in SCHEDULER_CLASSES:
        raise ConversionError(
            f"unknown scheduler type {scheduler_type!r}; expected one of {', '.join(SCHEDULER_TYPES)}"
        )
    found = getattr(diffusers, SCHEDULER_CLASSES[scheduler_type])
    if isinstance(found, DummyObject):
        backends = list(found._backends)
        missing = [name for name in backends if importlib.util.find_spec(name) is None] or backends
        raise ConversionError(
            f"--scheduler_type {scheduler_type} ({found.__name__}) needs {', '.join(missing)}, which is not "
            "installed; install the pinned packages with pip install -r requirements.txt, or choose another "
            "--scheduler_type such as ddim"
        )
    return found


# ------------------------------------------------------------------------------- the yaml that fits


def shape_differences(config: Mapping[str, Any], reference: Mapping[str, Any], reference_name: str) -> list[str]:
    """Where two LDM yamls build UNets or VAEs with differently shaped weights, each as 'UNet key ours (name:
    theirs)'."""
    found = []
    for part, to_diffusers, keys in (("UNet", lambda c: unet_config_from_ldm(c, 512, False, None), UNET_SHAPE_KEYS),
                                     ("VAE", lambda c: vae_config_from_ldm(c, 512), VAE_SHAPE_KEYS)):
        ours, theirs = to_diffusers(config), to_diffusers(reference)
        found += [f"{part} {key} {_plain(ours.get(key))} ({reference_name}: {_plain(theirs.get(key))})"
                  for key in keys if _plain(ours.get(key)) != _plain(theirs.get(key))]
    return found


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def fitting_original_config(state: Mapping[str, Tensor], stock_path: Path) -> tuple[dict[str, Any], list[str], str]:
    """The shipped yaml at `stock_path` if the weights have its shapes, else that yaml with the UNet and VAE
    values the weights' shapes determine written in. Returns the config, the differences (none when the
    shipped yaml fits) and, when the shapes were read, the attention heads assumed (the weights do not hold
    them)."""
    stock = load_original_config(stock_path)
    from_shapes, heads = shapes.original_config_from_shapes(state, stock)
    differences = shape_differences(from_shapes, stock, stock_path.name)
    return (from_shapes, differences, heads) if differences else (stock, [], "")


# ------------------------------------------------------------------------------------ diffusers -> yaml


def original_config_from_diffusers(
    family: Family, unet_config: Mapping[str, Any], vae_config: Mapping[str, Any],
    scheduler: Mapping[str, Any], text_layer: str | None = None,
) -> dict[str, Any]:
    """The LDM yaml describing a diffusers model: the shipped yaml of its family, with every value the
    diffusers configs determine written in (so tiny or nonstandard models get a yaml that fits them).
    `text_layer` ("last" or "penultimate") replaces the text-encoder layer the shipped yaml reads."""
    prediction: PredictionType = scheduler.get("prediction_type", "epsilon")
    config = yaml.safe_load((REPO_ROOT / original_config_name(family, prediction)).read_text())
    params = config["model"]["params"]
    if prediction == "v_prediction":
        params["parameterization"] = "v"
    else:
        params.pop("parameterization", None)
    params["linear_start"] = scheduler.get("beta_start", params["linear_start"])
    params["linear_end"] = scheduler.get("beta_end", params["linear_end"])
    params["timesteps"] = scheduler.get("num_train_timesteps", params["timesteps"])
    params["scale_factor"] = vae_config.get("scaling_factor", params["scale_factor"])
    if text_layer is not None:
        params["cond_stage_config"].setdefault("params", {})["layer"] = text_layer
    _write_unet_params(params["unet_config"]["params"], unet_config)
    _write_vae_params(params["first_stage_config"]["params"], vae_config)
    return config


def _write_unet_params(unet: dict[str, Any], unet_config: Mapping[str, Any]) -> None:
    base = unet_config["block_out_channels"][0]
    unet["in_channels"] = unet_config["in_channels"]
    unet["out_channels"] = unet_config["out_channels"]
    unet["model_channels"] = base
    unet["channel_mult"] = [c // base for c in unet_config["block_out_channels"]]
    unet["num_res_blocks"] = unet_config["layers_per_block"]
    unet["attention_resolutions"] = sorted(  # the stock yamls list them coarsest first
        (2**i for i, t in enumerate(unet_config["down_block_types"]) if t.startswith("CrossAttn")), reverse=True)
    unet["context_dim"] = unet_config["cross_attention_dim"]
    unet["transformer_depth"] = unet_config.get("transformer_layers_per_block", 1)
    heads = unet_config["attention_head_dim"]  # diffusers' name; it holds the number of heads
    if unet_config.get("use_linear_projection"):
        unet["use_linear_in_transformer"] = True
        unet.pop("num_heads", None)
        heads_list = heads if isinstance(heads, (list, tuple)) else [heads] * len(unet_config["block_out_channels"])
        unet["num_head_channels"] = base // heads_list[0]
    else:
        unet.pop("use_linear_in_transformer", None)
        unet.pop("num_head_channels", None)
        unet["num_heads"] = heads if isinstance(heads, int) else heads[0]


def _write_vae_params(first_stage: dict[str, Any], vae_config: Mapping[str, Any]) -> None:
    dd = first_stage["ddconfig"]
    base = vae_config["block_out_channels"][0]
    dd["ch"] = base
    dd["ch_mult"] = [c // base for c in vae_config["block_out_channels"]]
    dd["num_res_blocks"] = vae_config["layers_per_block"]
    dd["z_channels"] = vae_config["latent_channels"]
    dd["in_channels"] = vae_config["in_channels"]
    dd["out_ch"] = vae_config["out_channels"]
    first_stage["embed_dim"] = vae_config["latent_channels"]
