"""The sample-prompts file (`sample_prompts`): read and checked whole, before any model loads.

.txt: one prompt per line. .json: a list of samples, or EveryDream2's {"samples": [...], "seed", "cfgs",
"num_inference_steps"}; each sample is a prompt string or {"prompt", "negative_prompt", "seed", "cfg",
"size": [w, h], "steps"}. Every problem in the file is reported at once, with the sample it is in, so a bad
size or step count never waits for the end of a run to show (where it used to cost the trained model).

Imports nothing heavy: the preflight and `--dry_run` read the file without torch.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.errors import UserError

DEFAULT_SEED = 555
DEFAULT_CFG = 7.0
DEFAULT_STEPS = 30
SIZE_MULTIPLE = 8  # the VAE's downsampling: diffusers' pipelines refuse other sizes
MIN_SIDE, MAX_SIDE = 64, 4096
MAX_STEPS = 1000


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative_prompt: str = ""
    seed: int = DEFAULT_SEED
    cfg: float = DEFAULT_CFG
    size: tuple[int, int] | None = None  # (width, height); None: the training resolution
    steps: int = DEFAULT_STEPS


def read_sample_prompts(path: Path) -> list[SamplePrompt]:
    """Every sample in `path`; a UserError lists every problem in the file."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"sample_prompts {path} cannot be read ({err}); give a UTF-8 .txt or .json file.") from None
    if Path(path).suffix.lower() != ".json":
        return [SamplePrompt(line.strip()) for line in text.splitlines() if line.strip()]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"sample_prompts {path} is not valid json ({err.msg} at line {err.lineno}).") from None
    problems: list[str] = []
    prompts = _from_json(data, problems)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise UserError(f"sample_prompts {path} has {len(problems)} problem(s):\n{listed}")
    return prompts


def _from_json(data: Any, problems: list[str]) -> list[SamplePrompt]:
    defaults: dict[str, Any] = {}
    if isinstance(data, dict):
        defaults["seed"] = _seed(data.get("seed", DEFAULT_SEED), "seed", problems)
        defaults["steps"] = _steps(data.get("num_inference_steps", DEFAULT_STEPS), "num_inference_steps", problems)
        cfgs = data.get("cfgs")
        if cfgs:
            if isinstance(cfgs, list):
                defaults["cfg"] = _cfg(cfgs[0], "cfgs[0]", problems)
            else:
                problems.append(f"cfgs: got {cfgs!r}; expected a list of guidance scales such as [7.0].")
        data = data.get("samples", [])
    if not isinstance(data, list):
        problems.append(f"expected a list of samples (or {{\"samples\": [...]}}), found {type(data).__name__}.")
        return []
    return [p for i, item in enumerate(data) if (p := _sample(item, defaults, f"sample {i + 1}", problems))]


def _sample(item: Any, defaults: dict[str, Any], where: str, problems: list[str]) -> SamplePrompt | None:
    if isinstance(item, str):
        return SamplePrompt(item, **defaults)
    if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
        problems.append(f"{where}: each sample needs a \"prompt\" string; found {item!r}.")
        return None
    values = dict(defaults)
    if "negative_prompt" in item:
        if isinstance(item["negative_prompt"], str):
            values["negative_prompt"] = item["negative_prompt"]
        else:
            problems.append(f"{where}: negative_prompt must be a string, got {item['negative_prompt']!r}.")
    if "seed" in item:
        values["seed"] = _seed(item["seed"], f"{where} seed", problems)
    if "cfg" in item:
        values["cfg"] = _cfg(item["cfg"], f"{where} cfg", problems)
    if "steps" in item:
        values["steps"] = _steps(item["steps"], f"{where} steps", problems)
    size = _size(item["size"], f"{where} size", problems) if item.get("size") else None
    return SamplePrompt(item["prompt"], size=size, **values)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _seed(value: Any, where: str, problems: list[str]) -> int:
    if not _is_int(value) or value < -1:
        problems.append(f"{where}: got {value!r}; expected an integer >= 0 (or -1).")
        return DEFAULT_SEED
    # EveryDream2's -1 means "random"; a series of samples only compares with one fixed seed
    return DEFAULT_SEED if value < 0 else value


def _cfg(value: Any, where: str, problems: list[str]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        problems.append(f"{where}: got {value!r}; expected a guidance scale >= 0 such as 7.0.")
        return DEFAULT_CFG
    return float(value)


def _steps(value: Any, where: str, problems: list[str]) -> int:
    if not _is_int(value) or not 1 <= value <= MAX_STEPS:
        problems.append(f"{where}: got {value!r}; expected an integer number of steps from 1 to {MAX_STEPS}.")
        return DEFAULT_STEPS
    return value


def _size(value: Any, where: str, problems: list[str]) -> tuple[int, int] | None:
    ok = isinstance(value, list) and len(value) == 2 and all(_is_int(v) for v in value)
    if not ok or not all(MIN_SIDE <= v <= MAX_SIDE and v % SIZE_MULTIPLE == 0 for v in value):
        problems.append(f"{where}: got {value!r}; expected [width, height], each a multiple of {SIZE_MULTIPLE} "
                        f"from {MIN_SIDE} to {MAX_SIDE}, such as [512, 512] or [576, 448].")
        return None
    return value[0], value[1]
