"""The data pipeline: caption rules, buckets, images from the wild, the epoch schedule, the latent cache,
the dry run, and real `python train.py` runs on a messy folder of landscape and portrait images; and data/'s
own boundary: its options, its error type, its messages through common/console.py, one VAE encode."""

from __future__ import annotations

import copy
import dataclasses
import math
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from convert.tokenizer import clip_tokenizer
from data.buckets import Bucket, bucket_table, fit_image, group_by_bucket, nearest_bucket
from data.captions import CaptionError, read_caption, shuffle_tags, tokenize_captions
from data.dataset import TrainDataset, build_dataloader, build_training_data
from data.encode import encode_posterior
from data.errors import DataError
from data.images import load_for_bucket, load_rgb, resize_crop
from data.latent_cache import (
    LatentCache,
    Variant,
    choose_cache_dir,
    entry_problem,
    fill_cache,
    latent_shape,
    vae_fingerprint,
)
from data.options import DataOptions
from data.scan import find_image_files, scan_data_root
from data.schedule import batches_per_epoch, epoch_batches
from data.settings import read_multiply
from tests.conftest import REPO_ROOT, run_train
from tests.messy_data import (
    BLUE,
    BROKEN,
    EXPECTED,
    LINKED_DUPLICATES,
    LINKED_IMAGES,
    LINKED_LOOP,
    LINKED_SECOND_FOLDER,
    RED,
    make_linked_folder,
    make_messy_folder,
)
from tests.test_imports import python_files
from trainer.config.schema import TrainConfig
from trainer.preflight.device import for_this_machine


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_messy_folder(tmp_path_factory.mktemp("messy"))


def config(data_root: Path, **overrides) -> TrainConfig:
    return for_this_machine(dataclasses.replace(TrainConfig(), **{"data_root": str(data_root), "resolution": 128,
                                                                   "num_workers": 0, **overrides}))


def options(data_root: Path, **overrides) -> DataOptions:
    """What data/ takes: the config's defaults with `overrides`, as the trainer builds it."""
    return DataOptions.from_config(config(data_root, **overrides))


def few_shapes(shapes_dir: Path, folder: Path, count: int = 4) -> Path:
    """A copy of `count` shape images and captions: the tiny VAE takes ~0.2 s per image on a CPU."""
    folder.mkdir()
    for image in sorted(shapes_dir.glob("*.png"))[::16 // count]:
        shutil.copy(image, folder)
        shutil.copy(image.with_suffix(".txt"), folder)
    return folder


def close(a: tuple, b: tuple, tolerance: int = 12) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b))


# ---------------------------------------------------------------- captions


def test_caption_sources_in_order(tmp_path: Path):
    image = tmp_path / "a red car_03.jpg"
    image.touch()
    assert read_caption(image) == "a red car"  # file name up to the first "_"
    image.with_suffix(".json").write_text('{"caption": "from json"}', encoding="utf-8")
    assert read_caption(image) == "from json"
    image.with_suffix(".yaml").write_text("main_prompt: a car\ntags: [red, {tag: fast, weight: 2}]\n", encoding="utf-8")
    assert read_caption(image) == "a car, red, fast"  # yaml before json; tag weights dropped
    image.with_suffix(".caption").write_text("from .caption", encoding="utf-8")
    assert read_caption(image) == "from .caption"
    image.with_suffix(".txt").write_bytes("\ufeffun caf\u00e9 \u2615\r\nsecond line\r\n".encode("utf-8"))
    assert read_caption(image) == "un caf\u00e9 \u2615 second line"  # BOM gone, CRLF a space, end stripped


def test_caption_problems_name_the_file(tmp_path: Path):
    image = tmp_path / "x.png"
    image.with_suffix(".yaml").write_text("main_prompt: [unclosed\n", encoding="utf-8")
    with pytest.raises(CaptionError, match=r"x\.yaml is not valid yaml \(expected .* at line \d+, column \d+\); "
                                           r"correct it, or delete the file\.$"):
        read_caption(image)
    image.with_suffix(".yaml").write_text("other: 1\n", encoding="utf-8")
    with pytest.raises(CaptionError, match="none of main_prompt, tags or caption"):
        read_caption(image)
    image.with_suffix(".txt").write_bytes(b"\xff\xfe latin-1 \xe9")
    with pytest.raises(CaptionError, match="not UTF-8"):
        read_caption(image)


def test_multiply_txt(tmp_path: Path):
    assert read_multiply(tmp_path) == 1.0
    (tmp_path / "multiply.txt").write_bytes(b"\xef\xbb\xbf2.5\r\n")
    assert read_multiply(tmp_path) == 2.5
    (tmp_path / "multiply.txt").write_text("twice", encoding="utf-8")
    with pytest.raises(CaptionError, match="expected one number >= 0"):
        read_multiply(tmp_path)


def test_shuffle_tags_keeps_main_prompt_and_keep_tags():
    caption = "a portrait of ann, smiling, outdoors, red hat, blue sky, film grain"
    orders = set()
    for seed in range(40):
        out = shuffle_tags(caption, keep_tags=1, rng=random.Random(seed)).split(", ")
        assert out[:2] == ["a portrait of ann", "smiling"]
        assert sorted(out[2:]) == sorted(["outdoors", "red hat", "blue sky", "film grain"])
        orders.add(tuple(out))
    assert len(orders) > 10  # really shuffled
    assert shuffle_tags("no commas here", 0, random.Random(0)) == "no commas here"


def test_cond_dropout_and_shuffle_in_the_dataset(shapes_dir: Path):
    scan = scan_data_root(shapes_dir, 64)
    tokenizer = clip_tokenizer()
    draws = epoch_batches(scan.items, 4, 0.0, seed=1, epoch=0)
    rows = [d for batch in draws for d in batch]
    always = TrainDataset(scan.items, tokenizer, options(shapes_dir, cond_dropout=1.0))
    assert {always.caption(d) for d in rows} == {""}
    never = TrainDataset(scan.items, tokenizer, options(shapes_dir, cond_dropout=0.0, shuffle_tags=True))
    captions = [never.caption(d) for d in rows]
    assert all(c.startswith(("a photo of a red circle, ", "a drawing of a blue square, ")) for c in captions)
    assert {c.split(", ")[0] for c in captions} == {"a photo of a red circle", "a drawing of a blue square"}
    assert captions == [never.caption(d) for d in rows]  # the draw's seed decides, not call order


# ---------------------------------------------------------------- buckets


def test_bucket_table_512():
    table = bucket_table(512)
    assert [str(b) for b in table[:7]] == ["512x512", "576x448", "448x576", "640x384", "384x640", "704x320", "320x704"]
    assert str(table[-2]) == "1024x256" and str(table[-1]) == "256x1024"  # 4:1 is the most
    for b in table:
        assert b.width % 64 == 0 and b.height % 64 == 0
        assert 0.8 * 512 * 512 <= b.width * b.height <= 512 * 512
        assert max(b.aspect, 1 / b.aspect) <= 4.0
    assert len(set(table)) == len(table)
    assert [str(b) for b in bucket_table(128)] == ["128x128", "192x64", "64x192", "256x64", "64x256"]


def test_nearest_bucket_and_minimal_crop():
    table = bucket_table(512)
    assert nearest_bucket(3000, 3000, table) == Bucket(512, 512)
    assert nearest_bucket(4000, 3000, table) == Bucket(576, 448)  # 4:3 photo
    assert nearest_bucket(3000, 4000, table) == Bucket(448, 576)
    assert nearest_bucket(1920, 1080, table) == Bucket(640, 384)  # 16:9 video frame
    assert nearest_bucket(10000, 100, table) == Bucket(1024, 256)  # beyond 4:1: the widest
    resized, box, upscaled = fit_image(4000, 3000, Bucket(576, 448))
    assert resized == (597, 448) and box == (10, 0, 586, 448) and not upscaled  # only 21 columns cut
    assert fit_image(100, 100, Bucket(512, 512))[2]  # upscaled


# ---------------------------------------------------------------- images from the wild


def test_messy_folder_scan(messy: Path):
    scan = scan_data_root(messy, 128)
    found = {str(i.path.relative_to(messy)): (i.caption, str(i.bucket)) for i in scan.items}
    assert found == EXPECTED
    skipped = {str(p.relative_to(messy)): reason for p, reason in scan.skipped}
    assert skipped.keys() == BROKEN.keys()
    assert all(BROKEN[name] in reason for name, reason in skipped.items()), skipped
    report = "\n".join(scan.report())
    assert "skipped 2 unusable file(s)" in report and "broken/empty.png: empty file (0 bytes)" in report
    assert "1 image(s) are smaller than their bucket" in report and "tiny_icon.png: 32x32 -> 128x128" in report
    assert "portraits x2.5 per epoch" in report
    assert [i.multiply for i in scan.items if "portraits" in str(i.path)] == [2.5, 2.5, 1.0, 1.0]  # not inherited


def test_messy_images_decode_right(messy: Path):
    rotated = load_rgb(messy / "rotated_phone.jpg")
    assert rotated.size == (96, 192)
    assert close(rotated.getpixel((48, 10)), RED) and close(rotated.getpixel((48, 180)), BLUE)
    assert close(load_rgb(messy / "gray16.png").getpixel((5, 5)), (128, 128, 128), 1)
    assert load_rgb(messy / "portraits" / "deep" / "cmyk_print.jpg").mode == "RGB"
    tall = load_rgb(messy / "portraits" / "tall person_1.png")
    assert close(tall.getpixel((5, 5)), RED, 0) and tall.getpixel((5, 150)) == (255, 255, 255)
    sticker = load_rgb(messy / "portraits" / "deep" / "clear_sticker.png")
    assert sticker.getpixel((0, 0)) == (255, 255, 255) and close(sticker.getpixel((64, 64)), RED, 0)
    cropped = load_for_bucket(messy / "rotated_phone.jpg", Bucket(64, 192), flip=False)
    assert cropped.size == (64, 192) and close(cropped.getpixel((32, 5)), RED)


def test_scan_follows_links_reads_each_folder_once_and_counts_each_file_once(shapes_dir: Path, tmp_path: Path):
    data = make_linked_folder(tmp_path, shapes_dir)
    os.symlink("no_such_file.png", data / "broken_link.png")
    os.mkfifo(data / "pipe.png")  # opening it would wait forever for a writer
    (data / ".hidden").mkdir()
    shutil.copy(shapes_dir / "square_002.png", data / ".hidden")
    scan = scan_data_root(data, 64)  # with os.walk(followlinks=True) the loop multiplied every image
    found = {str(i.path.relative_to(data)): i.caption for i in scan.items}
    assert found == LINKED_IMAGES  # the file's own path (with its caption sidecar) is counted, not a link's
    report = scan.report()
    assert report[0] == f"Data: 4 images in {data}, 2 skipped."
    assert f"  {LINKED_LOOP}" in report and f"  {LINKED_SECOND_FOLDER}" in report
    assert any(line.startswith("Data: 2 folder path(s) lead to a folder already scanned") for line in report)
    assert any(line.startswith(f"Data: {LINKED_DUPLICATES} more path(s) lead to images already found") and
               "e.g. square_000_hardlink.png is square_000.png" in line for line in report), report
    skipped = dict((str(p.relative_to(data)), reason) for p, reason in scan.skipped)
    assert skipped == {"pipe.png": "not a regular file (a pipe, socket or device); remove it or move it away",
                       "broken_link.png": "a broken link: it points to no_such_file.png, which does not exist"}


def test_empty_and_all_broken_data_roots(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        scan_data_root(tmp_path / "empty", 128)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match="none could be used, e.g. a.png: not an image file"):
        scan_data_root(tmp_path / "bad", 128)


def test_images_only_in_hidden_folders_are_counted_and_the_advice_works(tmp_path: Path):
    root = tmp_path / "data"
    for folder, count in ((".photos", 3), (".photos/more", 1), (".git", 0)):
        (root / folder).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (64, 64), (200, 0, 0)).save(root / folder / f"red circle_{i}.png")
    with pytest.raises(DataError) as refused:
        scan_data_root(root, 128)
    message = str(refused.value)
    assert "holds no images outside hidden folders, which are not read; 4 image file(s) are in them: " \
        ".photos/ (4)." in message and ".git" not in message
    assert f"ln -s '.photos' '{root / 'photos'}'" in message and "or pass it as data_root itself" in message

    assert len(scan_data_root(root / ".photos", 128).items) == 4  # as data_root itself
    (root / "photos").symlink_to(".photos")  # the link the message shows
    assert len(scan_data_root(root, 128).items) == 4


# ---------------------------------------------------------------- the epoch schedule


def test_schedule_buckets_fill_and_multiply(messy: Path):
    items = scan_data_root(messy, 128).items
    batch_size = 3
    expected_rows = Counter({i: 1 for i in range(len(items))})
    for i, item in enumerate(items):
        if item.multiply == 2.5:
            expected_rows[i] = 2  # plus the random half, below
    seen_extra = set()
    for epoch in range(6):
        batches = epoch_batches(items, batch_size, flip_p=0.5, seed=7, epoch=epoch)
        assert len(batches) == batches_per_epoch(items, batch_size)  # the same every epoch
        real = Counter()
        for batch in batches:
            assert len(batch) == batch_size
            assert len({items[d.index].bucket for d in batch}) == 1  # one bucket per batch
            real.update(d.index for d in batch if d.weight == 1.0)
            assert all(d.weight in (0.0, 1.0) for d in batch)
        extra = [i for i in real if real[i] > expected_rows[i]]
        assert len(extra) == 1 and real[extra[0]] == 3  # 2 images x 0.5 = one third repeat per epoch
        seen_extra.add(extra[0])
        assert all(real[i] >= expected_rows[i] for i in expected_rows)
        assert sum(real.values()) == sum(expected_rows.values()) + 1
    assert len(seen_extra) == 2  # the fraction is drawn anew each epoch
    assert epoch_batches(items, 3, 0.5, 7, 0) == epoch_batches(items, 3, 0.5, 7, 0)
    assert epoch_batches(items, 3, 0.5, 7, 0) != epoch_batches(items, 3, 0.5, 7, 1)


def test_pixel_batches_are_non_square_per_bucket(messy: Path):
    loader = build_dataloader(options(messy, batch_size=2, cache_latents=False), clip_tokenizer())
    shapes = set()
    for batch in loader:
        pixels = batch["pixel_values"]
        assert pixels.dtype == torch.float32 and -1.0 <= pixels.min() and pixels.max() <= 1.0
        assert batch["input_ids"].shape == (2, 77) and batch["loss_weight"].shape == (2,)
        shapes.add(tuple(pixels.shape[2:]))
    assert shapes == {(128, 128), (64, 192), (192, 64)}  # (H, W): square, landscape and portrait batches
    assert len(loader.dataset) == len(EXPECTED)


# ---------------------------------------------------------------- latent cache


def tiny_vae(tiny_model) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_model("sd1") / "vae")


def count_encoder_calls(vae: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    vae.encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    return calls


def test_latent_cache_reuse_and_invalidation(tiny_model, shapes_dir: Path, tmp_path: Path, capsys):
    data = few_shapes(shapes_dir, tmp_path / "data")
    vae = tiny_vae(tiny_model)
    calls = count_encoder_calls(vae)
    cfg = options(data, resolution=64, batch_size=2, flip_p=0.5, cache_latents=True)
    loader = build_dataloader(cfg, clip_tokenizer(), vae)
    variants = 2 * 4  # flipped and not
    assert sum(calls) == variants
    for _ in range(2):  # two epochs: latents come from disk
        for batch in loader:
            assert "pixel_values" not in batch and batch["latents"].shape == (2, 4, 8, 8)
    assert sum(calls) == variants
    assert (data / ".latent_cache" / ".gitignore").read_text().endswith("*\n")

    build_dataloader(cfg, clip_tokenizer(), vae)  # a second run
    assert sum(calls) == variants
    assert f"Latent cache: 0 encoded, {variants} reused" in capsys.readouterr().out

    Image.new("RGB", (64, 64), BLUE).save(data / "circle_000.png")  # the image changed
    build_dataloader(cfg, clip_tokenizer(), vae)
    assert sum(calls) == variants + 2  # that image, flipped and not, and nothing else

    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(1.0)  # any weight change, even outside the encoder, is a different VAE
    build_dataloader(cfg, clip_tokenizer(), vae)
    assert sum(calls) == 2 * variants + 2


def test_cached_latents_match_encoding_every_step(tiny_model, shapes_dir: Path, tmp_path: Path):
    """The cache stores the posterior, so a cached row is distributed exactly as a fresh VAE sample."""
    vae = tiny_vae(tiny_model)
    data = few_shapes(shapes_dir, tmp_path / "data", count=2)
    cfg = options(data, resolution=64, batch_size=2, cond_dropout=0.0)
    dataset = build_dataloader(cfg, clip_tokenizer(), vae, cache_dir=tmp_path / "cache").dataset
    assert len(list((tmp_path / "cache").glob("vae-*/*/*.safetensors"))) == 2
    assert not (data / ".latent_cache").exists()
    draw = epoch_batches(dataset.items, 2, 0.0, cfg.seed, 0)[0][0]
    item = dataset.items[draw.index]
    from data.pixels import to_tensor

    with torch.no_grad():
        posterior = vae.encode(to_tensor(load_for_bucket(item.path, item.bucket, False))[None]).latent_dist
    samples = torch.stack([dataset[dataclasses.replace(draw, seed=s)]["latents"] for s in range(200)])
    scale = vae.config.scaling_factor
    torch.testing.assert_close(samples.mean(0), posterior.mean[0] * scale, atol=4 * posterior.std.max() * scale / math.sqrt(200), rtol=0)
    torch.testing.assert_close(samples.std(0), posterior.std[0] * scale, rtol=0.25, atol=1e-6)


def damage(entry: Path, how: str) -> None:
    """Break a cache entry the way disks, copies and other programs do."""
    if how == "truncated":
        entry.write_bytes(entry.read_bytes()[:-100])
    elif how == "other keys":
        save_file({"mean": torch.zeros(4, 8, 8), "var": torch.zeros(4, 8, 8)}, str(entry))
    elif how == "other shape":
        save_file({"mean": torch.zeros(4, 4, 4), "std": torch.zeros(4, 4, 4)}, str(entry))
    elif how == "float16":
        save_file({"mean": torch.zeros(4, 8, 8, dtype=torch.float16), "std": torch.zeros(4, 8, 8, dtype=torch.float16)},
                  str(entry))
    elif how == "not safetensors":
        entry.write_bytes(b"<html>503 Service Unavailable</html>")
    elif how == "a folder":
        entry.unlink()
        entry.mkdir()


DAMAGE_REASONS = {  # how -> what entry_problem says, for the (4, 8, 8) latents of a 64x64 image
    "truncated": "truncated: it is 2092 bytes, but its safetensors header declares 2192 (8 + 136 header + 2048 "
                 "tensor data)",
    "other keys": "holds ['mean', 'var'], expected exactly mean and std",
    "other shape": "mean is F32 [4, 4, 4], expected F32 [4, 8, 8]",
    "float16": "mean is F16 [4, 8, 8], expected F32 [4, 8, 8]",
    "not safetensors": "not a safetensors file: it starts with b'<html>50', not a header length",
    "a folder": "cannot be read (Is a directory)",
}


def test_damaged_cache_entries_are_encoded_again_with_one_notice(tiny_model, shapes_dir: Path, tmp_path: Path,
                                                                 capsys):
    data = few_shapes(shapes_dir, tmp_path / "data")
    vae = tiny_vae(tiny_model)
    cfg = options(data, resolution=64, batch_size=2, flip_p=0.5)
    build_dataloader(cfg, clip_tokenizer(), vae, cache_dir=tmp_path / "cache")
    entries = sorted((tmp_path / "cache").glob("vae-*/*/*.safetensors"))
    assert len(entries) == 8 and all(entry_problem(e, (4, 8, 8)) is None for e in entries)
    assert {e.stat().st_size for e in entries} == {2192}  # what DAMAGE_REASONS counts with
    for entry, how in zip(entries, DAMAGE_REASONS):
        damage(entry, how)
        assert entry_problem(entry, (4, 8, 8)) == DAMAGE_REASONS[how]
    calls = count_encoder_calls(vae)
    capsys.readouterr()

    loader = build_dataloader(cfg, clip_tokenizer(), vae, cache_dir=tmp_path / "cache")
    out = capsys.readouterr().out
    notices = [line for line in out.splitlines() if "damaged entr" in line]
    assert len(notices) == 1, out
    assert notices[0].startswith("Latent cache: 6 damaged entries will be encoded again, e.g. vae-")
    assert any(f": {reason}. Nothing to do; if this recurs, check the disk that holds {tmp_path / 'cache'}." in
               notices[0] for reason in DAMAGE_REASONS.values()), notices[0]
    assert "Latent cache: 6 encoded, 2 reused" in out and sum(calls) == 6
    assert all(entry_problem(e, (4, 8, 8)) is None for e in entries)
    assert sum(len(batch["latents"]) for batch in loader) == 4  # and training reads them all


def test_cache_dir_beside_the_data_else_a_fallback_when_data_root_is_read_only(small_disk, tmp_path: Path):
    import hashlib

    data, fallback_root = tmp_path / "data", tmp_path / "fallback"
    data.mkdir()
    assert choose_cache_dir(data, None, fallback_root) == (data / ".latent_cache", None)
    assert choose_cache_dir(data, str(tmp_path / "mine"), fallback_root) == (tmp_path / "mine", None)
    mounted = small_disk("photos", "1m", read_only=True, fill=lambda p: (p / "a.png").write_bytes(b"x"))
    folder, notice = choose_cache_dir(mounted, None, fallback_root)
    assert folder == fallback_root / f"photos-{hashlib.sha256(str(mounted.resolve()).encode()).hexdigest()[:8]}"
    assert notice == (
        f"Latent cache: the default latent cache folder {mounted / '.latent_cache'} cannot be written: Read-only "
        f"file system (tested in {mounted}, the part that exists); choose a writable place or fix its permissions. "
        f"Caching in {folder} instead; latent_cache_dir sets the place."
    )
    assert choose_cache_dir(mounted, str(mounted / "c"), fallback_root) == (mounted / "c", None)  # as given


def new_children(before: set) -> list[multiprocessing.Process]:
    return [p for p in multiprocessing.active_children() if p not in before]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_training_loader_workers_leave_stop_signals_to_the_main_process(shapes_dir: Path, signum: int):
    """`kill -TERM -- -<pgid>` reaches the workers too; a worker that dies of it crashes the run before it saves."""
    before = set(multiprocessing.active_children())
    loader = build_dataloader(options(shapes_dir, resolution=64, batch_size=1, num_workers=2, cache_latents=False),
                              clip_tokenizer())
    batches = iter(loader)
    got = [next(batches), next(batches)]  # one from each worker: both have run their worker_init_fn
    workers = new_children(before)
    assert len(workers) == 2
    for worker in workers:
        os.kill(worker.pid, signum)
    got += list(batches)  # a killed worker raises here ("DataLoader worker ... killed by signal")
    assert len(got) == len(loader) == 16
    assert all(worker.is_alive() for worker in workers)  # persistent workers: alive for the next epoch


def test_cache_fill_workers_leave_stop_signals_to_the_main_process(tiny_model, shapes_dir: Path, tmp_path: Path):
    vae = tiny_vae(tiny_model)
    before = set(multiprocessing.active_children())
    signalled: list[int] = []

    def stop_workers_at_second_batch(module, args, out) -> None:
        encoded.append(1)
        if len(encoded) == 2:  # batches 0 and 1 came from workers 0 and 1: both have run their worker_init_fn
            for worker in new_children(before):
                os.kill(worker.pid, signal.SIGTERM)
                os.kill(worker.pid, signal.SIGINT)
                signalled.append(worker.pid)

    encoded: list[int] = []
    vae.encoder.register_forward_hook(stop_workers_at_second_batch)
    variants = [Variant(i.path, i.bucket, flip) for i in scan_data_root(shapes_dir, 64).items for flip in (False, True)]
    cache = LatentCache(tmp_path / "cache", vae_fingerprint(vae))
    assert fill_cache(cache, variants, vae, batch_size=1, num_workers=2) == (32, 0)
    assert len(signalled) == 2 and len(encoded) == 32
    assert all(entry_problem(cache.entry(v), latent_shape(vae, v.bucket)) is None for v in variants)


def random_pixels(count: int = 2, size: int = 64) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_vae_encodes_in_its_own_dtype_and_gives_float32(tiny_model, shapes_dir: Path, dtype: torch.dtype):
    from data.validation import encode_validation_set

    vae32, vae = tiny_vae(tiny_model), tiny_vae(tiny_model).to(dtype)
    fed: list[torch.dtype] = []
    vae.encoder.conv_in.register_forward_pre_hook(lambda module, args: fed.append(args[0].dtype))
    mean, std = encode_posterior(vae, random_pixels())
    assert fed == [dtype] and mean.dtype == std.dtype == torch.float32 and mean.shape == std.shape == (2, 4, 8, 8)
    reference, _ = encode_posterior(vae32, random_pixels())
    torch.testing.assert_close(mean, reference, atol=0.05 * float(reference.abs().max()), rtol=0)
    assert vae_fingerprint(vae) != vae_fingerprint(vae32)  # fp16/bf16 latents differ: a cache folder of their own

    items = scan_data_root(shapes_dir, 64).items[:2]
    (batch,) = encode_validation_set(items, clip_tokenizer(), vae, batch_size=2)
    assert fed[-1] == dtype and batch["latents"].dtype == torch.float32 and batch["latents"].shape == (2, 4, 8, 8)


@pytest.mark.slow
def test_fp16_overflow_is_encoded_again_in_float32_with_one_notice(tiny_model, tmp_path: Path, capsys):
    vae = tiny_vae(tiny_model)
    with torch.no_grad():  # one latent channel near 1.2e5: beyond fp16's largest value, 65504
        vae.encoder.conv_out.bias[0] += 6e4
        vae.quant_conv.weight[0, 0] = 2.0
    half = vae.to(torch.float16)
    with torch.no_grad():
        assert not torch.isfinite(half.encode(random_pixels().half()).latent_dist.mean).all()  # it does overflow
    expected = encode_posterior(copy.deepcopy(half).float(), random_pixels())
    assert expected[0].abs().max() > 1e5
    capsys.readouterr()
    for _ in range(2):
        mean, std = encode_posterior(half, random_pixels())
        torch.testing.assert_close((mean, std), expected)
    out = capsys.readouterr().out
    assert out.count("VAE: in float16 it encoded a batch of 64x64 images to non-finite latents (overflow); such "
                     "batches are encoded again in float32") == 1, out
    assert next(half.parameters()).dtype == torch.float16  # the VAE itself is left as it was


@pytest.mark.slow
def test_training_loop_never_encodes_cached_latents(tiny_model, shapes_dir: Path, tmp_path: Path):
    from trainer.models.load import load_models
    from trainer.preflight.checks import run_preflight
    from trainer.run.loop import train

    models = load_models(str(tiny_model("sd1")))
    cfg = config(few_shapes(shapes_dir, tmp_path / "data"), resolution=64, batch_size=2, max_epochs=2,
                 logdir=str(tmp_path / "logs"), mixed_precision="no", gradient_checkpointing=False)
    preflight = run_preflight(cfg, tmp_path / "run")
    data = build_training_data(cfg, models.tokenizer, models.vae, cache_dir=preflight.cache_dir, scan=preflight.scan)
    calls = count_encoder_calls(models.vae)
    train(cfg, models, data, tmp_path / "run", preflight, "no")
    assert calls == []  # two epochs, four steps, not one VAE encoder call


# ---------------------------------------------------------------- dry run and real runs


@pytest.mark.slow
def test_dry_run_counts_steps_without_models(messy: Path, tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(REPO_ROOT / "train.py"), "--dry_run", "--data_root", str(messy),
         "--resolution", "128", "--batch_size", "2", "--grad_accum", "2", "--resume_ckpt", "someone/some-model"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "diffusers" not in imported and "transformers" not in imported  # torch tells the device; no model loads
    out = result.stdout
    # per epoch: 128x128 4 images (2 batches), 192x64 3 (2), 64x192 2 x 2.5 + rotated = 6 (3): 7 batches
    assert "64x192 6/3" in out and "128x128 4/2" in out and "192x64 3/2" in out
    assert "7 batches of 2, 4 steps/epoch (grad_accum 2)" in out
    assert "broken/truncated.jpg: truncated" in out and not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_messy_folder_with_landscape_and_portrait_images_trains(tiny_model, messy: Path, tmp_path: Path):
    args = ["--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(messy), "--resolution", "128",
            "--batch_size", "2", "--max_epochs", "1", "--shuffle_tags", "--num_workers", "2",
            "--latent_cache_dir", str(tmp_path / "cache"), "--logdir", "logs", "--gradient_checkpointing", "false"]
    result = run_train(args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "images per bucket: 64x192 3, 128x128 4, 192x64 3" in out  # portrait, landscape and square
    assert "broken/empty.png: empty file (0 bytes)" in out and "broken/truncated.jpg: truncated" in out
    assert f"Latent cache: {len(EXPECTED)} encoded, 0 reused" in out
    assert "on 10 images" in out and "7 steps/epoch" in out
    assert "Saved model: " in out


# ---------------------------------------------------------------- validation split


def test_validation_split_is_stable_disjoint_and_refuses_everything(shapes_dir: Path):
    from data.validation import split_validation

    scan = scan_data_root(shapes_dir, 64)
    train_scan, held = split_validation(scan, 0.25, seed=7)
    assert len(held) == 4 and len(train_scan.items) == 12
    assert not set(held) & set(train_scan.items)
    assert split_validation(scan, 0.25, seed=7)[1] == held  # same seed, same split
    assert split_validation(scan, 0.25, seed=8)[1] != held
    assert split_validation(scan, 0.0, seed=7) == (scan, [])
    assert len(split_validation(scan, 0.01, seed=7)[1]) == 1  # a fraction asks for at least one image
    with pytest.raises(DataError, match="would hold out all 16 images"):
        split_validation(scan, 0.99, seed=7)


def test_training_data_holds_out_validation_images(shapes_dir: Path, tiny_model, tmp_path: Path):
    from trainer.models.load import load_models

    models = load_models(str(tiny_model("sd1")))
    cfg = options(few_shapes(shapes_dir, tmp_path / "data", count=8), resolution=64, batch_size=2,
                  validation_split=0.25, num_workers=0)
    data = build_training_data(cfg, models.tokenizer, models.vae)
    assert len(data.loader.dataset) == 6
    assert [b["latents"].shape for b in data.validation["validation"]] == [torch.Size([2, 4, 8, 8])]
    assert data.validation["validation"][0]["input_ids"].shape == (2, 77)


# ---------------------------------------------------------------- data/ on its own


def test_data_options_are_config_keys_read_in_one_line(shapes_dir: Path):
    fields = {field.name: field.type for field in dataclasses.fields(DataOptions)}
    config_fields = {field.name: field.type for field in dataclasses.fields(TrainConfig)}
    assert fields.keys() <= config_fields.keys()  # named exactly as the config's keys
    cfg = config(shapes_dir, resolution=64, flip_p=0.5, validation_split=0.25, keep_tags=2)
    built = DataOptions.from_config(cfg)
    assert all(getattr(built, name) == getattr(cfg, name) for name in fields)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.seed = 1  # type: ignore[misc]
    # until every caller passes DataOptions, the config itself works wherever they are taken
    loaders = [build_dataloader(given, clip_tokenizer()) for given in (dataclasses.replace(cfg, cache_latents=False),
                                                                          dataclasses.replace(built, cache_latents=False))]
    assert [len(loader) for loader in loaders] == [4, 4]  # 16 images, batch_size 4
    assert [b["input_ids"].tolist() for b in loaders[0]] == [b["input_ids"].tolist() for b in loaders[1]]


def test_tokenize_captions_pads_and_cuts_to_the_window():
    tokenizer = clip_tokenizer()
    ids = tokenize_captions(tokenizer, ["a red circle", "word " * 200])
    assert ids.shape == (2, tokenizer.model_max_length) == (2, 77)
    assert ids[0, -1] == tokenizer.pad_token_id and ids[1, -1] == tokenizer.eos_token_id  # padded; cut, closed


def test_group_by_bucket_keeps_the_given_order(shapes_dir: Path):
    items = scan_data_root(shapes_dir, 64).items
    variants = [Variant(i.path, Bucket(64, 128) if n % 3 else i.bucket, flip) for n, i in enumerate(items)
                for flip in (False, True)]
    groups = group_by_bucket(variants)
    assert list(groups) == [Bucket(64, 64), Bucket(64, 128)]
    assert [v for group in groups.values() for v in group] == sorted(variants, key=lambda v: v.bucket != Bucket(64, 64))


def test_the_scan_report_is_said_and_its_upscale_warning_warned(messy: Path, capsys):
    scan = scan_data_root(messy, 128)
    capsys.readouterr()
    scan.tell()
    said = capsys.readouterr()
    assert said.out.splitlines() + said.err.splitlines() == scan.report()  # the dry run's lines, word for word
    assert said.err.startswith("Warning: 1 image(s) are smaller than their bucket and will be upscaled")
    assert "tiny_icon.png: 32x32 -> 128x128" in said.err and "Warning" not in said.out


def test_validation_choice_is_said(shapes_dir: Path, capsys):
    from data.validation import validation_items

    scan = scan_data_root(shapes_dir, 64)
    train_scan, held = validation_items(options(shapes_dir, resolution=64, validation_split=0.25), scan)
    assert len(held) == 4 and len(train_scan.items) == 12
    assert capsys.readouterr().out == "Validation: 4 of 16 images held out (validation_split 0.25).\n"
    assert validation_items(options(shapes_dir, resolution=64, validation_data_root=str(shapes_dir)), scan)[0] is scan
    assert capsys.readouterr().out == f"Validation: 16 images in {shapes_dir}.\n"


DATA_FILES = [path for path in python_files() if path.relative_to(REPO_ROOT).parts[0] == "data"]


def calls_and_attributes(path: Path) -> list[tuple[int, str]]:
    """(line, name) of every bare-name call and every attribute read in `path`."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            found.append((node.lineno, node.func.id))
        elif isinstance(node, ast.Attribute):
            found.append((node.lineno, node.attr))
    return found


def test_data_speaks_only_through_the_console():
    """Messages go through common/console.py (one voice per run, mirrored into train.log), never a bare print."""
    assert DATA_FILES
    bare = [f"{path.relative_to(REPO_ROOT)}:{line} {name}" for path in DATA_FILES
            for line, name in calls_and_attributes(path) if name in ("print", "stdout", "stderr")]
    assert bare == []


def test_pixels_become_latents_only_in_encode_posterior():
    """data/encode.py is the one place that runs the VAE encoder (with its fp16 overflow recovery)."""
    readers = {str(path.relative_to(REPO_ROOT)) for path in DATA_FILES
               for _, name in calls_and_attributes(path) if name == "latent_dist"}
    assert readers == {str(Path("data/encode.py"))}


# ---------------------------------------------------------------- captions, files and crops (small pieces)


def test_caption_sources(tmp_path: Path):
    (tmp_path / "a red car_03.jpg").touch()
    assert read_caption(tmp_path / "a red car_03.jpg") == "a red car"
    (tmp_path / "x.png").touch()
    (tmp_path / "x.txt").write_bytes("\ufeffa caf\u00e9 photo\r\n".encode("utf-8"))
    assert read_caption(tmp_path / "x.png") == "a caf\u00e9 photo"
    (tmp_path / "y.png").touch()
    (tmp_path / "y.caption").write_text("from caption file", encoding="utf-8")
    assert read_caption(tmp_path / "y.png") == "from caption file"


def test_image_files_are_found_recursively_skipping_hidden_folders_and_other_files(tmp_path: Path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    for name in ("a.png", "sub/b.JPG", "sub/deeper/c.webp"):
        Image.new("RGB", (8, 8)).save(tmp_path / name, format="PNG" if name.endswith("png") else None)
    (tmp_path / "notes.md").touch()
    (tmp_path / ".latent_cache").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / ".latent_cache" / "hidden.png")
    assert [p.name for p in find_image_files(tmp_path)] == ["a.png", "b.JPG", "c.webp"]


def test_square_bucket_crop_keeps_the_middle():
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    image.paste((255, 255, 255), (50, 0, 150, 100))  # white middle square
    out = resize_crop(image, Bucket(64, 64))
    assert out.size == (64, 64)
    assert min(out.getdata())[0] > 200  # all white: the black side bars were cropped away
