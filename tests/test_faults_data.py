"""Faults in the data a real run meets, in real `python train.py` processes: a latent-cache entry damaged after
an earlier run, and a data_root full of links with a loop among them. Each test checks the exit status, the one
notice, and what is on disk afterwards.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data.latent_cache import entry_problem
from tests.conftest import run_train
from tests.messy_data import LINKED_DUPLICATES, LINKED_LOOP, LINKED_SECOND_FOLDER, make_linked_folder

pytestmark = pytest.mark.slow

SMALL_RUN = ["--resolution", "64", "--batch_size", "2", "--max_steps", "2", "--mixed_precision", "no",
             "--gradient_checkpointing", "false", "--logdir", "logs"]
LATENT_SHAPE = (4, 8, 8)  # the tiny VAE's latents of a 64x64 image


def args(model: Path, data: Path) -> list[str]:
    return ["--resume_ckpt", str(model), "--data_root", str(data), *SMALL_RUN]


def cache_entries(data: Path) -> list[Path]:
    return sorted((data / ".latent_cache").glob("vae-*/*/*.safetensors"))


def test_a_truncated_cache_entry_is_encoded_again_and_the_run_trains(tiny_model, shapes_dir: Path, tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    for image in sorted(shapes_dir.glob("*.png"))[::4]:
        shutil.copy(image, data)
        shutil.copy(image.with_suffix(".txt"), data)
    first = run_train(args(tiny_model("sd1"), data), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    entries = cache_entries(data)
    assert len(entries) == 4
    victim = entries[0]  # cut in half, as a copy or a disk can leave it
    whole = victim.read_bytes()
    posterior = {key: tensor.clone() for key, tensor in load_file(victim).items()}  # not a view of the file
    victim.write_bytes(whole[: len(whole) // 2])
    image = next(p for p in data.glob("*.png") if victim.name.startswith(hashlib.sha256(p.read_bytes()).hexdigest()))

    second = run_train(args(tiny_model("sd1"), data), cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    cache = data / ".latent_cache"
    notices = [line for line in second.stdout.splitlines() if "damaged entr" in line]
    assert notices == [
        f"Latent cache: 1 damaged entry will be encoded again, e.g. {victim.relative_to(cache)} ({image.name}): "
        f"truncated: it is {len(whole) // 2} bytes, but its safetensors header declares {len(whole)} "
        f"(8 + 136 header + 2048 tensor data). Nothing to do; if this recurs, "
        f"check the disk that holds {cache}."
    ], second.stdout
    assert "Latent cache: 1 encoded, 3 reused" in second.stdout
    assert "Traceback" not in second.stderr
    assert entry_problem(victim, LATENT_SHAPE) is None
    torch.testing.assert_close(load_file(victim), posterior)  # encoded again, the same
    assert len(second.stdout.split("Saved model: ")) == 2  # it trained and saved


def test_a_data_root_with_a_link_loop_trains_on_each_image_once(tiny_model, shapes_dir: Path, tmp_path: Path):
    data = make_linked_folder(tmp_path, shapes_dir)
    # a loop made the scan walk until the paths grew too long (minutes) and count every image many times
    result = run_train(args(tiny_model("sd1"), data), cwd=tmp_path, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert f"Data: 4 images in {data}, 0 skipped." in out
    assert f"\n  {LINKED_LOOP}\n" in out and f"\n  {LINKED_SECOND_FOLDER}\n" in out
    assert f"Data: {LINKED_DUPLICATES} more path(s) lead to images already found" in out
    assert "Latent cache: 4 encoded, 0 reused" in out
    assert len(cache_entries(data)) == 4  # each real file encoded once
    assert len(out.split("Saved model: ")) == 2
