"""The numbers a run logs: the loss and throughput of the steps since the last log line, learning rates, the
gradient norm and memory, written to the trackers (tensorboard, and wandb when asked).

The loss is summed on its device and read once per log line: reading it every step (`.item()`) would make the
CPU wait for the GPU each step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from trainer.run.logs import log_to_trackers


@dataclass
class LogWindow:
    """Loss and throughput since the last log line."""

    loss_sum: torch.Tensor | float = 0.0
    batches: int = 0
    samples: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss: torch.Tensor, batch_size: int) -> None:
        self.loss_sum, self.batches, self.samples = self.loss_sum + loss, self.batches + 1, self.samples + batch_size


def log_scalars(run, window: LogWindow, grad_norm, step: int) -> float:
    """Write the window's scalars to the trackers; returns its mean loss (this process's). A tracker that
    cannot write (a full disk, a deleted run folder) is said once; it never stops the run (trainer/run/logs.py)."""
    elapsed = max(time.perf_counter() - window.start, 1e-9)
    optimizer_steps = -(-window.batches // run.cfg.grad_accum)
    mean_loss = float(window.loss_sum) / max(window.batches, 1)
    scalars = {
        "loss/train": mean_loss,
        "perf/it_per_s": optimizer_steps / elapsed,
        "perf/samples_per_s": window.samples * run.accelerator.num_processes / elapsed,
    }
    param_groups = run.lr_scheduler.scheduler.optimizer.param_groups
    for group, lr in zip(param_groups, run.lr_scheduler.get_last_lr()):
        scalars[f"lr/{group.get('name', 'group')}"] = lr
    if grad_norm is not None:
        scalars["grad_norm"] = float(grad_norm)
    if torch.cuda.is_available():
        scalars["perf/gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    log_to_trackers(run, scalars, step)
    return mean_loss
