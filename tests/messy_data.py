"""A data folder as users really have them: nested, mixed formats and modes, odd captions, broken files.

Built from code (not checked in) so every case is visible here. Sizes suit `resolution` 128, whose buckets
are 128x128, 192x64, 64x192, 256x64 and 64x256.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

RED, BLUE = (220, 20, 20), (20, 20, 220)

# file -> (caption it must get, bucket it must go to); the broken files are in BROKEN
EXPECTED: dict[str, tuple[str, str]] = {
    "a cat_01.jpg": ("a cat", "192x64"),
    "gray16.png": ("caf\u00e9, na\u00efve \u2014 \u6771\u4eac", "128x128"),
    "tiny_icon.png": ("tiny", "128x128"),
    "rotated_phone.jpg": ("held upright", "64x192"),
    "palette.bmp": ("palette", "192x64"),
    "webp/photo_7.webp": ("a street, rain, night, neon", "192x64"),
    "portraits/tall person_1.png": ("tall person", "64x192"),
    "portraits/tall person_2.png": ("tall person", "64x192"),
    "portraits/deep/cmyk_print.jpg": ("a printed poster", "128x128"),
    "portraits/deep/clear_sticker.png": ("clear", "128x128"),
}
BROKEN: dict[str, str] = {"broken/truncated.jpg": "truncated", "broken/empty.png": "empty file"}


def halves(width: int, height: int, first=RED, second=BLUE, vertical: bool = True) -> Image.Image:
    """Left/right (vertical=True) or top/bottom halves in two colors: orientation is visible in the pixels."""
    image = Image.new("RGB", (width, height), second)
    image.paste(first, (0, 0, width // 2, height) if vertical else (0, 0, width, height // 2))
    return image


def make_messy_folder(root: Path) -> Path:
    (root / "portraits" / "deep").mkdir(parents=True)
    for sub in ("webp", "broken", ".hidden"):
        (root / sub).mkdir()

    halves(192, 96).save(root / "a cat_01.jpg", quality=95)  # caption from the file name
    # 16-bit grayscale, mid gray: a naive convert would clip it to white
    Image.fromarray(np.full((128, 128), 32768, dtype=np.uint16)).save(root / "gray16.png")
    (root / "gray16.txt").write_bytes("\ufeffcaf\u00e9, na\u00efve \u2014 \u6771\u4eac\r\n".encode("utf-8"))
    Image.new("RGB", (32, 32), RED).save(root / "tiny_icon.png")  # smaller than its bucket: upscaled, warned
    (root / "tiny_icon.caption").write_text("tiny\n", encoding="utf-8")

    # stored landscape with the red half on the left; EXIF 6 (rotate 90 clockwise) shows it portrait, red on top
    exif = Image.Exif()
    exif[0x0112] = 6
    halves(192, 96).save(root / "rotated_phone.jpg", exif=exif, quality=95)
    (root / "rotated_phone.txt").write_text("held upright", encoding="utf-8")

    halves(192, 96).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(root / "palette.bmp")
    (root / "palette.txt").write_text("palette", encoding="utf-8")

    halves(200, 100, vertical=False).save(root / "webp" / "photo_7.webp")
    (root / "webp" / "photo_7.yaml").write_text(
        "main_prompt: a street\ntags:\n  - rain\n  - tag: night\n    weight: 1.5\n  - neon\n", encoding="utf-8"
    )

    for i in (1, 2):  # RGBA, transparent everywhere but a red bar: the background must come out white
        rgba = Image.new("RGBA", (80, 200), (0, 0, 0, 0))
        rgba.paste((*RED, 255), (0, 0, 80, 40))
        rgba.save(root / "portraits" / f"tall person_{i}.png")
    (root / "portraits" / "multiply.txt").write_text("2.5\r\n", encoding="utf-8")

    Image.new("CMYK", (128, 128), (0, 255, 255, 0)).save(root / "portraits" / "deep" / "cmyk_print.jpg")
    (root / "portraits" / "deep" / "cmyk_print.json").write_text('{"caption": "a printed poster"}', encoding="utf-8")
    # palette PNG whose index 0 is transparent
    sticker = Image.new("P", (128, 128), 0)
    sticker.putpalette([0, 0, 0, *RED] + [0, 0, 0] * 254)
    sticker.paste(1, (32, 32, 96, 96))
    sticker.save(root / "portraits" / "deep" / "clear_sticker.png", transparency=0)

    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    noisy.save(buffer, format="JPEG", quality=90)
    (root / "broken" / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "broken" / "empty.png").write_bytes(b"")

    (root / "notes.txt").write_text("not an image, not a caption of one", encoding="utf-8")
    Image.new("RGB", (64, 64)).save(root / ".hidden" / "ignored.png")  # hidden folders are skipped
    return root
