"""Everything a run writes: its folder, saved models (diffusers + single file), pruning, and training state.

A save is `<save_dir>/<name>/` (a diffusers pipeline), `<save_dir>/<name>.safetensors` (original layout for
A1111/ComfyUI, with a `.yaml` sidecar for SD2), and with `save_optimizer` also `<name>/training_state/`, from
which `resume_state` continues the run exactly. Every folder appears atomically (written under a temporary name,
then renamed), so a crash never leaves a save that looks whole.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from trainer.config import TrainConfig, save_config
from trainer.errors import UserError
from trainer.models import ModelInfo, SDModels

STATE_DIR = "training_state"
STATE_FILE = "trainer_state.json"


def run_dir_path(cfg: TrainConfig) -> Path:
    """`<logdir>/<run_name>`, by default named after the project and the time now. In a multi-process run only
    the main process's answer counts (train.py passes it to the others): the clocks may straddle a second."""
    return Path(cfg.logdir) / (cfg.run_name or f"{cfg.project_name}_{datetime.now():%Y%m%d-%H%M%S}")


def create_run_dir(cfg: TrainConfig, info: ModelInfo, run_dir: Path | None = None) -> Path:
    """`run_dir` (default: `run_dir_path(cfg)`) with the resolved config (`--config` loads it back) and the
    model's description. The main process's job."""
    run_dir = run_dir or run_dir_path(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "train.json")
    (run_dir / "model_info.json").write_text(json.dumps(asdict(info), indent=2) + "\n", encoding="utf-8")
    return run_dir


def save_dir(cfg: TrainConfig, run_dir: Path) -> Path:
    return Path(cfg.save_ckpt_dir) if cfg.save_ckpt_dir else run_dir / "ckpts"


def save_name(cfg: TrainConfig, epoch: int, step: int, prefix: str = "") -> str:
    """`<prefix><project>-ep<epoch>-gs<step>`; prefix "last-" for the final save, "interrupted-" on Ctrl-C."""
    return f"{prefix}{cfg.project_name}-ep{epoch:02d}-gs{step:05d}"


def _replace_atomically(partial: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    os.replace(partial, final)


def save_model(
    models: SDModels, unet, text_encoder, path: Path, *, half: bool = True, single_file: bool = True
) -> Path:
    """Write a complete diffusers pipeline folder (and a single-file export beside it); prints `Saved model:`.

    `unet`/`text_encoder` are the trained (unwrapped) modules; `half` stores fp16 copies of every weight
    without touching the modules being trained.
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
    if half:
        _halve_weights(partial)
    _replace_atomically(partial, path)
    print(f"Saved model: {path}", flush=True)
    if single_file:
        from trainer.convert import export_single_file

        result = export_single_file(path, path.with_name(path.name + ".safetensors"), half=half)
        extra = f" (+ {result.sidecar_yaml.name})" if result.sidecar_yaml else ""
        print(f"Saved single file: {result.checkpoint_path}{extra}", flush=True)
    return path


def _halve_weights(folder: Path) -> None:
    """Rewrite every float32 safetensors file under `folder` as float16 (the modules stay fp32)."""
    from safetensors.torch import load_file, save_file

    for file in folder.rglob("*.safetensors"):
        tensors = load_file(file)
        halved = {k: v.half() if v.dtype == torch.float32 else v for k, v in tensors.items()}
        save_file(halved, file, metadata={"format": "pt"})


def prune_saves(directory: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` periodic saves (never `last-` or `interrupted-` ones), each with its
    `-ema` twin and single files; returns the folders deleted."""
    periodic = [
        p for p in directory.iterdir()
        if p.is_dir() and (p / "model_index.json").is_file() and not p.name.endswith("-ema")
        and not p.name.startswith(("last-", "interrupted-"))
    ]
    periodic.sort(key=lambda p: p.stat().st_mtime)
    deleted = periodic[: max(0, len(periodic) - keep)]
    for folder in deleted:
        for base in (folder, folder.with_name(folder.name + "-ema")):
            shutil.rmtree(base, ignore_errors=True)
            for suffix in (".safetensors", ".yaml"):
                base.with_name(base.name + suffix).unlink(missing_ok=True)
    return deleted


# ---------------------------------------------------------------- training state (exact resume)


@dataclass
class TrainerState:
    """Where the loop stands, beside accelerate's own state (weights, optimizer, LR schedule, scaler, RNG)."""

    global_step: int
    epoch: int  # 1-based epoch in progress
    batches_in_epoch: int  # global micro-batches of `epoch` already consumed (each process took its slice of each)
    batch_samples: int = 0  # rows in one global micro-batch (batch_size x processes); 0: saved before it was kept


def continue_position(saved: TrainerState, batch_samples: int) -> TrainerState:
    """Where to go on in the epoch with global batches of `batch_samples` rows. Unchanged (an exact resume) when
    the global batch is the same, whatever the process count (batch 4 on one process = batch 2 on two). With
    another global batch the epoch is re-planned in batches of the new size (data/schedule.py), so the run goes
    on after as many samples as were trained, rounded down to whole batches: close, not exact."""
    position = saved.batches_in_epoch
    if saved.batch_samples and saved.batch_samples != batch_samples:
        position = saved.batches_in_epoch * saved.batch_samples // batch_samples
    return dataclasses.replace(saved, batches_in_epoch=position, batch_samples=batch_samples)


def save_training_state(accelerator, state: TrainerState, model_path: Path) -> Path:
    """accelerate's state plus ours into `<model_path>/training_state`, atomically. Call on every process.

    No noise generator is saved: every sample's noise comes from its row's seed (trainer/objective.py
    `row_generators`), which the data schedule replays."""
    final = model_path / STATE_DIR
    partial = model_path / (STATE_DIR + ".partial")
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n", encoding="utf-8")
        _replace_atomically(partial, final)
    accelerator.wait_for_everyone()
    return final


def find_training_state(resume_state: str, logdir: Path, extra_dirs: list[Path]) -> Path:
    """The training-state folder `resume_state` names: a folder (the save or its training_state/) or 'findlast'."""
    if resume_state != "findlast":
        given = Path(resume_state)
        for candidate in (given, given / STATE_DIR):
            if (candidate / STATE_FILE).is_file():
                return candidate
        raise UserError(
            f"resume_state {resume_state!r} holds no {STATE_FILE}; point it at a save made with save_optimizer true "
            f"(the save folder or its {STATE_DIR}/ sub-folder), or use 'findlast'."
        )
    found = [p.parent for d in [logdir, *extra_dirs] if d.is_dir() for p in d.rglob(f"{STATE_DIR}/{STATE_FILE}")]
    if not found:
        raise UserError(
            f"resume_state findlast found no training state under {', '.join(str(d) for d in [logdir, *extra_dirs])}; "
            "saves keep one only when save_optimizer is true."
        )
    return max(found, key=lambda p: (p / STATE_FILE).stat().st_mtime)


def load_training_state(accelerator, state_dir: Path) -> TrainerState:
    """Weights, optimizer, LR schedule and RNG back into the prepared objects; returns the saved position. With
    more processes than at the save, the new ones find no RNG file of their own; accelerate then keeps their
    seeded state, which changes nothing here: no training draw uses the global RNG."""
    accelerator.load_state(str(state_dir))
    return TrainerState(**json.loads((state_dir / STATE_FILE).read_text(encoding="utf-8")))
