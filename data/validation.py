"""A held-out validation set: a fixed share of data_root (or a folder of its own), encoded once.

The validation loss is only comparable across steps if nothing about it changes but the weights: the same
images, captions (no dropout or tag shuffles), latents (posterior means, no flips) and, in the trainer, the
same noise and timesteps each time.

Choosing the images imports no torch (the preflight and `--dry_run` use it); only encoding them does.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from common.console import say
from data.buckets import group_by_bucket
from data.captions import tokenize_captions
from data.errors import DataError
from data.options import DataOptions
from data.scan import ImageItem, Scan, scan_data_root

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTokenizer


def split_validation(scan: Scan, fraction: float, seed: int) -> tuple[Scan, list[ImageItem]]:
    """(training scan, held-out items): round(fraction x n) images, at least one, chosen by a seeded hash of
    each path so the split is stable across runs and independent of file order."""
    if fraction <= 0:
        return scan, []
    count = max(1, round(fraction * len(scan.items)))
    if count >= len(scan.items):
        raise DataError(
            f"validation_split {fraction} would hold out all {len(scan.items)} images; use a smaller fraction "
            "or a validation_data_root folder."
        )

    def rank(item: ImageItem) -> str:
        return hashlib.sha256(f"{seed}/{item.path.relative_to(scan.root)}".encode()).hexdigest()

    held_out = set(sorted(scan.items, key=rank)[:count])
    return replace(scan, items=[i for i in scan.items if i not in held_out]), [i for i in scan.items if i in held_out]


def encode_validation_set(
    items: list[ImageItem], tokenizer: CLIPTokenizer, vae: torch.nn.Module, batch_size: int
) -> list[dict[str, torch.Tensor]]:
    """Batches of {"latents": posterior mean x scaling factor, "input_ids"}, grouped by bucket, on the CPU."""
    import torch

    from data.encode import encode_posterior, scaled_latents
    from data.pixels import bucket_pixels

    batches = []
    for bucket_items in group_by_bucket(items).values():
        for start in range(0, len(bucket_items), batch_size):
            chunk = bucket_items[start : start + batch_size]
            pixels = torch.stack([bucket_pixels(i.path, i.bucket, flip=False) for i in chunk])
            mean, std = encode_posterior(vae, pixels)  # float32, on the CPU
            batches.append({
                "latents": scaled_latents(mean, std, None, vae.config.scaling_factor),
                "input_ids": tokenize_captions(tokenizer, [i.caption for i in chunk]),
            })
    return batches


def validation_items(options: DataOptions, scan: Scan) -> tuple[Scan, list[ImageItem]]:
    """The training scan and the validation items `options` ask for (a folder wins over a split)."""
    if options.validation_data_root:
        held = scan_data_root(Path(options.validation_data_root), options.resolution)
        say(f"Validation: {len(held.items)} images in {held.root}.")
        return scan, held.items
    train_scan, held = split_validation(scan, options.validation_split, options.seed)
    if held:
        say(f"Validation: {len(held)} of {len(scan.items)} images held out (validation_split "
            f"{options.validation_split}).")
    return train_scan, held
