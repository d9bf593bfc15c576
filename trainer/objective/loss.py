"""The denoising loss: noise a latent (`noise.py`), ask the UNet for the scheduler's target, weigh the error.

Pure functions of (models, batch, generator): with the same generator the same loss comes out. Each option
is a named helper with the formula it implements and where it comes from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel

from data.encode import encode_posterior, scaled_latents
from data.masking.masks import to_latent_size
from trainer.config.schema import LossType
from trainer.objective.noise import Generators, randn, sample_noise, sample_timesteps, to_device


@dataclass(frozen=True)
class Objective:
    """The objective's options; `TrainConfig` keys of the same names."""

    min_snr_gamma: float | None = None
    zero_frequency_noise_ratio: float = 0.0
    pyramid_noise_discount: float | None = None
    timestep_start: int = 0
    timestep_end: int = 1000
    loss_type: LossType = "mse"
    huber_c: float = 0.1
    embedding_perturbation: float = 0.0
    clip_skip: int = 0
    channels_last: bool = False  # the UNet's input in channels-last memory format (the UNet is held in it too)

    @classmethod
    def from_config(cls, cfg) -> "Objective":
        return cls(**{name: getattr(cfg, name) for name in cls.__dataclass_fields__})


# ---------------------------------------------------------------- target and weighting


def training_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity v = sqrt(a_t) * noise - sqrt(1 - a_t) * x0
    (Salimans & Ho 2022, "Progressive Distillation"), as the scheduler's config says."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def signal_to_noise(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = a_t / (1 - a_t), with a_t the cumulative product of alphas."""
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting").

    The paper's weight min(SNR, gamma) is for an x0 loss; an epsilon loss is already SNR x the x0 loss, so
    it becomes min(SNR, gamma) / SNR, and a v loss is (SNR + 1) x the x0 loss: min(SNR, gamma) / (SNR + 1).
    """
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    # at SNR 0 (zero-terminal-SNR's last step) epsilon carries no information about x0: weight it 0, not nan
    return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.zeros_like(snr))


def elementwise_loss(prediction: torch.Tensor, target: torch.Tensor, loss_type: LossType, huber_c: float,
                     noise_level: torch.Tensor | None = None) -> torch.Tensor:
    """Per-element error. huber/smooth_l1 are the pseudo-Huber losses of Khrapov & Popov 2024 ("Improving
    Diffusion Models's Data-Corruption Resistance using Scheduled Pseudo-Huber Loss"), as diffusers scripts use:
    huber = 2c(sqrt(d^2 + c^2) - c) (about d^2 for small d, 2c|d| for large), smooth_l1 = the same / c.
    mse_huber and huber_mse are EveryDream2's blends by each row's `noise_level` t/T (B,): mse_huber weighs the
    squared error by t/T and torch's Huber loss (delta 1) by 1 - t/T, so noisy steps learn by MSE and nearly
    clean ones by Huber, robust to outliers; huber_mse the other way round."""
    difference = prediction.float() - target.float()
    if loss_type == "mse":
        return difference**2
    if loss_type in ("mse_huber", "huber_mse"):
        level = noise_level.float().view(-1, *[1] * (difference.dim() - 1)).to(difference.device)
        mse_share = level if loss_type == "mse_huber" else 1 - level
        huber = torch.nn.functional.huber_loss(difference, torch.zeros_like(difference), reduction="none", delta=1.0)
        return mse_share * difference**2 + (1 - mse_share) * huber
    pseudo_huber = 2 * (torch.sqrt(difference**2 + huber_c**2) - huber_c)
    if loss_type == "huber":
        return huber_c * pseudo_huber
    if loss_type == "smooth_l1":
        return pseudo_huber
    raise ValueError(f"unsupported loss_type {loss_type!r}")


# ---------------------------------------------------------------- the conditioning and the latents


@torch.no_grad()
def encode_images(vae: torch.nn.Module, pixel_values: torch.Tensor, generators) -> torch.Tensor:
    """Pixels in [-1, 1] -> latents sampled from the VAE's posterior with each row's own generator, scaled to
    about unit variance (fp32, whatever dtype the frozen VAE is held in)."""
    mean, std = encode_posterior(vae, pixel_values, recover_overflow=False)
    return scaled_latents(mean, std, to_device(randn(mean.shape, generators), mean.device), vae.config.scaling_factor)


def encode_prompts(text_encoder: CLIPTextModel, input_ids: torch.Tensor, clip_skip: int = 0) -> torch.Tensor:
    """CLIP text states for the UNet. clip_skip k >= 2 takes the k-th layer from the end (2 = penultimate,
    NovelAI-style) and applies the final layer norm, as A1111 does; 0 and 1 mean the last layer."""
    if clip_skip <= 1:
        return text_encoder(input_ids)[0]
    hidden = text_encoder(input_ids, output_hidden_states=True).hidden_states[-clip_skip]
    return text_encoder.final_layer_norm(hidden)


def perturb_embeddings(states: torch.Tensor, amount: float, generator: Generators) -> torch.Tensor:
    """Gaussian noise of std `amount` on every text-embedding element: a regulariser against overfitting
    captions (EveryDream2's embedding_perturbation)."""
    if not amount:
        return states
    noise = to_device(randn(states.shape, generator), states.device).to(states.dtype)
    return states + amount * noise


# ---------------------------------------------------------------- the loss


def compute_loss(
    unet: UNet2DConditionModel,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    generator: Generators = None,
    objective: Objective = Objective(),
    loss_weight: torch.Tensor | None = None,
    mask_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The mean weighted denoising loss of one batch (a scalar, fp32). `generator`: one for the batch, or one
    per row (`row_generators`), from which that row's noise, timestep and perturbation are drawn.

    `loss_weight` (B,) weighs each sample; the sum is still divided by B, so rows of weight 0 (the data
    loader's fillers of an under-full bucket batch) count for nothing and the others as in a full batch.
    `mask_weights` (B, 1, H, W), masked training's weight maps (data/masking/masks.py), weighs each latent pixel: brought to
    the latents' size by area averaging, it multiplies the elementwise loss in every channel before the mean, so a
    background weighted 0 teaches nothing; every loss_type and min-SNR apply as without it."""
    noise = sample_noise(latents, objective.zero_frequency_noise_ratio, objective.pyramid_noise_discount,
                         generator)
    end = min(objective.timestep_end, scheduler.config.num_train_timesteps)
    timesteps = to_device(sample_timesteps(latents.shape[0], objective.timestep_start, end, generator), latents.device)
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    if objective.channels_last:  # the layout the UNet's weights are in: its convolutions then convert nothing
        noisy_latents = noisy_latents.contiguous(memory_format=torch.channels_last)
    encoder_hidden_states = perturb_embeddings(encoder_hidden_states, objective.embedding_perturbation, generator)
    prediction = unet(noisy_latents, timesteps, encoder_hidden_states).sample
    target = training_target(scheduler, latents, noise, timesteps)
    # fp32 even under autocast: fp16 squares of small errors underflow
    noise_level = timesteps / scheduler.config.num_train_timesteps
    elementwise = elementwise_loss(prediction, target, objective.loss_type, objective.huber_c, noise_level)
    if mask_weights is not None:
        elementwise = elementwise * to_latent_size(mask_weights, elementwise.shape[-2:]).to(elementwise.device)
    per_sample = elementwise.mean(dim=(1, 2, 3))
    if objective.min_snr_gamma:
        snr = signal_to_noise(scheduler, timesteps)
        per_sample = per_sample * min_snr_weights(snr, objective.min_snr_gamma, scheduler.config.prediction_type)
    if loss_weight is not None:
        per_sample = per_sample * loss_weight.to(per_sample.device, per_sample.dtype)
    return per_sample.mean()


# ---------------------------------------------------------------- validation


@torch.no_grad()
def validation_loss(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    scheduler: DDPMScheduler,
    batches: list[dict[str, torch.Tensor]],
    device: torch.device,
    repeats: int = 4,
    seed: int = 0,
    stop_requested: Callable[[], bool] = lambda: False,
    batch_done: Callable[[], None] = lambda: None,
) -> float | None:
    """Mean plain-MSE loss over fixed batches with the same noise and timesteps on every call (a fresh
    generator of `seed`), `repeats` draws per image, so only the weights change between calls; weighted by the
    batches' masks with masked training, as training is. None when `stop_requested()` turned true part way (a stop
    does not wait for a long validation set). `batch_done()` is called after each batch (the caller's progress)."""
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for batch in batches:
        if stop_requested():
            return None
        latents = batch["latents"].to(device)
        states = encode_prompts(text_encoder, batch["input_ids"].to(device))
        for _ in range(repeats):
            loss = compute_loss(unet, scheduler, latents, states, generator, Objective(),
                                mask_weights=batch.get("mask_weights"))
            total, count = total + loss.item() * len(latents), count + len(latents)
        batch_done()
    return total / max(count, 1)
