"""diffusers state dicts -> the original single-file (LDM/CompVis) layout AUTOMATIC1111 and ComfyUI load.

Pure functions of state dicts and configs: each diffusers block prefix maps to its LDM block prefix plus the
renames inside it (`unet_block_map`, `vae_block_map`); the VAE's attention becomes 1x1 convolutions and SD2's
text encoder OpenCLIP's fused q/k/v, as the original files hold them. The converter also uses this direction
to know which tensors of a file it placed (convert/to_diffusers.py `leftovers`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from convert.errors import ConversionError
from convert.tables import CLIP_PREFIX, OPENCLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, Family

BlockMap = dict[str, tuple[str, dict[str, str]]]  # diffusers block prefix -> (LDM block prefix, inner renames)

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


def unet_block_map(unet_config: Mapping[str, Any]) -> BlockMap:
    """diffusers block prefix -> (LDM block prefix, inner renames) for a UNet of this config.

    LDM numbers its blocks flat: input_blocks.0 is conv_in, then each level has `layers_per_block`
    (resnet, attention) pairs followed by a downsampler; output_blocks mirror it with one more layer
    per level, the upsampler sitting after the attention when there is one.
    """
    per_level = unet_config["layers_per_block"]
    levels = len(unet_config["block_out_channels"])
    m: BlockMap = {
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


def vae_block_map(vae_config: Mapping[str, Any]) -> BlockMap:
    """diffusers VAE block prefix -> (LDM prefix, inner renames). LDM's decoder counts its levels from
    the bottom (up.0 is the last, full-resolution level)."""
    levels = len(vae_config["block_out_channels"])
    per_level = vae_config["layers_per_block"]
    m: BlockMap = {
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


def _rename(key: str, block_map: BlockMap) -> str:
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
