"""The training loop on accelerate: devices, mixed precision, gradient accumulation and multi-process.

Reads top to bottom: set up -> for each optimizer step: encode, loss, backward, clip, step -> save.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from trainer.checkpoints import save_dir, save_model, save_name
from trainer.config import TrainConfig
from trainer.models import SDModels
from trainer.objective import compute_loss


def pick_mixed_precision(requested: str) -> str:
    """fp16 autocast needs CUDA; on a CPU-only machine train in fp32 rather than fail (bf16 works on CPUs)."""
    if requested == "fp16" and not torch.cuda.is_available():
        print("Warning: mixed_precision fp16 needs a CUDA GPU; none found, so this run trains in fp32.", file=sys.stderr)
        return "no"
    return requested


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    if cfg.lr_warmup_steps is not None:
        return cfg.lr_warmup_steps
    return 0 if cfg.lr_scheduler == "constant" else math.ceil(0.02 * total_steps)


def freeze(module: torch.nn.Module) -> None:
    module.requires_grad_(False)
    module.eval()


def train(cfg: TrainConfig, models: SDModels, loader: torch.utils.data.DataLoader, run_dir: Path) -> Path:
    """Fine-tune `models` on the batches of `loader`; returns the folder of the final saved model."""
    accelerator = Accelerator(
        mixed_precision=pick_mixed_precision(cfg.mixed_precision),
        gradient_accumulation_steps=cfg.grad_accum,
        log_with="tensorboard",
        project_dir=str(run_dir),
    )
    set_seed(cfg.seed)
    if torch.cuda.is_available():  # TF32 matmuls: ~free speed on Ampere+, precision well within fp16's
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    unet, text_encoder, vae = models.unet, models.text_encoder, models.vae
    train_text_encoder = not cfg.disable_textenc_training

    # The VAE is frozen and stays fp32: SD's VAE overflows in fp16 at high resolution, and its saved weights
    # must come out exactly as they went in.
    freeze(vae)
    vae.to(accelerator.device)
    unet.train()
    if train_text_encoder:
        text_encoder.train()
    else:
        freeze(text_encoder)
        text_encoder.to(accelerator.device)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_text_encoder:
            text_encoder.activation_checkpointing_enable()

    trained = [unet] + ([text_encoder] if train_text_encoder else [])
    optimizer = torch.optim.AdamW(params_of(trained), lr=cfg.lr)
    steps_per_epoch = math.ceil(len(loader) / cfg.grad_accum)
    total_steps = steps_per_epoch * cfg.max_epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    # accelerate steps a prepared scheduler once per process per optimizer step, so its horizon scales too
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer,
        num_warmup_steps=warmup_steps(cfg, total_steps) * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes,
    )
    if train_text_encoder:
        unet, text_encoder, optimizer, loader, lr_scheduler = accelerator.prepare(
            unet, text_encoder, optimizer, loader, lr_scheduler
        )
    else:
        unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    trained = [unet] + ([text_encoder] if train_text_encoder else [])
    accelerator.init_trackers("tensorboard")

    accelerator.print(
        f"Training {models.info.family.upper()} ({models.info.prediction_type}) on {len(loader.dataset)} images at "
        f"{cfg.resolution}px: batch {cfg.batch_size} x accum {cfg.grad_accum} x {accelerator.num_processes} "
        f"process(es), {steps_per_epoch} steps/epoch, {total_steps} steps, device {accelerator.device}, "
        f"precision {accelerator.mixed_precision}, text encoder {'trained' if train_text_encoder else 'frozen'}."
    )
    generator = torch.Generator().manual_seed(cfg.seed + accelerator.process_index)
    progress = tqdm(total=total_steps, desc="steps", disable=not accelerator.is_local_main_process)
    global_step, epoch, window_losses = 0, 0, []
    for epoch in range(1, cfg.max_epochs + 1):
        for batch in loader:
            with accelerator.accumulate(*trained):
                latents = batch["latents"] if "latents" in batch else encode_images(vae, batch["pixel_values"], generator)
                with torch.set_grad_enabled(train_text_encoder), accelerator.autocast():
                    encoder_hidden_states = text_encoder(batch["input_ids"])[0]
                loss = compute_loss(unet, models.noise_scheduler, latents, encoder_hidden_states, generator)
                accelerator.backward(loss)  # divides by grad_accum: accumulated grads average, not sum
                if accelerator.sync_gradients and cfg.clip_grad_norm:
                    accelerator.clip_grad_norm_(params_of(trained), cfg.clip_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            window_losses.append(loss.detach().item())
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{window_losses[-1]:.4f}", epoch=epoch)
            if global_step % cfg.log_step == 0 or global_step == total_steps:
                mean_loss = sum(window_losses) / len(window_losses)
                accelerator.log({"loss/train": mean_loss, "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
                window_losses = []
            if global_step >= total_steps:
                break
        if global_step >= total_steps:
            break
        if cfg.save_every_n_epochs and epoch % cfg.save_every_n_epochs == 0:
            save_on_main(accelerator, models, unet, text_encoder, save_dir(cfg, run_dir) / save_name(cfg, epoch, global_step))
    progress.close()
    final = save_dir(cfg, run_dir) / save_name(cfg, epoch, global_step, last=True)
    save_on_main(accelerator, models, unet, text_encoder, final)
    accelerator.end_training()
    return final.resolve()


@torch.no_grad()
def encode_images(vae: torch.nn.Module, pixel_values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pixels in [-1, 1] -> latents sampled from the VAE's posterior, scaled to about unit variance."""
    latents = vae.encode(pixel_values.float()).latent_dist.sample(generator)
    return latents * vae.config.scaling_factor


def params_of(modules: list[torch.nn.Module]) -> list[torch.nn.Parameter]:
    return [p for module in modules for p in module.parameters()]


def save_on_main(accelerator: Accelerator, models: SDModels, unet, text_encoder, path: Path) -> None:
    """One process writes; the others wait so nobody reads a half-written save."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model(models, accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder), path)
    accelerator.wait_for_everyone()
