"""How much disk room latent-cache entries take, and what to say when a disk has too little.

An entry's size follows from its latent shape alone: a small safetensors header and two float32 tensors (the
posterior's mean and std), in whole blocks of the file system. So the preflight sizes the cache from the buckets
before any model loads (SD's VAE: 4 channels, an eighth of the image each way), and the fill sizes it exactly once
the VAE is known (data/latent_cache.py). No torch here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from common.files import human_bytes, nearest_existing
from data.buckets import Bucket


class Variant(Protocol):
    """What sizing reads of a cached variant (data/latent_cache.py's Variant, which imports this module)."""

    path: Path
    flip: bool

# SD 1.x/2.x latents, for sizing entries before the VAE loads (trainer/models/checks.py refuses a VAE whose
# latent_channels differ from the UNet's 4)
SD_LATENT_CHANNELS = 4
SD_LATENT_FACTOR = 8
HEADER_BYTES = 8 + 192  # the header's length field and its json: 136 bytes for 4x8x8, under 160 at any SD size


def sd_latent_shape(bucket: Bucket) -> tuple[int, int, int]:
    """An SD 1.x/2.x VAE's latent shape for `bucket` (`latent_shape` says it for a loaded VAE)."""
    return SD_LATENT_CHANNELS, bucket.height // SD_LATENT_FACTOR, bucket.width // SD_LATENT_FACTOR


def block_size(folder: Path) -> int:
    """The allocation unit of the file system `folder` is (or would be created) on: a file takes whole blocks,
    so a 2 KiB entry takes 4 KiB."""
    statvfs = getattr(os, "statvfs", None)  # POSIX only
    try:
        return (statvfs(nearest_existing(folder)).f_frsize if statvfs else 0) or 4096
    except OSError:
        return 4096


def entry_bytes(shape: tuple[int, ...], block: int) -> int:
    """Disk bytes of one entry of latents of `shape`: its header and two float32 tensors, in whole blocks."""
    return math.ceil((HEADER_BYTES + 2 * 4 * math.prod(shape)) / block) * block


def cache_bytes(shapes: Iterable[tuple[int, ...]], new_folders: int, index_bytes: int, block: int) -> int:
    """Disk bytes that writing entries of `shapes` takes: the entries, a block for each new hash-prefix folder,
    and the hash index's new copy (written whole, beside the old one until it replaces it)."""
    return (sum(entry_bytes(shape, block) for shape in shapes) + new_folders * block
            + math.ceil(index_bytes / block) * block)


def variants_phrase(count: int, variants: list[Variant], how: str) -> str:
    """'the 32 of 32 image variants not yet cached (16 images, each also flipped)': `count` of the run's
    `variants` are `how`; flipped variants are cached beside the images', for images whose flip_p is above 0."""
    images, flipped = len({v.path for v in variants}), sum(v.flip for v in variants)
    flips = "" if not flipped else ", each also flipped" if flipped == images else f", {flipped} also flipped"
    return (f"the {count} of {len(variants)} image variant{'' if len(variants) == 1 else 's'} {how} ({images} "
            f"image{'' if images == 1 else 's'}{flips})")


def room_message(root: Path, what: str, needed: int, free: int) -> str:
    """Not enough room for the cache at `root`: `what` needs `needed` bytes, and `free` are free; and the ways on."""
    return (f"not enough free space for the latent cache in {root}: {what} need about {human_bytes(needed)}, and "
            f"{human_bytes(free)} is free. Free some space there, or set latent_cache_dir to a folder on a disk "
            f"with room (--latent_cache_dir <folder>), or turn the cache off with --cache_latents false (each step "
            "then encodes its images).")
