"""The settings whose best value depends on the device: `null` (or `auto`) in the config is resolved here, once,
into a concrete value, and each choice is said with its reason. The rest of the trainer only sees concrete values.

Why per device:
- gradient checkpointing trades ~20% of a step for most of the activation memory: a GPU's memory is the limit,
  a CPU's RAM rarely is, and there the recomputation cost 18% a step (docs/PERFORMANCE.md);
- data-loader workers prepare batches beside a GPU; on a CPU the step already uses every core, and a worker
  process competes with it;
- bf16 has fp32's range (no loss scaling, no overflow) where the GPU computes it natively (Ampere and newer);
- channels_last feeds tensor cores' convolutions directly; on a CPU it only adds layout conversions.

Imports nothing heavy: the device is described by a `Device` value the caller measures.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.config.schema import TrainConfig

MAX_WORKERS = 8  # beyond this, batch preparation outruns any SD step and workers only cost memory


@dataclass(frozen=True)
class Device:
    """The training device as far as defaults care."""

    gpu: bool  # a CUDA GPU trains (or the plan is for one: --vram_gb on a machine without)
    bf16: bool  # the GPU computes bf16 natively
    cpu_cores: int  # cores this process may use
    processes: int = 1  # processes sharing the machine (accelerate launch)
    memory: int | None = None  # the GPU's own memory in bytes; None on a CPU

    @classmethod
    def here(cls, processes: int = 1) -> Device:
        """This machine's device (imports torch)."""
        import torch

        gpu = torch.cuda.is_available()
        return cls(gpu=gpu, bf16=gpu and torch.cuda.is_bf16_supported(), cpu_cores=usable_cores(), processes=processes,
                   memory=torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory if gpu else None)

    def planned(self, vram_gb: float | None) -> Device:
        """The device a dry run plans for: this one, or, when vram_gb is given on a machine without a GPU, a
        GPU with that memory (the plan answers "would this fit my GPU?")."""
        if self.gpu or vram_gb is None:
            return self
        return dataclasses.replace(self, gpu=True, bf16=True, memory=int(vram_gb * 2**30))


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve(cfg: TrainConfig, device: Device) -> tuple[TrainConfig, list[str]]:
    """`cfg` with every device-dependent `null`/`auto` made concrete, and one line saying what was chosen."""
    chosen: dict[str, object] = {}
    reasons: list[str] = []
    if cfg.mixed_precision == "auto":
        half = "fp16" if not cfg.fused_backward else "no"  # fp16's loss scaler cannot work inside backward
        chosen["mixed_precision"] = ("bf16" if device.bf16 else half) if device.gpu else "no"
        reasons.append("mixed_precision " + (
            "bf16 (the GPU has it: fp32's range, no loss scaling)" if chosen["mixed_precision"] == "bf16" else
            "fp16 (this GPU has no fast bf16)" if chosen["mixed_precision"] == "fp16" else
            "no (fp32: fused_backward cannot use fp16, and this GPU has no fast bf16)" if device.gpu else
            "no (fp32: fp16 autocast needs CUDA)"))
    if cfg.gradient_checkpointing is None:
        chosen["gradient_checkpointing"] = device.gpu
        reasons.append("gradient_checkpointing " + ("on (GPU memory is the limit)" if device.gpu else
                                                    "off (on a CPU it costs ~18% a step and RAM is rarely the limit)"))
    if cfg.num_workers is None:
        workers = 0 if not device.gpu else max(1, min(MAX_WORKERS, device.cpu_cores // device.processes - 1))
        chosen["num_workers"] = workers
        reasons.append(f"num_workers {workers} " + ("(the CPU step uses every core)" if not device.gpu else
                                                    f"({device.cpu_cores} cores, {device.processes} process(es))"))
    if cfg.channels_last is None:
        chosen["channels_last"] = device.gpu
        reasons.append("channels_last " + ("on (tensor-core convolutions)" if device.gpu else
                                           "off (a CPU gains nothing)"))
    if not chosen:
        return cfg, []
    where = "GPU" if device.gpu else "CPU"
    return dataclasses.replace(cfg, **chosen), [f"Device defaults for a {where}: " + "; ".join(reasons) + "."]


def for_this_machine(cfg: TrainConfig, processes: int = 1) -> TrainConfig:
    """`cfg` resolved for this machine, without saying it (benches, tests, library callers)."""
    return resolve(cfg, Device.here(processes))[0]


def require_resolved(cfg: TrainConfig) -> None:
    """A programming error guard: the trainer's modules take concrete values only."""
    open_keys = [key for key in ("mixed_precision", "gradient_checkpointing", "num_workers", "channels_last")
                 if getattr(cfg, key) in (None, "auto")]
    if open_keys:
        raise ValueError(f"{', '.join(open_keys)} not resolved for the device: pass the config through "
                         "trainer.preflight.device.resolve (or for_this_machine) first")
