"""Masked training (data/masking/masks.py, data/masking/cache.py, the loss's weight maps): mask files are never images, a mask
follows its image through every transform, the loss ignores what its mask says to, the latent cache never serves a
stale mask, the dry run says every mask problem per image, and alpha channels mask with mask_from_alpha."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image

from convert.tokenizer import clip_tokenizer
from data.dataset import TrainDataset, build_dataloader, build_training_data
from data.images import load_for_bucket
from data.latent_cache import entry_problem
from data.masking.cache import MASK_KEYS
from data.masking.masks import MaskWeighting, bucket_mask, checked_masks, from_alpha, latent_mask
from data.options import DataOptions
from data.scan import scan_data_root
from data.schedule import Draw
from trainer.config.schema import TrainConfig
from trainer.objective.loss import Objective, compute_loss, validation_loss
from trainer.objective.noise import row_generators
from trainer.preflight.checks import run_preflight
from trainer.preflight.device import for_this_machine
from trainer.preflight.report import plan_lines

SD_BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}


def options(root: Path, **overrides) -> DataOptions:
    """What data/ takes: masked training with unmasked_weight 0, cache off, unless `overrides` say otherwise."""
    plain = DataOptions(data_root=root, resolution=64, batch_size=2, flip_p=0.0, seed=1, cond_dropout=0.0,
                        shuffle_tags=False, keep_tags=0, num_workers=0, cache_latents=False, validation_split=0.0,
                        validation_data_root=None, masked_training=True, unmasked_weight=0.0)
    return dataclasses.replace(plain, **overrides)


def save(path: Path, pixels: np.ndarray) -> Path:
    """`pixels` (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA, as the file `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(path)
    return path


def asymmetric(height: int = 100, width: int = 150) -> np.ndarray:
    """A gray picture no flip or centered crop leaves alike: a bar near the left edge (which a crop to a square cuts
    partly away), a block lower right, and a horizontal ramp."""
    pixels = np.tile(np.linspace(0, 90, width), (height, 1))
    pixels[10:60, 12:40] = 255
    pixels[65:95, 95:135] = 180
    return pixels.round()


def masked_scan(root: Path, resolution: int, **overrides):
    scan, _, _ = checked_masks(scan_data_root(root, resolution), options(root, resolution=resolution, **overrides))
    return scan


# ---------------------------------------------------------------- files: which are masks, and of which image


def test_mask_files_are_never_images_and_each_is_matched_to_its_image(tmp_path: Path):
    picture = np.full((64, 64, 3), 200)
    save(tmp_path / "cat.png", picture), save(tmp_path / "cat-masklabel.png", np.full((64, 64), 255))
    save(tmp_path / "dog.png", picture)
    save(tmp_path / "sub" / "fox.jpg", picture), save(tmp_path / "sub" / "fox-masklabel.png", np.full((64, 64), 255))
    save(tmp_path / "lost-masklabel.png", np.full((64, 64), 255))  # no image named lost
    scan = scan_data_root(tmp_path, 64)
    assert {item.path.name: item.mask and item.mask.name for item in scan.items} == {
        "cat.png": "cat-masklabel.png", "dog.png": None, "fox.jpg": "fox-masklabel.png"}
    assert scan.unmatched_masks == [tmp_path / "lost-masklabel.png"]

    off, _, _ = checked_masks(scan, options(tmp_path, masked_training=False))
    report = off.report()
    assert report[0] == f"Data: 3 images in {tmp_path}, 0 skipped."  # no mask became an image (nor a caption)
    assert ("Data: 2 image(s) have a mask file (-masklabel.png) beside them, not used: masked_training is off (they "
            "are never trained on as images). To weight each image's loss by its mask, set masked_training true "
            "(docs/DATA.md).") in report


# ---------------------------------------------------------------- the mask follows its image


def test_a_mask_takes_its_images_resize_crop_and_flip(tmp_path: Path):
    pattern = asymmetric()  # 150x100: the 128x128 bucket scales it up and cuts its sides
    save(tmp_path / "cat.png", np.stack([pattern] * 3, axis=-1)), save(tmp_path / "cat-masklabel.png", pattern)
    save(tmp_path / "owl.png", np.stack([pattern] * 3, axis=-1))
    save(tmp_path / "owl-masklabel.png", pattern[::2, ::2])  # half size: resized to its image first
    items = {item.path.stem: item for item in masked_scan(tmp_path, 128).items}
    assert items["cat"].mask.name == "cat-masklabel.png" and items["owl"].mask.name == "owl-masklabel.png"
    for flip in (False, True):
        differences = {}
        for name, item in items.items():
            image = np.asarray(load_for_bucket(item.path, item.bucket, flip), dtype=np.float32)[..., 0] / 255
            mask = bucket_mask(item, flip)[0].numpy()
            assert mask.shape == image.shape == (128, 128)
            differences[name] = np.abs(mask - image)
        assert differences["cat"].max() <= 1 / 255  # the same pixels, to the rounding of a gray RGB image
        assert differences["owl"].mean() < 0.02  # a half-size mask, enlarged: blurred at its edges only
    cat = items["cat"]
    assert not torch.allclose(bucket_mask(cat, True), bucket_mask(cat, False))  # the flip is not a no-op here
    squashed = np.asarray(Image.fromarray(pattern.astype(np.uint8)).resize((128, 128)), dtype=np.float32) / 255
    assert np.abs(bucket_mask(cat, False)[0].numpy() - squashed).mean() > 0.05  # cropped, not squashed
    latent = latent_mask(cat, True, (16, 16))  # area averages of 8x8 pixels
    torch.testing.assert_close(latent, bucket_mask(cat, True).reshape(1, 16, 8, 16, 8).mean(dim=(2, 4)))


# ---------------------------------------------------------------- the loss


@pytest.fixture(scope="module")
def unet(tiny_model) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(tiny_model("sd1") / "unet")


def half_masked_row(tmp_path: Path, unmasked_weight: float = 0.0) -> dict:
    """A training row (cache off) of a 64x64 image whose mask is white on its left half: 4 of the 8 latent columns."""
    mask = np.zeros((64, 64))
    mask[:, :32] = 255
    save(tmp_path / "cat.png", np.full((64, 64, 3), 128)), save(tmp_path / "cat-masklabel.png", mask)
    scan = masked_scan(tmp_path, 64, unmasked_weight=unmasked_weight)
    dataset = TrainDataset(scan.items, clip_tokenizer(), options(tmp_path, unmasked_weight=unmasked_weight))
    return dataset[Draw(0, False, seed=7)]


def unet_gradients(unet, scheduler, latents, states, weights, objective) -> list[torch.Tensor]:
    unet.zero_grad()
    compute_loss(unet, scheduler, latents, states, torch.Generator().manual_seed(0), objective,
                 mask_weights=weights).backward()
    return [p.grad.clone() for p in unet.parameters() if p.grad is not None]


def test_with_unmasked_weight_0_latents_outside_the_mask_do_not_move_the_gradient(unet, tmp_path: Path):
    """At the last step of a zero-terminal-SNR schedule the UNet sees pure noise and a v-prediction model must
    predict -latents: the latents reach the loss only as its target, pixel by pixel, so what the mask leaves out
    must change no gradient, and what it keeps must."""
    row = half_masked_row(tmp_path)
    weights = row["mask_weights"][None]  # (1, 1, 64, 64) from the dataset, brought to 8x8 by the loss
    assert weights.shape == (1, 1, 64, 64) and set(weights.unique().tolist()) == {0.0, 1.0}
    scheduler = DDPMScheduler(**SD_BETAS, prediction_type="v_prediction", rescale_betas_zero_snr=True)
    assert scheduler.alphas_cumprod[-1] == 0  # the last step is pure noise
    last_step = Objective(timestep_start=999, timestep_end=1000)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    states = torch.randn(1, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    change = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    outside, inside = change.clone(), change.clone()
    outside[..., :4], inside[..., 4:] = 0, 0  # the mask is the left 4 latent columns

    def gradients(these: torch.Tensor) -> list[torch.Tensor]:
        return unet_gradients(unet, scheduler, these, states, weights, last_step)

    reference = gradients(latents)
    assert all(torch.equal(a, b) for a, b in zip(reference, gradients(latents + outside)))
    assert not all(torch.equal(a, b) for a, b in zip(reference, gradients(latents + inside)))
    unmasked = unet_gradients(unet, scheduler, latents + outside, states, None, last_step)
    assert not all(torch.equal(a, b) for a, b in zip(reference, unmasked))  # without the mask it would have


@pytest.mark.parametrize("loss_type", ["mse", "huber", "mse_huber"])
def test_a_mask_of_ones_changes_no_loss_and_normalizing_divides_by_the_weighted_area(unet, loss_type: str):
    """Every loss_type and min-SNR apply with a mask as without; a mask weighs each sample's elementwise loss, and
    normalize_masked_area_loss divides the sample's loss by the mean of its weight map (OneTrainer's formula)."""
    scheduler = DDPMScheduler(**SD_BETAS)
    objective = Objective(loss_type=loss_type, min_snr_gamma=5.0)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    states = torch.randn(2, 77, unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))

    def loss(rows: slice = slice(None), weights: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            return compute_loss(unet, scheduler, latents[rows], states[rows], row_generators([5, 6][rows]),
                                objective, mask_weights=weights)

    assert torch.equal(loss(weights=torch.ones(2, 1, 8, 8)), loss())
    masks = torch.zeros(2, 1, 64, 64)
    masks[0, :, :8, :16], masks[1, :, 8:56, 8:56] = 1, 1  # a small subject and a large one
    plain, normalized = MaskWeighting(0.2, False)(masks), MaskWeighting(0.2, True)(masks)
    torch.testing.assert_close(plain, 0.2 + 0.8 * masks)
    torch.testing.assert_close(normalized.mean(dim=(1, 2, 3)), torch.ones(2))
    per_sample = [loss(slice(i, i + 1), plain[i : i + 1]) / plain[i].mean() for i in range(2)]
    torch.testing.assert_close(loss(weights=normalized), torch.stack(per_sample).mean())
    assert not torch.isclose(loss(weights=plain), loss(weights=normalized))


def test_validation_loss_is_weighted_by_the_masks(tiny_model, tmp_path: Path, capsys):
    vae = AutoencoderKL.from_pretrained(tiny_model("sd1") / "vae")
    unet = UNet2DConditionModel.from_pretrained(tiny_model("sd1") / "unet")
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel.from_pretrained(tiny_model("sd1") / "text_encoder")
    mask = np.zeros((64, 64))
    mask[8:40, 8:40] = 255
    for name in ("a", "b", "c", "d"):
        save(tmp_path / f"{name}.png", np.random.default_rng(len(name)).integers(0, 256, (64, 64, 3)))
        save(tmp_path / f"{name}-masklabel.png", mask)
    cfg = options(tmp_path, validation_split=0.25, unmasked_weight=0.1)
    data = build_training_data(cfg, clip_tokenizer(), vae)
    (batch,) = data.validation["validation"]  # one image of four held out
    assert ("Validation set 'validation': masked training: 1 of 1 images have a mask (-masklabel.png), 0 are measured "
            "everywhere; outside a mask the loss weighs 0.1 (unmasked_weight).") in capsys.readouterr().out
    assert batch["mask_weights"].shape == (1, 1, 8, 8)
    expected = MaskWeighting(0.1, False)(torch.from_numpy(mask[None, None] / 255).float().reshape(1, 1, 8, 8, 8, 8)
                                         .mean(dim=(3, 5)))
    torch.testing.assert_close(batch["mask_weights"], expected)
    scheduler = DDPMScheduler(**SD_BETAS)
    masked = validation_loss(unet, text_encoder, scheduler, [batch], torch.device("cpu"))
    plain = validation_loss(unet, text_encoder, scheduler, [{k: v for k, v in batch.items() if k != "mask_weights"}],
                            torch.device("cpu"))
    assert masked != pytest.approx(plain, rel=1e-3)
    with torch.no_grad():  # the same noise and timesteps as validation_loss draws, with the mask's weights
        generator, states = torch.Generator().manual_seed(0), text_encoder(batch["input_ids"])[0]
        by_hand = np.mean([compute_loss(unet, scheduler, batch["latents"], states, generator, Objective(),
                                        mask_weights=batch["mask_weights"]).item() for _ in range(4)])
    assert masked == pytest.approx(by_hand, rel=1e-6)


# ---------------------------------------------------------------- the latent cache


def test_a_changed_mask_is_never_served_stale_from_the_latent_cache(tiny_model, tmp_path: Path, capsys):
    vae = AutoencoderKL.from_pretrained(tiny_model("sd1") / "vae")
    data, cache = tmp_path / "data", tmp_path / "cache"
    left = np.zeros((64, 64))
    left[:, :32] = 255
    save(data / "cat.png", np.full((64, 64, 3), 90)), save(data / "cat-masklabel.png", left)
    dog = np.full((64, 64, 4), 255)
    dog[..., 3] = left  # its alpha channel: the same left half
    save(data / "dog.png", dog)
    save(data / "owl.png", np.full((64, 64, 3), 30))  # no mask: ones, and no entry
    cfg = options(data, cache_latents=True, flip_p=0.5, mask_from_alpha=True)

    def weights(loader) -> dict[str, torch.Tensor]:
        """Each image's row weight map, flipped ("-flip") and not."""
        items = loader.dataset.items
        return {items[i].path.stem + ("-flip" if flip else ""): loader.dataset[Draw(i, flip, 0)]["mask_weights"]
                for i in range(len(items)) for flip in (False, True)}

    first = build_dataloader(cfg, clip_tokenizer(), vae, cache_dir=cache)
    out = capsys.readouterr().out
    assert "Latent cache: 6 encoded, 0 reused" in out and "Latent cache: 4 masks made, 0 reused" in out
    entries = sorted((cache / "masks").rglob("*.safetensors"))
    assert len(entries) == 4 and all(entry_problem(e, (1, 8, 8), MASK_KEYS) is None for e in entries)
    assert sum("-alpha-" in e.name for e in entries) == 2  # dog's alpha channel, flipped and not
    seen = weights(first)
    expected = torch.zeros(1, 8, 8)
    expected[..., :4] = 1
    torch.testing.assert_close(seen["cat"], expected)
    torch.testing.assert_close(seen["dog"], expected)  # alpha: the same left half
    torch.testing.assert_close(seen["cat-flip"], expected.flip(-1))
    torch.testing.assert_close(seen["owl"], torch.ones(1, 8, 8))

    save(data / "cat-masklabel.png", 255 - left)  # the mask changes: now the right half
    second = build_dataloader(cfg, clip_tokenizer(), vae, cache_dir=cache)
    out = capsys.readouterr().out
    assert "Latent cache: 0 encoded, 6 reused" in out and "Latent cache: 2 masks made, 2 reused" in out
    torch.testing.assert_close(weights(second)["cat"], expected.flip(-1))  # the new mask, not the cached old one
    torch.testing.assert_close(weights(second)["dog-flip"], expected.flip(-1))
    assert second.dataset.masks[(0, False)] != first.dataset.masks[(0, False)]  # cat's entry has a new name


# ---------------------------------------------------------------- the dry run says it, per image


def test_the_dry_run_says_each_mask_problem_with_its_image_and_counts_the_masks(tmp_path: Path):
    data = tmp_path / "data"
    picture = np.full((64, 96, 3), 150)  # 96x64: the 128 bucket cuts its sides
    white = np.full((64, 96), 255)
    side = np.zeros((64, 96))
    side[:, :6] = 255  # white only in a strip the crop cuts away
    masks = {"good": white, "half": white[::2, ::2], "tall": np.full((96, 64), 255), "black": np.zeros((64, 96)),
             "cropped": side, "broken": None}
    for name, mask in masks.items():
        save(data / f"{name}.png", picture)
        if mask is None:
            (data / f"{name}-masklabel.png").write_bytes(b"not a png")
        else:
            save(data / f"{name}-masklabel.png", mask)
    save(data / "plain.png", picture)
    save(data / "orphan-masklabel.png", white)
    cfg = for_this_machine(dataclasses.replace(
        TrainConfig(), resume_ckpt="someone/some-model", data_root=str(data), resolution=128, batch_size=1,
        logdir=str(tmp_path / "logs"), masked_training=True, unmasked_weight=0.05, normalize_masked_area_loss=True))
    preflight = run_preflight(cfg, tmp_path / "logs" / "run")
    lines = plan_lines(cfg, preflight)
    assert lines[0] == f"Data: 7 images in {data}, 0 skipped."  # the 7 masks are no images
    said = "\n".join(lines)
    assert ("Data: masked training: 2 of 7 images have a mask (-masklabel.png), 5 train everywhere; outside a mask the "
            "loss weighs 0.05 (unmasked_weight), and each image's loss is divided by its mask's weighted area "
            "(normalize_masked_area_loss).") in lines
    assert ("Data: masked training: 1 mask(s) have their image's aspect ratio but another size, and are resized to "
            "it, e.g. half-masklabel.png 48x32 for half.png 96x64; nothing to do.") in lines
    assert ("Data: masked training: 4 image(s) train without their mask (everywhere, at weight 1), since it cannot be "
            "used:") in lines
    assert ("  tall.png: its mask tall-masklabel.png is 64x96, another aspect ratio than the image's 96x64: no resize "
            "would put it on its subject. Make the mask from this image (the same size), or delete it.") in lines
    assert ("  broken.png: its mask broken-masklabel.png cannot be read (not an image file PIL can read). Save the mask "
            "again as a grayscale PNG of the image's size, or delete it.") in lines
    assert ("  black.png: its mask black-masklabel.png is black everywhere: with it the image would teach nothing but "
            "its background (at unmasked_weight). Paint what it should learn white, or delete the mask.") in lines
    assert "  cropped.png: its mask cropped-masklabel.png is black everywhere its crop to the bucket 128x128 keeps" in said
    assert ("Data: masked training: 1 mask file(s) have no image of their name beside them, not used: "
            "orphan-masklabel.png. A mask is named after its image: photos/cat.jpg -> photos/cat-masklabel.png.") in lines
    masked = {item.path.stem: item.mask for item in preflight.scan.items}
    assert masked == {"good": data / "good-masklabel.png", "half": data / "half-masklabel.png", "tall": None,
                      "black": None, "cropped": None, "broken": None, "plain": None}


def test_masked_training_without_any_mask_says_how_to_give_one(tmp_path: Path):
    save(tmp_path / "cat.png", np.full((64, 64, 3), 90))
    report = masked_scan(tmp_path, 64).report()
    assert ("Data: masked training: none of the 1 images has a mask, so all train everywhere, as without "
            "masked_training. Put a grayscale <name>-masklabel.png beside each image (white: learn, black: ignore; "
            "photos/cat.jpg -> photos/cat-masklabel.png), or set mask_from_alpha for images with transparency.") in report


# ---------------------------------------------------------------- alpha channels


def test_alpha_channels_mask_with_mask_from_alpha(tmp_path: Path):
    data, pattern = tmp_path / "data", asymmetric()
    rgba = np.concatenate([np.full((100, 150, 3), 40), pattern[..., None]], axis=-1)
    save(data / "cut.png", rgba)  # its alpha channel is the pattern
    save(data / "both.png", rgba), save(data / "both-masklabel.png", 255 - pattern)  # the file wins
    save(data / "opaque.png", np.full((100, 150, 4), 255))  # fully opaque: as no mask
    save(data / "gone.png", np.zeros((100, 150, 4)))  # fully transparent: nothing to learn
    save(data / "flat.png", np.full((100, 150, 3), 40))  # no alpha channel
    without = {item.path.stem: item.mask for item in masked_scan(data, 128).items}
    assert without == {"cut": None, "both": data / "both-masklabel.png", "opaque": None, "gone": None, "flat": None}
    scan = masked_scan(data, 128, mask_from_alpha=True)
    items = {item.path.stem: item for item in scan.items}
    assert {name: item.mask for name, item in items.items()} == {
        "cut": data / "cut.png", "both": data / "both-masklabel.png", "opaque": None, "gone": None, "flat": None}
    assert from_alpha(items["cut"]) and not from_alpha(items["both"])
    report = scan.report()
    assert ("Data: masked training: 2 of 5 images have a mask (1 -masklabel.png, 1 alpha channel), 3 train "
            "everywhere; outside a mask the loss weighs 0 (unmasked_weight).") in report
    assert any(line.startswith("  gone.png: its alpha channel is transparent everywhere: with it the image would "
                               "teach nothing") for line in report)
    cut, reference = items["cut"], save(tmp_path / "pattern.png", np.stack([pattern] * 3, axis=-1))
    for flip in (False, True):  # the alpha channel takes the image's own path, as a mask file does
        expected = np.asarray(load_for_bucket(reference, cut.bucket, flip), dtype=np.float32)[..., 0] / 255
        assert np.abs(bucket_mask(cut, flip)[0].numpy() - expected).max() <= 1 / 255
