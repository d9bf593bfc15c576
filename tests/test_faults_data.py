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
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

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
    assert notices == [(
        f"Latent cache: 1 damaged entry will be encoded again, e.g. {victim.relative_to(cache)} ({image.name}): "
        f"truncated: it is {len(whole) // 2} bytes, but its safetensors header declares {len(whole)} "
        f"(8 + 136 header + 2048 tensor data). Nothing to do; if this recurs, "
        f"check the disk that holds {cache}."
    )], second.stdout
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


# ---------------------------------------------------------------- entries damaged during the run

LONG_RUN = [*SMALL_RUN[:SMALL_RUN.index("--max_steps")], *SMALL_RUN[SMALL_RUN.index("--max_steps") + 2:],
            "--flip_p", "0"]  # one entry an image: an epoch (8 steps) reads each


# what a copy of the shared shapes folder leaves out: the latent cache and scan index other tests' runs left in it
FRESH = shutil.ignore_patterns(".latent_cache", ".scan_index.json.gz")


def run_args(model: Path, data: Path, *more: str) -> list[str]:
    return ["--resume_ckpt", str(model), "--data_root", str(data), *LONG_RUN, *more]


def the_message(stderr: str) -> str:
    """The one `train.py: ...` message of a run that ended on a problem, with no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    (message,) = [line for line in stderr.splitlines() if line.startswith("train.py: ")]
    return message


def saved_paths(stdout: str) -> list[Path]:
    return [Path(line.split("Saved model: ", 1)[1].strip()) for line in stdout.splitlines() if "Saved model: " in line]


def image_of(entry: Path, data: Path) -> Path:
    return next(p for p in data.glob("*.png") if entry.name.startswith(hashlib.sha256(p.read_bytes()).hexdigest()))


def of_another_shape(entry: Path) -> None:
    """A whole entry, of a 128 px image's latents: it reads well, and trains a picture of another size."""
    save_file({"mean": torch.zeros(4, 16, 16), "std": torch.ones(4, 16, 16)}, str(entry))


DAMAGES = [
    lambda entry: entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2]),  # truncated
    lambda entry: entry.write_bytes(os.urandom(entry.stat().st_size)),  # garbage
    Path.unlink,  # deleted
    of_another_shape,
    lambda entry: save_file({k: v.half() for k, v in load_file(entry).items()}, str(entry)),  # float16
]


def test_latent_cache_entries_damaged_during_the_run_are_encoded_again_and_the_run_trains(
        tiny_model, shapes_dir: Path, tmp_path: Path):
    """Five entries are damaged while the run trains, each another way: truncated, overwritten with garbage,
    deleted, replaced by a whole entry of another shape (that one used to end in "this is a bug in the trainer")
    and by one in float16. The run reads each at its next epoch, encodes it again from its image (said once),
    trains to its end and saves; afterwards every entry is whole and holds what it held."""
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data, ignore=FRESH)  # entries of other tests' runs would not be this run's
    run = TrainProcess(run_args(tiny_model("sd1"), data, "--max_steps", "160", "--num_workers", "0"), cwd=tmp_path)
    run.wait_for("First step done")
    entries = cache_entries(data)
    held = {entry: {k: v.clone() for k, v in load_file(entry).items()} for entry in entries}
    for damage, entry in zip(DAMAGES, entries[::3]):
        damage(entry)
    code, out, err = run.finish()

    assert code == 0, err[-3000:]
    assert "Traceback" not in err
    cache = data / ".latent_cache"
    (notice,) = [line for line in out.splitlines() if "damaged during the run" in line]
    assert notice.startswith("Latent cache: the entry vae-") and notice.endswith(
        f"it was encoded again from its image, as any other found damaged will be. Nothing to do; if this recurs, "
        f"check the disk that holds {cache}."), notice
    assert cache_entries(data) == entries
    for entry in entries:
        assert entry_problem(entry, LATENT_SHAPE) is None
        torch.testing.assert_close(load_file(entry), held[entry])  # encoded again, the same
    assert len(saved_paths(out)) == 1


def left_half_masks(data: Path) -> None:
    """A mask beside each image: its left half trains, its right half is left out."""
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    for image in data.glob("*.png"):
        mask.save(image.with_name(f"{image.stem}-masklabel.png"))


def first_mask_entry(data: Path) -> Path:
    return min((data / ".latent_cache" / "masks").rglob("*.safetensors"))


def first_latent_entry(data: Path) -> Path:
    return cache_entries(data)[0]


def of_another_shape_then_removed(entry: Path, image: Path) -> Callable[[], None]:
    of_another_shape(entry)
    return entry.unlink  # the advice: remove it


def mask_of_another_shape_then_removed(entry: Path, image: Path) -> Callable[[], None]:
    save_file({"mask": torch.zeros(1, 16, 16)}, str(entry))
    return entry.unlink  # the advice: remove it


def damaged_as_its_image_changed_then_put_back(entry: Path, image: Path) -> Callable[[], None]:
    pixels = image.read_bytes()
    entry.write_bytes(entry.read_bytes()[:100])
    shutil.copyfile(next(p for p in sorted(image.parent.glob("*.png")) if p != image), image)
    return lambda: image.write_bytes(pixels)  # the advice: put the image back


# which entry, how it is damaged (and the advice followed), run settings, the message's middle, what the start says
CANNOT_ENCODE_AGAIN = {
    "read by a worker": (
        first_latent_entry, of_another_shape_then_removed, ["--num_workers", "1"],
        ("): it was changed or deleted during the run, and a DataLoader worker has no VAE to encode it again (with "
         "num_workers 0 the run does it itself). Remove it (the next start encodes it again), "),
        "Latent cache: 1 encoded, 15 reused"),
    "its image changed": (
        first_latent_entry, damaged_as_its_image_changed_then_put_back, ["--num_workers", "0"],
        ("), and its image {image} changed since the run started, so it cannot be encoded again. Put the image back "
         "as it was, or remove it, "),
        "Latent cache: 1 encoded, 15 reused"),
    "a mask entry": (
        first_mask_entry, mask_of_another_shape_then_removed, ["--num_workers", "0", "--masked_training", "true"],
        ("mask is F32 [1, 16, 16], expected F32 [1, 8, 8]): it was changed or deleted during the run. Remove it (the "
         "next start makes it again), "),
        "Latent cache: 1 masks made, 15 reused"),
}


@pytest.mark.parametrize("case", CANNOT_ENCODE_AGAIN)
def test_a_latent_cache_entry_damaged_where_it_cannot_be_encoded_again_is_one_message_and_the_advice_works(
        case, tiny_model, shapes_dir: Path, tmp_path: Path):
    """An entry damaged during the run where it cannot be encoded again: read by a DataLoader worker, which has no
    VAE (here replaced by an entry of another shape), truncated while its image changed too (its latent is no
    longer known), or a cached mask of another shape. What trained is saved first, then one message names the
    entry, says why it cannot be used and the way on; following it, the run goes on. (An entry of another shape
    used to end in "this is a bug in the trainer".)"""
    pick, damage, settings, middle, start_says = CANNOT_ENCODE_AGAIN[case]
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data, ignore=FRESH)  # entries of other tests' runs would not be this run's
    if "--masked_training" in settings:
        left_half_masks(data)
    command = run_args(tiny_model("sd1"), data, "--max_epochs", "500", *settings)
    run = TrainProcess(command, cwd=tmp_path)
    run.wait_for("First step done")
    entry = pick(data)
    image = image_of(entry, data)
    follow_the_advice = damage(entry, image)
    code, out, err = run.finish()

    assert code == 1, err[-3000:]
    message = the_message(err)
    assert message.startswith(f"train.py: the latent-cache entry {entry} can no longer be read ("), message
    assert middle.format(image=image) in message, message
    assert message.endswith("then continue from the run's last save with --resume_state findlast."), message
    assert "Warning: the error below stopped training at step" in err  # what trained was saved first
    (saved,) = saved_paths(out)
    assert saved.name.startswith("interrupted-") and (saved / "training_state").is_dir()

    follow_the_advice()
    resumed = run_train([*command, "--max_steps", str(int(saved.name[-5:]) + 2), "--resume_state", "findlast"],
                        cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert start_says in resumed.stdout
