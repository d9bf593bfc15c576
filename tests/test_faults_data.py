"""Faults in the data a real run meets, in real `python train.py` processes: a latent-cache entry damaged after
an earlier run, a data_root full of links with a loop among them, and a latent cache on a disk too small for it,
or that fills while the cache is written. Each test checks the exit status, the one notice or message, and what
is on disk afterwards.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data.errors import DataError
from data.latent_cache import (
    LatentCache,
    entry_problem,
    fill_cache,
    image_variants,
    room_problem_before_load,
    vae_fingerprint,
)
from data.scan import scan_data_root
from tests.conftest import TrainProcess, run_train
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


# ---------------------------------------------------------------- a full disk under the latent cache

FLIPPED_RUN = ["--flip_p", "0.5", "--num_workers", "0", "--batch_size", "1"]  # 16 images -> 32 variants, one a batch
VARIANTS = 32
ENTRY_BLOCKS = 1  # an entry of 4x8x8 latents is 2192 bytes: one 4 KiB page of a tmpfs


def hidden_or_empty(folder: Path) -> list[Path]:
    """What a failed write must not leave: a hidden file (a partial, `.<name>.partial-<host>-<pid>`, or a
    library's temporary) or an entry that is not whole (empty, truncated)."""
    return [p for p in folder.rglob("*") if p.is_file() and (
        (p.name.startswith(".") and p.name != ".gitignore")
        or (p.suffix == ".safetensors" and entry_problem(p, LATENT_SHAPE) is not None))]


def stop_at(run: TrainProcess, text: str, timeout: float = 240) -> None:
    """SIGSTOP the run's process group as soon as it prints `text`: polled every millisecond (not wait_for's 50
    ms), so that the run stops within the first few entries of its fill."""
    deadline = time.monotonic() + timeout
    while not any(text in line for line in list(run.out)):
        assert run.popen.poll() is None and time.monotonic() < deadline, "".join(run.out + run.err)[-3000:]
        time.sleep(0.001)
    run.signal_group(signal.SIGSTOP)


def fill_leaving(disk: Path, blocks: int) -> Path:
    """A file that takes all of `disk` but `blocks` 4 KiB pages: another program's writes filling the disk."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    ballast = disk / "another-programs-file"
    ballast.write_bytes(b"\0" * (free - blocks * 4096))
    return ballast


def test_a_disk_filling_during_the_latent_cache_fill_is_one_message_and_the_entries_written_are_reused(
        tiny_model, shapes_dir: Path, tmp_path: Path, small_disk):
    disk = small_disk("cache", "1m")  # room for the whole cache (32 pages and a few) when the run starts
    cache = disk / "latents"
    command = ["--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(shapes_dir), *SMALL_RUN, *FLIPPED_RUN,
               "--latent_cache_dir", str(cache)]
    run = TrainProcess(command, cwd=tmp_path)
    stop_at(run, "Latent cache: encoding")  # past the preflight's and the fill's room checks: the disk had room
    ballast = fill_leaving(disk, blocks=3 * ENTRY_BLOCKS)  # then another program fills it, but 3 entries
    run.signal_group(signal.SIGCONT)
    code, out, err = run.finish()

    assert code == 1, err[-3000:]
    assert "Traceback" not in err and "bug" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("train.py:")]
    assert line.startswith("train.py: the disk of the latent cache filled up") and str(cache) in line, line
    assert "latent_cache_dir" in line and "cache_latents false" in line, line
    assert not hidden_or_empty(disk), hidden_or_empty(disk)
    written = len(list(cache.glob("vae-*/*/*.safetensors")))
    assert 3 <= written < VARIANTS, out  # 3 after the disk filled, and those written before the stop
    assert (f"the {VARIANTS - written} of {VARIANTS} image variants still to encode (16 images, each also flipped) "
            f"need about {(VARIANTS - written) * 4:.1f} KiB more") in line, line
    assert f"The {written} entries written are whole, and the next run reuses them" in line, line

    # the disk still full: the preflight's check counts only the variants not yet cached
    problem = room_problem_before_load(cache, scan_data_root(shapes_dir, 64).items, flip_p=0.5)
    assert f"the {VARIANTS - written} of {VARIANTS} image variants not yet cached" in problem, problem

    ballast.unlink()  # the advice: free some space there, and run again
    again = run_train(command, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"Latent cache: {VARIANTS - written} encoded, {written} reused" in again.stdout, again.stdout
    assert len(list(cache.glob("vae-*/*/*.safetensors"))) == VARIANTS and not hidden_or_empty(disk)


def test_a_latent_cache_disk_too_small_is_refused_before_any_model_and_the_advice_works(
        tiny_model, shapes_dir: Path, tmp_path: Path, small_disk):
    disk = small_disk("cache", "64k")  # 16 pages, for 32 entries
    command = ["--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(shapes_dir), *SMALL_RUN, *FLIPPED_RUN]
    refused = run_train([*command, "--latent_cache_dir", str(disk / "latents")], cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "Model:" not in refused.stdout and "Traceback" not in refused.stderr
    assert (f"not enough free space for the latent cache in {disk / 'latents'}: the {VARIANTS} of {VARIANTS} image "
            "variants not yet cached (16 images, each also flipped) need about") in refused.stderr, refused.stderr
    assert "and 64.0 KiB is free" in refused.stderr and "--latent_cache_dir" in refused.stderr, refused.stderr
    assert not any(disk.iterdir())  # nothing written

    moved = run_train([*command, "--latent_cache_dir", str(tmp_path / "latents"), "--dry_run"], cwd=tmp_path)
    assert moved.returncode == 0, moved.stderr[-3000:]  # the advice: a folder on a disk with room


def test_entries_cached_for_another_vae_pass_the_preflight_and_the_fill_checks_the_exact_need(
        tiny_model, shapes_dir: Path, small_disk):
    """The preflight counts an entry under any VAE's folder as cached (which VAE the run uses is known once it
    loads); the fill checks the exact need before encoding anything, in the same words."""
    from diffusers import AutoencoderKL

    disk = small_disk("cache", "64k")  # 16 pages, for 32 entries
    items = scan_data_root(shapes_dir, 64).items
    variants = image_variants(items, 0.5)
    earlier = LatentCache(disk, "0123456789abcdef")  # an earlier run's entries, of another VAE (or dtype)
    for variant in variants:
        earlier.entry(variant).parent.mkdir(parents=True, exist_ok=True)
        earlier.entry(variant).touch()  # empty: on a tmpfs it takes no page, and only its name counts here
    earlier.save_hashes()
    assert room_problem_before_load(disk, items, flip_p=0.5) is None

    vae = AutoencoderKL.from_pretrained(tiny_model("sd1") / "vae")
    cache = LatentCache(disk, vae_fingerprint(vae))
    with pytest.raises(DataError) as refused:
        fill_cache(cache, variants, vae, batch_size=1, num_workers=0)
    assert str(refused.value).startswith(
        f"not enough free space for the latent cache in {disk}: the {VARIANTS} of {VARIANTS} image variants to "
        "encode (16 images, each also flipped) need about "), refused.value
    assert "--latent_cache_dir <folder>" in str(refused.value)
    assert not cache.folder.exists()  # nothing encoded, nothing written
    assert [p.name for p in disk.rglob(".*")] == [".gitignore"]  # no partial
