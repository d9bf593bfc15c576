"""Validation sets: a held-out share of data_root or a folder of its own, more named folders, and a share of
the training images re-measured as they train (a stabilized training loss); each encoded once.

The validation loss is only comparable across steps if nothing about it changes but the weights: the same
images, captions (no dropout or tag shuffles), latents (posterior means, no flips), masks (with masked training, the
same weight maps as training's) and, in the trainer, the same noise and timesteps each time.

Choosing the images imports no torch (the preflight and `--dry_run` use it); only encoding them does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from common.console import say
from common.progress import progress
from data.buckets import group_by_bucket
from data.captions import tokenize_captions
from data.errors import DataError
from data.options import DataOptions
from data.scan import ImageItem, Scan, scan_data_root

if TYPE_CHECKING:
    import torch
    from transformers import CLIPTokenizer

    from data.masking.masks import MaskWeighting


def split_validation(scan: Scan, fraction: float, seed: int, key: str = "validation_split",
                     ) -> tuple[Scan, list[ImageItem]]:
    """(training scan, held-out items): round(fraction x n) images, at least one, chosen by a seeded hash of
    each path so the split is stable across runs and independent of file order."""
    if fraction <= 0:
        return scan, []
    if max(1, round(fraction * len(scan.items))) >= len(scan.items):
        raise DataError(
            f"{key} {fraction} would hold out all {len(scan.items)} images; use a smaller fraction "
            "or a folder of validation images."
        )
    held_out = set(seeded_share(scan, fraction, seed))
    return replace(scan, items=[i for i in scan.items if i not in held_out]), [i for i in scan.items if i in held_out]


def seeded_share(scan: Scan, fraction: float, seed: int) -> list[ImageItem]:
    """round(fraction x n) of the scan's images, at least one, ranked by a seeded hash of each path: the same
    images every run, whatever the file order."""
    count = max(1, round(fraction * len(scan.items)))

    def rank(item: ImageItem) -> str:
        return hashlib.sha256(f"{seed}/{item.path.relative_to(scan.root)}".encode()).hexdigest()

    return sorted(scan.items, key=rank)[:count]


def validation_sets(scan: Scan, resolution: int, seed: int, split: float = 0.0, data_root: str | Path | None = None,
                    extra: dict[str, str] | None = None, stabilize: float = 0.0,
                    names: Callable[[str], str] = lambda name: "validation_data_root",
                    split_key: str = "validation_split") -> tuple[Scan, dict[str, list[ImageItem]]]:
    """(training scan, {set name: images}): the main set "validation" (data_root's images, else `split` of the
    training images held out), each `extra` folder under its own name, and "train-stabilized", a `stabilize`
    share of the images that still train. Every folder is scanned as data_root is, and says what it found;
    `names(set)` is how messages name a set's folder (the key that gave it), `split_key` the split's key."""
    sets: dict[str, list[ImageItem]] = {}
    if data_root:
        sets["validation"] = _scan_set(data_root, resolution, "validation", names("validation"))
    else:
        scan, held = split_validation(scan, split, seed, split_key)
        if held:
            sets["validation"] = held
            say(f"Validation: {len(held)} of {len(scan.items) + len(held)} images held out ({split_key} {split}).")
    for name, folder in (extra or {}).items():
        sets[name] = _scan_set(folder, resolution, name, names(name))
    if stabilize:
        sets["train-stabilized"] = seeded_share(scan, stabilize, seed)
        say(f"Validation: {len(sets['train-stabilized'])} training images re-measured for loss/train-stabilized.")
    return scan, sets


def _scan_set(folder: str | Path, resolution: int, name: str, role: str) -> list[ImageItem]:
    held = scan_data_root(Path(folder), resolution, role=role)
    say(f"Validation: {'' if name == 'validation' else f'set {name!r}: '}{len(held.items)} images in {held.root}.")
    return held.items


def encode_validation_set(
    items: list[ImageItem], tokenizer: CLIPTokenizer, vae: torch.nn.Module, batch_size: int,
    weighting: MaskWeighting | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Batches of {"latents": posterior mean x scaling factor, "input_ids"}, grouped by bucket, on the CPU; with a
    masked training's `weighting` also "mask_weights", each image's weight map at the latents' size (data/masking/masks.py)."""
    import torch

    from data.encode import encode_posterior, scaled_latents
    from data.masking.masks import latent_mask
    from data.pixels import bucket_pixels

    batches = []
    with progress("Validation: encoding", total=len(items), unit="images") as bar:  # not cached: every run
        for bucket_items in group_by_bucket(items).values():
            for start in range(0, len(bucket_items), batch_size):
                chunk = bucket_items[start : start + batch_size]
                pixels = torch.stack([bucket_pixels(i.path, i.bucket, flip=False) for i in chunk])
                mean, std = encode_posterior(vae, pixels)  # float32, on the CPU
                batches.append({
                    "latents": scaled_latents(mean, std, None, vae.config.scaling_factor),
                    "input_ids": tokenize_captions(tokenizer, [i.caption for i in chunk]),
                })
                if weighting is not None:
                    batches[-1]["mask_weights"] = weighting(torch.stack([latent_mask(i, False, mean.shape[-2:])
                                                                         for i in chunk]))
                bar.update(len(chunk))
    return batches


def validation_items(options: DataOptions, scan: Scan) -> tuple[Scan, list[ImageItem]]:
    """The training scan and the validation items `options` ask for (a folder wins over a split)."""
    train_scan, sets = validation_sets(scan, options.resolution, options.seed, options.validation_split,
                                       options.validation_data_root)
    return train_scan, sets.get("validation", [])
