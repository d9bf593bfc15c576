"""A tiny SD1-shaped model, fine-tuned on CPU by a real `python train.py`, learns its conditioning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import run_train
from trainer.models.load import load_model_dir
from trainer.tiny.shapes import caption_losses, make_shapes_dataset


@pytest.mark.slow
def test_tiny_model_learns_to_tell_captions_apart(tiny_model, tmp_path: Path):
    start = tiny_model("sd1")
    own_before, other_before = caption_losses(start)
    assert abs(other_before / own_before - 1) < 0.01  # untrained: the caption makes no difference

    data = make_shapes_dataset(tmp_path / "shapes", images_per_concept=16, size=64, seed=1)
    # The random text encoder stays frozen: trained jointly at this lr from random weights it collapses the
    # captions onto each other before the UNet can use them (measured: gap 14% frozen vs 0.3% trained).
    result = run_train(
        ["--resume_ckpt", str(start), "--data_root", str(data), "--resolution", "64", "--batch_size", "8",
         "--max_epochs", "40", "--lr", "2e-3", "--disable_textenc_training", "--gradient_checkpointing", "false",
         "--mixed_precision", "no", "--zero_frequency_noise_ratio", "0", "--cond_dropout", "0",
         "--save_full_precision", "--save_single_file", "false", "--num_workers", "0", "--logdir", "logs"],
        cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved = Path([l for l in result.stdout.splitlines() if l.startswith("Saved model: ")][-1].split(": ", 1)[1])
    own, other = caption_losses(saved)
    assert own < 0.5 * own_before  # it learned the data
    assert other / own > 1.05, (own, other)  # and its own caption now helps it denoise (measured 1.086; 1.127 after 80 epochs at 1e-3)


@pytest.mark.slow
def test_an_embedding_learns_its_concept_on_the_frozen_model(tiny_model, tmp_path: Path):
    """Textual inversion: the circles' captions name a new token; on held-out circles, the frozen model denoises
    better with the trained token than with its initializer word (the measure above, through diffusers' own
    load_textual_inversion). A random frozen UNet leaves little for any caption to gain: the best of 16 vectors at
    lr 0.1 for 160 steps was 4.5% (measured); 4 vectors at lr 0.2 for 80 steps gain 3.8%."""
    start = tiny_model("sd1")
    data = make_shapes_dataset(tmp_path / "shapes", images_per_concept=16, size=64, seed=1)
    for caption in data.glob("circle_*.txt"):
        caption.write_text("a photo of a sks-thing\n", encoding="utf-8")
    captions = {"circle": ("a photo of a sks-thing", "a photo of a shape")}
    result = run_train(
        ["--resume_ckpt", str(start), "--data_root", str(data), "--resolution", "64", "--batch_size", "8",
         "--max_epochs", "20", "--embedding_token", "sks-thing", "--embedding_init", "shape", "--embedding_vectors",
         "4", "--embedding_lr", "0.2", "--mixed_precision", "no", "--zero_frequency_noise_ratio", "0",
         "--cond_dropout", "0", "--save_full_precision", "--logdir", "logs"], cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = Path([l for l in result.stdout.splitlines() if l.startswith("Saved embedding: ")][-1].split(": ", 1)[1])
    token, initializer = caption_losses(start, embedding=(saved, "sks-thing"), captions=captions)
    assert initializer / token > 1.02, (token, initializer)  # measured 1.033
    untrained = tmp_path / "untrained.safetensors"  # the vectors it started from: 4 x "shape"'s
    with torch.no_grad():
        table = load_model_dir(start).text_encoder.get_input_embeddings().weight
        save_file({"emb_params": table[[table_id("shape", start)] * 4].contiguous()}, str(untrained))
    token, initializer = caption_losses(start, embedding=(untrained, "sks-thing"), captions=captions)
    assert abs(initializer / token - 1) < 0.005, (token, initializer)  # measured 1.001: the gain is the training's


def table_id(word: str, model: Path) -> int:
    from transformers import CLIPTokenizer

    (token_id,) = CLIPTokenizer.from_pretrained(model / "tokenizer")(word, add_special_tokens=False).input_ids
    return token_id
