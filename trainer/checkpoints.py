"""Where a run writes: its folder (resolved config, model description) and its saved models."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from diffusers import StableDiffusionPipeline

from trainer.config import TrainConfig, save_config
from trainer.models import ModelInfo, SDModels


def create_run_dir(cfg: TrainConfig, info: ModelInfo) -> Path:
    """`<logdir>/<run_name>` with the resolved config (`--config` loads it back) and the model's description."""
    name = cfg.run_name or f"{cfg.project_name}_{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(cfg.logdir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "train.json")
    (run_dir / "model_info.json").write_text(json.dumps(asdict(info), indent=2) + "\n", encoding="utf-8")
    return run_dir


def save_dir(cfg: TrainConfig, run_dir: Path) -> Path:
    return Path(cfg.save_ckpt_dir) if cfg.save_ckpt_dir else run_dir / "ckpts"


def save_name(cfg: TrainConfig, epoch: int, step: int, last: bool = False) -> str:
    return f"{'last-' if last else ''}{cfg.project_name}-ep{epoch:02d}-gs{step:05d}"


def save_model(models: SDModels, unet, text_encoder, path: Path) -> Path:
    """Write a complete diffusers pipeline folder that `StableDiffusionPipeline.from_pretrained` loads.

    `unet`/`text_encoder` are the trained (unwrapped) modules. The folder appears atomically: written
    beside its final name, then renamed, so a crash never leaves a half-written model that looks whole.
    """
    path = path.resolve()
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    pipeline = StableDiffusionPipeline(
        vae=models.vae,
        text_encoder=text_encoder,
        tokenizer=models.tokenizer,
        unet=unet,
        scheduler=models.sample_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(partial, safe_serialization=True)
    if path.exists():
        shutil.rmtree(path)
    partial.rename(path)
    print(f"Saved model: {path}", flush=True)
    return path
