"""Saving during a run: check, write, report. Every process calls `save` at the same moment.

1. The divergence guard is read: broken weights are never written (DivergedError names the step).
2. The save gets a name no other save has, and the disk is checked for room for all of it.
3. The main process writes the model folder into a hidden partial folder; with a training state every process
   adds its part; the main process renames it into place, then writes the EMA twin and the single files.
4. A write that fails on any process removes the partial output on the main process and raises SaveError on
   every process, saying what failed, where, and how to go on from the last complete save.
5. Only a complete save prunes older ones (max_saves).

`rescue` saves what an unexpected error left, when it can, before the error is reported.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate.utils import DistributedType, broadcast_object_list
from safetensors.torch import save_file

from common.console import say, warn
from common.files import atomic_folder, free_bytes, human_bytes, partial_path, readable_as_umask, remove
from trainer.adapters import embedding_file
from trainer.adapters.lora_file import file_metadata, file_tensors
from trainer.config.schema import frozen_base
from trainer.errors import UserError
from trainer.failures import mark_how_to_go_on
from trainer.run.guard import Breakage, DivergedError
from trainer.run.setup import Run, adapted_modules, ema_weights
from trainer.saves import footprint
from trainer.saves.checkpoints import (
    SaveError,
    component_weights,
    free_save_path,
    io_failure,
    prune_saves,
    room_problem,
    save_name,
    weight_problems,
    write_model_folder,
    write_single_file,
    write_trainer_state,
)
from trainer.saves.resume import STATE_DIR, TrainerState


def save(run: Run, state: TrainerState, *, epoch: int | None = None, prefix: str = "", with_state: bool = False) -> Path:
    """A model save named after `epoch` (default: the state's), plus an EMA twin and, with save_optimizer or
    `with_state`, the training state `state` to resume from. Returns the save's folder.

    A save_ckpt_dir that cannot take it (its disk full, or turned read-only) does not cost what trained: the save,
    and those after it, go into the run folder instead, said once."""
    try:
        return _save(run, state, epoch=epoch, prefix=prefix, with_state=with_state)
    except SaveError as err:
        fallback = run.run_dir / "ckpts"
        if err.folder_saved or fallback.resolve() == run.save_dir.resolve():
            raise
        warn(f"could not save into save_ckpt_dir {run.save_dir} ({err.reason}); nothing of that save was left "
             f"there. This save and those after it go into the run folder instead: {fallback}.")
        run.save_dir = fallback
        return _save(run, state, epoch=epoch, prefix=prefix, with_state=with_state)


def _save(run: Run, state: TrainerState, *, epoch: int | None, prefix: str, with_state: bool) -> Path:
    cfg, accelerator = run.cfg, run.accelerator
    check_weights(run)
    check_in_sync(run, state.global_step)
    with_state = with_state or cfg.save_optimizer
    name = save_name(cfg, epoch or state.epoch, state.global_step, prefix)
    (path,) = broadcast_object_list([free_save_path(run.save_dir, name).resolve() if accelerator.is_main_process
                                     else None])
    agree(run, lambda: _check_room(run, path, with_state), path, step=state.global_step)
    pipeline = run.pipeline()
    dtype = torch.float32 if cfg.save_full_precision else torch.float16
    partial = partial_path(path, run.owner)
    try:
        agree(run, lambda: _write_model(run, partial, pipeline, dtype, state, path.name), path,
              step=state.global_step, partial=partial)
        if with_state:
            agree(run, lambda: _save_training_state(run, partial), path, step=state.global_step, partial=partial,
                  every_process=True)
        agree(run, lambda: _finish(partial, path, state if with_state else None, run), path, step=state.global_step,
              partial=partial)
    except BaseException:  # a second Ctrl-C, a bug: whatever ends the save, its partial output goes with it
        if accelerator.is_main_process:
            remove(partial)
        raise
    if with_state:
        run.last_state = path / STATE_DIR
    run.last_save = path
    if not prefix:
        run.periodic_saves.append(path)
    _say_saved(run, path)
    if run.emas:
        twin = path.with_name(path.name + "-ema")
        with ema_weights(run):
            agree(run, lambda: _write_whole(run, twin, pipeline, dtype, state), twin, step=state.global_step)
        _say_saved(run, twin)
    if cfg.save_single_file and not frozen_base(cfg):  # a LoRA or embedding save is its small files
        for folder in [path] + ([path.with_name(path.name + "-ema")] if run.emas else []):
            agree(run, lambda folder=folder: _single_file(run, folder), folder, step=state.global_step, complete=True)
    if cfg.max_saves and not prefix and accelerator.is_main_process:
        _prune(run)
    accelerator.wait_for_everyone()
    return path


def _check_room(run: Run, path: Path, with_state: bool) -> str | None:
    unet, text_encoder = run.unwrapped()
    trained = sum(p.numel() for m in run.trained for p in m.parameters() if p.requires_grad)
    total = sum(p.numel() for m in (unet, text_encoder, run.vae) for p in m.parameters())
    small = frozen_base(run.cfg)  # LoRA, embeddings: only what trained is saved
    size = footprint.ModelSize(trained=trained, frozen=0 if small else total - trained)
    single_file = run.cfg.save_single_file and not small
    needed = footprint.save_bytes(size, half=not run.cfg.save_full_precision, single_file=single_file,
                                  ema=bool(run.emas), training_state=with_state, optimizer=run.setup.optimizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    return room_problem(path.parent, needed)


def _write_model(run: Run, partial: Path, pipeline, dtype: torch.dtype, state: TrainerState,
                 name: str) -> str | None:
    """The model (on a frozen base: the adapter and embedding files) into the partial folder a save becomes; a text
    when it cannot be."""
    weights = _small_weights(run, dtype) if frozen_base(run.cfg) else _weights(run, pipeline, dtype)
    problem = _bad_weights(weights)
    if problem:
        return problem
    remove(partial)
    partial.mkdir(parents=True)
    _write(run, partial, pipeline, weights, state, name)
    return None


def _write_whole(run: Run, path: Path, pipeline, dtype: torch.dtype, state: TrainerState) -> str | None:
    weights = _small_weights(run, dtype) if frozen_base(run.cfg) else _weights(run, pipeline, dtype)
    problem = _bad_weights(weights)
    if problem:
        return problem
    with atomic_folder(path, owner=run.owner) as partial:
        _write(run, partial, pipeline, weights, state, path.name)
    return None


def _write(run: Run, folder: Path, pipeline, weights: dict, state: TrainerState, name: str) -> None:
    """A diffusers model folder; on a frozen base the folder's small files: the adapter file `<name>.safetensors`
    (with any embeddings bundled) and one `<token>.safetensors` per embedding."""
    if not frozen_base(run.cfg):
        write_model_folder(folder, pipeline, weights)
        return
    images = len(run.data.loader.dataset)
    if run.adapters:
        metadata = file_metadata(run.cfg, run.info, run.adapters.settings, step=state.global_step, epoch=state.epoch,
                                 images=images, base_hash=run.base_hash, name=name,
                                 rates=(run.plan.unet.lr, run.plan.text_encoder.lr))
        save_file(weights["lora"], str(folder / f"{name}.safetensors"), metadata=metadata)
    for token, ids in (run.embeddings.tokens if run.embeddings is not None else {}).items():
        metadata = embedding_file.file_metadata(run.cfg, run.info, token, len(ids), step=state.global_step,
                                                epoch=state.epoch, images=images)
        save_file(weights[_embedding_part(token)], str(folder / f"{embedding_file.file_name(token)}.safetensors"),
                  metadata=metadata)


def _embedding_part(token: str) -> str:
    """A token's part of a save's weights (apart from "lora", whatever the token is called)."""
    return f"embedding {token!r}"


def _small_weights(run: Run, dtype: torch.dtype) -> dict:
    """A frozen base's save, by part: "lora" (the adapters, and the embeddings bundled) and each embedding."""
    unet, text_encoder = run.unwrapped()
    vectors = run.embeddings.vectors() if run.embeddings is not None else {}
    weights = {_embedding_part(token): embedding_file.file_tensors(v, dtype) for token, v in vectors.items()}
    if run.adapters:
        weights["lora"] = {**file_tensors(adapted_modules(unet, text_encoder, run.cfg), run.adapters.settings, dtype),
                           **embedding_file.bundled_tensors(vectors, dtype)}
    return weights


def _say_saved(run: Run, path: Path) -> None:
    if run.adapters:
        say(f"Saved LoRA: {path / (path.name + '.safetensors')}")
    if run.embeddings is not None:
        files = [str(path / f"{embedding_file.file_name(token)}.safetensors") for token in run.embeddings.tokens]
        say(f"Saved embedding{'s' if len(files) > 1 else ''}: {', '.join(files)}")
    if not frozen_base(run.cfg):
        say(f"Saved model: {path}")


def _weights(run: Run, pipeline, dtype: torch.dtype) -> dict:
    modules = {name: getattr(pipeline, name) for name in ("unet", "vae", "text_encoder")}
    trained = {"unet"} | (set() if run.cfg.disable_textenc_training else {"text_encoder"})
    # the frozen parts' files as the run loaded them (trainer/models/pinned.py), or memory where they changed
    return component_weights(Path(run.info.path), modules, trained, dtype, pinned=run.pinned)


def _save_training_state(run: Run, partial: Path) -> None:
    run.accelerator.save_state(str(partial / STATE_DIR))


def _finish(partial: Path, path: Path, state: TrainerState | None, run: Run) -> None:
    """The training state's own file, then the one rename that makes the save whole."""
    if state is not None:
        write_trainer_state(partial / STATE_DIR, _with_setup(state, run))
    readable_as_umask(partial)
    partial.rename(path)


def _with_setup(state: TrainerState, run: Run) -> TrainerState:
    return dataclasses.replace(state, setup=run.setup)


def _bad_weights(weights: dict) -> str | None:
    """The guard has checked the trained weights every step; this checks exactly what is about to be written,
    frozen parts and the fp16 cast included."""
    problems = weight_problems(weights)
    if not problems:
        return None
    return (f"the weights to save are not all finite in the save's dtype ({'; '.join(problems)}); lower lr, or "
            "set save_full_precision if a weight legitimately exceeds fp16's range (65504)")


def _single_file(run: Run, folder: Path) -> None:
    try:
        written = write_single_file(folder, half=not run.cfg.save_full_precision)
    except Exception as err:
        failure = io_failure(err)
        if failure is None:
            raise
        return (f"the model folder {folder} is saved and complete, but its single file could not be written: "
                f"{failure}. Nothing of that file was left behind. Export it later with python utils/convert_"
                f"diffusers_to_original_stable_diffusion.py --model_path {folder} --checkpoint_path "
                f"{folder}.safetensors")
    say(f"Saved single file: {written}")
    return None


def _prune(run: Run) -> None:
    try:
        for old in prune_saves(run.periodic_saves, run.cfg.max_saves):
            run.periodic_saves.remove(old)
            say(f"Pruned old save {old.name} (max_saves {run.cfg.max_saves}).")
    except OSError as err:  # the new save is complete; an old one left over costs only space
        warn(f"could not prune old saves in {run.save_dir} ({err.strerror}); they are kept.")


def agree(run: Run, work: Callable[[], str | None], path: Path, *, step: int, partial: Path | None = None,
          every_process: bool = False, complete: bool = False) -> None:
    """Run `work` (on the main process, or on `every_process`), then have every process learn whether it worked
    everywhere. `work` fails by returning a text or raising a file-system error; then `partial` is removed and
    SaveError is raised on every process. Any other exception is a bug: `partial` is removed too, the process
    that met it raises it with its traceback, and the others a SaveError (none is left waiting). `complete`:
    `path` itself is whole already, and the failure is of an addition to it (its single file)."""
    accelerator = run.accelerator
    failure, bug = None, None
    if every_process or accelerator.is_main_process:
        try:
            failure = work()
        except Exception as err:
            failure = io_failure(err)
            if failure is None:  # a bug: the other processes still learn of it here, rather than wait forever
                bug = err
                failure = f"an unexpected {type(err).__name__} on process {accelerator.process_index}"
    if accelerator.num_processes > 1:
        failure = next((f for f in _gather_objects(failure) if f), None)
    if failure is None:
        return
    if partial is not None and accelerator.is_main_process:
        remove(partial)
    if bug is not None:
        raise bug
    if complete:
        raise SaveError(f"{failure}.{_go_on(run)}", failure, folder_saved=True)
    space = "" if " free" in failure else f" ({_free_space(path)})"  # the room check says it itself
    raise SaveError(f"could not save the model at step {step} as {path}: {failure}{space}. Nothing "
                    f"of this save was left behind, and earlier saves are untouched.{_go_on(run)}", failure + space)


def _free_space(path: Path) -> str:
    try:
        return f"{human_bytes(free_bytes(path.parent))} free there"
    except OSError:
        return "free space unknown"


def _gather_objects(value):
    from accelerate.utils import gather_object

    return gather_object([value])


def _go_on(run: Run) -> str:
    return " Free space or fix the folder, then " + how_to_go_on(run)


def how_to_go_on(run: Run) -> str:
    """How to continue from this run's last complete save (a sentence without its capital)."""
    if run.last_state:
        return f"continue with --resume_state {run.last_state}."
    if run.last_save:
        return (f"start again from the last save with --resume_ckpt {run.last_save} (save_optimizer true keeps a "
                "training state to continue exactly).")
    return "run again: this run had no complete save yet."


def _last_good(run: Run) -> str:
    if run.last_save:
        return f"The last good save is {run.last_save}."
    return "This run has no save; the base model is unchanged."


# ---------------------------------------------------------------- checks


def check_weights(run: Run) -> None:
    """Stop with the guard's verdict when a step broke the weights (reads the device)."""
    broken = run.guard.breakage(run.accelerator)
    if broken is not None:
        raise DivergedError(diverged_message(run, broken))


def diverged_message(run: Run, broken: Breakage) -> str:
    cfg = run.cfg
    lrs = ", ".join(f"{g.get('name', 'group')} {g['initial_lr']:g}" for g in run.optimizer.param_groups)
    fixes = [f"lower lr (now {lrs})"]
    if not cfg.clip_grad_norm:
        fixes.append("set clip_grad_norm, e.g. 1.0")
    if run.accelerator.mixed_precision == "fp16":
        fixes.append("use mixed_precision bf16 (fp16 overflows more easily)")
    return (f"training diverged at step {broken.step}: {broken.describe(run.guard.limit)}. Training stopped, and "
            f"nothing trained from step {broken.step} on was saved. {_last_good(run)} Likely fix: "
            + "; ".join(fixes) + ".")


def check_in_sync(run: Run, step: int) -> None:
    """Every DDP process must hold the same weights: DDP averages the gradients and each process takes the same
    step. A difference means a process trained on something else; stop before saving one process's weights.
    (Only plain DDP: under FSDP/DeepSpeed each process holds a shard, not a copy.)"""
    accelerator = run.accelerator
    if accelerator.distributed_type not in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        return
    params = [p.detach() for module in run.trained for p in module.parameters()]
    checksum = torch.stack([torch.stack([p.double().sum(), p.double().abs().sum()]) for p in params]).sum(0)
    every = accelerator.gather(checksum.reshape(1, 2))
    if not torch.equal(every, checksum.reshape(1, 2).expand_as(every)):
        raise UserError(f"at step {step} the {accelerator.num_processes} processes hold different weights "
                        f"(checksums {every.tolist()}); nothing was saved. This is a bug: please report it with "
                        "your accelerate config.")
    say(f"Weights agree on all {accelerator.num_processes} processes at step {step} "
            f"(checksum {checksum[0].item():.6f}).")


def rescue(run: Run, state: TrainerState, start_step: int) -> None:
    """After an unexpected error (a bug, out of memory, a disk that turned read-only): save the weights trained so
    far as an interrupted save with its training state, if anything was trained, the weights are sound, and one
    process runs (a lone process cannot save alongside others that are stuck elsewhere); then mark the error with
    how to go on from the run's last complete save, this one or an earlier one, which its one line ends with
    (trainer/failures.py). Never raises: the error itself is what gets reported. Called while it is handled."""
    error = sys.exception()
    _rescue_save(run, state, start_step)
    if error is not None:
        mark_how_to_go_on(error, how_to_go_on(run))


def _rescue_save(run: Run, state: TrainerState, start_step: int) -> None:
    if run.accelerator.num_processes > 1 or state.global_step <= start_step:
        return
    try:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        path = save(run, state, prefix="interrupted-", with_state=True)
        warn(f"the error below stopped training at step {state.global_step}; the weights trained so far were saved "
             f"first: {path} (continue with --resume_state {path}).")
    except Exception as err:  # the original error matters more than this one
        warn(f"the error below stopped training at step {state.global_step}, and the weights could not be saved "
             f"either ({type(err).__name__}: {err}).")

