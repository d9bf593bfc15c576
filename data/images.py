"""Image files from the wild as RGB pictures of the bucket size.

Owns: which files are images (a `<stem>-masklabel` file is not one: it is its image's mask, data/masking/masks.py),
checking that one decodes (so a broken file is reported at start, not mid-run), turning any PIL mode into plain
8-bit RGB the right way up: EXIF orientation applied, transparency composited on white, CMYK/palette/grayscale
converted, 16-bit scaled down rather than clipped; and the one geometric path of a picture into its bucket (resize,
center crop, flip), which an image and its mask both take. Imports no torch, so the dry run stays fast.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from data.buckets import Bucket, fit_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
EXIF_ORIENTATION = 0x0112
ROTATED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF values that turn the picture by 90 degrees, swapping width and height
WHITE = (255, 255, 255)
# OneTrainer's name for an image's mask: photos/cat.jpg -> photos/cat-masklabel.png (any image format is read)
MASK_SUFFIX = "-masklabel"


def is_mask_file(path: Path) -> bool:
    """Whether `path` is a mask (`<image stem>-masklabel.<image extension>`), never an image to train on."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.stem.lower().endswith(MASK_SUFFIX)


def masked_stem(mask: Path) -> str:
    """The stem of the image `mask` belongs to: cat-masklabel.png -> cat."""
    return mask.stem[: -len(MASK_SUFFIX)]


class BadImage(Exception):
    """A file with an image extension that cannot be used; the message is the reason, for the skip report."""


def probe(path: Path) -> tuple[int, int]:
    """(width, height) as the picture is shown (after EXIF rotation), after checking the whole file decodes.

    Reading the header alone would pass a truncated JPEG that then fails on its first training step, so the
    pixels are decoded too; JPEGs decode at 1/8 scale (`draft`), which still reads every byte but is ~20x faster.
    """
    if path.stat().st_size == 0:
        raise BadImage("empty file (0 bytes)")
    try:
        with Image.open(path) as image:
            width, height = image.size
            turned = image.getexif().get(EXIF_ORIENTATION) in ROTATED_ORIENTATIONS
            if image.format == "JPEG":
                image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            image.load()
    except UnidentifiedImageError:
        raise BadImage("not an image file PIL can read") from None
    except Image.DecompressionBombError as err:
        raise BadImage(f"too large to decode safely ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:  # PIL reports broken data as any of these
        raise BadImage(f"truncated or corrupt ({err})") from None
    if width < 1 or height < 1:
        raise BadImage(f"has no pixels ({width}x{height})")
    return (height, width) if turned else (width, height)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grayscale: convert("L") clips everything above 255 to white; scale the range instead
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array / 257.0, 0, 255).round().astype(np.uint8), "L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # transparent pixels hold arbitrary colors (often black); white is what a viewer shows
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, WHITE + (255,))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)  # phone photos store rotation in EXIF
        return to_rgb(image)


def resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image` scaled to `size` (width, height)."""
    if size == image.size:
        return image
    # LANCZOS when shrinking keeps detail without aliasing; BICUBIC when enlarging avoids ringing
    shrinking = size[0] < image.width
    return image.resize(size, Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC)


def resize_crop(image: Image.Image, bucket: Bucket) -> Image.Image:
    """Scale `image` to just cover `bucket` and cut the centered bucket-sized window."""
    resized, box, _ = fit_image(image.width, image.height, bucket)
    return resize(image, resized).crop(box)


def place_in_bucket(image: Image.Image, bucket: Bucket, flip: bool) -> Image.Image:
    """`image` resized and cropped to `bucket`, mirrored when `flip`: the one geometric path of every picture that
    trains, an image and its mask alike (so the mask stays on its subject)."""
    image = resize_crop(image, bucket)
    return ImageOps.mirror(image) if flip else image


def load_for_bucket(path: Path, bucket: Bucket, flip: bool) -> Image.Image:
    return place_in_bucket(load_rgb(path), bucket, flip)

