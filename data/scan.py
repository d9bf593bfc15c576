"""Scanning data_root once at start: every usable image with its caption, size, bucket and repeat factor,
and every file that had to be skipped, with the reason.

Nothing here loads a model or imports torch, so `train.py --dry_run` answers in seconds.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from data.buckets import Bucket, bucket_table, fit_image, nearest_bucket
from data.captions import CaptionError, read_caption, read_multiply
from data.images import IMAGE_EXTENSIONS, BadImage, probe
from trainer.errors import UserError

LISTED_AT_MOST = 20  # names printed per report; the rest are counted


@dataclass(frozen=True)
class ImageItem:
    path: Path
    caption: str
    size: tuple[int, int]  # width, height as shown (EXIF rotation applied)
    bucket: Bucket
    multiply: float  # the folder's multiply.txt
    upscaled: bool  # smaller than its bucket: it is enlarged, which blurs it


@dataclass(frozen=True)
class Scan:
    root: Path
    items: list[ImageItem]
    skipped: list[tuple[Path, str]]  # (file, reason)

    def report(self) -> list[str]:
        """Lines to print once at start: images, buckets, skipped files, upscaled images."""
        lines = [f"Data: {len(self.items)} images in {self.root}, {len(self.skipped)} skipped."]
        per_bucket = Counter(item.bucket for item in self.items)
        lines.append("Data: images per bucket: " + ", ".join(f"{b} {n}" for b, n in sorted(per_bucket.items())))
        for folder, factor in sorted({(i.path.parent, i.multiply) for i in self.items if i.multiply != 1.0}):
            lines.append(f"Data: multiply.txt repeats images in {_relative(folder, self.root)} x{factor:g} per epoch.")
        if self.skipped:
            lines.append(f"Data: skipped {len(self.skipped)} unusable file(s):")
            lines += [f"  {_relative(p, self.root)}: {reason}" for p, reason in self.skipped[:LISTED_AT_MOST]]
            lines += [f"  ... and {len(self.skipped) - LISTED_AT_MOST} more"] if len(self.skipped) > LISTED_AT_MOST else []
        upscaled = [i for i in self.items if i.upscaled]
        if upscaled:
            lines.append(
                f"Warning: {len(upscaled)} image(s) are smaller than their bucket and will be upscaled (blurrier); "
                "use larger images or a lower resolution:"
            )
            lines += [f"  {_relative(i.path, self.root)}: {i.size[0]}x{i.size[1]} -> {i.bucket}" for i in upscaled[:LISTED_AT_MOST]]
            lines += [f"  ... and {len(upscaled) - LISTED_AT_MOST} more"] if len(upscaled) > LISTED_AT_MOST else []
        return lines


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root)) or "."
    except ValueError:
        return str(path)


def find_image_files(root: Path) -> list[Path]:
    """Image files under `root`, recursively, in a stable order; hidden folders (our .latent_cache) skipped."""
    found: list[Path] = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        found += [Path(folder) / f for f in sorted(files) if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return found


def scan_data_root(root: Path, resolution: int, threads: int | None = None) -> Scan:
    """Every image under `root` checked, captioned and bucketed. Raises UserError when none is usable."""
    paths = find_image_files(root)
    if not paths:
        raise UserError(
            f"data_root {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}), searched recursively. "
            "Point --data_root at your training images."
        )
    table = bucket_table(resolution)
    multiplies: dict[Path, float] = {}
    for folder in sorted({p.parent for p in paths}):
        try:
            multiplies[folder] = read_multiply(folder)
        except CaptionError as err:
            raise UserError(str(err)) from None

    def check(path: Path) -> ImageItem | tuple[Path, str]:
        try:
            width, height = probe(path)
            caption = read_caption(path)
        except (BadImage, CaptionError) as err:
            return path, str(err)
        except OSError as err:  # unreadable: permissions, a broken link, a file removed meanwhile
            return path, f"cannot be read ({err.strerror or err})"
        bucket = nearest_bucket(width, height, table)
        upscaled = fit_image(width, height, bucket)[2]
        return ImageItem(path, caption, (width, height), bucket, multiplies[path.parent], upscaled)

    # Decoding releases the GIL, so threads check files in parallel without pickling anything.
    with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(check, paths))
    items = [r for r in results if isinstance(r, ImageItem)]
    skipped = [r for r in results if not isinstance(r, ImageItem)]
    if not items:
        raise UserError(
            f"data_root {str(root)!r} has {len(paths)} image file(s) but none could be used, e.g. "
            f"{skipped[0][0].name}: {skipped[0][1]}. Replace or remove the broken files."
        )
    return Scan(root, items, skipped)
