"""VAE latents computed once and kept on disk, so later epochs and later runs skip the VAE encoder.

The VAE is frozen, so an image's latent depends only on (its pixels, its bucket crop, its flip, the VAE
weights and their dtype); the cache key is exactly that:

    <cache dir>/vae-<fingerprint>/<sha256 of file>[:2]/<sha256>-<W>x<H>[-flip].safetensors

A changed image has a new content hash, a different VAE (or the same in another dtype) a new fingerprint
folder; either way the entry is encoded afresh, and stale entries are simply never read (delete the folder to
reclaim the space).

What is stored is the VAE's posterior, mean and std, not one sample from it: each step then draws a new sample
(`mean + std * noise`), exactly what encoding the image every step would give, at a file read's cost.
Crops are deterministic (center, see data/buckets.py), so the only variants are flipped and not; both are
cached for each image that can be flipped (its flip_p, its own or else the run's, above 0).

Where: `choose_cache_dir` (latent_cache_dir, else `<data_root>/.latent_cache`, else a fallback place when
data_root is read-only); the folder holds a `.gitignore` of `*` so a data set kept in git does not pick it up.
Entries and the hash index are written whole or not at all (common/files.py). Before training every entry the
run needs is checked from its header (a few hundred bytes): a damaged one (truncated, another layout, not
safetensors, unreadable) is encoded again, with one notice. During the run each entry read is checked the same
way on what was read (`read_entry`); data/dataset.py encodes one damaged since again where the VAE is at hand. One
writer fills the cache: the main process, before training (`fill_cache`); other processes only read it, so
multi-process runs call `fill_cache` on rank 0, wait at a barrier, then build their loaders. An entry encoded again
during the run is written whole by the process that found it.

Room: an entry's size is known from its bucket alone (data/cache_room.py), so the preflight checks that the disk can
take the entries not yet cached before any model loads (`room_problem_before_load`), and `fill_cache` checks
again, exactly, once the VAE is known. A disk that fills anyway (another program writing to it) ends the fill in
one message (`DataError`); the entries written until then are whole, and the next run reuses them.

torch is imported only by the functions that encode or read latents: the preflight and `--dry_run` choose the
cache folder and check its room from here without it, in seconds.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common.console import say
from common.files import (
    free_bytes,
    human_bytes,
    place_problem,
    remove,
    remove_stale_partials,
    write_bytes_atomically,
)
from common.progress import progress
from common.safetensors_header import HeaderError, read_header
from data.buckets import Bucket, group_by_bucket
from data.cache_room import (
    block_size,
    cache_bytes,
    room_message,
    sd_latent_shape,
    variants_phrase,
)
from data.errors import DataError
from data.scan import ImageItem, own_or_run
from data.workers import ignore_stop_signals

if TYPE_CHECKING:
    import torch

LATENT_CACHE_FOLDER = ".latent_cache"  # under data_root unless latent_cache_dir says otherwise
HASH_INDEX = "content_hashes.json"  # path -> (size, mtime_ns, sha256): unchanged files are not read again
KEYS = ("mean", "std")  # what an entry holds: the posterior, float32 (latent_channels, H/8, W/8) each
INDEX_RECORD_BYTES = 128  # the hash index's record of one image, besides its path
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def choose_cache_dir(data_root: Path, latent_cache_dir: str | None, fallback_root: Path) -> tuple[Path, str | None]:
    """(cache folder, notice or None): `latent_cache_dir` as given; else `<data_root>/.latent_cache`, next to the
    images it caches; else, when data_root cannot be written (a read-only mount), a folder of its own under
    `fallback_root`, named after data_root and its resolved path, and a notice saying where and why."""
    if latent_cache_dir:
        return Path(latent_cache_dir), None
    beside_data = Path(data_root) / LATENT_CACHE_FOLDER
    problem = place_problem(beside_data, "the default latent cache folder")
    if problem is None:
        return beside_data, None
    resolved = Path(data_root).resolve()
    fallback = Path(fallback_root) / f"{resolved.name}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"
    return fallback, f"Latent cache: {problem} Caching in {fallback} instead; latent_cache_dir sets the place."


@dataclass(frozen=True)
class Variant:
    """One cached latent: an image file as one bucket crop, flipped or not."""

    path: Path
    bucket: Bucket
    flip: bool


def latent_keys(items: list[ImageItem], flip_p: float) -> list[tuple[int, bool]]:
    """(item index, flip) of every latent the run can draw: flipped too for each image whose flip_p (its own,
    else the run's `flip_p`) is above 0."""
    return [(i, flip) for i, item in enumerate(items)
            for flip in ((False, True) if own_or_run(item.flip_p, flip_p) > 0 else (False,))]


def image_variants(items: list[ImageItem], flip_p: float) -> list[Variant]:
    """The variant of every (image, flip) of `latent_keys`, in its order."""
    return [Variant(items[i].path, items[i].bucket, flip) for i, flip in latent_keys(items, flip_p)]


def entry_name(sha: str, variant: Variant) -> str:
    """An entry's file name, from its image's content hash (it goes in the folder named by the hash's first 2)."""
    return f"{sha}-{variant.bucket}{'-flip' if variant.flip else ''}.safetensors"


def entry_sha(entry: Path) -> str:
    """The content hash of the image an entry was made from: the start of its name (`entry_name`)."""
    return entry.name.split("-", 1)[0]


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """A short hash of the VAE's config and every weight with its dtype: any change to either gives a new cache
    folder (the same VAE in fp16 encodes slightly differently from fp32, so it has entries of its own).

    Hashing all weights (SD's VAE is 335 MB) costs well under a second on one core, and unlike sampling a few
    tensors it cannot miss a VAE fine-tuned only in some layers.
    """
    import torch

    digest = hashlib.blake2b(digest_size=8)
    config = getattr(vae, "config", {})
    digest.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def latent_shape(vae: torch.nn.Module, bucket: Bucket) -> tuple[int, int, int]:
    """(latent_channels, H/f, W/f) of one image of `bucket`; f is 8 for SD's VAE (one halving per block but one)."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return vae.config.latent_channels, bucket.height // factor, bucket.width // factor


def read_hash_index(root: Path) -> dict[str, list]:
    """The content-hash index of the cache at `root`: resolved path -> [size, mtime_ns, sha256]; {} when there is
    none or it is damaged (a damaged index only costs re-hashing)."""
    index = Path(root) / HASH_INDEX
    if not index.is_file():
        return {}
    try:
        hashes = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return hashes if isinstance(hashes, dict) else {}


def indexed_hash(hashes: dict[str, list], path: Path) -> str | None:
    """`path`'s content hash as the index knows it, when the file is unchanged since (same size and mtime). The
    index is keyed by resolved path; a path that is already one (no link on the way, the usual case) is found
    without resolving it, which costs several system calls a file: thousands of images a second."""
    stat = path.stat()
    for resolve in (os.path.abspath, os.path.realpath):
        known = hashes.get(resolve(path))
        if known and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
            return known[2]
    return None


class LatentCache:
    def __init__(self, root: Path, fingerprint: str):
        self.root = Path(root)
        self.folder = self.root / f"vae-{fingerprint}"
        self._hashes = read_hash_index(self.root)
        self._hashes_changed = False
        self._hash_index = self.root / HASH_INDEX

    def content_hash(self, path: Path) -> str:
        known = indexed_hash(self._hashes, path)
        if known:
            return known
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        self._hashes[str(path.resolve())] = [stat.st_size, stat.st_mtime_ns, digest]
        self._hashes_changed = True
        return digest

    def entry(self, variant: Variant) -> Path:
        sha = self.content_hash(variant.path)
        return self.folder / sha[:2] / entry_name(sha, variant)

    def index_bytes(self, anew: bool = False) -> int:
        """About the bytes the hash index takes when `save_hashes` writes it now (0 when it has nothing new to
        write), or, `anew`, in a new cache folder elsewhere."""
        if not anew and not self._hashes_changed and self._hash_index.is_file():
            return 0
        return sum(len(key) + INDEX_RECORD_BYTES for key in self._hashes)

    def save_hashes(self) -> None:
        """Write the content-hash index (the one writer's job), when it learned new hashes. A process that finds
        everything already indexed writes nothing: the other processes of a multi-process run, which read the
        cache after the main one filled it."""
        self.root.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(self.root)
        gitignore = self.root / ".gitignore"
        if not gitignore.exists():
            write_bytes_atomically(gitignore, b"# written by the trainer: cached VAE latents, safe to delete\n*\n")
        if self._hashes_changed or not self._hash_index.is_file():
            write_bytes_atomically(self._hash_index, json.dumps(self._hashes).encode("utf-8"))
            self._hashes_changed = False


def entry_problem(path: Path, shape: tuple[int, ...], keys: tuple[str, ...] = KEYS) -> str | None:
    """Why the cache entry at `path` cannot be used, or None: it must be a whole safetensors file of exactly
    `keys` (a latent's `KEYS`; a mask's, data/masking/cache.py), each float32 of `shape`. Reads only its header
    (common/safetensors_header.py), so checking every entry before a run costs a few hundred bytes each."""
    try:
        header = read_header(path)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    except HeaderError as err:
        return str(err)
    if sorted(header.tensors) != sorted(keys):
        return f"holds {sorted(header.tensors) or 'no tensors'}, expected exactly {' and '.join(keys)}"
    for name, info in sorted(header.tensors.items()):
        if (info.dtype, info.shape) != ("F32", tuple(shape)):
            return f"{name} is {info.dtype} {list(info.shape)}, expected F32 {list(shape)}"
    return header.size_problem()


def save_posterior(path: Path, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Write one entry whole or not at all. Serialized in memory (an entry is at most a few hundred KiB) and written
    through our own partial: safetensors' save_file writes through a temporary of its own, which a killed run
    would leave under a name no clean-up knows, and reports a full disk as SafetensorError, not OSError."""
    from safetensors.torch import save

    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(path, save({"mean": mean.contiguous(), "std": std.contiguous()}))


class DamagedEntry(Exception):
    """A cache entry found unusable while the run reads it; the text says why, as `entry_problem` words it."""


def read_entry(path: Path, shape: tuple[int, ...], keys: tuple[str, ...] = KEYS) -> dict[str, torch.Tensor]:
    """The tensors of the entry at `path`, checked as `entry_problem` checks one before the run, but on the tensors
    read (the file may have changed since, and between two reads): raises DamagedEntry for an entry damaged,
    replaced or deleted since."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(path.read_bytes())
    except (OSError, SafetensorError):
        tensors = {}
    if sorted(tensors) != sorted(keys) or any((t.dtype, tuple(t.shape)) != (torch.float32, tuple(shape))
                                              for t in tensors.values()):
        raise DamagedEntry(entry_problem(path, shape, keys) or "it changed while it was read")
    return tensors


def uncached_variants(root: Path, variants: list[Variant]) -> tuple[list[Variant], int]:
    """(the variants with no entry in the cache at `root`, how many hash-prefix folders their entries need that
    do not exist), judged without reading an image or knowing the VAE, for the preflight.

    An image's content hash comes from the hash index; an image the index does not know, or that changed since,
    counts as not cached (hashing it would read the whole data set). An entry under any VAE's folder counts as
    cached: which VAE the run uses is known once it loads, and `fill_cache` checks the exact need then.
    """
    folders = [f for f in Path(root).glob("vae-*") if f.is_dir()] if Path(root).is_dir() else []
    if not folders:
        return list(variants), min(len({v.path for v in variants}), 256)
    hashes = read_hash_index(root)
    shas = {path: indexed_hash(hashes, path) for path in {v.path for v in variants}}
    names, prefixes = set(), set()
    for folder in folders:
        for sub in os.scandir(folder):
            if sub.is_dir():
                prefixes.add(sub.name)
                names.update(os.listdir(sub.path))
    todo = [v for v in variants if shas[v.path] is None or entry_name(shas[v.path], v) not in names]
    new_prefixes = {shas[v.path][:2] for v in todo if shas[v.path] is not None} - prefixes
    return todo, min(len(new_prefixes) + sum(1 for sha in shas.values() if sha is None), 256)


def room_problem_before_load(root: Path, items: list[ImageItem], flip_p: float) -> str | None:
    """Why the disk of the cache at `root` cannot take the entries of `items` not yet cached (`uncached_variants`,
    sized for SD's VAE), or None. The preflight's check, before any model loads: no torch, no image read."""
    variants = image_variants(items, flip_p)
    todo, new_folders = uncached_variants(root, variants)
    if not todo:
        return None
    block = block_size(root)
    index = sum(len(os.path.abspath(item.path)) + INDEX_RECORD_BYTES for item in items)
    needed = cache_bytes((sd_latent_shape(v.bucket) for v in todo), new_folders, index, block)
    free = free_bytes(root)
    if free >= needed:
        return None
    what = variants_phrase(len(todo), variants, "not yet cached")
    return room_message(root, what, needed, free)


def check_room(cache: LatentCache, missing: list[Variant], variants: list[Variant], vae: torch.nn.Module) -> None:
    """Raise DataError when the cache's disk cannot take the `missing` entries: `room_problem_before_load`'s check
    again, exact now that the VAE (and so each entry's shape and folder) is known."""
    if not missing:
        return
    block = block_size(cache.root)
    new_folders = len({cache.entry(v).parent for v in missing if not cache.entry(v).parent.is_dir()})
    needed = cache_bytes((latent_shape(vae, v.bucket) for v in missing), new_folders, cache.index_bytes(), block)
    free = free_bytes(cache.root)
    if free < needed:
        raise DataError(room_message(cache.root, variants_phrase(len(missing), variants, "to encode"), needed, free))


def disk_filled_message(cache: LatentCache, err: OSError, missing: list[Variant], variants: list[Variant],
                        vae: torch.nn.Module) -> str:
    """The disk filled during the fill (another program wrote to it): where, what is left to encode and what is
    free, that the entries written are kept, and the ways on."""
    left = [v for v in missing if not cache.entry(v).is_file()]
    block = block_size(cache.root)
    shapes = {v: latent_shape(vae, v.bucket) for v in variants}
    left_bytes = cache_bytes((shapes[v] for v in left), 0, 0, block)
    folders = len({cache.entry(v).parent for v in variants})
    whole = cache_bytes(shapes.values(), folders, cache.index_bytes(anew=True), block)
    written = len(missing) - len(left)
    what = variants_phrase(len(left), variants, "still to encode")
    return (f"the disk of the latent cache filled up while it was written ({err.strerror or err}, in "
            f"{cache.folder}): {what} need about {human_bytes(left_bytes)} more, and "
            f"{human_bytes(free_bytes(cache.root))} is free. The {written} entr{'y' if written == 1 else 'ies'} "
            f"written {'is' if written == 1 else 'are'} whole, and the next run reuses "
            f"{'it' if written == 1 else 'them'}. Free some space there and run again, or set latent_cache_dir to "
            f"a folder on a disk with about {human_bytes(whole)} free (the whole cache; --latent_cache_dir "
            "<folder>), or turn the cache off with --cache_latents false.")


class _VariantPixels:
    """A map-style dataset (all a DataLoader needs) of the variants' pixels."""

    def __init__(self, variants: list[Variant]):
        self.variants = variants

    def __len__(self) -> int:
        return len(self.variants)

    def __getitem__(self, index: int) -> torch.Tensor:
        from data.pixels import bucket_pixels

        v = self.variants[index]
        return bucket_pixels(v.path, v.bucket, v.flip)


def damaged_entries(cache: LatentCache, variants: list[Variant], vae: torch.nn.Module) -> dict[Variant, str]:
    """The variants whose cache entry exists but cannot be used, with the reason (see `entry_problem`). Minutes for a
    large data set the first time: finding an entry hashes its image, which reads the whole file."""
    damaged = {}
    with progress("Latent cache: looking up", total=len(variants), unit="image variants") as bar:
        for variant in variants:
            path = cache.entry(variant)
            if path.exists() or path.is_symlink():
                problem = entry_problem(path, latent_shape(vae, variant.bucket))
                if problem:
                    damaged[variant] = problem
            bar.update()
    return damaged


def damage_notice(cache: LatentCache, damaged: dict[Variant, str]) -> str:
    variant, problem = next(iter(damaged.items()))
    count = len(damaged)
    return (
        f"Latent cache: {count} damaged entr{'y' if count == 1 else 'ies'} will be encoded again, e.g. "
        f"{cache.entry(variant).relative_to(cache.root)} ({variant.path.name}): {problem}. Nothing to do; if this "
        f"recurs, check the disk that holds {cache.root}."
    )


def fill_cache(
    cache: LatentCache, variants: list[Variant], vae: torch.nn.Module, batch_size: int, num_workers: int
) -> tuple[int, int]:
    """Encode every variant not yet in `cache`, or whose entry is damaged (said in one line); returns (encoded,
    already cached). Main process only.

    Raises DataError, before encoding, when the disk cannot take the entries to write (`check_room`), and when it
    fills during the fill all the same (another program writing there): the entries written are whole and kept.
    """
    damaged = damaged_entries(cache, variants, vae)
    if damaged:
        say(damage_notice(cache, damaged))
        for variant in damaged:
            remove(cache.entry(variant))  # a folder or a link in an entry's place would refuse the new file
    missing = [v for v in variants if not cache.entry(v).is_file()]
    for folder in sorted({cache.entry(v).parent for v in missing}):
        remove_stale_partials(folder)  # what a killed fill left (before the room is measured: it frees some)
    check_room(cache, missing, variants, vae)
    try:
        cache.save_hashes()
        if missing:
            _encode(cache, missing, len(variants), vae, batch_size, num_workers)
    except OSError as err:
        if err.errno not in NO_SPACE:  # a read-only or failing disk: trainer/failures.py says those in one line
            raise
        raise DataError(disk_filled_message(cache, err, missing, variants, vae)) from None
    return len(missing), len(variants) - len(missing)


def _encode(cache: LatentCache, missing: list[Variant], total: int, vae: torch.nn.Module, batch_size: int,
            num_workers: int) -> None:
    """Write the entries of `missing`, each whole or not at all. Encodes on the GPU when there is one (the VAE goes
    back where it was afterwards), batching variants of one bucket together while worker processes decode the
    next images."""
    import torch

    from data.encode import encode_posterior

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    home = next(vae.parameters()).device
    say(f"Latent cache: encoding {len(missing)} of {total} image variants on {device} into {cache.folder}.")
    vae.to(device)
    try:
        with progress("Latent cache: encoding", total=len(missing), unit="image variants") as bar:
            for group in group_by_bucket(missing).values():
                loader = torch.utils.data.DataLoader(
                    _VariantPixels(group), batch_size=batch_size, num_workers=num_workers,
                    pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals,
                )
                done = 0
                for pixels in loader:
                    mean, std = encode_posterior(vae, pixels)
                    for i, variant in enumerate(group[done : done + len(pixels)]):
                        save_posterior(cache.entry(variant), mean[i], std[i])
                    done += len(pixels)
                    bar.update(len(pixels))
    finally:
        vae.to(home)
