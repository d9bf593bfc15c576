"""DoRA (`lora_kind dora`): peft's LoRA layers with a trained magnitude for each input column of the weight, the
decomposition Stable Diffusion's readers apply to a `dora_scale` of shape (1, in[, 1, 1]).

DoRA ([Liu et al. 2024](https://arxiv.org/abs/2402.09353)) trains a direction and a magnitude apart:

    W' = (W + dW) * m / ||W + dW||_c        dW: LoRA's update, ||.||_c: each input column's norm (over the outputs
                                            and the kernel), m: one trained magnitude per input column

with the norm held constant in backward (the paper's section 4.3). AUTOMATIC1111, Forge and ComfyUI merge a file's
`dora_scale` exactly so, and OneTrainer trains it so by default. peft's own DoRA takes each output row's norm
instead; ComfyUI reads such a file with the base's norm in place of the merged weight's, and AUTOMATIC1111 not at all
(measured, docs/LORA.md), so it is not used here.

Because W' x = (W + dW)(x * m / n), the layer is peft's LoRA layer applied to its input scaled per input channel:
a forward pre-hook scales it, and the magnitudes live on the LoRA layer as `dora_scale`, a parameter (fp32, trained)
in the file's shape. At the start m equals the base's norms, so the scale is exactly 1 and the outputs the base's.
"""

from __future__ import annotations

import torch

ADAPTER = "default"  # peft's adapter name (trainer/adapters/lora.py)
MAGNITUDE = "dora_scale"


def add_magnitudes(module: torch.nn.Module, paths: list[str]) -> None:
    """Give each peft LoRA layer at `paths` of `module` its magnitudes (the column norms of its weight with the
    adapter's current update: the base's for fresh adapters) and the hook that applies them."""
    for path in paths:
        layer = module.get_submodule(path)
        with torch.no_grad():
            start = column_norms(merged_weight(layer))
        setattr(layer, MAGNITUDE, torch.nn.ParameterDict({ADAPTER: torch.nn.Parameter(start)}))
        layer.register_forward_pre_hook(scale_input)


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """Each input column's norm, (1, in) for a Linear's weight, (1, in, 1, 1) for a convolution's."""
    return torch.linalg.vector_norm(weight, dim=[dim for dim in range(weight.dim()) if dim != 1], keepdim=True)


def merged_weight(layer: torch.nn.Module) -> torch.Tensor:
    """W + dW of a peft LoRA layer, in fp32."""
    return layer.get_base_layer().weight.float() + layer.get_delta_weight(ADAPTER).float()


def scale_input(layer: torch.nn.Module, args: tuple) -> tuple | None:
    """The LoRA layer's input times m / ||W + dW||_c, per input channel (the channels are the last dimension of a
    Linear's input, the second of a convolution's)."""
    if layer.disable_adapters or ADAPTER not in layer.active_adapters:
        return None
    x, *rest = args
    with torch.no_grad():
        norms = column_norms(merged_weight(layer))
    scale = getattr(layer, MAGNITUDE)[ADAPTER] / norms
    return (x * scale.reshape(-1) if x.dim() != 4 else x * scale).to(x.dtype), *rest


def merge_magnitudes(layer: torch.nn.Module) -> None:
    """W' into the base layer's weight of a LoRA layer whose update peft has merged already (W + dW there)."""
    base = layer.get_base_layer()
    merged = base.weight.detach().float()
    scale = getattr(layer, MAGNITUDE)[ADAPTER].detach().float() / column_norms(merged)
    base.weight.data = (merged * scale).to(base.weight.dtype)
