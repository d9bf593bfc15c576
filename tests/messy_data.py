"""Data folders as users really have them: nested, mixed formats and modes, odd captions, broken files; and
one full of links (a folder linked in, a link loop, second paths to folders and files).

Built from code (not checked in) so every case is visible here. The messy folder's sizes suit `resolution`
128, whose buckets are 128x128, 192x64, 64x192, 256x64 and 64x256.
"""

from __future__ import annotations

import io
import os
import shutil
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


# make_linked_folder: the 4 real images and their captions, and the paths that lead to them a second time
LINKED_IMAGES = {
    "circle_000.png": "a photo of a red circle, round shape",
    "square_000.png": "a drawing of a blue square, square shape",
    "sub/circle_001.png": "a photo of a red circle, round shape",
    "outside/square_001.png": "a drawing of a blue square, square shape",  # by the link to a folder outside
}
LINKED_LOOP = "sub/loop -> .. (already scanned as data_root itself)"
LINKED_SECOND_FOLDER = "twice -> sub (already scanned as sub)"
LINKED_DUPLICATES = 2  # sub/again.png (a link to circle_000.png) and square_000_hardlink.png (a hard link)


def make_linked_folder(root: Path, shapes_dir: Path) -> Path:
    """`root`/data: 4 shape images reached by 6 paths plus a loop; the real files and captions come from
    `shapes_dir` (trainer/tiny/shapes.py's 64px circles and squares). Returns the data folder."""
    data, outside = root / "data", root / "elsewhere"
    for folder in (data / "sub", outside):
        folder.mkdir(parents=True)
    for name, target in (("circle_000", data), ("square_000", data), ("circle_001", data / "sub"),
                         ("square_001", outside)):
        for suffix in (".png", ".txt"):
            shutil.copy(shapes_dir / f"{name}{suffix}", target)
    os.symlink("../elsewhere", data / "outside")  # a folder linked in: followed
    os.symlink("..", data / "sub" / "loop")  # back to data_root: a loop
    os.symlink("sub", data / "twice")  # a second path to a folder
    os.symlink("../circle_000.png", data / "sub" / "again.png")  # a second path to a file
    os.link(data / "square_000.png", data / "square_000_hardlink.png")  # a hard link: the same file again
    return data
