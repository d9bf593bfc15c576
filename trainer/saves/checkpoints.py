"""Everything a run writes: its folder, saved models (diffusers + single file), pruning, and training state.

A save is `<save_dir>/<name>/` (a diffusers pipeline, with `training_state/` inside when it keeps one),
`<save_dir>/<name>.safetensors` (the original layout for A1111/ComfyUI, with a `.yaml` sidecar for SD2), and with
EMA the same again as `<name>-ema`. Saves fail safe:

- a folder is written under a hidden partial name (common/files.py), training state included, and renamed into
  place whole, so neither a reader nor `findlast` ever sees half of one;
- a save never replaces another one: a name in use gets a suffix;
- nothing is written when a weight is non-finite or too large for the save's dtype, or when the disk lacks the
  room for the whole save;
- a write that fails anyway (a full disk, a read-only mount, a file in the way) removes its partial output and
  raises SaveError, which says what failed, where, and how to go on from the last complete save. Earlier saves
  are never touched: pruning runs only after a save is complete, and only over complete periodic saves.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from common import console
from common.files import (
    atomic_file,
    free_bytes,
    human_bytes,
    remove,
    remove_stale_partials,
    remove_whole,
    write_text_atomically,
)
from trainer.config.schema import TrainConfig, config_to_dict
from trainer.errors import UserError
from trainer.models.load import ModelInfo
from trainer.models.pinned import WEIGHT_FILES, PinnedPart, weight_files
from trainer.saves.resume import STATE_FILE, TrainerState


class SaveError(UserError):
    """A save could not be written; its partial output is gone and earlier saves are as they were. `reason`: the
    failure in a few words; `folder_saved`: the model folder is whole, what failed was an addition to it."""

    def __init__(self, message: str, reason: str = "", folder_saved: bool = False):
        super().__init__(message)
        self.reason, self.folder_saved = reason or message, folder_saved


# ---------------------------------------------------------------- the run folder


def create_run_dir(cfg: TrainConfig, info: ModelInfo, run_dir: Path) -> Path:
    """Make the run folder, never reusing one: a time-stamped name taken by another run started in the same
    second gets a suffix (-2, -3, ...); a run_name in use was refused by the preflight, and still is here if
    another run took it since. Writes the resolved config (`--config` loads it back) and the model's
    description. The main process's job; returns the folder made."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    candidate, number = run_dir, 1
    while True:
        try:
            candidate.mkdir()
            break
        except FileExistsError:
            if cfg.run_name:
                raise UserError(f"run folder {candidate} already exists (another run took it); choose another "
                                "run_name, or leave run_name null for a time-stamped folder.") from None
            number += 1
            candidate = run_dir.with_name(f"{run_dir.name}-{number}")
    write_text_atomically(candidate / "train.json", json.dumps(config_to_dict(cfg), indent=2) + "\n")
    write_text_atomically(candidate / "model_info.json", json.dumps(asdict(info), indent=2) + "\n")
    return candidate


def open_run_folder(cfg: TrainConfig, info: ModelInfo, planned: Path, save_dir: Path) -> Path:
    """The run's folder made (`create_run_dir`), partial saves of killed runs removed, and everything said from
    now on mirrored into its train.log; returns the folder. The main process's job."""
    run_dir = create_run_dir(cfg, info, planned)
    console.attach_log(run_dir / "train.log")
    for stale in remove_stale_saves(Path(cfg.logdir), save_dir):
        console.say(f"Removed {stale}, a partial save a killed run left behind.")
    console.say(f"Run folder: {run_dir.resolve()}")
    return run_dir


def discard_run_folder(run_dir: Path, trackers: list) -> None:
    """Remove the folder of a run that ended before it trained a step, so that the same command, fixed, is not
    refused because its run_name is taken. It holds only what the start wrote (config, train.log, empty
    tensorboard events); the reason the run ended is on the console. The main process's job."""
    for tracker in trackers:  # the tensorboard writer would otherwise write into the removed folder
        tracker.finish()
    console.attach_log(None)
    if run_dir.is_dir():
        remove(run_dir)
        console.say(f"Removed the run folder {run_dir}: the run ended before its first step.")


def save_name(cfg: TrainConfig, epoch: int, step: int, prefix: str = "") -> str:
    """`<prefix><project>-ep<epoch>-gs<step>`; prefix "last-" for the final save, "interrupted-" on a stop."""
    return f"{prefix}{cfg.project_name}-ep{epoch:02d}-gs{step:05d}"


def free_save_path(directory: Path, name: str) -> Path:
    """`directory/name`, or `name-2`, `name-3`, ... when any file of a save by that name exists (its folder, EMA
    twin or single files): a save never replaces another one, e.g. of an earlier run sharing save_ckpt_dir."""
    def taken(stem: str) -> bool:
        return any((directory / f"{stem}{ema}{ext}").exists() for ema in ("", "-ema")
                   for ext in ("", ".safetensors", ".yaml"))

    stem, number = name, 1
    while taken(stem):
        number += 1
        stem = f"{name}-{number}"
    return directory / stem


# ---------------------------------------------------------------- what a save holds


def component_weights(model_dir: Path, modules: dict[str, torch.nn.Module], from_memory: set[str],
                      dtype: torch.dtype, pinned: dict[str, PinnedPart] | None = None
                      ) -> dict[str, dict[str, torch.Tensor]]:
    """Every component's tensors in the save's dtype, on the CPU. Trained modules come from memory (their fp32
    masters), and so do those in `from_memory`; frozen ones from their files as stored, when there are such files
    (frozen parts are held in the compute precision, and a bf16 copy of an fp32 VAE must not be what the save
    keeps), else from memory.

    A run passes `pinned`, its frozen parts' files as it loaded them (trainer/models/pinned.py): those are copied
    when unchanged, and a part whose files changed in place since (or that has none pinned) comes from memory, as
    the run used it, said once. Without `pinned` (tools, tests) the files in `model_dir` are read as they are."""
    weights = {}
    for name, module in modules.items():
        state = module.state_dict()
        stored = None if name in from_memory else _stored(model_dir, name, module, pinned)
        if stored is not None:
            state = {k: stored[k] if k in stored and stored[k].shape == v.shape else v for k, v in state.items()}
        weights[name] = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
                         for k, v in state.items()}
    return weights


def _stored(model_dir: Path, name: str, module: torch.nn.Module,
            pinned: dict[str, PinnedPart] | None) -> dict[str, torch.Tensor] | None:
    """A frozen part's tensors as stored: from its pinned files when given, else from `model_dir`."""
    if pinned is None:
        return stored_weights(model_dir, name)
    part = pinned.get(name)
    if part is None:  # no safetensors files at load: there is nothing else the run loaded
        return None
    stored = part.read()
    part.say_change(kept_files=stored is not None, held=next(module.parameters()).dtype)
    return stored


def stored_weights(model_dir: Path, component: str) -> dict[str, torch.Tensor] | None:
    """A component's tensors as its safetensors files hold them now (memory-mapped), or None without such files."""
    files = weight_files(model_dir, component)
    return {k: v for file in files for k, v in load_file(file).items()} if files else None


def weight_problems(weights: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """Non-finite values in what a save would write (an fp32 weight past fp16's range is inf once cast)."""
    problems = []
    for component, tensors in weights.items():
        bad = {k: int((~torch.isfinite(v)).sum()) for k, v in tensors.items() if v.is_floating_point()}
        bad = {k: n for k, n in bad.items() if n}
        if bad:
            first = next(iter(bad))
            problems.append(f"{component}: {sum(bad.values())} non-finite values in {len(bad)} tensors (e.g. {first})")
    return problems


def write_model_folder(folder: Path, pipeline, weights: dict[str, dict[str, torch.Tensor]]) -> None:
    """A complete diffusers pipeline folder of `pipeline`'s parts, with `weights` as the tensors of its models:
    each tensor written once, in the dtype it has (the save's: fp16, or fp32 with save_full_precision).

    The text encoder's config says fp32 whatever the files store, so that
    `StableDiffusionPipeline.from_pretrained(folder)` with no dtype works: diffusers then loads the UNet and VAE in fp32 whatever their files store, while
    transformers' default `dtype="auto"` takes the config's dtype (or, without one, the file's): an fp16 text
    encoder beside an fp32 UNet fails at the first step ("mat1 and mat2 must have the same dtype"). An explicit
    dtype overrides the config in both libraries, and the single file and ComfyUI/A1111 never read it."""
    for name, tensors in weights.items():
        module, target = getattr(pipeline, name), folder / name
        target.mkdir()
        if name == "text_encoder":  # a transformers model: it needs its class named, and the dtype said above
            config = copy.deepcopy(module.config)
            config.dtype, config.architectures = torch.float32, [type(module).__name__]
            config.save_pretrained(target)
        else:
            module.save_config(target)
        save_file(tensors, str(target / WEIGHT_FILES[name]), metadata={"format": "pt"})
    pipeline.tokenizer.save_pretrained(folder / "tokenizer")
    pipeline.scheduler.save_pretrained(folder / "scheduler")
    pipeline.save_config(folder)  # model_index.json


def write_single_file(model_folder: Path, half: bool) -> str:
    """The original-layout single file beside `model_folder` (and its yaml); returns what was written."""
    from convert import export_single_file

    result = export_single_file(model_folder, model_folder.with_name(model_folder.name + ".safetensors"), half=half)
    return str(result.checkpoint_path) + (f" (+ {result.sidecar_yaml.name})" if result.sidecar_yaml else "")


# ---------------------------------------------------------------- failing safely


# How torch.save and safetensors word a failed write (they raise their own types, not OSError).
WRITE_FAILURE_WORDS = ("write", "iostream", "no space", "errno", "file too large", "read-only", "permission")


def io_failure(err: BaseException) -> str | None:
    """What went wrong, when `err` (or an exception it was raised while handling: torch's zip writer fails again
    as it closes) is the file system's doing: a full disk, a read-only mount, permissions, a file in the way.
    None for anything else, which is a bug and must keep its traceback."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError):
            where = f" ({seen.filename})" if seen.filename else ""
            return f"{seen.strerror or seen}{where}"
        text = str(seen).strip()
        if type(seen).__name__ == "SafetensorError" or (
                isinstance(seen, RuntimeError) and any(word in text.lower() for word in WRITE_FAILURE_WORDS)):
            # torch words a failed write as its C++ stream's error ("basic_ios::clear: iostream error")
            return f"a write failed ({text.splitlines()[0] if text else type(seen).__name__})"
        seen = seen.__cause__ or seen.__context__
    return None


def room_problem(directory: Path, needed: int) -> str | None:
    free = free_bytes(directory)
    if free >= needed:
        return None
    return f"not enough free space in {directory}: the save needs about {human_bytes(needed)}, {human_bytes(free)} free"


def prune_saves(saves: list[Path], keep: int) -> list[Path]:
    """Delete all but the newest `keep` of `saves`, each with its `-ema` twin and single files; returns the folders
    deleted. `saves` are the run's own complete periodic saves, oldest first: never another run's (a save folder
    may be shared), never a `last-` or `interrupted-` save, never a partial one."""
    deleted = saves[: max(0, len(saves) - keep)]
    for folder in deleted:
        for base in (folder, folder.with_name(folder.name + "-ema")):
            for suffix in (".safetensors", ".yaml"):  # first: until the folder goes, what is left is a whole save
                base.with_name(base.name + suffix).unlink(missing_ok=True)
            remove_whole(base)  # a kill while its gigabytes go leaves a partial, not a half save under its name
    return deleted


def remove_stale_saves(logdir: Path, save_dir: Path) -> list[Path]:
    """Partial saves that killed runs left behind (their writer is gone), in the save folder and in every run
    folder's ckpts/ under logdir; returns them. Run at each start, by the main process."""
    folders = {save_dir, *(p / "ckpts" for p in logdir.iterdir() if p.is_dir())} if logdir.is_dir() else {save_dir}
    return [stale for folder in sorted(folders) for stale in remove_stale_partials(folder)]


def write_trainer_state(state_dir: Path, state: TrainerState) -> None:
    with atomic_file(state_dir / STATE_FILE) as partial:
        partial.write_text(state.to_json(), encoding="utf-8")

