"""The UNet and VAE configuration that a single file's weights imply, read from the shapes of its tensors.

Used when no yaml fits the file (no sidecar, and the shipped yamls describe other sizes: pruned or distilled
variants, tiny test models), the way the text encoder's width and depth are read from its shapes. The result
is the family's shipped yaml with the values the weights determine written in, so everything the shapes
cannot tell (the noise schedule, the VAE scale factor) stays the family's:

* UNet: input and output channels, block widths (`model_channels`, `channel_mult`), layers per block, which
  levels have attention, the context width, linear or 1x1-conv projections, transformer depth;
* VAE: image and latent channels, block widths, layers per block;
* attention heads are not in the weights (they only split a width): the yaml's are kept when they divide the
  widths (SD1's 8 heads, SD2's 64-wide heads), else one head per block.

Only LDM's regular layout is read (the same layers in every level); anything else is refused with the name
of what was found, asking for the model's yaml.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from convert.errors import ConversionError
from convert.tables import CLIP_HEAD_WIDTH, UNET_PREFIX, VAE_PREFIX

if TYPE_CHECKING:
    from torch import Tensor

ASK_FOR_YAML = "pass the model's yaml (--original_config_file, or <file>.yaml beside it)"


def block_indices(keys: Iterable[str], prefix: str) -> list[int]:
    """The numbers N of the `<prefix>N.` blocks among `keys`, sorted."""
    found = {k[len(prefix):].split(".", 1)[0] for k in keys if k.startswith(prefix)}
    return sorted(int(n) for n in found if n.isdigit())


def original_config_from_shapes(state: Mapping[str, Tensor], base: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """`base` (the family's shipped yaml) with the UNet and VAE values of the weights written in, and the
    attention heads that were assumed, in words."""
    config = copy.deepcopy(dict(base))
    params = config["model"]["params"]
    unet = {k[len(UNET_PREFIX):]: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    vae = {k[len(VAE_PREFIX):]: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    heads = _write_unet_params(params["unet_config"]["params"], unet)
    _write_vae_params(params["first_stage_config"]["params"], vae)
    return config, heads


# ------------------------------------------------------------------------------------------------ UNet


def _unet_levels(unet: Mapping[str, Tensor]) -> list[list[tuple[int, bool]]]:
    """Per resolution level, its (width, has attention) layers: LDM's input_blocks.0 is conv_in, then each
    level's ResBlock (+ SpatialTransformer) layers, a downsampler between levels."""
    levels: list[list[tuple[int, bool]]] = [[]]
    for i in block_indices(unet, "input_blocks.")[1:]:
        block = f"input_blocks.{i}."
        if block + "0.op.weight" in unet:
            levels.append([])
        elif block + "0.out_layers.3.weight" in unet:
            levels[-1].append((int(unet[block + "0.out_layers.3.weight"].shape[0]), block + "1.proj_in.weight" in unet))
        else:
            raise ConversionError(f"cannot read the UNet's layout from its weights: {UNET_PREFIX}{block}* is neither "
                                  f"a ResBlock nor a downsampler; {ASK_FOR_YAML}")
    return levels


def _uniform(values: list, what: str) -> Any:
    if len(set(values)) != 1:
        raise ConversionError(f"cannot read the configuration from the weights' shapes: {what} differ ({values}), "
                              f"which an LDM yaml cannot describe; {ASK_FOR_YAML}")
    return values[0]


def _write_unet_params(params: dict[str, Any], unet: Mapping[str, Tensor]) -> str:
    model_channels, in_channels = (int(n) for n in unet["input_blocks.0.0.weight"].shape[:2])
    levels = _unet_levels(unet)
    layers = _uniform([len(level) for level in levels], "the layers per level")
    widths = [_uniform([w for w, _ in level], f"the widths within level {n}") for n, level in enumerate(levels)]
    attention = [_uniform([a for _, a in level], f"attention within level {n}") for n, level in enumerate(levels)]
    if any(w % model_channels for w in widths):
        raise ConversionError(f"cannot read the UNet configuration from the weights' shapes: block widths {widths} "
                              f"are not multiples of the first, {model_channels}; {ASK_FOR_YAML}")
    first_attention = next((k[: -len("proj_in.weight")] for k in sorted(unet) if k.endswith(".1.proj_in.weight")), None)
    if first_attention is None:
        raise ConversionError(f"cannot read the UNet configuration from the weights' shapes: it has no "
                              f"SpatialTransformer (proj_in) blocks; {ASK_FOR_YAML}")
    params.update(
        in_channels=in_channels,
        out_channels=int(unet["out.2.weight"].shape[0]),
        model_channels=model_channels,
        channel_mult=[w // model_channels for w in widths],
        num_res_blocks=layers,
        attention_resolutions=[2**n for n, has in enumerate(attention) if has],
        context_dim=int(unet[first_attention + "transformer_blocks.0.attn2.to_k.weight"].shape[1]),
        use_linear_in_transformer=unet[first_attention + "proj_in.weight"].ndim == 2,
        transformer_depth=len(block_indices(unet, first_attention + "transformer_blocks.")),
    )
    return _write_heads(params, widths)


def _write_heads(params: dict[str, Any], widths: list[int]) -> str:
    """Attention heads only split a width, so the weights cannot tell them: keep the yaml's when they fit."""
    if params["use_linear_in_transformer"]:  # SD2: a head width, the same at every level
        head_width = params.get("num_head_channels", CLIP_HEAD_WIDTH)
        if head_width <= 0 or any(w % head_width for w in widths):
            head_width = widths[0]
        params.pop("num_heads", None)
        params["num_head_channels"] = head_width
        return f"{head_width}-wide attention heads assumed (the weights do not hold the head count)"
    heads = params.get("num_heads", 8)  # SD1: a head count, the same at every level
    if heads <= 0 or any(w % heads for w in widths):
        heads = 1
    params.pop("num_head_channels", None)
    params["num_heads"] = heads
    return f"{heads} attention heads per block assumed (the weights do not hold the head count)"


# ------------------------------------------------------------------------------------------------- VAE


def _write_vae_params(first_stage: dict[str, Any], vae: Mapping[str, Tensor]) -> None:
    ch, in_channels = (int(n) for n in vae["encoder.conv_in.weight"].shape[:2])
    levels = block_indices(vae, "encoder.down.")
    layers = _uniform([len(block_indices(vae, f"encoder.down.{n}.block.")) for n in levels], "the VAE layers per level")
    widths = [int(vae[f"encoder.down.{n}.block.{layers - 1}.conv2.weight"].shape[0]) for n in levels]
    if any(w % ch for w in widths):
        raise ConversionError(f"cannot read the VAE configuration from the weights' shapes: block widths {widths} "
                              f"are not multiples of the first, {ch}; {ASK_FOR_YAML}")
    z_channels = int(vae["decoder.conv_in.weight"].shape[1])
    first_stage["ddconfig"].update(
        ch=ch,
        ch_mult=[w // ch for w in widths],
        num_res_blocks=layers,
        in_channels=in_channels,
        out_ch=int(vae["decoder.conv_out.weight"].shape[0]),
        z_channels=z_channels,
        double_z=int(vae["encoder.conv_out.weight"].shape[0]) == 2 * z_channels,
    )
    first_stage["embed_dim"] = int(vae["quant_conv.weight"].shape[0]) // 2  # mean and log-variance
