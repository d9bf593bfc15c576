"""The divergence guard: the first step that breaks the loss or the weights is kept, and named."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.run.guard import LOSS_NOT_FINITE, WEIGHTS_NOT_FINITE, WEIGHTS_TOO_LARGE, WeightGuard


def params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8))]


def step(guard: WeightGuard, number: int, loss: float = 1.0) -> None:
    guard.add_loss(torch.tensor(loss))
    guard.after_step(number)


def test_healthy_steps_leave_no_verdict():
    guard = WeightGuard(params(), half_saves=True, device=torch.device("cpu"))
    for number in range(1, 4):
        step(guard, number)
    assert guard.breakage() is None


def test_the_first_bad_step_is_kept_whatever_follows():
    weights = params()
    guard = WeightGuard(weights, half_saves=True, device=torch.device("cpu"))
    step(guard, 1)
    with torch.no_grad():
        weights[0][3, 3] = 70_000.0  # finite, but inf in an fp16 save: an exploding update with a fine loss
    step(guard, 2)
    with torch.no_grad():
        weights[1][0] = math.nan
    step(guard, 3, loss=math.nan)
    broken = guard.breakage()
    assert (broken.step, broken.kind) == (2, WEIGHTS_TOO_LARGE) and broken.peak == pytest.approx(70_000, rel=1e-3)
    assert "norm grew to 700" in broken.describe(guard.limit) and "65504" in broken.describe(guard.limit)


def test_full_precision_saves_allow_large_weights_but_not_nan_and_a_nan_loss_counts():
    weights = params()
    guard = WeightGuard(weights, half_saves=False, device=torch.device("cpu"))
    with torch.no_grad():
        weights[0][0, 0] = 1e6
    step(guard, 1)
    assert guard.breakage() is None
    step(guard, 2, loss=math.inf)
    assert guard.breakage().kind == LOSS_NOT_FINITE and guard.breakage().step == 2

    nan_weights = params()
    other = WeightGuard(nan_weights, half_saves=False, device=torch.device("cpu"))
    with torch.no_grad():
        nan_weights[1][2] = math.inf
    step(other, 7)
    assert (other.breakage().step, other.breakage().kind) == (7, WEIGHTS_NOT_FINITE)


def test_accumulated_micro_batches_count_every_loss():
    guard = WeightGuard(params(), half_saves=True, device=torch.device("cpu"))
    guard.add_loss(torch.tensor(math.nan))  # the first of two micro-batches
    guard.add_loss(torch.tensor(0.5))
    guard.after_step(1)
    assert guard.breakage().kind == LOSS_NOT_FINITE
