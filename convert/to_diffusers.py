"""Original (LDM/CompVis) state dict -> diffusers state dicts for unet, vae and text_encoder, as pure functions.

UNet, VAE and text-encoder tensors go through diffusers' own `single_file_utils` building blocks, so the result
is what diffusers itself produces; every result is a view of the input (nothing copied until it is written).
`check_against_model` holds the result against the model its config builds (on the meta device, no memory),
and `leftovers` splits what the diffusers layout has no place for into extras kept for the way back and the
second UNet copy that is dropped.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from convert.errors import ConversionError
from convert.tables import CLIP_PREFIX, EMA_BOOKKEEPING, EMA_PREFIX, FAMILIES, OPENCLIP_PREFIX, VAE_PREFIX, Family
from convert.to_original import text_encoder_to_ldm, unet_to_ldm, vae_to_ldm


@dataclass
class DiffusersParts:
    """A converted file: each component's state dict with the (meta) model it fits, whose config is written."""

    tensors: dict[str, dict[str, Tensor]]  # "unet", "vae", "text_encoder" -> state dict
    models: dict[str, torch.nn.Module]
    extras: dict[str, Tensor]  # what the diffusers layout has no place for, kept for the way back
    dropped: str  # a note on the second UNet copy left out, or ""


def convert_state(state: Mapping[str, Tensor], family: Family, configs: Mapping[str, Mapping[str, Any]],
                  extract_ema: bool, config_source: str) -> DiffusersParts:
    """Every component of an original state dict, checked against the models `configs` build ("unet", "vae",
    "text_encoder"); tensors are views of `state`, nothing is copied yet."""
    tensors = {
        "unet": convert_unet(state, configs["unet"], extract_ema),
        "vae": convert_vae(state, configs["vae"]),
        "text_encoder": convert_text_encoder(state, family, configs["text_encoder"]),
    }
    models = {name: meta_model(name, config) for name, config in configs.items()}
    expected = {name: model.state_dict() for name, model in models.items()}
    # CLIP's position_ids buffer is not a parameter in current transformers: it goes to the extras
    if "embeddings.position_ids" not in expected["text_encoder"]:
        tensors["text_encoder"].pop("embeddings.position_ids", None)
    check_against_model("UNet", tensors["unet"], expected["unet"], config_source)
    check_against_model("VAE", tensors["vae"], expected["vae"], config_source)
    check_against_model("text encoder", tensors["text_encoder"], expected["text_encoder"],
                        f"the {FAMILIES[family].text_encoder.name} layout")
    extras, dropped = leftovers(state, family, tensors["unet"], configs["unet"], tensors["vae"], configs["vae"],
                                tensors["text_encoder"], extract_ema)
    return DiffusersParts(tensors, models, extras, dropped)


def convert_unet(state: Mapping[str, Tensor], unet_config: Mapping[str, Any],
                 extract_ema: bool = False) -> dict[str, Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    logging.getLogger("diffusers.loaders.single_file_utils").setLevel(logging.ERROR)
    return convert_ldm_unet_checkpoint(state, dict(unet_config), extract_ema=extract_ema)


def convert_vae(state: Mapping[str, Tensor], vae_config: Mapping[str, Any]) -> dict[str, Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae_state = {k: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    return convert_ldm_vae_checkpoint(vae_state, dict(vae_config))


def convert_text_encoder(state: Mapping[str, Tensor], family: Family,
                         text_config: Mapping[str, Any]) -> dict[str, Tensor]:
    """Original text encoder -> transformers CLIPTextModel keys (without the `text_model.` prefix that
    transformers >= 5.6 no longer uses). Blocks beyond the config's layers (the one a `penultimate` yaml never
    runs) are left out: they stay in the original file's extras."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    if family == "sd1":
        converted = convert_ldm_clip_checkpoint({k: v for k, v in state.items() if k.startswith(CLIP_PREFIX)})
    else:
        text_state = {k: v for k, v in state.items() if k.startswith(OPENCLIP_PREFIX)}
        width_holder = SimpleNamespace(config=SimpleNamespace(hidden_size=text_config["hidden_size"]))
        converted = convert_open_clip_checkpoint(width_holder, text_state, prefix=OPENCLIP_PREFIX)
    layers = text_config["num_hidden_layers"]
    return {k.removeprefix("text_model."): v for k, v in converted.items()
            if (index := _layer_index(k)) is None or index < layers}


def _layer_index(key: str) -> int | None:
    m = re.search(r"encoder\.layers\.(\d+)\.", key)
    return int(m.group(1)) if m else None


# ------------------------------------------------------------------------------------- validation


def meta_model(kind: str, config: Mapping[str, Any]) -> torch.nn.Module:
    """The diffusers/transformers model a config builds, on the meta device (shapes only, no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        if kind == "unet":
            return UNet2DConditionModel.from_config(dict(config))
        if kind == "vae":
            return AutoencoderKL.from_config(dict(config))
        return CLIPTextModel(CLIPTextConfig(**config))


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


# -------------------------------------------------------------------------------------- leftovers


def leftovers(state: Mapping[str, Tensor], family: Family, unet: Mapping[str, Tensor], unet_config: Mapping[str, Any],
              vae: Mapping[str, Tensor], vae_config: Mapping[str, Any], text: Mapping[str, Tensor],
              extract_ema: bool) -> tuple[dict[str, Tensor], str]:
    """Tensors of the original file the diffusers model has no place for (kept, so the way back gives the same
    file), and a note on the second UNet copy (dropped: keeping it would double the folder for weights that
    are not trained)."""
    used = {*unet_to_ldm(unet, unet_config), *vae_to_ldm(vae, vae_config), *text_encoder_to_ldm(text, family)}
    assert used <= set(state), sorted(used - set(state))[:5]  # the way back inverts the way there
    extras = {k: v for k, v in state.items()
              if k not in used and (not k.startswith(EMA_PREFIX) or k in EMA_BOOKKEEPING)}
    dropped = len(state) - len(used) - len(extras)
    if not dropped:
        return extras, ""
    which = "the non-EMA UNet was" if extract_ema else f"{dropped} EMA tensors (model_ema.*) were"
    return extras, (f"converted the {'EMA' if extract_ema else 'non-EMA'} UNet weights; {which} not kept"
                    + ("" if extract_ema else " (add --extract_ema to convert the EMA weights instead)"))
