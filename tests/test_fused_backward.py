"""fused_backward (trainer/optim/fused_backward.py): the same training as the ordinary step, never more than one
gradient held, exact resume, and what it cannot combine with refused before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import run_train
from tests.test_loop import FAST, assert_same_weights, saved_paths
from trainer.optim.fused_backward import FusedBackwardOptimizer


def test_each_parameter_steps_in_backward_and_its_gradient_is_freed():
    """On a real module: the same update as one AdamW over all parameters, and at every moment of backward at
    most one gradient exists."""
    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    fused = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    fused.load_state_dict(reference.state_dict())
    held: list[int] = []
    for param in fused.parameters():  # registered first, so it runs before the same parameter's step
        param.register_post_accumulate_grad_hook(
            lambda p: held.append(sum(q.grad is not None for q in fused.parameters())))
    plain = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    stepper = FusedBackwardOptimizer([{"params": list(fused.parameters()), "lr": 1e-2, "weight_decay": 0.1}],
                                     lambda groups: torch.optim.AdamW(groups))
    for step in range(3):
        x = torch.randn(5, 8)
        reference(x).square().mean().backward()
        plain.step()
        plain.zero_grad()
        fused(x).square().mean().backward()
        stepper.step()
    assert max(held) == 1 and all(p.grad is None for p in fused.parameters())
    for a, b in zip(reference.parameters(), fused.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert len(stepper.state_dict()["optimizers"]) == 4  # one state per parameter, saved as one optimizer


COMMON = ["--batch_size", "2", "--max_epochs", "3", "--lr", "1e-4", "--save_full_precision", "--save_single_file",
          "false", "--disable_textenc_training", "--cond_dropout", "0", *FAST]


@pytest.mark.slow
def test_trains_the_same_weights_as_the_ordinary_step(tiny_model, shapes_dir: Path, tmp_path: Path):
    common = ["--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(shapes_dir), *COMMON, "--max_steps", "4"]
    ordinary = run_train([*common, "--logdir", "ordinary"], cwd=tmp_path)
    fused = run_train([*common, "--logdir", "fused", "--fused_backward"], cwd=tmp_path)
    assert ordinary.returncode == 0 and fused.returncode == 0, (ordinary.stderr + fused.stderr)[-3000:]
    assert "fused backward" in fused.stdout
    assert_same_weights(saved_paths(ordinary.stdout)[-1], saved_paths(fused.stdout)[-1])


@pytest.mark.slow
def test_exact_resume(tiny_model, shapes_dir: Path, tmp_path: Path):
    """6 steps straight == 3 steps, stop, resume for 3 more: every parameter's own optimizer state comes back."""
    common = ["--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(shapes_dir), *COMMON, "--fused_backward",
              "--optimizer", "adamw8bit"]
    straight = run_train([*common, "--max_steps", "6", "--logdir", "straight"], cwd=tmp_path)
    first = run_train([*common, "--max_steps", "3", "--logdir", "split", "--save_optimizer"], cwd=tmp_path)
    resumed = run_train([*common, "--max_steps", "6", "--logdir", "split", "--resume_state", "findlast"], cwd=tmp_path)
    for result in (straight, first, resumed):
        assert result.returncode == 0, result.stderr[-3000:]
    assert "step 3, epoch 1, 3 batches into it" in resumed.stdout
    assert_same_weights(saved_paths(straight.stdout)[-1], saved_paths(resumed.stdout)[-1])


REFUSALS = [
    (["--optimizer", "prodigy"], "fused_backward: prodigy estimates one step size from all parameters together"),
    (["--grad_accum", "2"], "grad_accum: got 2 (from command line); expected 1 with fused_backward"),
    (["--clip_grad_norm", "1"], "clip_grad_norm: got 1.0 (from command line); expected null with fused_backward"),
    (["--mixed_precision", "fp16"], "mixed_precision: got 'fp16' (from command line); expected bf16, no or auto"),
]


@pytest.mark.parametrize("args, expected",  # the first in the default tier, the others with --run-slow
                         [REFUSALS[0], *(pytest.param(*r, marks=pytest.mark.slow) for r in REFUSALS[1:])])
@pytest.mark.slow
def test_what_it_cannot_combine_with_is_refused_before_loading(args, expected, tiny_model, shapes_dir: Path,
                                                                tmp_path: Path):
    result = run_train(["--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(shapes_dir), "--fused_backward",
                        "--dry_run", *args], cwd=tmp_path)
    assert result.returncode != 0 and expected in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_state_saved_without_it_is_refused_before_loading(tiny_model, shapes_dir: Path, tmp_path: Path):
    """One optimizer state per parameter cannot continue one optimizer's state (nor the reverse): said by the
    preflight, naming the setting."""
    common = ["--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(shapes_dir), *COMMON, "--logdir", "logs"]
    first = run_train([*common, "--max_steps", "2", "--save_optimizer"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_train([*common, "--max_steps", "4", "--resume_state", "findlast", "--fused_backward"], cwd=tmp_path)
    assert resumed.returncode == 2 and "fused_backward: off then, on now" in resumed.stderr, resumed.stderr[-2000:]
    assert "Model source" not in resumed.stdout and "Traceback" not in resumed.stderr
