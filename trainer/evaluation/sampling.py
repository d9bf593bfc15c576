"""Sample images during training from the settings of trainer/evaluation/prompts.py, and write them where a user looks.

Each time, the samples drawn by `SampleSettings.draw` (random captions and -1 seeds chosen) go through the
pipeline `batch_size` at a time, those of one size, cfgs and step count together, one image per guidance scale,
with the file's scheduler built from the model's own scheduler config (`generate_samples`). Out come PNGs, a grid
(a row per sample, a column per cfg) and a sample-prompts json that remakes every image (`write_samples`).

Sampling never changes the training state: module modes are restored, the global RNGs are left as they were,
and the scheduler is a fresh one each time (the model's own, saved with it, is never stepped). A stop request
(Ctrl-C, SIGTERM) ends it within one denoising step, so a stop during a long prompt list still saves promptly.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image

from common.console import warn
from common.files import atomic_file, write_text_atomically
from common.progress import Progress
from data.captions import spell_out_vectors, token_groups
from trainer.evaluation.prompts import SCHEDULERS, Drawn


def sd_pipeline(unet, text_encoder, vae, tokenizer, scheduler) -> StableDiffusionPipeline:
    """A diffusers pipeline of these parts (the trained ones unwrapped): what samples are drawn with and what a
    save's model_index.json describes."""
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return prompts_spelled_out_by_caller(pipeline)


def prompts_spelled_out_by_caller(pipeline):
    """`pipeline`, reading its prompts as given: the caller spells an embedding's tokens out as training captions
    are (data/captions.spell_out_vectors). diffusers' own conversion (`maybe_convert_prompt`) is a plain text
    replace: it misses a token written in another case, and spells out again a longer token that starts with it."""
    pipeline.maybe_convert_prompt = lambda prompt, tokenizer: prompt
    return pipeline


def sampling_scheduler(name: str | None, model_scheduler: SchedulerMixin) -> SchedulerMixin:
    """A fresh scheduler for sampling: `name` (a prompts.SCHEDULERS name; None: the model's own class) built from
    the model's own scheduler config, so its prediction type, betas and timestep spacing carry over."""
    if name is None:
        return type(model_scheduler).from_config(model_scheduler.config)
    class_name, overrides = SCHEDULERS[name]
    scheduler_class = getattr(diffusers, class_name)
    config = model_scheduler.config
    accepted = inspect.signature(scheduler_class.__init__).parameters
    if config.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in accepted:
        warn(f"sample scheduler {name} cannot rescale its betas to zero terminal SNR as the model's scheduler does; "
             "its samples start short of pure noise. ddim, euler, euler_a and dpm++ keep it.")
    scheduler = scheduler_class.from_config(config, **overrides)
    wanted = config.get("prediction_type", "epsilon")
    if "prediction_type" in accepted and scheduler.config.get("prediction_type") != wanted:
        raise ValueError(f"sample scheduler {name} predicts {scheduler.config.get('prediction_type')}, the model "
                         f"{wanted}; its samples would be noise. Choose another scheduler.")
    return scheduler


def batches(drawn: Sequence[Drawn], batch_size: int) -> list[list[int]]:
    """Indexes of `drawn` in pipeline calls: one call takes up to `batch_size` samples of one size, cfgs and step
    count (what one call shares), in file order within each kind."""
    kinds: dict[tuple, list[int]] = {}
    for index, sample in enumerate(drawn):
        kinds.setdefault((sample.size, sample.cfgs, sample.steps), []).append(index)
    return [group[i:i + batch_size] for group in kinds.values() for i in range(0, len(group), batch_size)]


@torch.no_grad()
def generate_samples(
    model: StableDiffusionPipeline, drawn: Sequence[Drawn], device: torch.device, batch_size: int = 1,
    scheduler: str | None = None, stop_requested: Callable[[], bool] = lambda: False, clip_skip: int = 0,
    progress: bool = False,
) -> dict[int, list[Image.Image]]:
    """{index in `drawn`: its images, one per cfg} from the current weights of `model`, with `scheduler` (see
    `sampling_scheduler`), without changing training state. Holds the samples finished before `stop_requested()`
    turned true (all of them when it never does). `clip_skip` is the training's (2 = penultimate layer), so the
    samples see the conditioning the model learns."""
    pipeline = sd_pipeline(model.unet, model.text_encoder, model.vae, model.tokenizer,
                           sampling_scheduler(scheduler, model.scheduler))
    pipeline.set_progress_bar_config(disable=not progress, leave=False)
    unet, text_encoder = pipeline.unet, pipeline.text_encoder
    was_training = [m.training for m in (unet, text_encoder)]
    unet.eval(), text_encoder.eval()
    # The trained UNet is fp32 while frozen parts may be held in fp16/bf16: autocast makes them meet.
    dtypes = {p.dtype for module in (unet, text_encoder, pipeline.vae) for p in module.parameters()}
    low = next((d for d in (torch.float16, torch.bfloat16) if d in dtypes), None)
    images: dict[int, list[Image.Image]] = {}
    # Every draw has its own generator; forking also keeps any scheduler that reaches for the global RNG from
    # moving the training's.
    with (torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
          Progress("Sampling", total=sum(len(sample.cfgs) for sample in drawn), unit="images") as bar):
        try:
            for indexes in batches(drawn, batch_size):
                rows = _generate_batch(pipeline, [drawn[i] for i in indexes], device, stop_requested, clip_skip, low,
                                       bar)
                if rows is None:
                    break
                images.update(zip(indexes, rows))
        finally:
            for module, mode in zip((unet, text_encoder), was_training):
                module.train(mode)
    return images


def _generate_batch(pipeline: StableDiffusionPipeline, group: list[Drawn], device: torch.device,
                    stop_requested: Callable[[], bool], clip_skip: int,
                    low: torch.dtype | None, bar: Progress) -> list[list[Image.Image]] | None:
    """Each sample's images, one per cfg, counted on `bar`; None when a stop came first (a half-denoised image is no
    sample)."""

    def interrupt_on_stop(pipe, step, timestep, callback_kwargs):
        pipe._interrupt = stop_requested()  # diffusers' own early exit from the denoising loop
        return callback_kwargs

    rows: list[list[Image.Image]] = [[] for _ in group]
    (width, height), first = group[0].size, group[0]
    groups = token_groups(pipeline.tokenizer)  # an embedding's tokens, spelled out as in training captions
    prompts, negative = ([spell_out_vectors(text, groups) if text else text for text in texts] for texts in
                         ([s.prompt for s in group], [s.negative_prompt for s in group]))
    for cfg in first.cfgs:
        if stop_requested():
            return None
        # fresh generators for every cfg: each column starts from its seed's own noise, so an image is remade
        # from (prompt, seed, cfg) alone and the columns differ only by guidance
        generators = [torch.Generator(device).manual_seed(sample.seed) for sample in group]
        with torch.autocast(device.type, dtype=low or torch.float32, enabled=low is not None):
            result = pipeline(
                prompts, negative_prompt=negative, width=width,
                height=height, num_inference_steps=first.steps, guidance_scale=cfg, generator=generators,
                output_type="np", callback_on_step_end=interrupt_on_stop,
                clip_skip=clip_skip - 1 if clip_skip >= 2 else None,  # diffusers counts layers skipped after the last
            )
        if stop_requested():
            return None
        for row, array in zip(rows, result.images):
            row.append(Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)))
        bar.update(len(group))
    return rows


# ---------------------------------------------------------------- writing


def image_grid(images: list[Image.Image], columns: int = 4) -> Image.Image:
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    width, height = max(i.width for i in images), max(i.height for i in images)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid


def samples_grid(rows: list[list[Image.Image]]) -> Image.Image:
    """A row per sample, a column per cfg; cells as large as the largest image, gaps white."""
    cells = [image for row in rows for image in row]
    width, height = max(i.width for i in cells), max(i.height for i in cells)
    grid = Image.new("RGB", (max(len(row) for row in rows) * width, len(rows) * height), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image, (x * width, y * height))
    return grid


def write_samples(images: dict[int, list[Image.Image]], drawn: Sequence[Drawn], out_dir: Path, tag: str,
                  scheduler: str | None = None) -> Path:
    """`<tag>-<index>-cfg<cfg>.png` for every image, `<tag>-grid.png`, and `<tag>-prompts.json`: a sample_prompts
    file that remakes these images (the drawn captions and seeds written out). Returns the grid's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    done = sorted(images)
    for index in done:
        for cfg, image in zip(drawn[index].cfgs, images[index]):
            _save_png(image, out_dir / f"{tag}-{index:02d}-cfg{cfg:g}.png")
    remake = {**({"scheduler": scheduler} if scheduler else {}), "samples": [
        {"prompt": s.prompt, "negative_prompt": s.negative_prompt, "seed": s.seed, "cfgs": list(s.cfgs),
         "size": list(s.size), "steps": s.steps} for s in (drawn[i] for i in done)]}
    write_text_atomically(out_dir / f"{tag}-prompts.json", json.dumps(remake, indent=2, ensure_ascii=False) + "\n")
    grid_path = out_dir / f"{tag}-grid.png"
    _save_png(samples_grid([images[i] for i in done]), grid_path)
    return grid_path


def _save_png(image: Image.Image, path: Path) -> None:
    with atomic_file(path) as partial:  # a crash mid-write leaves no half image
        image.save(partial, format="PNG")
