"""The trainer's row of bench/gpu/bench_gpu.py: a real training run, in this process, through the library's public
functions in train.py's order (as bench/bench_overhead.py runs it): device defaults, preflight, model loading, the
memory plan, the latent cache and data loader, then `trainer.run.loop.train`, final save included.

The model is the bench's random-weight one saved as a diffusers folder; the data a generated image set with one
epoch long enough for every step. A pre-forward hook on the loaded UNet reads the clock (after a synchronisation)
at the forward of step `warmup` + 1 and again `steps` forwards later: exactly `steps` whole steps, data loading
included, and neither the start-up nor the final save.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.gpu.gpu_rows import PRECISION, Case, Device, GiB, Parts


@dataclass
class TrainerMeasure:
    step_s: float
    peak_gib: float | None
    reserved_gib: float | None
    left_gib: float  # what the run left allocated after it ended (0 unless something keeps its tensors)
    memory_plan: list[str]  # what train.py would say of the run's memory: the plan, and advice if it does not fit


def save_model_folder(parts: Parts, folder: Path) -> Path:
    """`parts` as a diffusers folder the trainer loads (resume_ckpt), its UNet and text encoder stored in fp16:
    half the bytes to write and read; the trainer makes fp32 masters of them itself."""
    from diffusers import StableDiffusionPipeline

    from convert.tokenizer import clip_tokenizer
    from trainer.tiny.model import tiny_scheduler

    pipeline = StableDiffusionPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, unet=parts.unet,
        tokenizer=clip_tokenizer(pad_token="<|endoftext|>" if parts.spec.family == "sd1" else "!"),
        scheduler=tiny_scheduler("sd1" if parts.spec.family == "sd1" else "sd2-v"),  # the schedules SD ships
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    dtypes = [(module, next(module.parameters()).dtype) for module in (parts.unet, parts.text_encoder)]
    try:
        for module, _ in dtypes:
            module.to(torch.float16)
        pipeline.save_pretrained(folder, safe_serialization=True)
    finally:
        for module, dtype in dtypes:
            module.to(dtype)
    return folder


def trainer_config(model_dir: Path, data_root: Path, work: Path, case: Case, resolution: int, steps: int):
    """The TrainConfig of `case` as a user's train.json would say it, resolved for this machine as train.py
    resolves it (its remaining `null`s: the loader's workers)."""
    from trainer.config.schema import TrainConfig
    from trainer.preflight.device import for_this_machine

    return for_this_machine(dataclasses.replace(
        TrainConfig(), resume_ckpt=str(model_dir), data_root=str(data_root), resolution=resolution,
        batch_size=case.batch, max_steps=steps, max_epochs=10_000, mixed_precision=PRECISION,
        gradient_checkpointing=case.checkpointing, disable_textenc_training=not case.train_text_encoder,
        optimizer=case.optimizer, lr=1e-6, cache_latents=not case.vae_in_step, latent_cache_dir=str(work / "latents"),
        logdir=str(work / "logs"), run_name="bench", sample_steps=10**9, save_single_file=False,
        # the plain loop has none of these: off, so that both sides compute the same
        channels_last=False, torch_compile=False, text_embedding_cache=False, fused_backward=False,
    ))


def clock_on(unet: torch.nn.Module, warmup: int, steps: int, device: Device) -> dict[str, float]:
    """A pre-forward hook on `unet` that fills the returned dict with the clock's {start, end}."""
    clock: dict[str, float] = {}
    forwards = itertools.count()

    def read_clock(module, inputs) -> None:
        count = next(forwards)
        if count in (warmup, warmup + steps):
            device.sync()
            clock["start" if count == warmup else "end"] = time.perf_counter()

    unet.register_forward_pre_hook(read_clock)
    return clock


def run_trainer(cfg, run_dir: Path, warmup: int, steps: int, device: Device) -> tuple[dict[str, float], list[str]]:
    """A whole training run of `cfg` as train.py makes it (one process); returns the clock and the memory plan's
    lines. The models, loader and optimizer are this function's: they are gone when it returns."""
    from data.dataset import build_training_data
    from data.options import DataOptions
    from trainer.models.load import load_models
    from trainer.models.precision import component_dtypes, training_precision
    from trainer.preflight.checks import run_preflight
    from trainer.preflight.device import Device as TrainingDevice
    from trainer.preflight.memory import memory_report, model_params_of
    from trainer.run.loop import train

    preflight = run_preflight(cfg, run_dir)
    precision = training_precision(cfg.mixed_precision)
    models = load_models(cfg.resume_ckpt, dtypes=component_dtypes(cfg, precision))
    lines, too_big = memory_report(cfg, preflight, TrainingDevice.here(), model_params_of(models))
    data = build_training_data(DataOptions.from_config(cfg), models.tokenizer, models.vae,
                               cache_dir=preflight.cache_dir, scan=preflight.scan, held_out=preflight.validation)
    clock = clock_on(models.unet, warmup, steps, device)
    run_dir.mkdir(parents=True)
    result = train(cfg, models, data, run_dir, preflight, precision)
    if result.exit_code or result.final_save is None or "end" not in clock:
        raise RuntimeError(f"the run ended at step {result.global_step} with exit code {result.exit_code}, final "
                           f"save {result.final_save}, {'' if 'end' in clock else 'before the clock stopped'}")
    return clock, lines + too_big


def measure_trainer(parts: Parts, case: Case, warmup: int, steps: int, device: Device, work: Path,
                    log: Path) -> TrainerMeasure:
    """The trainer's step time and peak memory for `case` on `parts`' architecture, its output in `log`. The peak
    is the whole run's (loading and the final save included), less the bench's resident models."""
    from data.workers import end_worker_processes
    from trainer.tiny.shapes import make_shapes_dataset

    model_dir = save_model_folder(parts, work / "model")
    images = case.batch * (warmup + steps + 2)  # one epoch holds every step
    data_root = make_shapes_dataset(work / "data", images_per_concept=math.ceil(images / 2), size=parts.resolution)
    cfg = trainer_config(model_dir, data_root, work, case, parts.resolution, warmup + steps + 1)
    base = device.reset_peak()
    try:
        with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            clock, memory_plan = run_trainer(cfg, work / "run", warmup, steps, device)
    except BaseException:
        sys.stderr.write("".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:]))
        raise
    finally:
        end_worker_processes()  # as train.py's main does: no loader worker outlives the run
    peak, reserved = device.peak_gib(base)
    left = device.reset_peak()[0] - base[0]
    return TrainerMeasure((clock["end"] - clock["start"]) / steps, peak, reserved, left / GiB, memory_plan)
