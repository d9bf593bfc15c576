"""The fused backward pass (`fused_backward`, OneTrainer's "fused back pass"): each trained parameter has an
optimizer of its own, stepped by a hook the moment backward has finished its gradient, which is then freed. No
step ever holds all the gradients at once: for SD1.5 with its text encoder that is 3.7 GiB (fp32) less at the
peak, the size of the weights themselves.

What it cannot combine with, and why (each refused before the model loads, trainer/config/checks.py and
`problems` below):
- grad_accum > 1: the gradient is consumed after one micro-batch, so there is nothing to accumulate into;
- clip_grad_norm: clipping needs the norm over all gradients before any parameter steps;
- fp16: its loss scaler must see every gradient (for inf/nan) before any step, and unscale them;
- several processes: DDP averages gradients in buckets after this hook would already have stepped;
- prodigy and dadapt_*: they estimate one step size from all parameters together.
Everything else is the ordinary optimizer per parameter: the same maths, its state saved and resumed as one
optimizer (a ChainedOptimizer of them), the LR schedule applied to each.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from trainer.optim.chained import ChainedOptimizer

WHOLE_MODEL_OPTIMIZERS = ("prodigy", "dadapt_adam", "dadapt_lion", "dadapt_sgd", "dadapt_adan")


class FusedBackwardOptimizer(ChainedOptimizer):
    """One optimizer per parameter, each stepped from its parameter's post-accumulate-grad hook. `step` and
    `zero_grad` have nothing left to do: the hooks stepped, and freed every gradient."""

    def __init__(self, groups: list[dict], make: Callable[[list[dict]], torch.optim.Optimizer]):
        per_parameter = [(param, make([{**group, "params": [param]}])) for group in groups for param in group["params"]]
        super().__init__([optimizer for _, optimizer in per_parameter])
        self.hooks = [param.register_post_accumulate_grad_hook(_stepper(optimizer))
                      for param, optimizer in per_parameter]

    def step(self, closure=None):
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def remove_hooks(self) -> None:
        for hook in self.hooks:
            hook.remove()


def _stepper(optimizer: torch.optim.Optimizer):
    def step_and_free(param: torch.Tensor) -> None:
        optimizer.step()
        param.grad = None

    return step_and_free


def problems(optimizers: list[str], processes: int, precision: str) -> list[str]:
    """What fused_backward cannot run with, found once the optimizer plan, the process count and the resolved
    precision are known (the config's own conflicts are trainer/config/checks.py's)."""
    found = []
    whole = sorted({name for name in optimizers if name in WHOLE_MODEL_OPTIMIZERS})
    if whole:
        found.append(f"fused_backward: {', '.join(whole)} estimates one step size from all parameters together, "
                     "so it cannot step each parameter alone; use adamw, adamw8bit, lion or adafactor, or turn "
                     "fused_backward off.")
    if processes > 1:
        found.append(f"fused_backward: {processes} processes average their gradients after backward, too late for a "
                     "step inside it; train with one process, or turn fused_backward off.")
    if precision == "fp16":
        found.append("fused_backward: fp16's loss scaler must see every gradient before any step; use "
                     "mixed_precision bf16 (or no), or turn fused_backward off.")
    return found
