"""What bench/gpu/gpu_runs.py checks in a finished train.py run, each with the consumer's own loader where a file is
for another program: its log, its save (diffusers' from_pretrained), its single file (every key and shape of the
original file the run started from), its samples, its LoRA file (diffusers' load_lora_weights) and two saves
compared weight by weight. Each check returns what is wrong in one line, or None.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch


def train_log_problem(text: str, exit_code: int | None) -> str | None:
    """A traceback anywhere in the log is a bug; a failed run is said by its last report."""
    lines = [line for line in text.splitlines() if line.strip()]
    if "Traceback (most recent call last)" in text:
        return f"a traceback in its log, ending: {lines[-1][:200]}"
    if exit_code != 0:
        reports = [line for line in lines if "train.py:" in line]
        return (reports or lines or ["(empty log)"])[-1][:240]
    return None


def pipeline_from(folder: Path):
    """diffusers' StableDiffusionPipeline of a saved folder, loaded without the progress bars ("Loading pipeline
    components", "Loading weights") that would break up the table."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


def load_back(folder: Path | None) -> str | None:
    """The save loads whole in diffusers, and every weight in it is finite."""
    if folder is None or not folder.is_dir():
        return f"no saved model folder ({folder})"
    try:
        pipe = pipeline_from(folder)
    except Exception as err:
        return f"{folder.name} does not load in diffusers: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
    for part in ("unet", "text_encoder", "vae"):
        bad = [name for name, p in getattr(pipe, part).named_parameters() if not torch.isfinite(p).all()]
        if bad:
            return f"{folder.name}'s {part} holds non-finite weights ({bad[0]}, {len(bad)} tensors)"
    return None


def tensor_shapes(path: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as file:
        return {key: list(file.get_slice(key).get_shape()) for key in file.keys()}  # noqa: SIM118 (no mapping)


def check_single_file(single: Path | None, original: Path) -> str | None:
    """Every key of the file the run started from, with its shape, is in the saved single file."""
    if single is None or not single.exists():
        return f"no single file was saved ({single})"
    want, got = tensor_shapes(original), tensor_shapes(single)
    missing = sorted(set(want) - set(got))
    reshaped = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    if missing or reshaped:
        return (f"{single.name}: {len(missing)} of {len(want)} keys missing (first {missing[:3]}), {len(reshaped)} "
                f"with another shape (first {reshaped[:3]})")
    return None


def sample_problem(run_dir: Path) -> str | None:
    """The run drew its samples: PNG images with something in them (a NaN model decodes to one flat colour)."""
    import numpy as np
    from PIL import Image

    images = sorted(p for p in run_dir.rglob("*.png") if not p.name.endswith("-grid.png"))
    if not images:
        return f"no sample image under {run_dir}"
    for path in images:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3)
            if float(pixels.std(axis=0).max()) == 0.0:  # every pixel alike
                return f"sample {path.name} is one flat colour"
    return None


@dataclass
class Comparison:
    tensors: int
    differing: int
    max_abs: float
    relative: float  # |b - a| over |a - base|: the difference against what training changed

    @property
    def equal(self) -> bool:
        return self.differing == 0

    def describe(self) -> str:
        if self.equal:
            return f"equal bit for bit ({self.tensors} tensors)"
        return (f"{self.differing} of {self.tensors} tensors differ, max |diff| {self.max_abs:.3g}, |diff| "
                f"{self.relative:.3g}x what training changed")


def part_weights(folder: Path, part: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not (folder / part).is_dir():
        raise FileNotFoundError(f"{folder} holds no {part} (removed, or never saved)")
    weights: dict[str, torch.Tensor] = {}
    for file in sorted((folder / part).glob("*.safetensors")):
        weights.update(load_file(str(file)))
    return weights


def compare_saves(a: Path, b: Path, base: Path) -> Comparison:
    """The UNet and text encoder of two saves, tensor by tensor; `base` is the model both started from."""
    tensors = differing = 0
    max_abs, diff_sq, change_sq = 0.0, 0.0, 0.0
    for part in ("unet", "text_encoder"):
        first, second, start = part_weights(a, part), part_weights(b, part), part_weights(base, part)
        if set(first) != set(second):
            raise ValueError(f"{a.name} and {b.name} hold different {part} tensors")
        for key, x in first.items():
            x, y = x.double(), second[key].double()
            tensors += 1
            if torch.equal(x, y):
                continue
            differing += 1
            max_abs = max(max_abs, (x - y).abs().max().item())
            diff_sq += (x - y).pow(2).sum().item()
            change_sq += (x - start[key].double()).pow(2).sum().item() if key in start else 0.0
    relative = (diff_sq / change_sq) ** 0.5 if change_sq else (0.0 if not diff_sq else float("inf"))
    return Comparison(tensors, differing, max_abs, relative)


def lora_layers(module: torch.nn.Module) -> int:
    from peft.tuners.lora import LoraLayer

    return sum(isinstance(layer, LoraLayer) for layer in module.modules())


class _KeyWarnings(logging.Handler):
    """diffusers and peft say a key they could not place as a warning naming it."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "key" in record.getMessage().lower():
            self.messages.append(record.getMessage())


def check_lora_file(file: Path | None, base: Path) -> tuple[str | None, str]:
    """diffusers' load_lora_weights puts each adapter of the file on a layer of the base model, without a key
    it could not place: (the problem or None, what was found)."""
    if file is None or not file.exists():
        return f"no LoRA file was saved ({file})", ""
    from safetensors import safe_open

    with safe_open(str(file), "pt") as opened:
        downs = [key for key in opened.keys() if key.endswith("lora_down.weight")]  # noqa: SIM118
    in_file = {"unet": sum(k.startswith("lora_unet_") for k in downs),
               "text_encoder": sum(k.startswith("lora_te") for k in downs)}
    pipe = pipeline_from(base)
    handler = _KeyWarnings()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        pipe.load_lora_weights(str(file))
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    placed = {"unet": lora_layers(pipe.unet), "text_encoder": lora_layers(pipe.text_encoder)}
    said = (f"{file.name}: diffusers placed {placed['unet']} UNet and {placed['text_encoder']} text-encoder adapters "
            f"of the file's {in_file['unet']} + {in_file['text_encoder']}")
    if handler.messages:
        return f"{said}; it warned: {handler.messages[0][:200]}", said
    if placed != in_file or not all(in_file.values()):
        return said, said
    return None, said
