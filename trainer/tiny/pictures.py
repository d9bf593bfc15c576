"""What a tiny model draws for each shapes caption, judged without a person: the demo's before/after sheet and the
test that reads the same samples' colours.

A sample "shows" a concept when most of its saturated pixels are nearest that concept's colour (the shapes set's
red and blue) and there are enough of them to be a shape, not a speck. The light backgrounds are never saturated
(each channel 200-255), so they count for nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from trainer.tiny.shapes import CONCEPTS

SATURATED = 100  # a pixel's brightest channel less its darkest; the backgrounds stay under 56
NEAR = 80  # how far (RGB distance) a saturated pixel may be from a concept's colour to count for it: the palette's
# orange and purple (trainer/tiny/vae.py), which a VAE decodes stray latents to, are 100 and more from red and blue
MIN_PIXELS = 24  # of 64x64: a shape the size of a 5x5 square at least


def sample_captions(model_dir: Path, seeds: list[int], steps: int = 20, guidance: float = 7.5
                    ) -> dict[str, list[Image.Image]]:
    """{concept: one sample per seed with its caption} from the diffusers folder `model_dir`, drawn as
    utils/generate.py draws (the model's own scheduler, its default guidance)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from trainer.evaluation.sampling import prompts_spelled_out_by_caller

    pipeline = prompts_spelled_out_by_caller(StableDiffusionPipeline.from_pretrained(model_dir))
    pipeline.set_progress_bar_config(disable=True)
    samples = {}
    for concept, (_, _, caption) in CONCEPTS.items():
        samples[concept] = [pipeline(caption, num_inference_steps=steps, guidance_scale=guidance,
                                     generator=torch.Generator().manual_seed(seed)).images[0] for seed in seeds]
    return samples


def shown_concept(image: Image.Image) -> str | None:
    """The concept whose colour `image`'s saturated pixels are near, at least twice as many as near any other's;
    None where no concept's are (no shape, or a mix)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int32).reshape(-1, 3)
    pixels = pixels[pixels.max(axis=1) - pixels.min(axis=1) >= SATURATED]
    counts = {}
    for concept, (_, colour, _) in CONCEPTS.items():
        counts[concept] = int((np.linalg.norm(pixels - np.array(colour), axis=1) <= NEAR).sum())
    best = max(counts, key=counts.get)
    runner_up = max((count for concept, count in counts.items() if concept != best), default=0)
    return best if counts[best] >= MIN_PIXELS and counts[best] >= 2 * runner_up else None


def matching_share(samples: dict[str, list[Image.Image]]) -> float:
    """The share of samples that show their own caption's concept."""
    judged = [shown_concept(image) == concept for concept, images in samples.items() for image in images]
    return sum(judged) / len(judged)


def before_after_sheet(before: dict[str, list[Image.Image]], after: dict[str, list[Image.Image]],
                       scale: int = 2) -> Image.Image:
    """One labelled image: a row per caption and moment (before, after training), a column per seed, each sample
    shown `scale` times its size and marked with the concept it shows (or '-')."""
    rows = [(f"{moment}: {CONCEPTS[concept][2]}", images)
            for concept in CONCEPTS for moment, images in (("before", before[concept]), ("after", after[concept]))]
    columns = max(len(images) for _, images in rows)
    tile = before[next(iter(CONCEPTS))][0].width * scale
    label_height, pad = 14, 4
    sheet = Image.new("RGB", (pad + columns * (tile + pad), len(rows) * (label_height + tile + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (label, images) in enumerate(rows):
        top = pad + row * (label_height + tile + pad)
        draw.text((pad, top), label, fill="black")
        for column, image in enumerate(images):
            left = pad + column * (tile + pad)
            sheet.paste(image.resize((tile, tile), Image.NEAREST), (left, top + label_height))
            draw.text((left + 2, top + label_height + 2), shown_concept(image) or "-", fill="black")
    return sheet
