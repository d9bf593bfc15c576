"""Small pure pieces: captions, resizing, the training target, model description."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from data.buckets import Bucket
from data.captions import read_caption
from data.images import resize_crop
from data.scan import find_image_files
from trainer.models import load_models
from trainer.objective import compute_loss, training_target
from trainer.tokenizer import clip_tokenizer


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


def test_clip_tokenizer_matches_openai_ids():
    assert clip_tokenizer()("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = clip_tokenizer(pad_token="!")("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[4:] == [0] * 73  # SD2 pads with "!" (id 0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_target_formula(prediction_type: str):
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    target = training_target(scheduler, latents, noise, t)
    alpha_bar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = noise if prediction_type == "epsilon" else alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    torch.testing.assert_close(target, expected)


def test_model_bundle_describes_each_family_and_loss_is_deterministic(tiny_model):
    for family, expected in [("sd1", ("sd1", "epsilon", False)), ("sd2-v", ("sd2", "v_prediction", True))]:
        models = load_models(str(tiny_model(family)))
        info = models.info
        assert (info.family, info.prediction_type, info.upcast_attention) == expected
        assert info.native_resolution == 64
        assert models.noise_scheduler.config.prediction_type == expected[1]
        latents, states = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 64)
        losses = [compute_loss(models.unet, models.noise_scheduler, latents, states, torch.Generator().manual_seed(1))
                  for _ in range(2)]
        assert losses[0].item() == losses[1].item() and losses[0].item() > 0
