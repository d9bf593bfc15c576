"""Sample images during training: prompts from a .txt or .json file, fixed seeds, PNG grids and tensorboard.

.txt: one prompt per line. .json: a list of samples, or EveryDream2's {"samples": [...], "seed", "cfgs",
"num_inference_steps"}; each sample is a prompt string or {"prompt", "negative_prompt", "seed", "cfg",
"size": [w, h], "steps"}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from trainer.errors import UserError
from trainer.models import SDModels


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    seed: int = 555
    cfg: float = 7.0
    size: tuple[int, int] | None = None  # (width, height); None: the training resolution
    steps: int = 30


def read_sample_prompts(path: Path) -> list[SamplePrompt]:
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() != ".json":
        return [SamplePrompt(line.strip()) for line in text.splitlines() if line.strip()]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"sample_prompts {path} is not valid json ({err.msg} at line {err.lineno}).")
    defaults = {}
    if isinstance(data, dict):
        defaults = {"seed": data.get("seed", 555), "steps": data.get("num_inference_steps", 30)}
        if data.get("cfgs"):
            defaults["cfg"] = float(data["cfgs"][0])
        data = data.get("samples", [])
    prompts = []
    for item in data:
        if isinstance(item, str):
            prompts.append(SamplePrompt(item, **defaults))
            continue
        if not isinstance(item, dict) or "prompt" not in item:
            raise UserError(f"sample_prompts {path}: each sample needs a \"prompt\"; found {item!r}.")
        values = {**defaults, **{k: item[k] for k in ("negative_prompt", "seed", "cfg", "steps") if k in item}}
        if values.get("seed", 0) < 0:  # ED2's -1 means random; a sample series needs a fixed one
            values["seed"] = 555
        size = tuple(item["size"]) if item.get("size") else None
        prompts.append(SamplePrompt(item["prompt"], size=size, **values))
    return prompts


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
    models: SDModels, unet, text_encoder, prompts: list[SamplePrompt], resolution: int, device: torch.device
) -> list[Image.Image]:
    """Images for `prompts` from the current weights (unwrapped modules), without changing training state."""
    pipeline = StableDiffusionPipeline(
        vae=models.vae, text_encoder=text_encoder, tokenizer=models.tokenizer, unet=unet,
        scheduler=models.sample_scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    was_training = [m.training for m in (unet, text_encoder)]
    unet.eval(), text_encoder.eval()
    images = []
    try:
        for sample in prompts:
            width, height = sample.size or (resolution, resolution)
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                result = pipeline(
                    sample.prompt, negative_prompt=sample.negative_prompt or None, width=width, height=height,
                    num_inference_steps=sample.steps, guidance_scale=sample.cfg,
                    generator=torch.Generator(device).manual_seed(sample.seed), output_type="np",
                )
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
