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
safetensors, unreadable) is encoded again, with one notice. One writer: the main process fills the cache before
training (`fill_cache`); other processes only read it, so multi-process runs call `fill_cache` on rank 0, wait
at a barrier, then build their loaders.

torch is imported only by the functions that encode or read latents: the preflight and `--dry_run` choose the
cache folder from here without it, in seconds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common.console import say
from common.files import atomic_file, place_problem, remove, remove_stale_partials, write_bytes_atomically
from common.safetensors_header import HeaderError, read_header
from data.buckets import Bucket, group_by_bucket
from data.workers import ignore_stop_signals

if TYPE_CHECKING:
    import torch

LATENT_CACHE_FOLDER = ".latent_cache"  # under data_root unless latent_cache_dir says otherwise
HASH_INDEX = "content_hashes.json"  # path -> (size, mtime_ns, sha256): unchanged files are not read again
KEYS = ("mean", "std")  # what an entry holds: the posterior, float32 (latent_channels, H/8, W/8) each


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


class LatentCache:
    def __init__(self, root: Path, fingerprint: str):
        self.root = Path(root)
        self.folder = self.root / f"vae-{fingerprint}"
        self._hashes: dict[str, list] = {}
        self._hashes_changed = False
        self._hash_index = self.root / HASH_INDEX
        if self._hash_index.is_file():
            try:
                self._hashes = json.loads(self._hash_index.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                self._hashes = {}  # a damaged index only costs re-hashing

    def content_hash(self, path: Path) -> str:
        stat = path.stat()
        key = str(path.resolve())
        known = self._hashes.get(key)
        if known and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
            return known[2]
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        self._hashes[key] = [stat.st_size, stat.st_mtime_ns, digest]
        self._hashes_changed = True
        return digest

    def entry(self, variant: Variant) -> Path:
        sha = self.content_hash(variant.path)
        name = f"{sha}-{variant.bucket}{'-flip' if variant.flip else ''}.safetensors"
        return self.folder / sha[:2] / name

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


def entry_problem(path: Path, shape: tuple[int, ...]) -> str | None:
    """Why the cache entry at `path` cannot be used, or None: it must be a whole safetensors file of exactly
    `KEYS`, each float32 of `shape`. Reads only its header (common/safetensors_header.py), so checking every
    entry before a run costs a few hundred bytes each."""
    try:
        header = read_header(path)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    except HeaderError as err:
        return str(err)
    if sorted(header.tensors) != sorted(KEYS):
        return f"holds {sorted(header.tensors) or 'no tensors'}, expected exactly {' and '.join(KEYS)}"
    for name, info in sorted(header.tensors.items()):
        if (info.dtype, info.shape) != ("F32", tuple(shape)):
            return f"{name} is {info.dtype} {list(info.shape)}, expected F32 {list(shape)}"
    return header.size_problem()


def save_posterior(path: Path, mean: torch.Tensor, std: torch.Tensor) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as partial:
        save_file({"mean": mean.contiguous(), "std": std.contiguous()}, str(partial))


def load_posterior(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    return tensors["mean"], tensors["std"]


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
    """The variants whose cache entry exists but cannot be used, with the reason (see `entry_problem`)."""
    damaged = {}
    for variant in variants:
        path = cache.entry(variant)
        if path.exists() or path.is_symlink():
            problem = entry_problem(path, latent_shape(vae, variant.bucket))
            if problem:
                damaged[variant] = problem
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

    Encodes on the GPU when there is one (the VAE goes back where it was afterwards), batching variants of one
    bucket together while worker processes decode the next images.
    """
    import torch

    from data.encode import encode_posterior

    damaged = damaged_entries(cache, variants, vae)
    if damaged:
        say(damage_notice(cache, damaged))
        for variant in damaged:
            remove(cache.entry(variant))  # a folder or a link in an entry's place would refuse the new file
    missing = [v for v in variants if not cache.entry(v).is_file()]
    cache.save_hashes()
    if not missing:
        return 0, len(variants)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    home = next(vae.parameters()).device
    say(f"Latent cache: encoding {len(missing)} of {len(variants)} image variants on {device} into {cache.folder}.")
    for folder in sorted({cache.entry(v).parent for v in missing}):
        remove_stale_partials(folder)  # what a killed fill left
    vae.to(device)
    try:
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
    finally:
        vae.to(home)
    return len(missing), len(variants) - len(missing)
