"""The plain-loop rows of bench/gpu/bench_gpu.py: random-weight models built from the real configs, one training step
taken as the trainer takes it, its speed and peak memory, and the memory plan's prediction beside them.

A step, as the trainer does it: bf16 autocast over fp32 master weights; frozen parts (the VAE, and the text encoder
when frozen) held in bf16; epsilon (SD1.5) or v (SD2.1) MSE; the optimizer on every trained parameter, or one
optimizer per parameter stepped inside backward (`fused_backward`, trainer/optim/fused_backward.py).
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[2]
GiB = 2**30
PRECISION = "bf16"  # the table is bf16 only; every H100/H200-class GPU has it
COMPUTE_DTYPE = torch.bfloat16
LR = 1e-6
TOKENS = 77  # CLIP's context
VOCAB = 49408


def first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


# ---------------------------------------------------------------------------------------------- the models


@dataclass(frozen=True)
class ModelSpec:
    label: str
    yaml: str  # the shipped original config the UNet and VAE configs are read from
    resolution: int  # pixels (the dry run uses dry_resolution)
    dry_resolution: int
    upcast_attention: bool
    family: str  # trainer/convert's family name: its text encoder's kind
    text_width: int
    text_layers: int  # layers the model uses (SD2 runs OpenCLIP-H's first 23 of 24)
    prediction: str


SPECS = {
    "sd15": ModelSpec("SD1.5", "v1-inference.yaml", 512, 64, False, "sd1", 768, 12, "epsilon"),
    "sd21v": ModelSpec("SD2.1-v", "v2-inference-v.yaml", 768, 128, True, "sd2", 1024, 23, "v_prediction"),
}


@dataclass
class Parts:
    """One model's parts on the device, and the configs they were built from (what the memory plan reads)."""

    key: str
    spec: ModelSpec
    resolution: int
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object  # DDPMScheduler: the forward process of the loss
    unet_config: dict
    text_encoder_config: dict


def real_configs(spec: ModelSpec) -> tuple[dict, dict, dict]:
    """(UNet, VAE, text encoder) diffusers/transformers configs of the real model, as the converter makes them."""
    from convert.configs import text_encoder_config, unet_config_from_ldm, vae_config_from_ldm
    from convert.read import load_original_config

    original = load_original_config(REPO_ROOT / spec.yaml)
    unet = unet_config_from_ldm(original, spec.resolution, spec.upcast_attention, None)
    vae = vae_config_from_ldm(original, spec.resolution)
    return dict(unet), dict(vae), text_encoder_config(spec.family, spec.text_width, spec.text_layers)


def tiny_configs(spec: ModelSpec) -> tuple[dict, dict, dict]:
    """The real configs shrunk for the CPU self-check: same block types, flags and head layout, narrow and shallow."""
    unet, vae, text = real_configs(spec)
    per_level = isinstance(unet["attention_head_dim"], (list, tuple))  # SD2 lists heads per level
    unet.update(block_out_channels=(32, 32, 64, 64), layers_per_block=1, cross_attention_dim=64,
                attention_head_dim=(1, 1, 2, 2) if per_level else 2, sample_size=spec.dry_resolution // 8)
    vae.update(block_out_channels=(32, 32, 64, 64), layers_per_block=1, sample_size=spec.dry_resolution)
    text.update(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1, projection_dim=64)
    return unet, vae, text


def build_parts(key: str, device: torch.device, dry: bool) -> Parts:
    """Random-weight models built directly on the device (initialising 1.2 G parameters on a CPU takes long)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from trainer.tiny.model import SD_BETAS

    spec = SPECS[key]
    unet_config, vae_config, text_config = (tiny_configs if dry else real_configs)(spec)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_config)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
        vae = AutoencoderKL.from_config(vae_config)
    vae.to(COMPUTE_DTYPE).requires_grad_(False).eval()  # frozen: held in the compute precision, as the trainer does
    scheduler = DDPMScheduler(**SD_BETAS, prediction_type=spec.prediction)
    return Parts(key, spec, spec.dry_resolution if dry else spec.resolution, unet, text_encoder, vae, scheduler,
                 unet_config, text_config)


# ---------------------------------------------------------------------------------------------- one row


@dataclass(frozen=True)
class Case:
    model: str  # a key of SPECS
    batch: int
    optimizer: str = "adamw"  # adamw (fused kernel) or adamw8bit (bitsandbytes)
    checkpointing: bool = False
    train_text_encoder: bool = False
    vae_in_step: bool = False  # False: cached latents (random latents are the inputs, no VAE call)
    fused_backward: bool = False  # one optimizer per parameter, stepped inside backward


def sd15(batch: int, optimizer: str = "adamw", checkpointing: bool = False, text: bool = False,
         vae: bool = False) -> Case:
    return Case("sd15", batch, optimizer, checkpointing, text, vae)


GOAL_SPEED_CASE = sd15(8)
PAIR_CASE = sd15(4)  # UNet only, cached latents, no checkpointing
FULL_FINETUNE_CASE = sd15(1, "adamw8bit", checkpointing=True, text=True)
FUSED_FULL_FINETUNE_CASE = dataclasses.replace(FULL_FINETUNE_CASE, fused_backward=True)


@dataclass
class Result:
    samples_per_s: float | None = None
    step_s: float | None = None
    peak_gib: float | None = None
    reserved_gib: float | None = None
    plan: str = "n/a"
    vs_bare: float | None = None
    note: str = ""


class Device:
    """Synchronisation and peak memory; on the CPU (--dry) memory is not measured."""

    def __init__(self, dry: bool):
        self.torch = torch.device("cpu" if dry else "cuda")
        self.cuda = not dry

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> tuple[int, int]:
        """Frees what is cached, starts a new peak; returns the (allocated, reserved) bytes it starts from."""
        gc.collect()
        if not self.cuda:
            return 0, 0
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated(), torch.cuda.memory_reserved()

    def peak_gib(self, base: tuple[int, int] = (0, 0)) -> tuple[float | None, float | None]:
        """(allocated, reserved) peak GiB since reset_peak, less `base` (memory that is not this row's)."""
        if not self.cuda:
            return None, None
        return ((torch.cuda.max_memory_allocated() - base[0]) / GiB,
                (torch.cuda.max_memory_reserved() - base[1]) / GiB)


def set_up(parts: Parts, case: Case) -> list[torch.nn.Parameter]:
    """Trained and frozen parts as the trainer holds them for `case`; returns the trained parameters."""
    parts.unet.train().requires_grad_(True)
    if case.checkpointing:
        parts.unet.enable_gradient_checkpointing()
    else:
        parts.unet.disable_gradient_checkpointing()
    text_encoder = parts.text_encoder
    if case.train_text_encoder:
        text_encoder.to(torch.float32).train().requires_grad_(True)  # trained: fp32 masters
    else:
        text_encoder.to(COMPUTE_DTYPE).eval().requires_grad_(False)  # frozen: the compute precision
    if case.train_text_encoder and case.checkpointing:
        text_encoder.activation_checkpointing_enable()  # the trainer's call (transformers 5)
    elif getattr(text_encoder, "is_activation_checkpointing", False):
        text_encoder.activation_checkpointing_disable()
    return [*parts.unet.parameters(), *(text_encoder.parameters() if case.train_text_encoder else [])]


def optimizer_factory(name: str) -> Callable[[list[dict]], torch.optim.Optimizer]:
    """Builds `name` over parameter groups: torch's fused AdamW (one kernel for all parameters, CUDA and CPU),
    or bitsandbytes' 8-bit AdamW."""
    if name == "adamw8bit":
        import bitsandbytes

        return lambda groups: bitsandbytes.optim.AdamW8bit(groups)
    return lambda groups: torch.optim.AdamW(groups, fused=True)


def make_optimizer(case: Case, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """`case`'s optimizer over `params`; with fused_backward, the trainer's own per-parameter one, whose hooks step
    each parameter as backward finishes its gradient (its step and zero_grad then have nothing left to do)."""
    make, groups = optimizer_factory(case.optimizer), [{"params": params, "lr": LR}]
    if not case.fused_backward:
        return make(groups)
    from trainer.optim.fused_backward import FusedBackwardOptimizer

    return FusedBackwardOptimizer(groups, make)


def eight_bit_problem(device: Device) -> str | None:
    """Why bitsandbytes' 8-bit AdamW cannot run here, or None: imported and stepped once on a probe."""
    try:
        import bitsandbytes

        probe = torch.nn.Parameter(torch.zeros(4096, device=device.torch))
        probe.grad = torch.ones_like(probe)
        bitsandbytes.optim.AdamW8bit([probe]).step()
        return None
    except Exception as err:  # a missing wheel, or a native library that does not fit this CUDA
        return f"{type(err).__name__}: {first_line(err)}"[:200]


def make_step(parts: Parts, case: Case, optimizer: torch.optim.Optimizer, device: Device) -> Callable[[], None]:
    """One plain training step of `case` as a closure over fixed random inputs (what a cached-latent loader
    yields; pixels for the VAE row)."""
    batch, size = case.batch, parts.resolution
    input_ids = torch.randint(0, VOCAB, (batch, TOKENS), device=device.torch)
    if case.vae_in_step:
        pixels = torch.rand(batch, 3, size, size, device=device.torch, dtype=COMPUTE_DTYPE) * 2 - 1
    else:
        cached = torch.randn(batch, parts.unet.config.in_channels, size // 8, size // 8, device=device.torch)
    scaling = parts.vae.config.scaling_factor

    def step() -> None:
        if case.vae_in_step:
            with torch.no_grad():
                latents = parts.vae.encode(pixels).latent_dist.sample().float() * scaling
        else:
            latents = cached
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (batch,), device=device.torch)
        noisy = parts.scheduler.add_noise(latents, noise, timesteps)
        epsilon = parts.spec.prediction == "epsilon"
        target = noise if epsilon else parts.scheduler.get_velocity(latents, noise, timesteps)
        with torch.autocast(device.torch.type, dtype=COMPUTE_DTYPE):
            with torch.set_grad_enabled(case.train_text_encoder):
                states = parts.text_encoder(input_ids)[0]
            prediction = parts.unet(noisy, timesteps, states).sample
        F.mse_loss(prediction.float(), target.float()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(step: Callable[[], None], warmup: int, steps: int, device: Device) -> float:
    """Seconds per step: the mean over `steps` steps after `warmup` (first calls, allocations, autotuning)."""
    for _ in range(warmup):
        step()
    device.sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    device.sync()
    return (time.perf_counter() - start) / steps


def run_case(parts: Parts, case: Case, warmup: int, steps: int, device: Device) -> Result:
    """One row of the plain loop: speed and peak memory of `case`."""
    from trainer.optim.fused_backward import FusedBackwardOptimizer

    params = set_up(parts, case)
    device.reset_peak()  # after set_up: the text encoder's dtype change is no part of a step
    optimizer = make_optimizer(case, params)
    try:
        seconds = timed(make_step(parts, case, optimizer, device), warmup, steps, device)
        peak, reserved = device.peak_gib()  # the row's own weights count: a run holds them too
        return Result(case.batch / seconds, seconds, peak, reserved)
    finally:
        if isinstance(optimizer, FusedBackwardOptimizer):
            optimizer.remove_hooks()  # the parts serve the next rows: their backward must step nothing of this one
        del optimizer
        for p in params:
            p.grad = None
        device.reset_peak()


def predicted_peak(parts: Parts, case: Case) -> str:
    """The memory plan's peak for `case` in GiB (trainer/preflight/memory.py; like torch's allocator statistics, without
    the CUDA context), from the configs the parts were built from."""
    from trainer.preflight.memory import predict_peak_gib

    gib = predict_peak_gib(dict(parts.unet_config), dict(parts.text_encoder_config), batch=case.batch,
                           resolution=parts.resolution, precision=PRECISION, optimizer=case.optimizer,
                           gradient_checkpointing=case.checkpointing, train_text_encoder=case.train_text_encoder,
                           cached_latents=not case.vae_in_step, fused_backward=case.fused_backward,
                           vae_params=sum(p.numel() for p in parts.vae.parameters()))
    return f"{gib:.2f}"
