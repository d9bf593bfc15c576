"""The divergence guard: no non-finite or unsaveable weight ever reaches a save, and the step that broke them
is named.

After every optimizer step the guard looks at the step's loss and at the norm of all trained weights (one fused
pass, `get_total_norm`; nan or inf when any weight is). A loss that is not finite counts, and so does an update
that blows the weights up while the loss still looks fine. For fp16 saves the norm may not pass 65504, fp16's
largest value: no single weight can then be past it (a weight is at most the norm), and a trained SD model's norm
is far below it (about 700 for SD1.5's UNet), so only a run that exploded gets there. The inf norm would bound
single weights exactly, but costs 7x the L2 norm on a CPU; each save checks its exact tensors anyway.

The verdict stays on the device: the first bad step is kept in a tensor with `torch.where`, so the guard adds no
host synchronisation to a step. The loop reads it where it waits for the device anyway (each log line) and
before anything is saved or sampled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trainer.errors import UserError

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
HEALTHY, LOSS_NOT_FINITE, WEIGHTS_TOO_LARGE, WEIGHTS_NOT_FINITE = 0, 1, 2, 3


@dataclass(frozen=True)
class Breakage:
    step: int
    kind: int
    peak: float  # the trained weights' norm at that step

    def describe(self, limit: float) -> str:
        if self.kind == LOSS_NOT_FINITE:
            return "the loss became nan or inf"
        if self.kind == WEIGHTS_NOT_FINITE:
            return "the weights became nan or inf"
        return (f"the weights exploded: their norm grew to {self.peak:.6g}, past {limit:g}, the largest value an "
                "fp16 save can hold")


class DivergedError(UserError):
    """Training broke the weights; nothing after the last good step was saved."""


class WeightGuard:
    def __init__(self, params: list[torch.nn.Parameter], half_saves: bool, device: torch.device):
        self.params = params
        self.limit = FP16_MAX if half_saves else math.inf
        self._loss = torch.zeros((), device=device)
        # the first bad step, its kind and its peak weight; -1: none yet
        self._step = torch.full((), -1, dtype=torch.int64, device=device)
        self._kind = torch.full((), HEALTHY, dtype=torch.int64, device=device)
        self._peak = torch.zeros((), device=device)

    def add_loss(self, loss: torch.Tensor) -> None:
        """Each micro-batch's loss; nan and inf carry through the sum to the step's verdict."""
        self._loss = self._loss + loss.detach().float()

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Record `step` if its loss or the weights it left are bad. Python numbers enter torch.where as
        kernel arguments, so nothing here waits for the device."""
        peak = torch.nn.utils.get_total_norm(self.params, norm_type=2.0, foreach=True).float()
        peak = peak.to(self._loss.device)
        kind = torch.where(~torch.isfinite(self._loss), LOSS_NOT_FINITE,
                           torch.where(~torch.isfinite(peak), WEIGHTS_NOT_FINITE,
                                       torch.where(peak > self.limit, WEIGHTS_TOO_LARGE, HEALTHY)))
        first = (self._step < 0) & (kind != HEALTHY)
        self._step = torch.where(first, step, self._step)
        self._kind = torch.where(first, kind, self._kind)
        self._peak = torch.where(first, peak, self._peak)
        self._loss = torch.zeros_like(self._loss)

    def breakage(self, accelerator=None) -> Breakage | None:
        """The first bad step so far, or None. Reads the device: call it where the loop syncs anyway. With
        several processes every one gets the same verdict (the earliest bad step of any), or one would stop
        while the others wait for it in the next all-reduce."""
        verdict = torch.stack([self._step.double(), self._kind.double(), self._peak.double()]).reshape(1, 3)
        if accelerator is not None and accelerator.num_processes > 1:
            verdict = accelerator.gather(verdict)
        bad = [row for row in verdict.tolist() if row[0] >= 0]
        if not bad:
            return None
        step, kind, peak = min(bad)
        return Breakage(int(step), int(kind), peak)
