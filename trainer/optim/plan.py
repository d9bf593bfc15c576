"""The optimizer plan: which optimizer, settings and learning-rate schedule each model trains with, and which parts
of the text encoder stay frozen, from train.json and an EveryDream2 optimizer.json (read by optimizer_json.py).
What is planned here is built by build.py; planning imports no torch (the preflight plans before any model).

- train.json's `optimizer`, `lr`, `lr_scheduler`, `lr_warmup_steps`, `lr_decay_steps` are the defaults; a value
  set in optimizer.json's `base` wins (each win over train.json's optimizer or lr is said).
- The text encoder starts from `base` (its lr times `text_encoder_lr_scale` when that is set and the text encoder's
  own lr is not), then `text_encoder_overrides` wins where set.
- Where the two models differ only in lr, betas, epsilon or weight decay, they are two parameter groups of one
  optimizer under one schedule. Where they differ in optimizer, optimizer-specific keys or schedule, each model
  gets its own optimizer and schedule (chained.ChainedOptimizer). Adaptive optimizers (Prodigy, D-Adaptation)
  estimate one step size per optimizer and cannot honour per-group rates, so there any difference splits them.
"""

from __future__ import annotations

import difflib
import math
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from trainer.config.schema import OptimizerName, embedding_mode, trains_unet
from trainer.errors import ProblemsError
from trainer.optim.optimizer_json import OptimizerFile, read_optimizer_file

OPTIMIZERS: tuple[str, ...] = typing.get_args(OptimizerName)
DEFAULT_BETAS = (0.9, 0.999)
DEFAULT_LR = 1.5e-6  # train.json's lr null and no optimizer.json base lr
INF = math.inf


@dataclass(frozen=True)
class OptimizerSpec:
    """What an optimizer name reads and which package provides it."""

    package: str  # the pip package (requirements.txt) that provides it
    group_keys: tuple[str, ...]  # the settings each parameter group carries besides lr and weight decay
    options: dict[str, Any]  # the optimizer-specific keys it reads -> EveryDream2's default (None: the package's)
    adaptive: bool = False  # estimates its own step size: lr multiplies it (about 1.0), one estimate per optimizer
    betas: tuple[float, ...] = DEFAULT_BETAS  # the default, and how many it takes


SPECS: dict[str, OptimizerSpec] = {
    "adamw": OptimizerSpec("torch", ("betas", "eps"), {}),
    "adamw8bit": OptimizerSpec("bitsandbytes", ("betas", "eps"), {}),
    "lion": OptimizerSpec("lion-pytorch", ("betas",), {}),
    "lion8bit": OptimizerSpec("bitsandbytes", ("betas",), {}),
    "adafactor": OptimizerSpec("transformers", (), {}),
    # our prodigy keeps the package's defaults (EveryDream2 sets use_bias_correction and safeguard_warmup true)
    "prodigy": OptimizerSpec("prodigyopt", ("betas", "eps"),
                             {"d0": None, "growth_rate": None, "safeguard_warmup": None}, adaptive=True),
    "dadapt_adam": OptimizerSpec("pytorch-optimizer", ("betas", "eps"),
                                 {"d0": 1e-6, "growth_rate": INF, "decouple": True}, adaptive=True),
    "dadapt_lion": OptimizerSpec("pytorch-optimizer", ("betas",), {"d0": 1e-6}, adaptive=True),
    "dadapt_sgd": OptimizerSpec("pytorch-optimizer", (), {"d0": 1e-6, "growth_rate": INF, "momentum": 0.0},
                                adaptive=True),
    "dadapt_adan": OptimizerSpec("pytorch-optimizer", ("betas", "eps"),
                                 {"d0": 1e-6, "growth_rate": INF, "no_prox": False}, adaptive=True,
                                 betas=(0.98, 0.92, 0.99)),
}
assert set(SPECS) == set(OPTIMIZERS), "trainer/config/schema.py OptimizerName and SPECS name the same optimizers"
# EveryDream2 names with no well-kept package behind them -> (the nearest supported optimizer, why not)
_DOWG = "its only package, dowg 0.3.1 (2023), is unmaintained and its author doubts that it is correct"
REFUSED: dict[str, tuple[str, str]] = {
    "adacoor": ("prodigy", "it is EveryDream2's own code, in no package"),
    "coordinate_dowg": ("prodigy", _DOWG),
    "scalar_dowg": ("prodigy", _DOWG),
}
OPTION_KEYS = ("d0", "decouple", "momentum", "growth_rate", "safeguard_warmup", "no_prox")
GROUP_KEYS = {"betas": "betas", "epsilon": "eps"}  # optimizer.json's key -> the group setting that reads it
LORA_LR_HINT = 1e-5  # below this LoRA adapters barely move: likely a full fine-tune's lr left in place
ADAPTIVE_LR_HINT = 0.01  # below this an adaptive optimizer's lr (a multiplier of its own step size) is a likely slip


@dataclass(frozen=True)
class OptimizerSettings:
    optimizer: str = "adamw"
    lr: float = 1.5e-6
    betas: tuple[float, ...] | None = None  # None: the optimizer's default (SPECS)
    epsilon: float = 1e-8
    weight_decay: float = 0.01
    options: dict[str, Any] = field(default_factory=dict)  # optimizer-specific keys set (d0, decouple, ...)

    @property
    def spec(self) -> OptimizerSpec:
        return SPECS[self.optimizer]

    def resolved_betas(self) -> tuple[float, ...]:
        return self.betas if self.betas is not None else self.spec.betas

    def resolved_options(self) -> dict[str, Any]:
        """The optimizer-specific keys this optimizer reads, set or defaulted (None: the package's default)."""
        return {key: self.options.get(key, default) for key, default in self.spec.options.items()}


@dataclass(frozen=True)
class LRSchedule:
    name: str = "constant"
    warmup_steps: int | None = None  # None: 0 for constant, 2% of the decay otherwise; 0: no warmup
    decay_steps: int | None = None  # None: the run's length. After them the rate stays at its end value.

    def resolved(self, total_steps: int) -> tuple[int, int]:
        """(warmup steps, decay steps) for a run of `total_steps`."""
        decay = self.decay_steps if self.decay_steps is not None else total_steps
        if self.warmup_steps is not None:
            return self.warmup_steps, decay
        return (0 if self.name == "constant" else math.ceil(0.02 * decay)), decay

    def record(self) -> dict[str, Any]:
        """As a training state records it (trainer/saves/resume.py TrainingSetup.schedules)."""
        return {"lr_scheduler": self.name, "lr_warmup_steps": self.warmup_steps, "lr_decay_steps": self.decay_steps}


@dataclass(frozen=True)
class TextEncoderFreezing:
    """EveryDream2's text_encoder_freezing, with its defaults: the last n layers train (and the final layer norm),
    the rest is frozen, the embeddings too unless said otherwise."""

    unfreeze_last_n_layers: int | None = None  # None: every layer trains
    freeze_front_n_layers: int | None = None  # deprecated (positive only here: negative ones become the above)
    freeze_embeddings: bool | None = None  # None: frozen exactly when some layers are
    freeze_final_layer_norm: bool = False

    def trained_layers(self, count: int) -> int:
        """How many of the last of `count` encoder layers train."""
        if self.unfreeze_last_n_layers is not None:
            return min(count, self.unfreeze_last_n_layers)
        if self.freeze_front_n_layers is not None:
            return max(0, count - self.freeze_front_n_layers)
        return count

    def embeddings_frozen(self, count: int) -> bool:
        if self.freeze_embeddings is not None:
            return self.freeze_embeddings
        return self.trained_layers(count) < count

    @property
    def freezes_anything(self) -> bool:
        return self != TextEncoderFreezing(freeze_embeddings=False)


@dataclass(frozen=True)
class OptimizerPlan:
    unet: OptimizerSettings
    text_encoder: OptimizerSettings
    unet_schedule: LRSchedule
    text_encoder_schedule: LRSchedule
    freezing: TextEncoderFreezing = TextEncoderFreezing(freeze_embeddings=False)
    train_text_encoder: bool = True
    grad_scaler_tweaks: bool = False  # EveryDream2's fp16 grad-scaler settings (build.GRAD_SCALER_*)
    log_grad_norm: bool = True  # measure the gradient norm at log steps, for the log
    embedding: OptimizerSettings | None = None  # embedding mode: the token rows' (the text encoder's, at their lr)
    embedding_steps: int = 0  # pivotal tuning: the rows' lr is 0 after this many optimizer steps; 0: never
    train_unet: bool = True  # false: textual inversion, where only the embedding trains
    text_encoder_layers: bool = True  # whether anything of the text encoder but an embedding's rows trains

    @property
    def separate(self) -> bool:
        """Whether the text encoder gets an optimizer (and schedule) of its own."""
        unet, te = self.unet, self.text_encoder
        if not self.train_text_encoder:
            return False
        if unet.optimizer != te.optimizer or unet.resolved_options() != te.resolved_options():
            return True
        if self.unet_schedule != self.text_encoder_schedule:
            return True
        return unet.spec.adaptive and unet != te

    @property
    def label(self) -> str:
        """The optimizer as a training state records it: its name, or 'unet+text_encoder' names when split."""
        return f"{self.unet.optimizer}+{self.text_encoder.optimizer}" if self.separate else self.unet.optimizer

    def describe(self) -> str:
        if not self.separate:
            return self.unet.optimizer
        return f"{self.unet.optimizer} (UNet) + {self.text_encoder.optimizer} (text encoder), each its own"


def plan_optimizers(cfg, notices: list[str] | None = None) -> OptimizerPlan:
    """What to build, from train.json's keys and the optional optimizer.json; every problem of the file at once."""
    notices = notices if notices is not None else []
    settings = OptimizerSettings(optimizer=cfg.optimizer, lr=DEFAULT_LR if cfg.lr is None else cfg.lr)
    schedule = LRSchedule(cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.lr_decay_steps or None)  # train.json's 0: run
    plan = OptimizerPlan(settings, settings, schedule, schedule, train_text_encoder=not cfg.disable_textenc_training)
    problems: list[str] = []
    found = read_optimizer_file(Path(cfg.optimizer_config), problems, notices) if cfg.optimizer_config else None
    if found is not None:
        plan = _apply_file(found, plan, problems, notices, cfg.lr)
    if cfg.lora_rank:
        plan = _lora_rates(plan, cfg.lora_unet_lr, cfg.lora_text_encoder_lr, notices)
    if embedding_mode(cfg):  # the rows train with the text encoder's optimizer and schedule, at their own rate
        plan = replace(plan, embedding=replace(plan.text_encoder, lr=cfg.embedding_lr),
                       embedding_steps=cfg.embedding_steps, train_unet=trains_unet(cfg),
                       text_encoder_layers=cfg.lora_text_encoder)
    if problems:
        raise ProblemsError(problems, heading="in optimizer_config")  # each names the file and key
    _say_slips(plan, notices)
    return plan


def _apply_file(found: OptimizerFile, plan: OptimizerPlan, problems: list[str], notices: list[str],
                given_lr: float | None) -> OptimizerPlan:
    """The file over train.json's settings, except a train.json (or command-line) lr, which wins over the file's
    base lr, as in EveryDream2: its trainSD21.json sets lr 2e-6 over its optimizerSD21.json's 1e-6."""
    name = found.name
    for section, values in (("base", found.base), ("text_encoder_overrides", found.text_encoder)):
        if "optimizer" in values and not _known_optimizer(values["optimizer"], f"{name} {section}.optimizer", problems):
            del values["optimizer"]  # the rest is still checked, against the optimizer the model would get
    if "optimizer" in found.base and found.base["optimizer"] != plan.unet.optimizer:
        notices.append(f"optimizer {found.base['optimizer']} from {name} (train.json's {plan.unet.optimizer} is "
                       "not used).")
    if given_lr is not None and found.base.get("lr") not in (None, given_lr):
        notices.append(f"lr {given_lr:g} from the config wins over {name} base.lr {found.base['lr']:g}, as in "
                       "EveryDream2 (set lr null to use the file's).")
        found = replace(found, base={**found.base, "lr": given_lr})
    unet = _settings(found.base, plan.unet)
    unet_schedule = _schedule(found.base, plan.unet_schedule)
    text_encoder = unet
    scale = found.top.get("text_encoder_lr_scale")
    if scale is not None and "lr" in found.text_encoder:
        notices.append(f"{name} text_encoder_lr_scale is not used: text_encoder_overrides.lr sets the rate itself.")
    elif scale is not None:
        text_encoder = replace(unet, lr=unet.lr * scale)
    text_encoder = _settings(found.text_encoder, text_encoder)
    plan = OptimizerPlan(
        unet, text_encoder, unet_schedule, _schedule(found.text_encoder, unet_schedule),
        freezing=_freezing(found, problems, notices), train_text_encoder=plan.train_text_encoder,
        # absent from an optimizer.json means on, as in EveryDream2, so its files train as they did there
        grad_scaler_tweaks=found.top.get("apply_grad_scaler_step_tweaks", True),
        log_grad_norm=found.top.get("log_grad_norm", True),
    )
    _check_settings(found, plan, problems, notices)
    return plan


def _known_optimizer(value: str, where: str, problems: list[str]) -> bool:
    if value in SPECS:
        return True
    if value in REFUSED:
        nearest, why = REFUSED[value]
        problems.append(f"{where}: {value} is not supported here ({why}); the nearest supported optimizer is "
                        f"{nearest}. Supported: {', '.join(OPTIMIZERS)}.")
        return False
    names = [*OPTIMIZERS, *REFUSED]
    close = (difflib.get_close_matches(value, names, n=1, cutoff=0.6) or [n for n in names if value in n]
             or difflib.get_close_matches(value, names, n=1, cutoff=0.4))
    guess = f"did you mean {close[0]}? " if close else ""
    problems.append(f"{where}: optimizer {value!r} is unknown; {guess}expected one of {', '.join(OPTIMIZERS)}.")
    return False


def _settings(section: dict[str, Any], start: OptimizerSettings) -> OptimizerSettings:
    values = {key: section[key] for key in ("optimizer", "lr", "betas", "epsilon", "weight_decay") if key in section}
    options = {**start.options, **{key: section[key] for key in OPTION_KEYS if key in section}}
    return replace(start, **values, options=options)


def _schedule(section: dict[str, Any], start: LRSchedule) -> LRSchedule:
    return LRSchedule(section.get("lr_scheduler", start.name), section.get("lr_warmup_steps", start.warmup_steps),
                      section.get("lr_decay_steps", start.decay_steps))


def _freezing(found: OptimizerFile, problems: list[str], notices: list[str]) -> TextEncoderFreezing:
    given, where = found.freezing, f"{found.name} text_encoder_freezing"
    unfreeze, front = given.get("unfreeze_last_n_layers"), given.get("freeze_front_n_layers")
    if front is not None:
        notices.append(f"{where}.freeze_front_n_layers is deprecated; use unfreeze_last_n_layers instead "
                       "(freeze_front_n_layers -2 is unfreeze_last_n_layers 2).")
        if unfreeze is not None:
            problems.append(f"{where}: both unfreeze_last_n_layers and the deprecated freeze_front_n_layers are set; "
                            "keep unfreeze_last_n_layers only.")
        elif front < 0:
            unfreeze, front = -front, None
    front = front or None  # freezing the front 0 layers freezes nothing
    embeddings = given.get("freeze_embeddings")
    if embeddings is None and unfreeze is None and front is None:
        embeddings = False
    freezing = TextEncoderFreezing(unfreeze, front, embeddings, given.get("freeze_final_layer_norm", False))
    if unfreeze == 0 and freezing.embeddings_frozen(1) and freezing.freeze_final_layer_norm:
        problems.append(f"{where} freezes the whole text encoder (no layer, no embeddings, no final layer norm); "
                        "set disable_textenc_training true instead, or unfreeze something.")
    return freezing


def _check_settings(found: OptimizerFile, plan: OptimizerPlan, problems: list[str], notices: list[str]) -> None:
    """What only makes sense per optimizer: the number of betas, the optimizer-specific keys."""
    models = [("base", found.base, plan.unet)]
    if plan.train_text_encoder:
        models.append(("text_encoder_overrides", found.text_encoder, plan.text_encoder))
    elif found.text_encoder or found.freezing:
        notices.append(f"{found.name}: text_encoder_overrides and text_encoder_freezing are not used: "
                       "disable_textenc_training is true.")
    reported: set[tuple[tuple[float, ...], str]] = set()  # (betas, optimizer): base's problem is the inheritor's
    for section, given, settings in models:
        where = f"{found.name} {section}"
        betas, count = settings.resolved_betas(), len(settings.spec.betas)
        if "betas" in settings.spec.group_keys and len(betas) != count and (betas, settings.optimizer) not in reported:
            reported.add((betas, settings.optimizer))
            origin = (f"{where}.betas" if "betas" in given
                      else f"{found.name} base.betas (inherited by the text encoder)")
            problems.append(f"{origin}: got {list(betas)}; expected {count} numbers for {settings.optimizer}, "
                            f"such as {list(settings.spec.betas)}.")
        for key, reader_key in GROUP_KEYS.items():
            if key in given and reader_key not in settings.spec.group_keys:
                readers = [n for n, spec in SPECS.items() if reader_key in spec.group_keys]
                notices.append(f"{where}.{key} is not read by {settings.optimizer} (only by {', '.join(readers)}).")
        for key in OPTION_KEYS:
            if key in given and key not in settings.spec.options:
                readers = [n for n, spec in SPECS.items() if key in spec.options]
                notices.append(f"{where}.{key} is not read by {settings.optimizer} (only by {', '.join(readers)}).")


def _lora_rates(plan: OptimizerPlan, unet_lr: float | None, text_encoder_lr: float | None,
                notices: list[str]) -> OptimizerPlan:
    """LoRA mode's own rates (lora_unet_lr, lora_text_encoder_lr) over the plan's, where set. Adapters start at
    zero and train at rates near 1e-4; a full fine-tune's rate (1.5e-6 by default) leaves them almost where they
    started, which a run would only show as a model that learned nothing."""
    if unet_lr is not None:
        plan = replace(plan, unet=replace(plan.unet, lr=unet_lr))
    if text_encoder_lr is not None:
        plan = replace(plan, text_encoder=replace(plan.text_encoder, lr=text_encoder_lr))
    if not plan.unet.spec.adaptive and plan.unet.lr < LORA_LR_HINT:
        notices.append(f"LoRA: the UNet's adapters train at lr {plan.unet.lr:g}, a full fine-tune's rate; adapters "
                       f"usually train at 1e-4 to 5e-4 (set lora_unet_lr, and lora_text_encoder_lr for the text "
                       "encoder's).")
    return plan


def _say_slips(plan: OptimizerPlan, notices: list[str]) -> None:
    """Settings that work but are most likely not what was meant, wherever they were set."""
    models = [(plan.unet, plan.unet_schedule, "UNet")] if plan.train_unet else []
    if plan.text_encoder_layers and (plan.separate or not plan.train_unet):
        models.append((plan.text_encoder, plan.text_encoder_schedule, "text encoder"))
    if plan.embedding is not None:
        models.append((plan.embedding, plan.text_encoder_schedule, "embedding (embedding_lr)"))
    for settings, schedule, who in models:
        if settings.spec.adaptive and settings.lr < ADAPTIVE_LR_HINT:
            notices.append(f"{who}: {settings.optimizer} sets its own step size and lr multiplies it; lr "
                           f"{settings.lr:g} is far below the usual 0.1 to 1.0.")
        if schedule.name == "constant" and schedule.warmup_steps:
            notices.append(f"{who}: lr_warmup_steps {schedule.warmup_steps} has no effect with lr_scheduler "
                           "constant; use constant_with_warmup to warm up.")
