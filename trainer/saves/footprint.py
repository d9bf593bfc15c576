"""How many bytes a save takes on disk, from parameter counts: the preflight's free-space check (before any model
loads, from the model files' headers) and each save's own check (from the modules in memory) use the same sum.

Imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.safetensors_header import read_header
from convert.tables import UNET_PREFIX, VAE_PREFIX

# Optimizer state bytes per trained parameter, as accelerate's save_state writes them.
OPTIMIZER_STATE_BYTES = {
    "adamw": 8.0,  # exp_avg + exp_avg_sq, fp32
    "adamw8bit": 2.0,  # both moments in 8 bits (bitsandbytes' block quantisation; its scales are noise)
    "lion": 4.0,  # one momentum
    "lion8bit": 1.0,  # one momentum in 8 bits
    "prodigy": 16.0,  # exp_avg, exp_avg_sq, s and the initial weights
    "adafactor": 0.1,  # factored second moments: a row and a column per matrix
    "dadapt_adam": 12.0,  # exp_avg, exp_avg_sq, s
    "dadapt_lion": 8.0,  # exp_avg, s
    "dadapt_sgd": 12.0,  # z, s, x0
    "dadapt_adan": 20.0,  # exp_avg, exp_avg_sq, exp_avg_diff, s, previous_grad
}
UNKNOWN_OPTIMIZER_BYTES = 8.0
# An original single file's keys per component (its EMA copy, model_ema.*, is not converted).
COMPONENT_PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": "cond_stage_model."}
MARGIN = 1.05  # configs, the tokenizer, safetensors headers, file-system blocks
FIXED_BYTES = 8 * 2**20


@dataclass(frozen=True)
class ModelSize:
    """Parameter counts of the parts a save holds."""

    trained: int  # the UNet, and the text encoder when it is trained
    frozen: int  # the VAE, and the text encoder when it is not

    @property
    def total(self) -> int:
        return self.trained + self.frozen


def save_bytes(
    size: ModelSize, *, half: bool, single_file: bool, ema: bool, training_state: bool, optimizer: str
) -> int:
    """Disk bytes of one save: the diffusers folder, its single file, their EMA twins, and the training state."""
    weight_bytes = 2 if half else 4
    copies = 2 if single_file else 1
    total = size.total * weight_bytes * copies
    if ema:
        total += size.total * weight_bytes * copies  # the -ema folder (and its single file) is a whole model too
    if training_state:
        # accelerate's state: the trained weights in fp32, the optimizer's moments, the EMA's shadow weights
        per_param = 4 + optimizer_state_bytes(optimizer) + (4 if ema else 0)
        total += size.trained * per_param
    return int(total * MARGIN) + FIXED_BYTES


def optimizer_state_bytes(optimizer: str) -> float:
    """Per trained parameter, for an optimizer name or 'unet_name+text_encoder_name' (each model its own: sized
    as if every trained parameter had the larger state, which errs on the side of room)."""
    return max(OPTIMIZER_STATE_BYTES.get(name, UNKNOWN_OPTIMIZER_BYTES) for name in optimizer.split("+"))


def safetensors_numels(path: Path) -> dict[str, int]:
    """Each tensor's element count, from a safetensors file's header alone. Raises ValueError (HeaderError) for
    a file that is not one."""
    return {name: info.numel for name, info in read_header(path).tensors.items()}


def component_numels_in_folder(model_dir: Path) -> dict[str, int] | None:
    """Parameters per component of a diffusers folder, from its weight files' headers; None when any
    component's weights are not safetensors (their counts would need the weights loaded)."""
    counts = {}
    for component in COMPONENT_PREFIXES:
        files = sorted((model_dir / component).glob("*.safetensors"))
        if not files:
            return None
        counts[component] = sum(n for f in files for n in safetensors_numels(f).values())
    return counts


def component_numels_in_single_file(path: Path) -> dict[str, int] | None:
    """Parameters per component of an original single file (a .safetensors header; None for a .ckpt)."""
    if path.suffix.lower() != ".safetensors":
        return None
    numels = safetensors_numels(path)
    return {component: sum(n for key, n in numels.items() if key.startswith(prefix))
            for component, prefix in COMPONENT_PREFIXES.items()}


def model_size(counts: dict[str, int], train_text_encoder: bool) -> ModelSize:
    trained = counts["unet"] + (counts["text_encoder"] if train_text_encoder else 0)
    return ModelSize(trained=trained, frozen=sum(counts.values()) - trained)
