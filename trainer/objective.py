"""The denoising objective: noise a latent, ask the UNet for the scheduler's target, take the MSE.

Pure functions of (models, batch, generator): with the same generator the same loss comes out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel


def training_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity v = a_t * noise - s_t * x0
    (Salimans & Ho 2022, "Progressive Distillation", eq. in sec. 4), as the scheduler's config says."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def sample_noise_and_timesteps(
    latents: torch.Tensor, num_train_timesteps: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit gaussian noise and uniform timesteps, drawn on the CPU generator so runs repeat on any device."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    timesteps = torch.randint(0, num_train_timesteps, (latents.shape[0],), generator=generator)
    return noise.to(latents.device, latents.dtype), timesteps.to(latents.device)


def compute_loss(
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    noise, timesteps = sample_noise_and_timesteps(latents, scheduler.config.num_train_timesteps, generator)
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy_latents, timesteps, encoder_hidden_states).sample
    target = training_target(scheduler, latents, noise, timesteps)
    # the loss in fp32 even under autocast: fp16 squares of small errors underflow
    return F.mse_loss(prediction.float(), target.float())
