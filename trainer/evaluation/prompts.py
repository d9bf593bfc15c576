"""The sample-prompts file (`sample_prompts`): read and checked whole, before any model loads, into `SampleSettings`.

EveryDream2's files work as they are (its utils/sample_generator.py and doc/LOGGING.md):
- .txt: one prompt per line; an empty file (or only blank lines) samples random training captions instead.
- .json: {"batch_size", "seed", "cfgs", "scheduler", "num_inference_steps", "generate_samples_every_n_steps",
  "show_progress_bars", "resolution", "samples": [...]}, each sample {"prompt", "negative_prompt", "seed" (-1: a new
  random seed each time), "cfgs" or "cfg", "size": [w, h] or "aspect_ratio", "random_caption"}. No or empty
  "samples": random training captions, as in EveryDream2.
Ours on top: a plain json list of samples, a sample given as a bare string, and a sample's "steps".

Every problem in the file is reported at once, with the sample and key it is in, so a bad size or scheduler never
waits for the end of a run to show. A key that looks like a typo of a known one is a problem (with a did-you-mean);
an EveryDream2 key this trainer does not use, or an unrelated key, is a warning.

Imports nothing heavy: the preflight and `--dry_run` read the file without torch.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from common.console import warn
from trainer.errors import UserError, file_problems

DEFAULT_SEED = 555
DEFAULT_CFGS = (7.0,)  # EveryDream2 draws (7, 4, 1.01): three images per prompt; one is the cheaper default here
DEFAULT_STEPS = 30
RANDOM_SEED = -1  # EveryDream2's "a new random seed each time samples are drawn"
MAX_DRAWN_SEED = 2**31 - 1
MAX_RANDOM_CAPTIONS = 4  # EveryDream2 samples min(4, its sample batch size) captions when given no prompts
SIZE_MULTIPLE = 8  # the VAE's downsampling: diffusers' pipelines refuse other sizes
MIN_SIDE, MAX_SIDE = 64, 4096
MAX_STEPS = 1000
MAX_BATCH = 64

# EveryDream2's scheduler names (its SampleGenerator._create_scheduler) -> the diffusers class and the settings
# given on top of the model's own scheduler config; trainer/evaluation/sampling.py builds them. "_k": Karras sigmas.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    # PLMS, as SD ships it: from a DDIM config diffusers would add Runge-Kutta warm-up steps, which fail below
    # about 10 steps and are not what an SD user means by pndm
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "kdpm2": ("KDPM2AncestralDiscreteScheduler", {}),
    **{name: ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": karras})
       for name, karras in (("dpm++", False), ("dpm++_2m", False), ("dpm++_2m_k", True))},
    **{f"dpm++_2m_sde{k}": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                            "use_karras_sigmas": bool(k)}) for k in ("", "_k")},
    **{f"dpm++_2s{k}": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": bool(k)}) for k in ("", "_k")},
    # a fixed noise-sampler seed, as EveryDream2 gives: the SDE's extra noise is the same at every sampling
    **{f"dpm++_sde{k}": ("DPMSolverSDEScheduler", {"use_karras_sigmas": bool(k), "noise_sampler_seed": 0})
       for k in ("", "_k")},
}
# diffusers imports these schedulers only with an extra package installed
SCHEDULER_PACKAGES = {"LMSDiscreteScheduler": "scipy", "DPMSolverSDEScheduler": "torchsde"}

_TOP_KEYS = ("batch_size", "seed", "cfgs", "scheduler", "num_inference_steps", "generate_samples_every_n_steps",
             "show_progress_bars", "resolution", "samples")
_SAMPLE_KEYS = ("prompt", "negative_prompt", "seed", "cfgs", "cfg", "size", "aspect_ratio", "random_caption", "steps")
# EveryDream2 keys read and not used here, with why; said in a warning when set (to anything but false/null)
_TOP_UNUSED = {
    "generate_pretrain_samples": "samples are drawn every sample step and at the end, not before the first step",
    "generate_samples_every_n_epochs": "give generate_samples_every_n_steps instead",
    **dict.fromkeys(("external_gen_enabled", "external_gen_base_url", "external_gen_model_save_dir",
                     "keep_model_after_external_gen", "offload_model_for_external_gen", "invokeai_info_dicts_json"),
                    "there is no external generation here"),
}
_SAMPLE_UNUSED = dict.fromkeys(("external_info_dicts_json", "board_name_suffix", "offset", "limit", "every_n",
                                "log_to_tensorboard"), "external batches are not generated here")


@dataclass(frozen=True)
class SamplePrompt:
    """One sample of the file, as written: what is drawn anew each time (random seed, caption) still open."""

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = DEFAULT_SEED  # RANDOM_SEED (-1): a new random seed each time samples are drawn
    cfgs: tuple[float, ...] = DEFAULT_CFGS  # one image per guidance scale
    size: tuple[int, int] | None = None  # (width, height); None: from aspect_ratio, else square at the resolution
    aspect_ratio: float | None = None  # width / height, at about the resolution's pixel count
    steps: int = DEFAULT_STEPS
    random_caption: bool = False  # the prompt is a training caption drawn each time samples are drawn


@dataclass(frozen=True)
class Drawn:
    """One sample as drawn at one sampling step: its caption and seed chosen, its size known. What remakes it."""

    prompt: str
    negative_prompt: str
    seed: int
    cfgs: tuple[float, ...]
    size: tuple[int, int]  # (width, height)
    steps: int


@dataclass(frozen=True)
class SampleSettings:
    """A whole sample-prompts file. `None` fields were not in the file: the run's own value applies."""

    samples: tuple[SamplePrompt, ...] = ()  # empty: random training captions (see `requests`)
    defaults: SamplePrompt = SamplePrompt()  # the file's seed, cfgs and steps, which random captions then take
    batch_size: int | None = None  # prompts per pipeline call; None: half the training batch, as EveryDream2
    scheduler: str | None = None  # a SCHEDULERS name; None: the model's own scheduler
    every_n_steps: int | None = None  # generate_samples_every_n_steps; None: the config's sample_steps
    resolution: int | None = None  # the side of unsized samples; None: the training resolution
    show_progress_bars: bool = False
    notes: tuple[str, ...] = field(default=(), compare=False)  # the warnings said when the file was read

    def every(self, sample_steps: int) -> int:
        """Sample every this many optimizer steps: the file's generate_samples_every_n_steps wins."""
        return self.every_n_steps or sample_steps

    def batch(self, train_batch_size: int) -> int:
        """Prompts per pipeline call."""
        return self.batch_size or max(1, train_batch_size // 2)

    def requests(self, train_batch_size: int) -> tuple[SamplePrompt, ...]:
        """The samples to draw; with none given, EveryDream2's min(4, batch) random training captions."""
        if self.samples:
            return self.samples
        count = min(MAX_RANDOM_CAPTIONS, self.batch(train_batch_size))
        return (replace(self.defaults, random_caption=True),) * count

    def draw(self, train_resolution: int, train_batch_size: int, captions: Sequence[str],
             rng: random.Random | None = None) -> list[Drawn]:
        """The samples of one sampling step: random captions drawn from `captions` (the training captions),
        distinct while there are enough; -1 seeds drawn anew. `rng` (default: a fresh one from the OS) is private,
        so the training's random state never moves."""
        rng = rng or random.Random()
        requests = self.requests(train_batch_size)
        pool = [c for c in captions if c.strip()] or [""]  # only blank captions: the unconditional image
        wanted = sum(r.random_caption for r in requests)
        picks = iter(rng.sample(pool, wanted) if wanted <= len(pool) else rng.choices(pool, k=wanted))
        return [Drawn(next(picks) if r.random_caption else r.prompt, r.negative_prompt,
                      rng.randint(0, MAX_DRAWN_SEED) if r.seed == RANDOM_SEED else r.seed, r.cfgs,
                      self.size_of(r, train_resolution), r.steps) for r in requests]

    def size_of(self, sample: SamplePrompt, train_resolution: int) -> tuple[int, int]:
        """(width, height) of `sample`'s images."""
        resolution = self.resolution or train_resolution
        if sample.size:
            return sample.size
        return aspect_size(sample.aspect_ratio, resolution) if sample.aspect_ratio else (resolution, resolution)


def aspect_size(aspect_ratio: float, resolution: int) -> tuple[int, int]:
    """The size of about resolution² pixels whose width/height is nearest `aspect_ratio`; sides in multiples of
    64 (the size SD's UNet halves cleanly three times), of 8 below a 256 resolution (tiny models)."""
    step = 64 if resolution >= 256 else SIZE_MULTIPLE
    area = resolution * resolution
    sizes = [(w, max(step, round(area / w / step) * step)) for w in range(step, MAX_SIDE + 1, step)]
    near = [s for s in sizes if abs(s[0] * s[1] - area) <= 0.15 * area and s[1] <= MAX_SIDE] or [(resolution,) * 2]
    return min(near, key=lambda s: abs(math.log(s[0] / s[1] / aspect_ratio)))


def read_sample_prompts(path: Path) -> SampleSettings:
    """The settings in `path`; a UserError lists every problem in the file. Notes (ignored keys) are warned."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"sample_prompts {path} cannot be read ({err}); give a UTF-8 .txt or .json file.") from None
    if path.suffix.lower() != ".json":
        return SampleSettings(tuple(SamplePrompt(line.strip()) for line in text.splitlines() if line.strip()))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"sample_prompts {path} is not valid json ({err.msg} at line {err.lineno}); fix it, or "
                        "give a .txt file of one prompt per line.") from None
    problems: list[str] = []
    notes: list[str] = []
    settings = _settings(data, problems, notes)
    if problems:
        raise file_problems(f"sample_prompts {path}", problems)
    for note in notes:
        warn(f"sample_prompts {path}: {note}")
    return replace(settings, notes=tuple(notes))


# ---------------------------------------------------------------- the json file


def _settings(data: Any, problems: list[str], notes: list[str]) -> SampleSettings:
    if isinstance(data, list):  # ours: a plain list of samples
        data = {"samples": data}
    if not isinstance(data, dict):
        problems.append(f"expected {{\"samples\": [...], ...}} or a list of samples, found {type(data).__name__}.")
        return SampleSettings()
    data = _without_nulls(data)
    _check_keys(data, _TOP_KEYS, _TOP_UNUSED, "", problems, notes)
    get = data.get
    defaults = {"seed": _seed(get("seed", DEFAULT_SEED), "seed", problems),
                "cfgs": _cfgs(get("cfgs", list(DEFAULT_CFGS)), "cfgs", problems),
                "steps": _steps(get("num_inference_steps", DEFAULT_STEPS), "num_inference_steps", problems)}
    samples = get("samples") or []
    if not isinstance(samples, list):
        problems.append(f"samples: got {samples!r}; expected a list of samples such as [{{\"prompt\": \"a cat\"}}].")
        samples = []
    return SampleSettings(
        samples=tuple(p for i, item in enumerate(samples) if (p := _sample(item, defaults, i + 1, problems, notes))),
        defaults=SamplePrompt(**defaults),
        batch_size=_optional_int(get("batch_size"), "batch_size", 1, MAX_BATCH, problems),
        scheduler=_scheduler(get("scheduler"), problems),
        every_n_steps=_optional_int(get("generate_samples_every_n_steps"), "generate_samples_every_n_steps", 1,
                                    None, problems),
        resolution=_resolution(get("resolution"), problems),
        show_progress_bars=_flag(get("show_progress_bars", False), "show_progress_bars", problems),
    )


def _sample(item: Any, defaults: dict[str, Any], number: int, problems: list[str],
            notes: list[str]) -> SamplePrompt | None:
    where = f"sample {number}"
    if isinstance(item, str):
        return SamplePrompt(item, **defaults)
    if not isinstance(item, dict):
        problems.append(f"{where}: expected a prompt string or {{\"prompt\": ...}}, found {item!r}.")
        return None
    item = _without_nulls(item)
    _check_keys(item, _SAMPLE_KEYS, _SAMPLE_UNUSED, f"{where}: ", problems, notes)
    random_caption = _flag(item.get("random_caption", False), f"{where} random_caption", problems)
    prompt = item.get("prompt", "" if random_caption else None)
    if not isinstance(prompt, str):
        problems.append(f"{where}: needs a \"prompt\" string, or \"random_caption\": true; found {item!r}.")
        return None
    if random_caption and prompt:
        notes.append(f"{where}: random_caption is true, so its prompt {prompt!r} is replaced by a training caption.")
    values = dict(defaults)
    negative = item.get("negative_prompt", "")
    if not isinstance(negative, str):
        problems.append(f"{where} negative_prompt: got {negative!r}; expected a string.")
    if "seed" in item:
        values["seed"] = _seed(item["seed"], f"{where} seed", problems)
    if "cfg" in item:  # ours, and EveryDream2's newer per-sample cfg: it wins over cfgs there too
        values["cfgs"] = (_cfg(item["cfg"], f"{where} cfg", problems),)
        if "cfgs" in item:
            notes.append(f"{where}: both cfg {item['cfg']!r} and cfgs {item['cfgs']!r} are set; cfg wins (one image "
                         "at that guidance scale) and cfgs is not used. Keep one of them.")
    elif "cfgs" in item:
        values["cfgs"] = _cfgs(item["cfgs"], f"{where} cfgs", problems)
    if "steps" in item:
        values["steps"] = _steps(item["steps"], f"{where} steps", problems)
    size = _size(item["size"], f"{where} size", problems) if item.get("size") else None
    aspect = item.get("aspect_ratio")
    aspect = None if aspect is None else _aspect(aspect, f"{where} aspect_ratio", problems)
    return SamplePrompt(prompt, negative if isinstance(negative, str) else "", size=size, aspect_ratio=aspect,
                        random_caption=random_caption, **values)


def _check_keys(data: dict, known: tuple[str, ...], unused: dict[str, str], where: str, problems: list[str],
                notes: list[str]) -> None:
    """A near miss of a known key is a typo (a problem, with the key meant); EveryDream2 keys not used here and
    unrelated keys (a "comment") are ignored with a note, as EveryDream2 ignores what it does not read."""
    for key, value in data.items():
        if key in known:
            continue
        if key in unused:
            if value not in (False, None):
                notes.append(f"{where}{key} is an EveryDream2 key this trainer does not use ({unused[key]}); ignored.")
            continue
        close = difflib.get_close_matches(key, [*known, *unused], n=1, cutoff=0.75)
        if close:
            problems.append(f"{where}unknown key {key!r}; did you mean {close[0]!r}?")
        else:
            notes.append(f"{where}unknown key {key!r} ignored (known: {', '.join(known)}).")


# ---------------------------------------------------------------- values


def _without_nulls(data: dict) -> dict:
    """null means "the default", as in every other file the config names."""
    return {key: value for key, value in data.items() if value is not None}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _whole(value: Any) -> Any:
    """A float with no fraction (15.0) as the int it means, as train.json reads it."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _seed(value: Any, where: str, problems: list[str]) -> int:
    value = _whole(value)
    if not _is_int(value) or not RANDOM_SEED <= value < 2**63:
        problems.append(f"{where}: got {value!r}; expected an integer >= 0, or -1 for a new random seed each time.")
        return DEFAULT_SEED
    return value


def _cfg(value: Any, where: str, problems: list[str]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        problems.append(f"{where}: got {value!r}; expected a guidance scale >= 0 such as 7.0.")
        return DEFAULT_CFGS[0]
    return float(value)


def _cfgs(value: Any, where: str, problems: list[str]) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        problems.append(f"{where}: got {value!r}; expected a list of guidance scales such as [7, 4] "
                        "(one image each).")
        return DEFAULT_CFGS
    return tuple(_cfg(v, f"{where}[{i}]", problems) for i, v in enumerate(value))


def _steps(value: Any, where: str, problems: list[str]) -> int:
    value = _whole(value)
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


def _aspect(value: Any, where: str, problems: list[str]) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.125 <= value <= 8:
        problems.append(f"{where}: got {value!r}; expected width / height from 0.125 to 8, such as 1.77778 for 16:9.")
        return None
    return float(value)


def _flag(value: Any, where: str, problems: list[str]) -> bool:
    if not isinstance(value, bool):
        problems.append(f"{where}: got {value!r}; expected true or false.")
        return False
    return value


def _optional_int(value: Any, where: str, low: int, high: int | None, problems: list[str]) -> int | None:
    value = _whole(value)
    if value is None:
        return None
    if not _is_int(value) or value < low or (high is not None and value > high):
        problems.append(f"{where}: got {value!r}; expected an integer from {low}"
                        + (f" to {high}." if high is not None else " up."))
        return None
    return value


def _resolution(value: Any, problems: list[str]) -> int | None:
    if value is None:
        return None
    if not _is_int(value) or not MIN_SIDE <= value <= MAX_SIDE or value % SIZE_MULTIPLE:
        problems.append(f"resolution: got {value!r}; expected the side of unsized samples, a multiple of "
                        f"{SIZE_MULTIPLE} from {MIN_SIDE} to {MAX_SIDE}, such as 512 (or leave it out: the training "
                        "resolution).")
        return None
    return value


def _scheduler(value: Any, problems: list[str]) -> str | None:
    if value is None:
        return None
    name = value.strip().lower() if isinstance(value, str) else value
    if name in SCHEDULERS:
        package = SCHEDULER_PACKAGES.get(SCHEDULERS[name][0])
        if package and importlib.util.find_spec(package) is None:
            problems.append(f"scheduler: {name} needs the {package} package, which is not installed; pip install "
                            f"{package}, or choose another scheduler such as dpm++ or euler_a.")
        return name
    if name == "flow-matching":
        problems.append("scheduler: flow-matching is for EveryDream2's flow-matching models; this trainer trains "
                        "SD 1.x/2.x, which sample with e.g. ddim, dpm++ or euler_a (or leave scheduler out).")
        return None
    close = difflib.get_close_matches(str(name), SCHEDULERS, n=1, cutoff=0.6)
    problems.append(f"scheduler: got {value!r}" + (f"; did you mean {close[0]!r}?" if close else ".")
                    + f" Known: {', '.join(SCHEDULERS)} (or leave it out: the model's own scheduler).")
    return None
