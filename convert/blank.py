"""An original single file of the real sizes without its real weights: the state dict of the model a yaml
describes, its tensors on the meta device (shapes only, no memory) or made by a `fill` (random ones).

For what needs a real-size file but not a real model: the conversion benchmark, and tests of what the converter
reads from shapes (the yaml that fits, the text encoder's depth). The way back (convert/to_original.py) lays the
tensors out, so the file has exactly the keys and shapes a real one has.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from convert.configs import text_encoder_config, unet_config_from_ldm, vae_config_from_ldm
from convert.tables import FAMILIES, Family
from convert.to_diffusers import meta_model
from convert.to_original import diffusers_to_original

IMAGE_SIZE = 512  # only the configs' sample sizes depend on it, never a tensor's shape


@dataclass
class BlankOriginal:
    configs: dict[str, dict[str, Any]]  # "unet", "vae", "text_encoder" -> the diffusers config it was built from
    state: dict[str, Tensor]  # the original-layout state dict


def blank_original(original_config: Mapping[str, Any], family: Family, *, layers_per_block: int | None = None,
                   fill: Callable[[Tensor], Tensor] | None = None) -> BlankOriginal:
    """The single file of the model `original_config` describes, with every block of the family's real text
    encoder (SD2's unused last one too, as real SD2 files hold it) and, if given, `layers_per_block` UNet layers
    per level. Each tensor is `fill(meta tensor)`, or the meta tensor itself."""
    spec = FAMILIES[family].text_encoder
    unet_config = unet_config_from_ldm(original_config, IMAGE_SIZE, False, None)
    if layers_per_block is not None:
        unet_config["layers_per_block"] = layers_per_block
    configs = {
        "unet": unet_config,
        "vae": vae_config_from_ldm(original_config, IMAGE_SIZE),
        "text_encoder": text_encoder_config(family, spec.width, spec.blocks, "last"),
    }
    tensors = {}
    for name, config in configs.items():
        meta = meta_model(name, config).state_dict()
        tensors[name] = {key: fill(value) for key, value in meta.items()} if fill else meta
    state = diffusers_to_original(tensors["unet"], configs["unet"], tensors["vae"], configs["vae"],
                                  tensors["text_encoder"], family)
    return BlankOriginal(configs, state)
