"""One optimizer made of several: each model its own optimizer class, settings and schedule, stepped, zeroed and
saved as one.

Why one chained optimizer rather than two prepared ones: accelerate steps each prepared optimizer through the fp16
GradScaler and calls `scaler.update()` after each, so with two of them the second one's gradients are unscaled a
second time after a clip (or the gradient-norm measurement at log steps) and the scale is updated twice per step.
Chained, accelerate, the scaler, the schedule and the training state (one optimizer.bin, one scheduler.bin) see
one optimizer.
"""

from __future__ import annotations

import torch


class ChainedOptimizer(torch.optim.Optimizer):
    """Several optimizers that step, zero and save as one: their parameter groups in order, one state dict holding
    each one's. Not built by Optimizer.__init__: the groups stay the parts' own."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):  # no super().__init__: it would copy the groups
        self.optimizers = list(optimizers)
        self.defaults: dict = {}

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @property
    def state(self) -> dict:
        return {param: value for optimizer in self.optimizers for param, value in optimizer.state.items()}

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        parts = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if not isinstance(parts, list) or len(parts) != len(self.optimizers):
            held = f"{len(parts)} optimizers" if isinstance(parts, list) else "one optimizer"
            raise ValueError(f"the saved optimizer state holds {held}; this run has {len(self.optimizers)}")
        for optimizer, part in zip(self.optimizers, parts):
            optimizer.load_state_dict(part)

    def __repr__(self) -> str:
        return f"ChainedOptimizer({', '.join(type(o).__name__ for o in self.optimizers)})"
