"""The objective's random draws and noise schedule: noise (offset, pyramid), timesteps, each row's own generator,
and zero terminal SNR.

Random numbers are drawn on the CPU (runs repeat on any device) and reach a GPU without making the host wait
(`to_device`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import TypeAlias

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

# One generator for the whole batch, or one per row (the trainer's choice: see row_generators).
Generators: TypeAlias = torch.Generator | Sequence[torch.Generator] | None


def row_generators(seeds: Iterable[int]) -> list[torch.Generator]:
    """One CPU generator per batch row, from the row's own seed (data/schedule.py's `Draw.seed`, which the data
    set passes on). A sample then gets the same noise and timestep whichever batch, batch size or process it
    lands in: a 2-process run with batch b draws exactly what a 1-process run with batch 2b draws, and a resumed
    run what the uninterrupted one did. The seed is hashed first: the latent cache already samples the VAE
    posterior from `Draw.seed` itself, and torch's CPU generator keeps only a seed's low 32 bits."""
    return [torch.Generator().manual_seed(_noise_seed(int(seed))) for seed in seeds]


def _noise_seed(seed: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/noise".encode(), digest_size=8).digest(), "little") >> 1


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`. A plain copy to a GPU makes the host wait for everything queued before it (torch
    synchronises the stream after a pageable copy), which would cost a host sync each step; from pinned memory
    the copy is queued like a kernel, and torch keeps the pinned buffer until the copy has run."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def randn(shape: Sequence[int], generator: Generators) -> torch.Tensor:
    """Standard normal noise; with one generator per row, row i is drawn from generator i alone."""
    if isinstance(generator, Sequence):
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in generator])
    return torch.randn(tuple(shape), generator=generator)


def offset_noise(shape: torch.Size, ratio: float, generator: Generators) -> torch.Tensor:
    """Unit noise plus `ratio` x a per-channel constant (Guttenberg 2023, "Diffusion with Offset Noise"):
    lets the model change an image's mean brightness, which plain noise barely ever asks of it."""
    noise = randn(shape, generator)
    if ratio:
        noise = noise + ratio * randn((shape[0], shape[1], 1, 1), generator)
    return noise


def pyramid_noise(noise: torch.Tensor, discount: float, generator: Generators) -> torch.Tensor:
    """Multi-resolution noise (Whitaker 2023): add noise drawn at 1/2, 1/4, ... resolution, upsampled and
    weighted discount**i, then renormalise to unit variance. Low frequencies get destroyed too."""
    batch, channels, height, width = noise.shape
    noise = noise.clone()
    for i in range(1, 16):
        h, w = height // 2**i, width // 2**i
        if h < 1 or w < 1:
            break
        coarse = randn((batch, channels, h, w), generator)
        noise += F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False) * discount**i
    return noise / noise.std()


def sample_noise(latents: torch.Tensor, offset_ratio: float, pyramid_discount: float | None,
                 generator: Generators) -> torch.Tensor:
    """Drawn on the CPU generator so runs repeat on any device, then moved to the latents' device."""
    noise = offset_noise(latents.shape, offset_ratio, generator)
    if pyramid_discount:
        noise = pyramid_noise(noise, pyramid_discount, generator)
    return to_device(noise, latents.device).to(latents.dtype)


def sample_timesteps(batch_size: int, start: int, end: int, generator: Generators) -> torch.Tensor:
    """Uniform integer timesteps in [start, end)."""
    if isinstance(generator, Sequence):
        return torch.cat([torch.randint(start, end, (1,), generator=g) for g in generator])
    return torch.randint(start, end, (batch_size,), generator=generator)


def zero_terminal_snr_schedulers(noise_scheduler: DDPMScheduler, sample_scheduler):
    """Both schedulers with betas rescaled so the last timestep is pure noise (Lin et al. 2023, "Common
    Diffusion Noise Schedules and Sampling Steps are Flawed", Alg. 1), and the saved sampler starting from
    the last timestep ("trailing" spacing, sec. 3.3). Only meaningful for v-prediction: at SNR 0 an epsilon
    model's target is its input."""
    import inspect

    from diffusers import DDIMScheduler

    training = DDPMScheduler.from_config(noise_scheduler.config, rescale_betas_zero_snr=True)
    sampler_class = type(sample_scheduler)
    if "rescale_betas_zero_snr" not in inspect.signature(sampler_class.__init__).parameters:
        sampler_class = DDIMScheduler  # e.g. PNDM has no such option
    sampling = sampler_class.from_config(
        sample_scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing"
    )
    return training, sampling
