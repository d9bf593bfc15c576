"""The validation plan: which image sets get a loss measured with fixed noise, and how often.

It comes from the config's keys (`validation_split`, `validation_data_root`, `validation_every_n_epochs`), or
from EveryDream2's validation json (`validation_config`), which wins over them. Its keys:

    validate_training          measure a validation loss at all (its "val" set)
    val_split_mode             "automatic": hold out auto_split_proportion of data_root;
                               "manual": the images in manual_data_root
    auto_split_proportion      (older name: val_split_proportion)
    manual_data_root           (older name: val_data_root)
    extra_manual_datasets      {"name": "folder"}: more sets, each logged as its own loss
    stabilize_training_loss    also re-measure a share (stabilize_split_proportion) of the training images
                               with fixed noise: a smooth training-loss curve
    every_n_epochs             1: every epoch, 2: every other one, 0.5: twice an epoch
    seed                       chooses the held-out and stabilizing images
    documentation              ignored

Every problem in the file is reported at once, with the file and the key. Imports nothing heavy: the preflight
reads it before any model loads.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.files import read_json_object
from trainer.errors import UserError, file_problems

MAIN_SET = "validation"  # logged as loss/validation; extra sets as loss/validation-<name>
STABILIZED_SET = "train-stabilized"

_RENAMED = {"val_split_proportion": "auto_split_proportion", "val_data_root": "manual_data_root"}
_KEYS = {"validate_training", "val_split_mode", "auto_split_proportion", "manual_data_root", "extra_manual_datasets",
         "stabilize_training_loss", "stabilize_split_proportion", "every_n_epochs", "seed", "use_relative_loss",
         "documentation", *_RENAMED}
_NOT_HONOURED = {"use_relative_loss": "plot loss/validation against its first value instead"}


@dataclass(frozen=True)
class ValidationPlan:
    split: float = 0.0  # share of data_root held out as the main set
    data_root: str | None = None  # the main set's own folder (wins over split)
    extra: dict[str, str] = field(default_factory=dict)  # name -> folder: more sets, each its own loss
    stabilize: float = 0.0  # share of the training images re-measured with fixed noise; 0: off
    every_n_epochs: float = 1.0
    seed: int | None = None  # picks the held-out and stabilizing images; None: the run's seed
    source: str = field(default="", compare=False)  # the validation json as the config names it; "": the config

    def folder_role(self, name: str) -> str:
        """How messages name the folder of set `name`: the key that gave it."""
        if not self.source:
            return "validation_data_root"
        key = "manual_data_root" if name == MAIN_SET else f"extra_manual_datasets[{name!r}]"
        return f"validation_config {self.source} {key}"

    @property
    def split_key(self) -> str:
        return f"auto_split_proportion of {self.source}" if self.source else "validation_split"

    def steps_in_epoch(self, epoch: int, steps_per_epoch: int) -> list[int]:
        """The optimizer steps of `epoch` (1-based, counted within it) after which validation runs, as EveryDream2
        places them: every_n_epochs >= 1 validates after the last step of every that many epochs; below 1 the
        epoch is split into round(1 / every_n_epochs) even parts (0.33: thirds), each validated after its end."""
        if self.every_n_epochs >= 1:
            return [steps_per_epoch] if epoch % self.every_n_epochs == 0 else []
        parts = max(1, min(steps_per_epoch, round(1 / self.every_n_epochs)))
        return [math.ceil((i + 1) * steps_per_epoch / parts) for i in range(parts)]


def plan_validation(cfg, notices: list[str] | None = None) -> ValidationPlan:
    """The plan from the config, or from its validation json when `validation_config` names one."""
    if not cfg.validation_config:
        return ValidationPlan(cfg.validation_split, cfg.validation_data_root, {}, 0.0,
                              float(cfg.validation_every_n_epochs))
    notices = notices if notices is not None else []
    overruled = [key for key, unset in (("validation_split", 0.0), ("validation_data_root", None),
                                        ("validation_every_n_epochs", 1)) if getattr(cfg, key) != unset]
    if overruled:
        notices.append(f"{', '.join(overruled)} not used: validation_config {cfg.validation_config} decides.")
    return read_validation_json(Path(cfg.validation_config), notices)


def read_validation_json(path: Path, notices: list[str]) -> ValidationPlan:
    data, problem = read_json_object(path)
    if data is None:
        raise UserError(f"validation_config: {problem} Give the path of EveryDream2's validation json, or null.")
    problems: list[str] = []
    data = _renamed(data, path, notices)
    for key in sorted(set(data) - _KEYS):
        match = difflib.get_close_matches(key, sorted(_KEYS), n=1)
        problems.append(f"{key}: unknown key{f'; did you mean {match[0]!r}?' if match else ''}")
    ignored = sorted(k for k in _NOT_HONOURED if data.get(k))
    if ignored:
        notices.append(f"{path}: {', '.join(f'{k} is not used ({_NOT_HONOURED[k]})' for k in ignored)}.")
    plan = _plan_from(data, problems, str(path))
    if problems:
        raise file_problems(f"validation_config {path}", problems)
    notices.append(f"validation from {path}: {describe(plan)}.")
    return plan


def _renamed(data: dict[str, Any], path: Path, notices: list[str]) -> dict[str, Any]:
    """EveryDream2's older key names read as the current ones (the current name wins when both are given)."""
    data = dict(data)
    for old, new in _RENAMED.items():
        if old in data:
            value = data.pop(old)
            if new not in data:
                data[new] = value
                notices.append(f"{path}: {old} (EveryDream2's older name) is read as {new}.")
    return data


def _plan_from(data: dict[str, Any], problems: list[str], source: str = "") -> ValidationPlan:
    validate = _flag(data, "validate_training", True, problems)
    mode = data.get("val_split_mode", "automatic")
    if mode not in ("automatic", "manual"):
        problems.append(f"val_split_mode: got {mode!r}; expected \"automatic\" or \"manual\".")
    automatic = validate and mode != "manual"  # a value only read in the other mode is not checked, as in ED2
    split = _share(data, "auto_split_proportion", 0.15, problems) if automatic else 0.0
    manual = data.get("manual_data_root")
    if manual is not None and not isinstance(manual, str):
        problems.append(f"manual_data_root: got {manual!r}; expected a folder path, or null.")
        manual = None
    extra = _extra_sets(data.get("extra_manual_datasets") or {}, problems)
    if validate and mode == "manual" and not manual:
        problems.append("val_split_mode is \"manual\" but manual_data_root is not set; give the folder of "
                        "validation images, or use \"automatic\".")
    stabilizing = _flag(data, "stabilize_training_loss", False, problems)
    stabilize = _share(data, "stabilize_split_proportion", 0.15, problems) if stabilizing else 0.0
    every = data.get("every_n_epochs", 1)
    if isinstance(every, bool) or not isinstance(every, (int, float)) or not (math.isfinite(every) and every > 0):
        problems.append(f"every_n_epochs: got {every!r}; expected a number of epochs > 0 such as 1 or 0.5.")
        every = 1
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        problems.append(f"seed: got {seed!r}; expected an integer >= 0, or null for the run's seed.")
        seed = None
    return ValidationPlan(split=split, data_root=manual if validate and mode == "manual" else None, extra=extra,
                          stabilize=stabilize, every_n_epochs=float(every), seed=seed, source=source)


def _flag(data: dict[str, Any], key: str, default: bool, problems: list[str]) -> bool:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, str) and value.lower() in ("true", "false"):  # EveryDream2's own files write "true"
        return value.lower() == "true"
    if not isinstance(value, bool):
        problems.append(f"{key}: got {value!r}; expected true or false.")
        return default
    return value


def _share(data: dict[str, Any], key: str, default: float, problems: list[str]) -> float:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        problems.append(f"{key}: got {value!r}; expected a share between 0 and 1 such as 0.15.")
        return default
    return float(value)


def _extra_sets(value: Any, problems: list[str]) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        problems.append(f"extra_manual_datasets: got {value!r}; expected {{\"name\": \"folder\", ...}}.")
        return {}
    bad = [name for name in value if not name.strip() or name in (MAIN_SET, STABILIZED_SET) or "/" in name]
    if bad:
        problems.append(f"extra_manual_datasets: the name(s) {bad} cannot be used; pick names without '/', other than "
                        f"{MAIN_SET!r} and {STABILIZED_SET!r}.")
    return dict(value)


def describe(plan: ValidationPlan) -> str:
    parts = []
    if plan.data_root:
        parts.append(f"the images in {plan.data_root}")
    elif plan.split:
        parts.append(f"{plan.split:g} of data_root held out")
    parts += [f"set {name!r} from {folder}" for name, folder in plan.extra.items()]
    if plan.stabilize:
        parts.append(f"a stabilized training loss on {plan.stabilize:g} of the training images")
    if not parts:
        return "no validation"
    return ", ".join(parts) + f", every {plan.every_n_epochs:g} epoch(s)"
