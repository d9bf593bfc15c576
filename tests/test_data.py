"""The data pipeline: caption rules, buckets, images from the wild, the epoch schedule, the latent cache,
the dry run, and real `python train.py` runs on a messy folder of landscape and portrait images."""

from __future__ import annotations

import dataclasses
import math
import random
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from data.buckets import Bucket, bucket_table, fit_image, nearest_bucket
from data.captions import CaptionError, read_caption, read_multiply, shuffle_tags
from data.dataset import TrainDataset, build_dataloader, build_training_data
from data.images import load_for_bucket, load_rgb
from data.scan import scan_data_root
from data.schedule import batches_per_epoch, epoch_batches
from tests.conftest import REPO_ROOT, run_train
from tests.messy_data import BLUE, BROKEN, EXPECTED, RED, make_messy_folder
from trainer.config import TrainConfig
from trainer.errors import UserError
from trainer.tokenizer import clip_tokenizer


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_messy_folder(tmp_path_factory.mktemp("messy"))


def config(data_root: Path, **overrides) -> TrainConfig:
    return dataclasses.replace(TrainConfig(), **{"data_root": str(data_root), "resolution": 128, "num_workers": 0, **overrides})


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
    with pytest.raises(CaptionError, match=r"x\.yaml is not valid yaml"):
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
    always = TrainDataset(scan.items, tokenizer, config(shapes_dir, cond_dropout=1.0))
    assert {always.caption(d) for d in rows} == {""}
    never = TrainDataset(scan.items, tokenizer, config(shapes_dir, cond_dropout=0.0, shuffle_tags=True))
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


def test_empty_and_all_broken_data_roots(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no images"):
        scan_data_root(tmp_path / "empty", 128)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"not a png at all")
    with pytest.raises(UserError, match="none could be used, e.g. a.png: not an image file"):
        scan_data_root(tmp_path / "bad", 128)


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
    loader = build_dataloader(config(messy, batch_size=2, cache_latents=False), clip_tokenizer())
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
    cfg = config(data, resolution=64, batch_size=2, flip_p=0.5, cache_latents=True)
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
    cfg = config(data, resolution=64, batch_size=2, latent_cache_dir=str(tmp_path / "cache"), cond_dropout=0.0)
    dataset = build_dataloader(cfg, clip_tokenizer(), vae).dataset
    draw = epoch_batches(dataset.items, 2, 0.0, cfg.seed, 0)[0][0]
    item = dataset.items[draw.index]
    from data.pixels import to_tensor

    with torch.no_grad():
        posterior = vae.encode(to_tensor(load_for_bucket(item.path, item.bucket, False))[None]).latent_dist
    samples = torch.stack([dataset[dataclasses.replace(draw, seed=s)]["latents"] for s in range(200)])
    scale = vae.config.scaling_factor
    torch.testing.assert_close(samples.mean(0), posterior.mean[0] * scale, atol=4 * posterior.std.max() * scale / math.sqrt(200), rtol=0)
    torch.testing.assert_close(samples.std(0), posterior.std[0] * scale, rtol=0.25, atol=1e-6)


@pytest.mark.slow
def test_training_loop_never_encodes_cached_latents(tiny_model, shapes_dir: Path, tmp_path: Path):
    from trainer.loop import train
    from trainer.models import load_models

    models = load_models(str(tiny_model("sd1")))
    cfg = config(few_shapes(shapes_dir, tmp_path / "data"), resolution=64, batch_size=2, max_epochs=2,
                 logdir=str(tmp_path / "logs"), mixed_precision="no", gradient_checkpointing=False)
    data = build_training_data(cfg, models.tokenizer, models.vae)
    calls = count_encoder_calls(models.vae)
    train(cfg, models, data, tmp_path / "run")
    assert calls == []  # two epochs, four steps, not one VAE encoder call


# ---------------------------------------------------------------- dry run and real runs


def test_dry_run_counts_steps_without_models(messy: Path, tmp_path: Path):
    result = subprocess.run(
        [sys.executable, "-X", "importtime", str(REPO_ROOT / "train.py"), "--dry_run", "--data_root", str(messy),
         "--resolution", "128", "--batch_size", "2", "--grad_accum", "2", "--resume_ckpt", "no_such_model"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "diffusers" not in imported and "torch" not in imported and "transformers" not in imported
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
    with pytest.raises(UserError, match="would hold out all 16 images"):
        split_validation(scan, 0.99, seed=7)


def test_training_data_holds_out_validation_images(shapes_dir: Path, tiny_model, tmp_path: Path):
    from trainer.models import load_models

    models = load_models(str(tiny_model("sd1")))
    cfg = config(few_shapes(shapes_dir, tmp_path / "data", count=8), resolution=64, batch_size=2,
                 validation_split=0.25, num_workers=0)
    data = build_training_data(cfg, models.tokenizer, models.vae)
    assert len(data.loader.dataset) == 6
    assert [b["latents"].shape for b in data.validation] == [torch.Size([2, 4, 8, 8])]
    assert data.validation[0]["input_ids"].shape == (2, 77)
