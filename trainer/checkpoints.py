"""Everything a run writes: its folder, saved models (diffusers + single file), pruning, and training state.

A save is `<save_dir>/<name>/` (a diffusers pipeline), `<save_dir>/<name>.safetensors` (original layout for
A1111/ComfyUI, with a `.yaml` sidecar for SD2), and with `save_optimizer` also `<name>/training_state/`, from
which `resume_state` continues the run exactly. Every folder appears atomically (written under a temporary name,
then renamed), so a crash never leaves a save that looks whole.
"""

from __future__ import annotations

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
    batches_in_epoch: int  # micro-batches of `epoch` already consumed


def save_training_state(accelerator, state: TrainerState, generator: torch.Generator, model_path: Path) -> Path:
    """accelerate's state plus ours into `<model_path>/training_state`, atomically. Call on every process."""
    final = model_path / STATE_DIR
    partial = model_path / (STATE_DIR + ".partial")
    accelerator.save_state(str(partial))
    torch.save(generator.get_state(), partial / f"noise_generator_{accelerator.process_index}.pt")
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


def load_training_state(accelerator, state_dir: Path, generator: torch.Generator) -> TrainerState:
    accelerator.load_state(str(state_dir))
    generator_file = state_dir / f"noise_generator_{accelerator.process_index}.pt"
    if not generator_file.is_file():  # saved with fewer processes: derive this rank's stream from rank 0's
        generator_file = state_dir / "noise_generator_0.pt"
    generator.set_state(torch.load(generator_file, weights_only=True))
    return TrainerState(**json.loads((state_dir / STATE_FILE).read_text(encoding="utf-8")))
