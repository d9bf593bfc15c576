"""A small generated image+caption set: red circles and blue squares on varied backgrounds.

Used by the offline demo and by tests. Two concepts whose captions differ in more than a token or two, so
a tiny model can visibly learn its conditioning in a few CPU minutes.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

CONCEPTS = {
    "circle": ("red", (220, 30, 30), "a photo of a red circle, round shape"),
    "square": ("blue", (30, 60, 220), "a drawing of a blue square, square shape"),
}


def draw_shape(concept: str, size: int, rng: random.Random, anywhere: bool = False) -> Image.Image:
    """One image of `concept` ("circle" or "square") at a jittered place and scale on a light background.

    Circles sit in the upper left, squares in the lower right. A random tiny VAE normalises colour away
    (GroupNorm), but not layout: the concepts must differ where such a VAE can see it, or a tiny model has
    nothing in its latents to tie to the caption. `anywhere`: both concepts anywhere in the image, for the trained
    VAE (trainer/tiny/vae.py), whose latents keep the colours: the caption alone then tells what the shape is.
    """
    _, color, _ = CONCEPTS[concept]
    background = tuple(rng.randint(200, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    side = rng.randint(size * 3 // 10, size * 9 // 20)
    if anywhere:
        margin = size // 16
        x0, y0 = rng.randint(margin, size - margin - side), rng.randint(margin, size - margin - side)
    else:
        low, high = size // 16, size // 2 - side // 2
        x0, y0 = rng.randint(low, max(low, high)), rng.randint(low, max(low, high))
        if concept == "square":  # mirrored into the lower right
            x0, y0 = size - x0 - side, size - y0 - side
    box = (x0, y0, x0 + side, y0 + side)
    if concept == "circle":
        draw.ellipse(box, fill=color)
    else:
        draw.rectangle(box, fill=color)
    return image


def make_shapes_dataset(out_dir: Path, images_per_concept: int = 8, size: int = 64, seed: int = 0) -> Path:
    """Write `<concept>_<i>.png` images with sidecar `.txt` captions into `out_dir`; returns `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for concept, (_, _, caption) in CONCEPTS.items():
        for i in range(images_per_concept):
            stem = out_dir / f"{concept}_{i:03d}"
            draw_shape(concept, size, rng).save(stem.with_suffix(".png"))
            stem.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return out_dir


def caption_losses(model_dir: Path, images_per_concept: int = 8, draws: int = 8, seed: int = 123,
                   lora: Path | None = None, embedding: tuple[Path, str] | None = None,
                   captions: dict[str, tuple[str, str]] | None = None) -> tuple[float, float]:
    """(loss with each image's own caption, loss with the other concept's caption) on fresh held-out shapes.

    The training objective itself (trainer/objective/loss.py `compute_loss`, plain MSE), with the same noise and
    timestep for both captions (the same generator seed), so the difference is what the caption is worth to the
    model: about 0 for a model that ignores its conditioning, clearly positive once it has learned it. `lora`: a
    LoRA file applied to the model first, by diffusers' own loader (as a user's pipeline applies it); `embedding`:
    (an embedding file, its token), added by diffusers' load_textual_inversion. `captions`: the concepts to draw,
    each with (its own caption, the caption to compare with); default: both, each against the other's caption.
    """
    import numpy as np
    import torch

    from data.captions import tokenize_captions
    from data.encode import encode_posterior
    from data.pixels import to_tensor
    from trainer.models.load import load_model_dir
    from trainer.objective.loss import compute_loss, encode_prompts

    models = load_model_dir(Path(model_dir))
    if lora is not None or embedding is not None:
        from trainer.evaluation.sampling import sd_pipeline

        pipeline = sd_pipeline(models.unet, models.text_encoder, models.vae, models.tokenizer, models.sample_scheduler)
        if lora is not None:
            pipeline.load_lora_weights(str(lora))
        if embedding is not None:
            from trainer.adapters.embedding_file import read_embedding_file

            pipeline.load_textual_inversion(read_embedding_file(embedding[0]), token=embedding[1])
    if captions is None:
        captions = {concept: (CONCEPTS[concept][2], CONCEPTS[other][2]) for concept, other in zip(CONCEPTS,
                                                                                                  reversed(CONCEPTS))}
    concepts, rng = list(captions), random.Random(seed)
    own, other = [], []
    with torch.no_grad():
        texts = list(dict.fromkeys(text for pair in captions.values() for text in pair))
        states = dict(zip(texts, encode_prompts(models.text_encoder, tokenize_captions(models.tokenizer,
                                                                                         texts)).split(1)))
        for i in range(images_per_concept * len(concepts)):
            concept = concepts[i % len(concepts)]
            mean, _ = encode_posterior(models.vae, to_tensor(draw_shape(concept, 64, rng))[None])
            latents = mean * models.vae.config.scaling_factor
            for draw in range(draws):
                draw_seed = (seed * len(concepts) * images_per_concept + i) * draws + draw
                for losses, caption in zip((own, other), captions[concept]):
                    generator = torch.Generator().manual_seed(draw_seed)
                    losses.append(compute_loss(models.unet, models.noise_scheduler, latents, states[caption],
                                               generator).item())
    return float(np.mean(own)), float(np.mean(other))
