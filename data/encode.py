"""The VAE encoder as everything that needs latents calls it: pixels in, the float32 posterior out.

The frozen VAE may be held in fp16 or bf16 (the run's compute precision). It then runs in that dtype, and
fp16's small range (largest value 65504) overflows on some images, giving inf or NaN latents that would
poison training. Such a batch is encoded again in float32, from a float32 copy of the VAE made once (and
said once) per VAE. bf16 has float32's range and does not overflow.

`scaled_latents` turns a posterior into what the UNet takes, for cached and freshly encoded latents alike.
"""

from __future__ import annotations

import copy
from weakref import WeakKeyDictionary

import torch

from common.console import say

# The float32 copy of each reduced-precision VAE that overflowed once; dropped with the VAE.
_FLOAT32_COPIES: WeakKeyDictionary[torch.nn.Module, torch.nn.Module] = WeakKeyDictionary()


@torch.no_grad()
def encode_posterior(
    vae: torch.nn.Module, pixels: torch.Tensor, recover_overflow: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's posterior over the latents of `pixels`: (mean, std), unscaled.

    `pixels`: (B, 3, H, W) in [-1, 1], any float dtype, on any device. They are fed to the VAE on its device
    and in its own dtype. Returns two float32 tensors of shape (B, latent_channels, H/8, W/8) on the pixels'
    device; a latent sample is `mean + std * noise`, times `vae.config.scaling_factor` for the UNet.

    A batch whose latents come out non-finite in fp16 (overflow) is encoded again in float32, with one notice
    per VAE. Raises RuntimeError if even float32 latents are non-finite: the VAE's weights are broken.
    `recover_overflow=False` skips that check, which waits for the device: the training loop encodes every step
    (cache off) and leaves a non-finite result to its divergence guard, which stops the run naming the step.
    """
    weight = next(vae.parameters())
    mean, std = _posterior(vae, pixels.to(weight.device, weight.dtype))
    if recover_overflow and not _finite(mean, std):
        if weight.dtype == torch.float32:
            raise RuntimeError(
                f"The VAE (float32) encoded a batch of {tuple(pixels.shape)} pixels to non-finite latents (inf or "
                "NaN); its weights are damaged. Use an intact VAE (download or convert the base model again)."
            )
        mean, std = _posterior(_float32_copy(vae, pixels.shape), pixels.to(weight.device, torch.float32))
    return mean.to(pixels.device), std.to(pixels.device)


def scaled_latents(
    mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor | None, scaling_factor: float
) -> torch.Tensor:
    """The UNet's latents from a posterior: the sample `mean + std * noise` (the mean itself when `noise` is None:
    fixed latents for the validation loss), times the VAE's scaling factor, which brings them to about the unit
    variance the noise schedule assumes (Rombach et al. 2022, latent diffusion)."""
    sample = mean if noise is None else mean + std * noise
    return sample * scaling_factor


def _posterior(vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    posterior = vae.encode(pixels).latent_dist
    return posterior.mean.float(), posterior.std.float()


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _float32_copy(vae: torch.nn.Module, shape: torch.Size) -> torch.nn.Module:
    """The VAE's float32 copy, on its device; made (and announced) the first time this VAE overflows."""
    weight = next(vae.parameters())
    if vae not in _FLOAT32_COPIES:
        say(
            f"VAE: in {str(weight.dtype).removeprefix('torch.')} it encoded a batch of {shape[-1]}x{shape[-2]} "
            "images to non-finite latents (overflow); such batches are encoded again in float32, which is slower "
            "and holds a float32 copy of the VAE. To avoid it, use mixed_precision bf16 (same range as float32)."
        )
        _FLOAT32_COPIES[vae] = copy.deepcopy(vae).to(torch.float32)
    return _FLOAT32_COPIES[vae].to(weight.device)
