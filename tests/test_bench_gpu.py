"""The GPU check (bench/gpu/) keeps working between the rare sessions that have a GPU: its CPU rehearsal runs real
train.py processes through every check it makes there, and each check finds what it is there to find."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bench.gpu.gpu_verify import check_single_file, compare_saves, sample_problem, train_log_problem

REPO_ROOT = Path(__file__).resolve().parent.parent


def save_weights(folder: Path, unet: dict[str, torch.Tensor], text: dict[str, torch.Tensor]) -> Path:
    for part, weights in (("unet", unet), ("text_encoder", text)):
        (folder / part).mkdir(parents=True)
        save_file(weights, str(folder / part / "model.safetensors"))
    return folder


def test_two_saves_are_compared_bit_for_bit_and_a_difference_is_sized_against_what_training_changed(tmp_path):
    start = {"w": torch.zeros(4, 4)}
    trained = {"w": torch.full((4, 4), 0.01)}
    base = save_weights(tmp_path / "base", start, {"t": torch.ones(3)})
    straight = save_weights(tmp_path / "straight", trained, {"t": torch.ones(3)})
    same = save_weights(tmp_path / "same", {"w": trained["w"].clone()}, {"t": torch.ones(3)})
    nudged = trained["w"].clone()
    nudged[0, 0] += 1e-7  # one element, one float32 step or so: still not equal
    off = save_weights(tmp_path / "off", {"w": nudged}, {"t": torch.ones(3)})

    assert compare_saves(straight, same, base).equal
    compared = compare_saves(straight, off, base)
    assert (compared.tensors, compared.differing) == (2, 1)
    assert compared.max_abs == pytest.approx(1e-7, rel=0.1)
    assert compared.relative == pytest.approx(1e-7 / 0.04, rel=0.1)  # |diff| over |0.01 x 16 elements|
    assert "1 of 2 tensors differ" in compared.describe()


def test_a_single_file_missing_a_key_or_with_another_shape_is_found(tmp_path):
    original = tmp_path / "original.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(4)}, str(original))
    whole = tmp_path / "whole.safetensors"
    save_file({"a": torch.ones(2, 3), "b": torch.ones(4), "extra": torch.ones(1)}, str(whole))
    short = tmp_path / "short.safetensors"
    save_file({"a": torch.ones(3, 2)}, str(short))

    assert check_single_file(whole, original) is None
    assert "1 of 2 keys missing (first ['b']), 1 with another shape (first ['a'])" in check_single_file(short, original)
    assert "no single file" in check_single_file(None, original)


def test_a_flat_sample_and_a_traceback_are_problems(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), (128, 0, 0)).save(tmp_path / "s-00-cfg7.png")
    assert "one flat colour" in sample_problem(tmp_path)
    assert "no sample image" in sample_problem(tmp_path / "nothing")
    assert train_log_problem("step 1\nTraceback (most recent call last):\n  ...\nValueError: x\n", 1).endswith("x")
    assert train_log_problem("train.py: the disk is full\nbye\n", 1) == "train.py: the disk is full"
    assert train_log_problem("Saved model: x\n", 0) is None


@pytest.mark.slow
def test_the_cpu_rehearsal_runs_train_py_through_the_gpu_checks_and_they_pass(tmp_path):
    """Every train.py group but sd21v, as the GPU call runs them, on tiny models: a sample, EMA, a single file,
    3 + 3 steps against 6 in bf16 and in fp32, two deterministic runs alike, the LoRA file in diffusers; groups that
    share a run (sd15_full's is resume_bf16's straight one, resume_fp32's is repeat_fp32's first) each find it
    there when they are checked. About a minute and a half on 2 cores."""
    out = tmp_path / "out"
    groups = "sd15_full,resume_bf16,lora,resume_fp32,repeat_fp32"
    done = subprocess.run([sys.executable, "bench/gpu/bench_gpu.py", "--dry", "--only", groups, "--parallel", "2",
                           "--out", str(out / "bench_gpu.txt")], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    table = (out / "bench_gpu.txt").read_text()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for group in groups.split(","):
        assert f"PASS  train.py {group}:" in table, table
    assert "PASS  train.py resume_bf16: equal bit for bit" in table  # a CPU is deterministic
    assert "Traceback" not in (out / "bench_gpu_runs.log").read_text()
    assert "Rerun" not in table  # every group asked for passed
