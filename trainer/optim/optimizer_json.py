"""Reading EveryDream2's optimizer.json: its keys, the type and range of each value, and every problem named with
the file and the key (an unknown key with a did-you-mean), before anything is planned from it. What the values
mean for the run is trainer/optim/plan.py's business; this module only says whether the file is well formed.

The schema (EveryDream2's optimizer/optimizers.py and optimizer.json): `base` and `text_encoder_overrides` hold the
same keys (optimizer, lr, lr_scheduler, lr_warmup_steps, lr_decay_steps, betas, epsilon, weight_decay, and the
optimizer-specific d0, decouple, momentum, growth_rate, safeguard_warmup, no_prox); beside them
`text_encoder_lr_scale`, `text_encoder_freezing`, `apply_grad_scaler_step_tweaks` and `log_grad_norm`. Prose
(`doc`, `documentation`, keys starting with `_` or `-`) is ignored. null means "not set here"; 0 means zero
(EveryDream2 reads 0 as unset, which makes weight decay 0 or warmup 0 impossible to ask for).

Imports nothing heavy: the preflight reads it before any model loads.
"""

from __future__ import annotations

import difflib
import json
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.config.schema import LRScheduler

SCHEDULERS: tuple[str, ...] = typing.get_args(LRScheduler)
SECTIONS = ("base", "text_encoder_overrides")
FREEZING = "text_encoder_freezing"
PROSE_KEYS = frozenset({"doc", "docs", "documentation", "comment", "comments", "description"})
# read without effect, with a notice: this trainer accepted it before (EveryDream2 never had it)
IGNORED_KEYS = {"use_grad_scaler": "the grad scaler runs exactly when mixed_precision is fp16"}


class BadValue(ValueError):
    """A value that is not what its key takes; the text says what is expected."""


Check = Callable[[Any], Any]


def _number(value: Any, expected: str, low: float, high: float = math.inf, *, low_open: bool = False,
            high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise BadValue(expected)
    if value < low or (low_open and value == low) or value > high or (high_open and value == high):
        raise BadValue(expected)
    return float(value)


def _count(value: Any, expected: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise BadValue(expected)
    if value < low:
        raise BadValue(expected)
    return int(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadValue("true or false")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadValue('an optimizer name such as "adamw8bit"')
    return value.strip().lower()  # EveryDream2 lowercases the name


def _scheduler(value: Any) -> str:
    if value not in SCHEDULERS:
        raise BadValue("one of " + ", ".join(SCHEDULERS))
    return value


def _betas(value: Any) -> tuple[float, ...]:
    expected = "two numbers such as [0.9, 0.999] (three for dadapt_adan, such as [0.98, 0.92, 0.99]), each >= 0 and < 1"
    if not isinstance(value, list) or len(value) not in (2, 3):
        raise BadValue(expected)
    return tuple(_number(beta, expected, 0.0, 1.0, high_open=True) for beta in value)


SECTION_CHECKS: dict[str, Check] = {
    "optimizer": _text,
    # 0 trains nothing: EveryDream2 read it as "not set", which null says here
    "lr": lambda v: _number(v, "a number > 0 such as 1e-6, or null for train.json's", 0.0, low_open=True),
    "lr_scheduler": _scheduler,
    "lr_warmup_steps": lambda v: _count(v, "a whole number of steps >= 0 (0: no warmup), or null", 0),
    "lr_decay_steps": lambda v: _count(v, "a whole number of steps >= 1, or null for the run's length (EveryDream2's "
                                          "0 for 'automatic' is null here)", 1),
    "betas": _betas,
    "epsilon": lambda v: _number(v, "a number >= 0 such as 1e-8", 0.0),
    "weight_decay": lambda v: _number(v, "a number >= 0 such as 0.01 (0: no weight decay)", 0.0),
    "d0": lambda v: _number(v, "a number > 0 such as 1e-6", 0.0, low_open=True),
    "decouple": _flag,
    "momentum": lambda v: _number(v, "a number >= 0 and < 1 such as 0.9", 0.0, 1.0, high_open=True),
    "growth_rate": lambda v: _number(v, "a number > 0 such as 1.02, or null for no limit", 0.0, low_open=True),
    "safeguard_warmup": _flag,
    "no_prox": _flag,
}
FREEZING_CHECKS: dict[str, Check] = {
    "unfreeze_last_n_layers": lambda v: _count(v, "a whole number of layers >= 0, or null to train every layer", 0),
    "freeze_front_n_layers": lambda v: _count(v, "a whole number of layers (negative: all but the last n)", -math.inf),
    "freeze_embeddings": _flag,
    "freeze_final_layer_norm": _flag,
}
TOP_CHECKS: dict[str, Check] = {
    "text_encoder_lr_scale": lambda v: _number(v, "a number > 0 such as 0.5, or null", 0.0, low_open=True),
    "apply_grad_scaler_step_tweaks": _flag,
    "log_grad_norm": _flag,
}
TOP_KEYS = (*SECTIONS, FREEZING, *TOP_CHECKS, *IGNORED_KEYS)


@dataclass(frozen=True)
class OptimizerFile:
    """What an optimizer.json sets, checked: only the keys given a value (null and absent keys are left out)."""

    name: str  # how messages name the file: its path as the config gives it
    base: dict[str, Any] = field(default_factory=dict)
    text_encoder: dict[str, Any] = field(default_factory=dict)  # text_encoder_overrides
    top: dict[str, Any] = field(default_factory=dict)  # text_encoder_lr_scale, apply_grad_scaler_step_tweaks, ...
    freezing: dict[str, Any] = field(default_factory=dict)


def read_optimizer_file(path: Path, problems: list[str], notices: list[str]) -> OptimizerFile | None:
    """The checked contents of `path`; each problem is added to `problems` (None when the file is unreadable)."""
    name = str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        problems.append(f"optimizer_config {name!r} does not exist; give the path of an optimizer.json or null.")
        return None
    except (OSError, UnicodeDecodeError) as err:
        problems.append(f"optimizer_config {name!r} cannot be read ({err}); check its permissions or encoding.")
        return None
    except json.JSONDecodeError as err:
        problems.append(f"optimizer_config {name!r} is not valid json ({err.msg} at line {err.lineno}).")
        return None
    if not isinstance(data, dict):
        problems.append(f"{name}: got a json {type(data).__name__}; expected an object with a \"base\" section.")
        return None
    found = OptimizerFile(name)
    _check_keys(data, TOP_KEYS, name, "", problems)
    for key, value in data.items():
        if key in IGNORED_KEYS:
            notices.append(f"{name} {key} is not read: {IGNORED_KEYS[key]}.")
        elif key in TOP_CHECKS and value is not None:
            _store(found.top, key, value, TOP_CHECKS[key], f"{name} {key}", problems)
    for section, into in (("base", found.base), ("text_encoder_overrides", found.text_encoder)):
        _read_section(data.get(section), section, SECTION_CHECKS, into, name, problems)
    _read_section(data.get(FREEZING), FREEZING, FREEZING_CHECKS, found.freezing, name, problems)
    return found


def _read_section(section: Any, title: str, checks: dict[str, Check], into: dict[str, Any], name: str,
                  problems: list[str]) -> None:
    if section is None:
        return
    if not isinstance(section, dict):
        problems.append(f"{name} {title}: got {_shown(section)}; expected an object of keys, or null.")
        return
    _check_keys(section, tuple(checks), name, f"{title}.", problems)
    for key, value in section.items():
        if key in checks and value is not None:
            _store(into, key, value, checks[key], f"{name} {title}.{key}", problems)


def _store(into: dict[str, Any], key: str, value: Any, check: Check, where: str, problems: list[str]) -> None:
    try:
        into[key] = check(value)
    except BadValue as err:
        problems.append(f"{where}: got {_shown(value)}; expected {err}.")


def _check_keys(data: dict[str, Any], known: tuple[str, ...], name: str, prefix: str, problems: list[str]) -> None:
    """An unknown key is a problem, named with where it belongs or what it may be a typo of."""
    for key in data:
        if key in known or is_prose(key):
            continue
        problems.append(f"{name} {prefix}{key}: unknown key; {_hint(key, known)}")


def _hint(key: str, known: tuple[str, ...]) -> str:
    """Where a key that belongs elsewhere goes, or the known key it is most likely a typo of."""
    homes = {**{k: "base or text_encoder_overrides" for k in SECTION_CHECKS}, **{k: FREEZING for k in FREEZING_CHECKS},
             **{k: "the top level" for k in (*TOP_CHECKS, *SECTIONS, FREEZING)}}
    if key in homes:
        return f"it belongs in {homes[key]}."
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6) or difflib.get_close_matches(
        key, list(homes), n=1, cutoff=0.6)
    guess = f"did you mean {close[0]!r}? " if close else ""
    return f"{guess}expected some of {', '.join(known)}."


def is_prose(key: str) -> bool:
    """Documentation in the file (EveryDream2 ships a `doc` object): read past, never an unknown key."""
    return key.lower() in PROSE_KEYS or key.startswith(("_", "-", "#", "//"))


def _shown(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
