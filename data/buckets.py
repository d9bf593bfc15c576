"""Aspect-ratio buckets: the table of training sizes for a resolution, and which bucket an image goes to.

Training every image as a center square throws away the sides of every landscape and portrait photo. Instead
each image goes to the bucket whose aspect ratio is nearest its own, with about `resolution`^2 pixels, so it is
scaled and cropped only by the sliver its aspect differs from the bucket's (the NovelAI idea that
EveryDream2 and kohya use). A batch holds one bucket, so its tensors share one shape.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

# SD's VAE downsamples 8x and the UNet 8x more: sides that are multiples of 64 keep every level whole.
SIDE_MULTIPLE = 64
MAX_ASPECT = 4.0  # 4:1 at most; beyond that the crops get too thin to train on


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int

    @property
    def aspect(self) -> float:
        return self.width / self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def bucket_table(resolution: int, max_aspect: float = MAX_ASPECT) -> list[Bucket]:
    """Every bucket for `resolution`, square first, then by growing aspect (landscape, its portrait twin).

    For each width from `resolution` up in steps of 64 the height is the tallest multiple of 64 that keeps the
    area within resolution^2 (512 -> 512x512, 576x448, 640x384, 704x320, 768x320, 832x256, ... 1024x256).
    """
    if resolution < SIDE_MULTIPLE or resolution % SIDE_MULTIPLE:
        raise ValueError(f"resolution must be a multiple of {SIDE_MULTIPLE}, got {resolution}")
    area = resolution * resolution
    buckets = [Bucket(resolution, resolution)]
    width = resolution + SIDE_MULTIPLE
    while True:
        height = area // width // SIDE_MULTIPLE * SIDE_MULTIPLE
        if height < SIDE_MULTIPLE or width / height > max_aspect:
            break
        buckets += [Bucket(width, height), Bucket(height, width)]
        width += SIDE_MULTIPLE
    return buckets


def nearest_bucket(width: int, height: int, table: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest (in log space: 2:1 and 1:2 are equally far from 1:1)."""
    aspect = math.log(width / height)
    return min(table, key=lambda b: (abs(math.log(b.aspect) - aspect), -b.width * b.height))


def fit_image(width: int, height: int, bucket: Bucket) -> tuple[tuple[int, int], tuple[int, int, int, int], bool]:
    """Scale so the image just covers the bucket, then center-crop the excess (the smaller of the two cuts).

    Returns (resized size, crop box, upscaled?). Center, not random, so the crop is a pure function of the image
    and its cached latent stays valid; the crop only removes the aspect mismatch, a few percent of one side.
    """
    scale = max(bucket.width / width, bucket.height / height)
    resized = (max(bucket.width, round(width * scale)), max(bucket.height, round(height * scale)))
    left = (resized[0] - bucket.width) // 2
    top = (resized[1] - bucket.height) // 2
    return resized, (left, top, left + bucket.width, top + bucket.height), scale > 1.0


class _InABucket(Protocol):
    @property
    def bucket(self) -> Bucket: ...


InABucket = TypeVar("InABucket", bound=_InABucket)


def group_by_bucket(things: Iterable[InABucket]) -> dict[Bucket, list[InABucket]]:
    """`things` (images, cache variants: anything with a `bucket`) per bucket, each group in the given order:
    a batch holds one bucket, so encoding and batching go group by group."""
    groups: dict[Bucket, list[InABucket]] = {}
    for thing in things:
        groups.setdefault(thing.bucket, []).append(thing)
    return groups
