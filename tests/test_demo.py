"""The demo's parts: the tiny trained VAE (it reconstructs the shapes, colour included, and the script that makes
it writes a file that loads) and the judge of what a sample shows."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from data.pixels import to_tensor
from tests.conftest import REPO_ROOT, run_script
from trainer.tiny.pictures import shown_concept
from trainer.tiny.shapes import CONCEPTS, draw_shape
from trainer.tiny.vae import load_trained_vae, reconstruction_error, scene_batch, tiny_vae


def test_the_shipped_vae_reconstructs_the_shapes_and_their_colours():
    vae = load_trained_vae()
    assert reconstruction_error(vae) < 0.035  # pixels in -1..1; measured 0.0254; a grey guess is ~0.3
    rng = random.Random(5)
    for concept in CONCEPTS:
        for _ in range(4):
            image = draw_shape(concept, 64, rng)
            pixels = to_tensor(image)[None]
            with torch.no_grad():
                decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample
            again = Image.fromarray(((decoded[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy())
            assert shown_concept(image) == concept and shown_concept(again) == concept


def test_the_vaes_latents_of_a_shape_change_little_with_its_background():
    """Masked training's premise: a shape's own latents (those wholly on it) change with what is around it far less
    than a random VAE's do (trained, measured: 0.045 of the latents' spread for another plain background, 0.56 on
    colour noise; random: 0.35 and 1.02). GroupNorm's per-image statistics keep them from being wholly local."""
    changes = {}
    torch.manual_seed(0)
    for name, vae in (("trained", load_trained_vae()), ("random", tiny_vae())):
        clean = scene_batch(random.Random(3), 8, noise=False)
        shape = (clean.max(dim=1).values - clean.min(dim=1).values > 100 / 127.5)[:, None]  # its saturated pixels
        inside = (torch.nn.functional.avg_pool2d(shape.float(), 8) > 0.99).expand(-1, 4, -1, -1)
        with torch.no_grad():
            latents = vae.encode(clean).latent_dist.mean
            backgrounds = {"plain": torch.full_like(clean, 0.8), "noise": torch.rand_like(clean) * 2 - 1}
            for background, pixels in backgrounds.items():
                moved = vae.encode(torch.where(shape, clean, pixels)).latent_dist.mean
                changes[name, background] = float((moved - latents).abs()[inside].mean() / latents.std())
    assert changes["trained", "plain"] < 0.2 * changes["random", "plain"], changes
    assert changes["trained", "noise"] < 0.7 * changes["random", "noise"], changes


def test_shown_concept_reads_the_shapes_colour_and_not_the_background():
    rng = random.Random(0)
    assert [shown_concept(draw_shape(concept, 64, rng)) for concept in CONCEPTS] == list(CONCEPTS)
    assert shown_concept(Image.new("RGB", (64, 64), (230, 210, 250))) is None  # a light tint is no shape
    speck = Image.new("RGB", (64, 64), (240, 240, 240))
    speck.paste((220, 30, 30), (10, 10, 14, 14))  # 16 red pixels: a speck, not a circle
    assert shown_concept(speck) is None


@pytest.mark.slow
def test_make_tiny_vae_writes_a_vae_that_loads(tmp_path: Path):
    out = tmp_path / "vae.safetensors"
    result = run_script(REPO_ROOT / "utils" / "make_tiny_vae.py", ["--steps", "3", "--out", str(out)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Wrote {out}" in result.stdout and "reconstruction error" in result.stdout
    assert reconstruction_error(load_trained_vae(out)) > 0.1  # three steps learn nothing: it is a fresh one
