"""What a training step's forward pass keeps for backward, measured on the real architecture without computing it.

The UNet (and the text encoder, when trained) is built from its config on PyTorch's `meta` device, where tensors
have shapes and dtypes but no data, and one forward runs under `saved_tensors_hooks`: every tensor autograd keeps
for backward passes through the hook, so the bytes are the model's own, op by op, for any config, batch and
resolution, in about a second and no memory. Two things differ from a real GPU step and are emulated:
- mixed precision: the meta device has no autocast, so `_Autocast` casts the inputs of the ops CUDA's autocast
  runs in half precision (matmuls, convolutions, attention) and of those it runs in fp32 (norms, softmax), as
  autocast does; the half copies of trained weights are then kept for backward, as they are on a GPU;
- attention: SDPA on a GPU runs a flash/memory-efficient kernel that keeps q, k, v, the output and a per-row
  log-sum-exp, never the attention matrix. `_FlashAttention` keeps exactly those. `deterministic` runs PyTorch's
  plain ("math") kernel on a GPU instead (trainer/run/repeatable.py): it computes in fp32 and keeps each attention
  matrix, and the meta device runs that very kernel, so the trace with `plain_attention` lets SDPA run as it is.

Each saved tensor is recorded with the position of the op that first saved it, and whether it lies inside a
region gradient checkpointing recomputes (a UNet ResnetBlock2D or BasicTransformerBlock, a CLIP encoder layer, as
diffusers and transformers checkpoint them), and each op with the bytes of the gradients its backward makes (of
its output and of its inputs), so trainer/preflight/memory.py can replay the backward pass's peak with and without
checkpointing. Imports torch, diffusers and transformers: only the memory plan calls it.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from convert.tokenizer import CLIP_MAX_LENGTH as CONTEXT_TOKENS  # the prompt's token count

HALF_OPS = {F.linear, F.conv2d, torch.matmul, torch.bmm, torch.baddbmm, torch.mm, torch.addmm, torch.Tensor.matmul,
            torch.Tensor.__matmul__}  # CUDA autocast's lower-precision list, as SD's modules call it
FP32_OPS = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax}  # autocast's fp32 list
REGION_CLASSES = ("ResnetBlock2D", "BasicTransformerBlock", "CLIPEncoderLayer")  # what checkpointing recomputes


@dataclass
class SavedTensor:
    nbytes: int
    first_op: int  # the position of the first op that saved it
    region: int | None  # index into ActivationProfile.regions, or None outside checkpointed regions
    per_sample: bool  # False for half copies of weights, which do not grow with the batch


@dataclass
class ActivationProfile:
    """One forward pass of batch 1, as autograd sees it."""

    saved: list[SavedTensor] = field(default_factory=list)
    regions: list[tuple[int, int]] = field(default_factory=list)  # (first op, last op) of each checkpointed region
    region_inputs: list[tuple[int, int, int]] = field(default_factory=list)  # (region, nbytes, op), per sample
    params_last_use: list[tuple[int, int]] = field(default_factory=list)  # (op, numel) of each trained parameter
    ops: int = 0
    weight_copies: int = 0  # bytes of every half copy of a weight: autocast's cache holds them all to the end
    # the plain attention kernel's: (op, bytes of its fp32 attention matrices per sample); its backward briefly
    # holds two more of them (the gradients of the probabilities and of the scores) beside the one it kept
    attention_matrices: list[tuple[int, int]] = field(default_factory=list)
    gradient_work: list[tuple[int, int]] = field(default_factory=list)  # (op, bytes per sample of the gradients
    # of its output and of its non-weight inputs): they live for a moment while backward is at that op


class _FlashAttention(torch.autograd.Function):
    """SDPA as a GPU flash kernel: output and log-sum-exp, with q, k, v, output and lse kept for backward."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: the trace is forward only
        raise NotImplementedError


def _grad_bytes(value) -> int:
    """The bytes of the gradient backward makes for `value` (a tensor, or a tuple of them), 0 where it needs none."""
    if isinstance(value, (tuple, list)):
        return sum(_grad_bytes(v) for v in value)
    if isinstance(value, torch.Tensor) and value.requires_grad and value.is_floating_point():
        return value.numel() * value.element_size()
    return 0


class _Tracer(TorchFunctionMode):
    """Autocast emulation, flash attention (or the plain kernel), and bookkeeping of which op runs and which trained
    weight it reads."""

    def __init__(self, half: torch.dtype | None, profile: ActivationProfile, trained: set[int], plain: bool):
        super().__init__()
        self.half, self.profile, self.trained, self.plain = half, profile, trained, plain
        self.weight_copies: dict[int, torch.Tensor] = {}  # the half copies of weights, by storage
        self.last_use: dict[int, tuple[int, int]] = {}  # id(param) -> (op, numel)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.profile.ops += 1
        op = self.profile.ops
        for arg in [*args, *kwargs.values()]:
            if isinstance(arg, torch.nn.Parameter) and id(arg) in self.trained:
                self.last_use[id(arg)] = (self.profile.ops, arg.numel())
        result = self._run(func, args, kwargs)
        grads = _grad_bytes(result) + sum(_grad_bytes(a) for a in args if not isinstance(a, torch.nn.Parameter))
        if grads:
            self.profile.gradient_work.append((op, grads))
        return result

    def _run(self, func, args, kwargs):
        if func is F.scaled_dot_product_attention:
            q, k, v = (self._cast(a, self.half) for a in args[:3])
            if not self.plain:
                return _FlashAttention.apply(q, k, v)
            self.profile.attention_matrices.append((self.profile.ops, q.shape[:-1].numel() * k.shape[-2] * 4))
            return func(q, k, v, *args[3:], **kwargs)
        if self.half is not None and func in HALF_OPS:
            args = tuple(self._cast(a, self.half) for a in args)
        elif self.half is not None and func in FP32_OPS:
            args = tuple(self._cast(a, torch.float32) for a in args)
        return func(*args, **kwargs)

    def _cast(self, value, dtype):
        if (dtype is None or not isinstance(value, torch.Tensor) or not value.is_floating_point()
                or value.dtype == dtype):
            return value
        cast = value.to(dtype)
        if isinstance(value, torch.nn.Parameter):  # kept, as autocast's cache keeps it, so no address is reused
            self.weight_copies[_storage_key(cast)] = cast
        return cast


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


class _Recorder:
    """The saved-tensor hooks and the region markers of one trace."""

    def __init__(self, profile: ActivationProfile, tracer: _Tracer, params: set[int]):
        self.profile, self.tracer, self.params = profile, tracer, params
        self.seen: dict[int, SavedTensor] = {}
        self.keep: list[torch.Tensor] = []  # alive until the trace ends, so no storage address is reused
        self.region: int | None = None

    def pack(self, tensor: torch.Tensor):
        key = _storage_key(tensor)
        if key not in self.seen and key not in self.params:  # a trained or frozen weight itself is no activation
            self.keep.append(tensor)
            saved = SavedTensor(tensor.untyped_storage().nbytes(), self.profile.ops, self.region,
                                per_sample=key not in self.tracer.weight_copies)
            self.seen[key] = saved
            self.profile.saved.append(saved)
        return tensor

    def enter(self, module, args):
        self.profile.regions.append((self.profile.ops, self.profile.ops))
        self.region = len(self.profile.regions) - 1
        kept = {_storage_key(a): a for a in args if isinstance(a, torch.Tensor) and a.requires_grad}
        for key, tensor in kept.items():  # checkpointing keeps a region's inputs to recompute it
            self.profile.region_inputs.append((self.region, tensor.untyped_storage().nbytes(), self.profile.ops))

    def leave(self, module, args, output):
        start, _ = self.profile.regions[self.region]
        self.profile.regions[self.region] = (start, self.profile.ops)
        self.region = None


def trace(unet_config: dict, text_encoder_config: dict | None, resolution: int, precision: str,
          plain_attention: bool = False) -> ActivationProfile:
    """The activation profile of one training forward at batch 1: the UNet at `resolution` (pixels), and the text
    encoder first when `text_encoder_config` is given (it is trained). `precision`: no, fp16 or bf16. Attention
    runs as a GPU's flash kernel, or with `plain_attention` as PyTorch's math kernel (`deterministic` on a GPU)."""
    configs = json.dumps([unet_config, text_encoder_config], sort_keys=True, default=str)
    return _trace(configs, resolution, precision, plain_attention)


@functools.lru_cache(maxsize=16)  # the plan's advice re-plans the same model many times
def _trace(configs: str, resolution: int, precision: str, plain_attention: bool) -> ActivationProfile:
    unet, text_encoder = meta_models(*json.loads(configs))
    half = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    trained = [*unet.parameters(), *(text_encoder.parameters() if text_encoder is not None else [])]
    profile = ActivationProfile()
    tracer = _Tracer(half, profile, {id(p) for p in trained}, plain_attention)
    weights = {_storage_key(p) for m in (unet, text_encoder) if m is not None for p in m.parameters()}
    recorder = _Recorder(profile, tracer, weights)
    hooks = [m.register_forward_pre_hook(recorder.enter) for m in _regions(unet, text_encoder)]
    hooks += [m.register_forward_hook(recorder.leave) for m in _regions(unet, text_encoder)]
    latent = resolution // 8
    try:
        with torch.autograd.graph.saved_tensors_hooks(recorder.pack, lambda t: t), tracer:
            states = _context(text_encoder, unet)
            noisy = torch.empty(1, unet.config.in_channels, latent, latent, device="meta")
            prediction = unet(noisy, torch.zeros(1, dtype=torch.long, device="meta"), states).sample
            F.mse_loss(prediction.float(), torch.empty_like(prediction, dtype=torch.float32))
    finally:
        for hook in hooks:
            hook.remove()
    profile.params_last_use = list(tracer.last_use.values())
    profile.weight_copies = sum(copy.untyped_storage().nbytes() for copy in tracer.weight_copies.values())
    return profile


def _regions(*modules) -> list[torch.nn.Module]:
    return [m for module in modules if module is not None for m in module.modules()
            if type(m).__name__ in REGION_CLASSES]


def _context(text_encoder, unet) -> torch.Tensor:
    """The text encoder's hidden states when it is trained (traced), else a frozen embedding of the right size."""
    if text_encoder is None:
        return torch.empty(1, CONTEXT_TOKENS, unet.config.cross_attention_dim, device="meta")
    tokens = torch.zeros(1, CONTEXT_TOKENS, dtype=torch.long, device="meta")
    return text_encoder(tokens)[0]


@dataclass(frozen=True)
class AdaptedLayer:
    weight: int  # elements of the layer's weight
    input: int  # elements of its input, per sample
    region: int | None  # which checkpointed region holds it (None: outside every one)


def adapted_layers(unet_config: dict, text_encoder_config: dict | None, resolution: int,
                   targets: str) -> list[AdaptedLayer]:
    """The sizes of the layers `targets` (a lora_targets setting) adapts in the UNet, and in the text encoder when its
    config is given, from one forward at batch 1 on the meta device: what an adapter kind that keeps a layer-sized
    tensor for backward adds (the memory plan)."""
    from trainer.adapters.lora import target_paths

    unet, text_encoder = meta_models(unet_config, text_encoder_config)
    models = {"unet": unet, **({"text_encoder": text_encoder} if text_encoder is not None else {})}
    paths = {name: target_paths(module, name, targets) for name, module in models.items()}
    regions = {id(m): index for index, m in enumerate(_regions(unet, text_encoder))}
    region_of = {id(sub): regions[id(m)] for m in _regions(unet, text_encoder) for sub in m.modules()}
    inputs: dict[int, int] = {}
    hooks = [models[name].get_submodule(path).register_forward_pre_hook(
        lambda module, args: inputs.__setitem__(id(module), args[0].numel()))
        for name in paths for path in paths[name]]
    try:
        with torch.no_grad():
            states = _context(text_encoder, unet)
            noisy = torch.empty(1, unet.config.in_channels, resolution // 8, resolution // 8, device="meta")
            unet(noisy, torch.zeros(1, dtype=torch.long, device="meta"), states)
    finally:
        for hook in hooks:
            hook.remove()
    layers = [models[name].get_submodule(path) for name in paths for path in paths[name]]
    return [AdaptedLayer(layer.weight.numel(), inputs.get(id(layer), 0), region_of.get(id(layer))) for layer in layers]


def meta_models(unet_config: dict, text_encoder_config: dict | None):
    """The UNet (and text encoder) of these configs on the meta device: shapes and no memory."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config).train()
        text_encoder = None
        if text_encoder_config is not None:
            text_encoder = CLIPTextModel(CLIPTextConfig(**text_encoder_config)).train()
    unet.set_attn_processor(_sdpa_processor())
    return unet, text_encoder


def _sdpa_processor():
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()
