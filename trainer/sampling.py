"""Sample images during training from the prompts of trainer/prompts.py: fixed seeds, PNG grids, tensorboard.

Sampling never changes the training state, and a stop request (Ctrl-C, SIGTERM) ends it within one
denoising step, so a stop during a long prompt list still saves promptly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from trainer.prompts import SamplePrompt


def sd_pipeline(unet, text_encoder, vae, tokenizer, scheduler) -> StableDiffusionPipeline:
    """A diffusers pipeline of these parts (the trained ones unwrapped): what samples are drawn with and what a
    save's model_index.json describes."""
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def image_grid(images: list[Image.Image], columns: int = 4) -> Image.Image:
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    width, height = max(i.width for i in images), max(i.height for i in images)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid


@torch.no_grad()
def generate_samples(
    pipeline: StableDiffusionPipeline, prompts: list[SamplePrompt], resolution: int, device: torch.device,
    stop_requested: Callable[[], bool] = lambda: False,
) -> list[Image.Image]:
    """Images for `prompts` from the pipeline's current weights, without changing training state. Returns the
    images made before `stop_requested()` turned true (all of them when it never does)."""
    pipeline.set_progress_bar_config(disable=True)

    def interrupt_on_stop(pipe, step, timestep, callback_kwargs):
        pipe._interrupt = stop_requested()  # diffusers' own early exit from the denoising loop
        return callback_kwargs

    unet, text_encoder = pipeline.unet, pipeline.text_encoder
    was_training = [m.training for m in (unet, text_encoder)]
    unet.eval(), text_encoder.eval()
    # The trained UNet is fp32 while frozen parts may be held in fp16/bf16: autocast makes them meet.
    dtypes = {p.dtype for module in (unet, text_encoder, pipeline.vae) for p in module.parameters()}
    low = next((d for d in (torch.float16, torch.bfloat16) if d in dtypes), None)
    images = []
    try:
        for sample in prompts:
            if stop_requested():
                break
            width, height = sample.size or (resolution, resolution)
            with torch.autocast(device.type, dtype=low or torch.float32, enabled=low is not None):
                result = pipeline(
                    sample.prompt, negative_prompt=sample.negative_prompt or None, width=width, height=height,
                    num_inference_steps=sample.steps, guidance_scale=sample.cfg,
                    generator=torch.Generator(device).manual_seed(sample.seed), output_type="np",
                    callback_on_step_end=interrupt_on_stop,
                )
            if stop_requested():
                break
            images.append(Image.fromarray((np.clip(result.images[0], 0, 1) * 255).round().astype(np.uint8)))
    finally:
        for module, mode in zip((unet, text_encoder), was_training):
            module.train(mode)
    return images


def write_samples(images: list[Image.Image], prompts: list[SamplePrompt], out_dir: Path, tag: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        image.save(out_dir / f"{tag}-{index:02d}.png")
    (out_dir / f"{tag}-prompts.txt").write_text("\n".join(p.prompt for p in prompts) + "\n", encoding="utf-8")
    grid_path = out_dir / f"{tag}-grid.png"
    image_grid(images).save(grid_path)
    return grid_path
