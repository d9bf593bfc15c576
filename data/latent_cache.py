"""VAE latents computed once and kept on disk, so later epochs and later runs skip the VAE encoder.

The VAE is frozen, so an image's latent depends only on (its pixels, its bucket crop, its flip, the VAE
weights); the cache key is exactly that:

    <cache dir>/vae-<fingerprint>/<sha256 of file>[:2]/<sha256>-<W>x<H>[-flip].safetensors

A changed image has a new content hash, a different VAE a new fingerprint folder; either way the entry is
encoded afresh, and stale entries are simply never read (delete the folder to reclaim the space).

What is stored is the VAE's posterior, mean and std, not one sample from it: each step then draws a new sample
(`mean + std * noise`), exactly what encoding the image every step would give, at a file read's cost.
Crops are deterministic (center, see data/buckets.py), so the only variants are flipped and not; both are
cached when flip_p > 0.

The default folder is `<data_root>/.latent_cache` (`latent_cache_dir` moves it); it holds a `.gitignore` of
`*` so a data set kept in git does not pick it up. One writer: the main process fills the cache before
training (`fill_cache`); other processes only read it, so multi-process runs call `fill_cache` on rank 0,
wait at a barrier, then build their loaders.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from data.buckets import Bucket
from data.images import load_for_bucket
from data.pixels import to_tensor

HASH_INDEX = "content_hashes.json"  # path -> (size, mtime_ns, sha256): unchanged files are not read again


@dataclass(frozen=True)
class Variant:
    """One cached latent: an image file as one bucket crop, flipped or not."""

    path: Path
    bucket: Bucket
    flip: bool


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """A short hash of the VAE's config and every weight: any change to either gives a new cache folder.

    Hashing all weights (SD's VAE is 335 MB) costs well under a second on one core, and unlike sampling a few
    tensors it cannot miss a VAE fine-tuned only in some layers.
    """
    digest = hashlib.blake2b(digest_size=8)
    config = getattr(vae, "config", {})
    digest.update(json.dumps(dict(config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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
        """Write the content-hash index (the one writer's job) atomically, when it learned new hashes. A process
        that finds everything already indexed writes nothing: the other processes of a multi-process run, which
        read the cache after the main one filled it."""
        self.root.mkdir(parents=True, exist_ok=True)
        gitignore = self.root / ".gitignore"
        if not gitignore.exists():
            gitignore.write_text("# written by the trainer: cached VAE latents, safe to delete\n*\n", encoding="utf-8")
        if self._hashes_changed or not self._hash_index.is_file():
            _atomic_write(self._hash_index, json.dumps(self._hashes).encode("utf-8"))
            self._hashes_changed = False


def _atomic_write(path: Path, data: bytes) -> None:
    temp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    temp.write_bytes(data)
    os.replace(temp, path)  # readers see the old file or the new one, never half of one


def save_posterior(path: Path, mean: torch.Tensor, std: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    save_file({"mean": mean.contiguous(), "std": std.contiguous()}, str(temp))
    os.replace(temp, path)


def load_posterior(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = load_file(str(path))
    return tensors["mean"], tensors["std"]


class _VariantPixels(torch.utils.data.Dataset):
    def __init__(self, variants: list[Variant]):
        self.variants = variants

    def __len__(self) -> int:
        return len(self.variants)

    def __getitem__(self, index: int) -> torch.Tensor:
        v = self.variants[index]
        return to_tensor(load_for_bucket(v.path, v.bucket, v.flip))


@torch.no_grad()
def fill_cache(
    cache: LatentCache, variants: list[Variant], vae: torch.nn.Module, batch_size: int, num_workers: int
) -> tuple[int, int]:
    """Encode every variant not yet in `cache`; returns (encoded, already cached). Main process only.

    Encodes on the GPU when there is one (the VAE goes back where it was afterwards), batching variants of one
    bucket together while worker processes decode the next images.
    """
    missing = [v for v in variants if not cache.entry(v).is_file()]
    cache.save_hashes()
    if not missing:
        return 0, len(variants)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    home = next(vae.parameters()).device
    print(f"Latent cache: encoding {len(missing)} of {len(variants)} image variants on {device} into {cache.folder}.")
    vae.to(device)
    try:
        by_bucket: dict[Bucket, list[Variant]] = {}
        for v in missing:
            by_bucket.setdefault(v.bucket, []).append(v)
        for group in by_bucket.values():
            loader = torch.utils.data.DataLoader(
                _VariantPixels(group), batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda"
            )
            done = 0
            for pixels in loader:
                posterior = vae.encode(pixels.to(device, torch.float32)).latent_dist
                mean, std = posterior.mean.float().cpu(), posterior.std.float().cpu()
                for i, variant in enumerate(group[done : done + len(pixels)]):
                    save_posterior(cache.entry(variant), mean[i], std[i])
                done += len(pixels)
    finally:
        vae.to(home)
    sys.stdout.flush()
    return len(missing), len(variants) - len(missing)
