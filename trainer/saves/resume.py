"""Continuing a run from its training state (`resume_state`): finding it, checking that it is complete and fits
this run, and honouring what may change.

A training state is `<save>/training_state/`: accelerate's files (trained weights, optimizer, LR schedule, RNG,
EMA) plus `trainer_state.json`, which holds the loop's position and the setup it was trained with. On resume:

- what a state can only continue with (the model's architecture, which modules train, the text-encoder
  freezing, the optimizer, EMA on or off) must match, or the resume is refused naming what differs and how to
  go on (a save's folder is also a model: `--resume_ckpt <save>` starts anew from its weights);
- what may change (learning rates, betas, weight decay, each model's LR schedule, warmup and decay steps,
  max_epochs/max_steps, the global batch, grad_accum) is honoured and said in one line;
- a state that has nothing left to train under this config is refused rather than ending at once with exit 0;
- a data set that changed since the save (images added, removed or replaced: the epochs' plan, data/schedule.py,
  differs) is said in the same line with its counts then and now, and handled as a changed batch is: the epoch in
  progress is planned anew from the new data and goes on after as many samples as it had trained (an epoch that
  had trained as many as the new data holds is over), the epochs after it train the new data whole, and the run
  ends where they end (`steps_left`), the LR schedule spanning exactly that; the global step and the schedule's
  position are kept. States saved before the data was recorded are resumed as they were.

The checks that need only the config run in the preflight, before any model loads; the architecture check runs
right after the model loads, before the latent cache or the run folder is made.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.files import modified_ns
from trainer.config.schema import lora_alpha
from trainer.errors import UserError

STATE_DIR = "training_state"
STATE_FILE = "trainer_state.json"
# Keys of an optimizer's param groups that the config sets; the rest (Prodigy's d, ...) is the optimizer's state.
CONFIGURED_GROUP_KEYS = ("initial_lr", "betas", "eps", "weight_decay", "momentum", "growth_rate", "weight_decouple",
                         "safeguard_warmup")
SCHEDULE_KEYS = ("lr_scheduler", "lr_warmup_steps", "lr_decay_steps")


@dataclass(frozen=True)
class TrainingSetup:
    """What the state was trained with. `FIXED` fields must match on resume; the others may change."""

    family: str
    architecture: str  # a hash of every UNet and text-encoder parameter's name and shape
    trained: tuple[str, ...]
    freezing: dict[str, Any]  # trainer/optim/plan.py TextEncoderFreezing as a dict
    optimizer: str  # its name, or 'unet_name+text_encoder_name' when each model has its own (optim.OptimizerPlan.label)
    ema: bool
    lr: dict[str, float]  # per parameter group
    lr_scheduler: str  # the UNet's (older states: the one schedule of both)
    lr_warmup_steps: int | None
    total_steps: int
    grad_accum: int
    schedules: dict[str, dict[str, Any]] = field(default_factory=dict)  # per group: SCHEDULE_KEYS; {}: older state
    seed: int | None = None  # the run's seed (a -1 resolved); None: an older state
    fused_backward: bool = False  # one optimizer state per parameter (trainer/optim/fused_backward.py); older: False
    lora: dict[str, Any] = field(default_factory=dict)  # LoRA mode's adapter shapes (config.lora_record); {}: full
    base: str = ""  # LoRA mode: sha256 of the base's weights the adapters were trained on (trainer/adapters/lora.py)
    embedding: dict[str, Any] = field(default_factory=dict)  # embedding mode: each token's vector count; {}: none
    data: dict[str, Any] = field(default_factory=dict)  # the data's plan record (data/schedule.py); {}: older state

    FIXED = ("trained", "freezing", "optimizer", "ema", "fused_backward", "lora", "embedding")  # checked from the
    # config alone (preflight)


@dataclass
class TrainerState:
    """Where the loop stands, beside accelerate's own state (weights, optimizer, LR schedule, scaler, RNG)."""

    global_step: int
    epoch: int  # 1-based epoch in progress
    batches_in_epoch: int  # global micro-batches of `epoch` already consumed (each process took its slice of each)
    batch_samples: int = 0  # rows in one global micro-batch (batch_size x processes); 0: saved before it was kept
    setup: TrainingSetup | None = field(default=None, compare=False)  # None: saved by an older version

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        data = json.loads(text)
        setup = data.pop("setup", None)
        if setup is not None:
            setup = TrainingSetup(**{**setup, "trained": tuple(setup["trained"]),
                                     "freezing": upgraded_freezing(setup["freezing"])})
        return cls(**data, setup=setup)


def lora_record(cfg) -> dict[str, Any]:
    """What a LoRA training state can only continue with (TrainingSetup.lora): the adapters' shapes and scale ({}
    for a full fine-tune). Dropout and rates may change."""
    if not cfg.lora_rank:
        return {}
    kind = {} if cfg.lora_kind == "lora" else {"kind": cfg.lora_kind}  # LoRA's states from before kinds still fit
    factor = {"factor": cfg.lokr_factor} if cfg.lora_kind == "lokr" else {}
    return {"rank": cfg.lora_rank, "alpha": lora_alpha(cfg), "targets": cfg.lora_targets,
            "text_encoder": cfg.lora_text_encoder, **kind, **factor}


def embedding_record(cfg) -> dict[str, Any]:
    """What an embedding's training state can only continue with (TrainingSetup.embedding): each token and its
    vector count ({} without embeddings). Initializers and the rate may change."""
    from trainer.adapters.embedding_tokens import configured_tokens

    return {token.token: token.vectors for token in configured_tokens(cfg)}


def upgraded_freezing(freezing: dict[str, Any]) -> dict[str, Any]:
    """A state's text-encoder freezing as this version records it. States saved before unfreeze_last_n_layers
    recorded freeze_front_n_layers (negative: all but the last n) and an explicit freeze_embeddings."""
    if "unfreeze_last_n_layers" in freezing:
        return freezing
    front = freezing.get("freeze_front_n_layers")
    return {"unfreeze_last_n_layers": -front if front is not None and front < 0 else None,
            "freeze_front_n_layers": front if front is not None and front > 0 else None,
            "freeze_embeddings": bool(freezing.get("freeze_embeddings")),
            "freeze_final_layer_norm": bool(freezing.get("freeze_final_layer_norm"))}


def architecture_hash(*modules) -> str:
    """Names and shapes of every parameter of the base: equal exactly when a state's weights load into these
    modules."""
    from trainer.adapters.embeddings import is_rows_key

    digest = hashlib.blake2b(digest_size=8)
    for module in modules:
        for name, param in module.named_parameters():
            if is_rows_key(name):  # an embedding's rows: TrainingSetup.embedding records them
                continue
            digest.update(f"{name}:{tuple(param.shape)};".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- finding and reading


def find_training_state(resume_state: str, search: list[Path]) -> Path:
    """The training-state folder `resume_state` names: a save (or its training_state/), or 'findlast': the newest
    complete one under the `search` folders (logdir and the save folder)."""
    if resume_state != "findlast":
        given = Path(resume_state)
        for candidate in (given, given / STATE_DIR):
            if (candidate / STATE_FILE).is_file():
                return candidate
        raise UserError(
            f"resume_state {resume_state!r} holds no {STATE_FILE}; point it at a save made with save_optimizer true "
            f"(the save folder or its {STATE_DIR}/ sub-folder), or use 'findlast'."
        )
    # hidden folders are partial saves, never complete ones
    found = [(mtime, p.parent) for d in search if d.is_dir() for p in d.rglob(f"{STATE_DIR}/{STATE_FILE}")
             if not any(part.startswith(".") for part in p.relative_to(d).parts) and (mtime := modified_ns(p)) is not None]
    if not found:
        where = ", ".join(dict.fromkeys(str(d) for d in search))
        raise UserError(f"resume_state findlast found no training state under {where}; saves keep one only when "
                        "save_optimizer is true (and always on Ctrl-C).")
    return max(found, key=lambda pair: pair[0])[1]


def read_trainer_state(state_dir: Path) -> TrainerState:
    try:
        return TrainerState.from_json((state_dir / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise UserError(f"{state_dir / STATE_FILE} is damaged ({err}); resume from another save, or start a new run "
                        f"from this save's weights with --resume_ckpt {state_dir.parent}.") from None


def missing_state_files(state_dir: Path, setup: TrainingSetup | None) -> list[str]:
    """accelerate's files a complete state of this setup has, that `state_dir` lacks (or holds empty)."""
    trained = setup.trained if setup else ("unet",)
    expected = ["model.safetensors", *[f"model_{i}.safetensors" for i in range(1, len(trained))],
                "optimizer.bin", "scheduler.bin", "random_states_0.pkl"]
    if setup and setup.ema:
        expected += [f"custom_checkpoint_{i}.pkl" for i in range(len(trained))]
    return [name for name in expected if not (state_dir / name).is_file() or (state_dir / name).stat().st_size == 0]


# ---------------------------------------------------------------- fitting


def fixed_differences(saved: TrainingSetup, current: dict[str, Any]) -> list[str]:
    """The settings the state cannot continue without, as 'what: saved -> now'."""
    return [f"{key}: {_shown(getattr(saved, key))} then, {_shown(current[key])} now"
            for key in TrainingSetup.FIXED if _comparable(getattr(saved, key)) != _comparable(current[key])]


def honoured_changes(saved: TrainingSetup, current: TrainingSetup, saved_batch: int, batch: int) -> list[str]:
    """The settings that changed and will be honoured, as 'what saved -> now'."""
    changes = [f"lr ({group}) {saved.lr[group]:g} -> {lr:g}" for group, lr in current.lr.items()
               if group in saved.lr and saved.lr[group] != lr]
    changes += schedule_changes(saved, current)
    for key in ("total_steps", "grad_accum", "seed"):
        if getattr(saved, key) not in (None, getattr(current, key)):
            changes.append(f"{key} {_shown(getattr(saved, key))} -> {_shown(getattr(current, key))}")
    if saved.seed not in (None, current.seed):
        changes[-1] += " (the rest of the data order and noise follow the new seed)"
    if saved_batch and saved_batch != batch:
        changes.append(f"global batch {saved_batch} -> {batch} samples (the epoch in progress is re-planned in the "
                       "new batches and goes on after the samples already trained)")
    return changes


def schedule_changes(saved: TrainingSetup, current: TrainingSetup) -> list[str]:
    """Each schedule setting that changed, named once when it changed alike for every group, else per group."""
    def of(setup: TrainingSetup, group: str) -> dict[str, Any]:
        legacy = {"lr_scheduler": setup.lr_scheduler, "lr_warmup_steps": setup.lr_warmup_steps, "lr_decay_steps": None}
        return setup.schedules.get(group, legacy)  # older states: one schedule drove every group

    changes = []
    for key in SCHEDULE_KEYS:
        moved = {group: (of(saved, group)[key], of(current, group)[key]) for group in current.lr}
        moved = {group: pair for group, pair in moved.items() if pair[0] != pair[1]}
        if len(set(moved.values())) == 1 and len(moved) == len(current.lr):
            then, now = next(iter(moved.values()))
            changes.append(f"{key} {_setting(then)} -> {_setting(now)}")
        else:
            changes += [f"{key} ({group}) {_setting(then)} -> {_setting(now)}" for group, (then, now) in moved.items()]
    return changes


def _setting(value: Any) -> str:
    return "default" if value is None else _shown(value)


def _comparable(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples and lists alike, as the json file has them


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "+".join(map(str, value)) or "nothing"
    if isinstance(value, bool):
        return "on" if value else "off"
    return json.dumps(value) if isinstance(value, dict) else str(value)


def refusal(state_dir: Path, differences: list[str], what_to_set: str = "",
            setup: TrainingSetup | None = None) -> UserError:
    """`setup`: the state's; a save of a frozen base's adapters or embeddings is no base model to start from."""
    save = state_dir.parent if state_dir.name == STATE_DIR else state_dir
    if setup is not None and (setup.lora or setup.embedding):
        fresh = (f" A save of {'adapters' if setup.lora else 'embeddings'} is no base model: to train anew, start a "
                 "new run from the base model with no resume_state" + (f" (lora_init {save}/{save.name}.safetensors "
                 "starts the adapters from this save's)" if setup.lora else "") + ".")
    else:
        fresh = (f" To train on from its weights with a fresh optimizer instead, start a new run with --resume_ckpt "
                 f"{save} and no resume_state.")
    return UserError(f"resume_state {state_dir} cannot continue this run: " + "; ".join(differences) + ". A training "
                     f"state continues only the setup it was saved with.{what_to_set}{fresh}")


def continue_position(saved: TrainerState, batch_samples: int, batches: int) -> TrainerState:
    """Where to go on in the epoch with global batches of `batch_samples` rows, `batches` of them in an epoch now.
    Unchanged (an exact resume) when the global batch and the data are the same, whatever the process count
    (batch 4 on one process = batch 2 on two). With another global batch or data set the epoch is planned anew
    (data/schedule.py), so the run goes on after as many samples as were trained, rounded down to whole batches;
    an epoch that had trained as many as the new plan holds is at its end."""
    position = saved.batches_in_epoch
    if saved.batch_samples and saved.batch_samples != batch_samples:
        position = saved.batches_in_epoch * saved.batch_samples // batch_samples
    return dataclasses.replace(saved, batches_in_epoch=min(position, batches), batch_samples=batch_samples)


def steps_left(position: TrainerState, batches: int, grad_accum: int, max_epochs: int) -> int:
    """Optimizer steps from `position` (`continue_position`'s) to the end of epoch `max_epochs`, with `batches`
    global micro-batches an epoch: the rest of the epoch in progress, then the whole epochs after it (each ends
    in a step, its last accumulation however short). A resumed run ends there, so that it trains whole epochs of
    the data it has now; for a state of the same data and batch this is exactly what a fresh count leaves."""
    if position.epoch > max_epochs:
        return 0
    rest = math.ceil((batches - position.batches_in_epoch) / grad_accum)
    return rest + (max_epochs - position.epoch) * math.ceil(batches / grad_accum)


def data_changes(saved: TrainerState, now: dict[str, Any], batch_samples: int, batches: int) -> list[str]:
    """The data set's change since the state was saved (its plan record, data/schedule.py, differs), with what
    resuming does about it, as one honoured change; [] when it is the same or the state did not record it."""
    then = saved.setup.data if saved.setup else {}
    if not then or then == now:
        return []
    counts = (f"{then['images']} -> {now['images']} images" if then["images"] != now["images"] else
              f"{now['images']} images then and now, but other files, sizes or folder settings")
    trained = saved.batches_in_epoch * (saved.batch_samples or batch_samples)
    position = continue_position(saved, batch_samples, batches)
    if not trained:
        epoch = f"epoch {saved.epoch} begins with the new data"
    elif position.batches_in_epoch >= batches:
        epoch = (f"epoch {saved.epoch} had trained {trained} samples, as many as the new data's epoch holds: it is "
                 "over, and the next begins with the new data")
    else:
        epoch = f"epoch {saved.epoch} goes on in the new data's order after the {trained} samples it had trained"
    change = (f"data_root {counts} ({epoch}; every epoch after it trains the new data whole, and the run ends "
              "where its last epoch ends)")
    return [change]


# ---------------------------------------------------------------- loading


class StateGone(UserError):
    """The training state left its place before it had loaded: its save was renamed away whole (another run's
    max_saves pruning, trainer/saves/checkpoints.py), which is no damage to it."""


def load_training_state(accelerator, state_dir: Path) -> TrainerState:
    """Weights, optimizer, LR schedule and RNG back into the prepared objects; returns the saved position. With
    more processes than at the save, the new ones find no RNG file of their own; accelerate then keeps their
    seeded state, which changes nothing here: no training draw uses the global RNG. Raises StateGone when the
    state's folder is no longer there once a read failed."""
    try:
        saved = read_trainer_state(state_dir)
        accelerator.load_state(str(state_dir))
    except (UserError, OSError, RuntimeError, ValueError, KeyError, EOFError) as err:
        if not state_dir.is_dir():
            raise StateGone(f"the training state {state_dir} is gone") from None
        if isinstance(err, UserError):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0]  # torch adds paragraphs
        raise UserError(f"could not load the training state {state_dir} ({type(err).__name__}: {first}); it is "
                        f"damaged or from another setup. Resume from another save, or start a new run from this "
                        f"save's weights with --resume_ckpt {state_dir.parent}.") from None
    return saved


def load_agreed(accelerator, state_dir: Path) -> TrainerState | None:
    """`load_training_state` on every process, with one outcome for all: the state; None when it was gone under
    any process (all then load another one together: processes must never train on from different states); any
    other failure, on any process, raised on every one (none is left waiting for the others)."""
    saved, outcome, failure = None, None, None  # outcome: None loaded, "" gone, else what failed
    try:
        saved = load_training_state(accelerator, state_dir)
    except StateGone:
        outcome = ""
    except UserError as err:
        outcome, failure = str(err), err
    outcomes = [outcome]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        outcomes = gather_object([outcome])
    if failure is not None:
        raise failure
    problem = next((text for text in outcomes if text), None)
    if problem is not None:
        raise UserError(problem)
    return None if "" in outcomes else saved


def restore_configured_hyperparameters(optimizer, lr_scheduler, configured: list[dict[str, Any]]) -> None:
    """Loading a state brings back the saved param groups' lr, betas and weight decay and the schedule's base
    rates; put back what this run configured, and set each group's lr to the schedule's value at the restored
    step (the schedule's shape comes from this run: its function is rebuilt, not loaded)."""
    for group, values in zip(optimizer.param_groups, configured):
        group.update(values)
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    rates = [base * rule(scheduler.last_epoch) for base, rule in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates


def configured_hyperparameters(optimizer) -> list[dict[str, Any]]:
    return [{k: group[k] for k in CONFIGURED_GROUP_KEYS if k in group} for group in optimizer.param_groups]
