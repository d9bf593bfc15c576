"""The latent-size masks of masked training, kept beside the latent cache, so that a cached run reads no mask file
per step:

    <cache dir>/masks/<sha256 of image>[:2]/<sha256 of image>-<W>x<H>[-flip]-<mask>-<w>x<h>.safetensors

One entry per (image, flip) of the latent cache whose image has a mask, holding "mask": float32 (1, h, w), the
mask through its image's bucket crop and flip, reduced to the latents' h x w (data/masking/masks.py `latent_mask`).
`<mask>` is the mask file's content hash (its first 16 hex digits), or `alpha` for an image masked by its own alpha
channel (the image's hash covers it): a changed image or mask gives an entry of another name, so a stale mask is
never read. The mask is stored, not its weight map: unmasked_weight and normalize_masked_area_loss may change
between runs without new entries. The latents' own entries are the same with or without masks, so turning masked
training on or off encodes nothing again.

Made by the latent cache's one writer after the latents (`fill_masks`), each written whole (common/files.py); a
damaged entry is made again, said in one line. An entry is one latent channel: a few KiB.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from common.console import say
from common.files import remove, remove_stale_partials, write_bytes_atomically
from data.errors import DataError
from data.latent_cache import NO_SPACE, LatentCache, entry_problem, latent_shape
from data.masking.masks import from_alpha, latent_mask
from data.scan import ImageItem

if TYPE_CHECKING:
    import torch

MASK_FOLDER = "masks"  # beside the vae-<fingerprint> folders: a mask does not depend on the VAE, only its size
MASK_KEYS = ("mask",)
Key = tuple[int, bool]  # (item index, flip), as the latent cache's keys


def mask_entry(cache: LatentCache, item: ImageItem, flip: bool, size: tuple[int, int]) -> Path:
    """Where the mask of `item`, flipped or not, at the latents' `size` (h, w), is cached."""
    sha = cache.content_hash(item.path)
    mask = "alpha" if from_alpha(item) else cache.content_hash(item.mask)[:16]
    name = f"{sha}-{item.bucket}{'-flip' if flip else ''}-{mask}-{size[1]}x{size[0]}.safetensors"
    return cache.root / MASK_FOLDER / sha[:2] / name


def save_mask(path: Path, mask: torch.Tensor) -> None:
    from safetensors.torch import save

    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(path, save({"mask": mask.contiguous()}))


def load_mask(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path))["mask"]


def fill_masks(cache: LatentCache, items: list[ImageItem], keys: list[Key], vae: torch.nn.Module) -> dict[Key, Path]:
    """The mask entry of every (item index, flip) of `keys` whose image has a mask, made where missing or damaged
    (said in one line). Main process only, as the latents' fill."""
    wanted: dict[Key, tuple[Path, tuple[int, int]]] = {}
    for index, flip in keys:
        if items[index].mask is not None:
            size = latent_shape(vae, items[index].bucket)[1:]
            wanted[(index, flip)] = mask_entry(cache, items[index], flip, size), size
    damaged = [key for key, (path, size) in wanted.items()
               if (path.exists() or path.is_symlink()) and entry_problem(path, (1, *size), MASK_KEYS)]
    if damaged:
        path, size = wanted[damaged[0]]
        say(f"Latent cache: {len(damaged)} damaged mask entr{'y' if len(damaged) == 1 else 'ies'} will be made again, "
            f"e.g. {path.relative_to(cache.root)}: {entry_problem(path, (1, *size), MASK_KEYS)}. Nothing to do.")
        for key in damaged:
            remove(wanted[key][0])
    missing = [key for key, (path, _) in wanted.items() if not path.is_file()]
    for folder in sorted({wanted[key][0].parent for key in missing}):
        remove_stale_partials(folder)
    try:
        _make(missing, wanted, items)
        cache.save_hashes()  # the masks' content hashes, learned here
    except OSError as err:
        if err.errno not in NO_SPACE:  # a read-only or failing disk: trainer/failures.py says those in one line
            raise
        raise DataError(f"the disk of the latent cache filled up while masks were written ({err.strerror or err}, in "
                        f"{cache.root / MASK_FOLDER}). Free some space there and run again, or set latent_cache_dir "
                        "to a folder on a disk with room, or turn the cache off with --cache_latents false.") from None
    if wanted:
        say(f"Latent cache: {len(missing)} masks made, {len(wanted) - len(missing)} reused, in "
            f"{cache.root / MASK_FOLDER}.")
    return {key: path for key, (path, _) in wanted.items()}


def _make(missing: list[Key], wanted: dict[Key, tuple[Path, tuple[int, int]]], items: list[ImageItem]) -> None:
    """Write the entries of `missing`, in threads (decoding and resizing a mask release the GIL)."""
    def make(key: Key) -> None:
        path, size = wanted[key]
        save_mask(path, latent_mask(items[key[0]], key[1], size))

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(make, missing))
