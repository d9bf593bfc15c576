"""The training state a run resumes (`resume_state`), chosen and checked before any model loads: found (a save,
or findlast's newest), complete, fit for this config, with steps left; what changed and is honoured said in one
line (trainer/saves/resume.py says which changes may be), and the step the run ends at. Picked again when
findlast's pick goes before it has loaded (trainer/preflight/findlast.py), and checked against the model once it
has loaded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.console import say, warn
from data.scan import ImageItem
from data.schedule import batches_per_epoch, plan_record
from trainer.config.everydream2 import FIND_LAST
from trainer.config.schema import TrainConfig, trains_unet
from trainer.errors import UserError
from trainer.optim.plan import OptimizerPlan
from trainer.preflight.findlast import REMOVED, is_gone, picked_again, save_search
from trainer.saves.resume import (
    TrainerState,
    TrainingSetup,
    continue_position,
    data_changes,
    embedding_record,
    find_training_state,
    fixed_differences,
    honoured_changes,
    lora_record,
    missing_state_files,
    read_trainer_state,
    refusal,
    steps_left,
)


@dataclass
class ResumePlan:
    state_dir: Path
    saved: TrainerState
    total_steps: int  # the step the resumed run ends at (`steps_in_run`)
    found_last: bool = False  # findlast picked it: if it goes before it has loaded, the next newest is taken


def count_steps(batches: int, cfg: TrainConfig) -> tuple[int, int]:
    """(optimizer steps per epoch, steps in the whole run) of a fresh run, for `batches` global micro-batches per
    epoch."""
    per_epoch = math.ceil(batches / cfg.grad_accum)
    total = per_epoch * cfg.max_epochs
    return per_epoch, min(total, cfg.max_steps) if cfg.max_steps else total


def steps_in_run(cfg: TrainConfig, batches: int, batch_samples: int, saved: TrainerState | None = None) -> int:
    """The step a run ends at with `batches` global micro-batches of `batch_samples` rows an epoch: max_epochs
    epochs, or max_steps when it comes first. A resumed run goes on from the `saved` state's position and ends
    where its last epoch ends (trainer/saves/resume.py `steps_left`), which for the same data and batch is the
    fresh count."""
    if saved is None:
        return count_steps(batches, cfg)[1]
    position = continue_position(saved, batch_samples, batches)
    total = saved.global_step + steps_left(position, batches, cfg.grad_accum, cfg.max_epochs)
    return min(total, cfg.max_steps) if cfg.max_steps else total


def current_setup(cfg: TrainConfig, plan: OptimizerPlan, total_steps: int, family: str = "",
                  architecture: str = "", base: str = "", data: dict[str, Any] | None = None) -> TrainingSetup:
    """What this run trains with, as a training state records it (`data`: data/schedule.py's plan record)."""
    trained = (("unet",) if trains_unet(cfg) else ()) + (() if cfg.disable_textenc_training else ("text_encoder",))
    lr = {"unet": plan.unet.lr, **({} if cfg.disable_textenc_training else {"text_encoder": plan.text_encoder.lr})}
    if plan.embedding is not None:
        lr = {**({"unet": lr["unet"]} if trains_unet(cfg) else {}), "embedding": plan.embedding.lr}
        if cfg.lora_text_encoder:
            lr["text_encoder"] = plan.text_encoder.lr
    schedules = {"unet": plan.unet_schedule, "text_encoder": plan.text_encoder_schedule,
                 "embedding": plan.text_encoder_schedule}
    return TrainingSetup(family, architecture, trained, asdict(plan.freezing), plan.label,
                         cfg.ema_decay_rate is not None, lr, plan.unet_schedule.name, plan.unet_schedule.warmup_steps,
                         total_steps, cfg.grad_accum, schedules={group: schedules[group].record() for group in lr},
                         seed=cfg.seed, fused_backward=cfg.fused_backward, lora=lora_record(cfg), base=base,
                         embedding=embedding_record(cfg), data=data or {})


def plan_resume(cfg: TrainConfig, plan: OptimizerPlan, items: list[ImageItem], batch_samples: int,
                notices: list[str], gone: Path | None = None) -> ResumePlan:
    """The training state to continue on `items` (the training images), checked for completeness and fit; what
    changed is said in one line. findlast's pick that goes before it is read gives way to the next newest, said;
    `gone`: a pick that went after it was read (`resume_elsewhere`)."""
    search = save_search(cfg)
    found_last = cfg.resume_state == FIND_LAST
    state_dir = _next_state(gone, search) if gone else find_training_state(cfg.resume_state, search)
    while True:
        try:
            return _checked(cfg, plan, items, batch_samples, notices, state_dir, found_last)
        except UserError:
            if not (found_last and is_gone(state_dir)):
                raise
            state_dir = _next_state(state_dir, search)


def _next_state(gone: Path, search: list[Path]) -> Path:
    """The newest training state that still exists, said; a UserError saying so when none does."""
    try:
        found = find_training_state(FIND_LAST, search)
    except UserError:
        where = ", ".join(dict.fromkeys(str(d) for d in search))
        raise UserError(f"resume_state findlast: {gone} {REMOVED}, and no other training state is left under "
                        f"{where}. Resume from a save kept elsewhere, or start a new run.") from None
    warn(picked_again("resume_state", gone, found, "training state"))
    return found


def _checked(cfg: TrainConfig, plan: OptimizerPlan, items: list[ImageItem], batch_samples: int,
             notices: list[str], state_dir: Path, found_last: bool) -> ResumePlan:
    """`state_dir` read and checked: complete, fit for this config, with steps left; its changes said."""
    saved = read_trainer_state(state_dir)
    missing = missing_state_files(state_dir, saved.setup)
    if missing:
        raise UserError(f"resume_state {state_dir} is incomplete: it lacks {', '.join(missing)}. Resume from another "
                        f"save, or start a new run from this save's weights with --resume_ckpt {state_dir.parent}.")
    batches = batches_per_epoch(items, batch_samples)
    total_steps = steps_in_run(cfg, batches, batch_samples, saved)
    current = current_setup(cfg, plan, total_steps, data=plan_record(items, Path(cfg.data_root)))
    if saved.setup is not None:
        differences = fixed_differences(saved.setup, {k: getattr(current, k) for k in TrainingSetup.FIXED})
        if differences:
            raise refusal(state_dir, differences, " Set them back to continue exactly.", saved.setup)
        changes = honoured_changes(saved.setup, current, saved.batch_samples, batch_samples)
        changes += data_changes(saved, current.data, batch_samples, batches)
        if changes:
            notices.append(f"resuming {state_dir} with changes, honoured: {'; '.join(changes)}.")
    if saved.global_step >= total_steps:
        raise UserError(f"resume_state {state_dir} is at step {saved.global_step}, and this config's run ends at step "
                        f"{total_steps} (max_epochs {cfg.max_epochs}, max_steps {cfg.max_steps or 'none'}, batch "
                        f"{batch_samples} per step): nothing is left to train. Raise max_epochs or max_steps.")
    return ResumePlan(state_dir, saved, total_steps, found_last)


def resume_elsewhere(cfg: TrainConfig, gone: ResumePlan, plan: OptimizerPlan, items: list[ImageItem],
                     batch_samples: int, model: tuple[str, str], accelerator) -> ResumePlan:
    """The state to load instead of one that went after the preflight read it (another run's max_saves pruning):
    findlast's next newest, checked as the preflight checks one and against the loaded `model` (family,
    architecture hash), its honoured changes said. The main process picks it for all, and every process raises
    the same UserError when there is none; a state the user named is not replaced by another."""
    from accelerate.utils import broadcast_object_list

    found = problem = None
    notices: list[str] = []
    if accelerator.is_main_process:
        try:
            if not gone.found_last:
                raise UserError(f"resume_state {gone.state_dir} {REMOVED}: nothing was trained. Resume from another "
                                "save (--resume_state findlast takes the newest that exists).")
            found = plan_resume(cfg, plan, items, batch_samples, notices, gone=gone.state_dir)
            check_resume_fits_model(found, *model)
        except UserError as err:
            problem = str(err)
    found, problem = broadcast_object_list([found, problem])
    if problem is not None:
        raise UserError(problem)
    for notice in notices:
        say(notice)
    return found


def check_resume_fits_model(resume: ResumePlan | None, family: str, architecture: str) -> None:
    """A state only loads into the architecture it was trained with."""
    setup = resume.saved.setup if resume else None
    if setup is None:
        return
    if (setup.family, setup.architecture) != (family, architecture):
        what = (f"model family {setup.family.upper()} then, {family.upper()} now" if setup.family != family
                else "the model's layers differ in name or shape from those it was trained with")
        raise refusal(resume.state_dir, [what], " Resume with the base model it was trained from.", setup)
