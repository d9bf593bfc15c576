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


def draw_shape(concept: str, size: int, rng: random.Random) -> Image.Image:
    """One image of `concept` ("circle" or "square") at a random place and scale on a light background."""
    _, color, _ = CONCEPTS[concept]
    background = tuple(rng.randint(200, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    side = rng.randint(size * 2 // 5, size * 3 // 4)
    x0 = rng.randint(0, size - side)
    y0 = rng.randint(0, size - side)
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
