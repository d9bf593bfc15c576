"""The training DataLoader: scanned images -> per-epoch bucket batches -> tensors the loop takes.

Each batch is one of (all rows share one bucket size H x W, multiples of 64):
    {"input_ids": (B, 77), "pixel_values": (B, 3, H, W) in [-1, 1], "loss_weight": (B,), "seed": [B ints],
     "caption_ids": [B bytes]}  cache off
    {"input_ids": (B, 77), "latents": (B, 4, H/8, W/8) x vae scaling_factor, "loss_weight": (B,), "seed": [...],
     "caption_ids": [...]}  cache on
With masked_training each batch also holds "mask_weights": (B, 1, H, W) (cache off) or (B, 1, H/8, W/8) (cache on),
each row's weight map (data/masking/masks.py; ones for an image without a mask), which the loss brings to the latents'
size and multiplies the elementwise loss by.
`loss_weight` is 0 for the rows that fill a group's last batch (see data/schedule.py), else the image's
loss_scale (1 unless its data files set one): trainer/objective/loss.py `compute_loss` multiplies each row's loss by it
and divides the sum by the batch size. `seed` is each row's `Draw.seed`, from which the objective draws that
row's noise (trainer/objective/loss.py `row_generators`). `caption_ids` are the bytes of each row's token ids, kept on
the host: the key by which a frozen text encoder's states are reused (trainer/objective/text_cache.py). Bytes, not tuples of
ints: accelerate walks every element of a tuple on its way to the device, 77 per row, each step.

On a CUDA machine batches come in pinned memory, so that their copy to the GPU can be queued without blocking.

A latent-cache entry is checked as it is read (`CachedLatents`), as the run's start checks each: one damaged,
replaced or deleted during the run is encoded again from its image where the VAE is at hand, else it ends the run
in one DataError that names it and the way on; a file that trained would otherwise be lost or, of another shape,
silently train something else.

With N processes the sampler yields global batches of N x batch_size rows from one bucket and accelerate
(`split_batches`) gives process i the i-th slice: together the processes train exactly the batches one process
with batch N x batch_size would.

Every random choice (repeats, order, flips, tag shuffles, caption dropout, the latent sample) comes from the
run's seed and the epoch through `Draw.seed`, so results do not depend on num_workers.

The settings come as `DataOptions` (data/options.py), or any object with its attributes (the training config);
an image's own flip_p, cond_dropout and shuffle_tags (`ImageItem`, from its data files) win over them.
"""

from __future__ import annotations

import hashlib
import io
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import CLIPTokenizer

from common.console import say
from data.captions import shuffle_tags, tokenize_captions
from data.encode import encode_posterior, scaled_latents
from data.errors import DataError, read_during_run
from data.latent_cache import (
    LATENT_CACHE_FOLDER,
    DamagedEntry,
    LatentCache,
    Variant,
    entry_sha,
    fill_cache,
    image_variants,
    latent_keys,
    latent_shape,
    read_entry,
    save_posterior,
    vae_fingerprint,
)
from data.masking.cache import MASK_KEYS, fill_masks
from data.masking.masks import MaskWeighting, bucket_mask, checked_masks
from data.options import DataOptions
from data.pixels import bucket_pixels
from data.scan import ImageItem, Scan, own_or_run, scan_data_root
from data.schedule import Draw, batches_per_epoch, epoch_batches
from data.workers import ignore_stop_signals

# Captions tokenized once and reused (the tokenizer is the largest part of preparing a row); a bound for shuffled
# tags, whose captions rarely repeat: ~1 KiB each.
MAX_TOKENIZED = 65536


Key = tuple[int, bool]  # (item index, flip): one latent the run can draw
AGAIN = "then continue from the run's last save with --resume_state findlast."


class CachedLatents:
    """The run's latent-cache entries by `Key`, each read whole and checked (`read_entry`). One found damaged,
    replaced or deleted since the run's start is encoded again from its image, as the start would, where the VAE is
    at hand: in the process that filled or read the cache, not in a DataLoader worker (a forked copy of a model on
    the GPU cannot run there, and a worker loading its own would add a writer, on another device). Its image must
    still be the one the entry was made from: another image's latent would train under the old one's caption.
    Anything else is one DataError naming the entry and the way on."""

    def __init__(self, cache: LatentCache, keys: list[Key], variants: list[Variant], vae: torch.nn.Module):
        self.root = cache.root
        self.variants = dict(zip(keys, variants))
        self.entries = {key: cache.entry(v) for key, v in self.variants.items()}
        self.shapes = {key: latent_shape(vae, v.bucket) for key, v in self.variants.items()}
        self.vae: torch.nn.Module | None = vae
        self.said = False  # that entries damaged during the run are encoded again

    def __getstate__(self) -> dict:
        return {**self.__dict__, "vae": None}  # a worker started by spawn gets no VAE (nor a GPU model pickled)

    def read(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        """The entry's posterior (mean, std), float32 of its latents' shape."""
        try:
            tensors = read_entry(self.entries[key], self.shapes[key])
        except DamagedEntry as damage:
            problem = str(damage)
        else:
            return tensors["mean"], tensors["std"]
        if self.vae is None or torch.utils.data.get_worker_info() is not None:
            raise DataError(
                f"the latent-cache entry {self.entries[key]} can no longer be read ({problem}): it was changed or "
                "deleted during the run, and a DataLoader worker has no VAE to encode it again (with num_workers 0 "
                f"the run does it itself). Remove it (the next start encodes it again), {AGAIN}")
        return self._encode_again(key, problem)

    def _encode_again(self, key: Key, problem: str) -> tuple[torch.Tensor, torch.Tensor]:
        variant, entry = self.variants[key], self.entries[key]
        try:
            image = variant.path.read_bytes()
            changed = hashlib.sha256(image).hexdigest() != entry_sha(entry) and "changed since the run started"
        except OSError as err:
            changed = f"can no longer be read ({err.strerror or err})"
        if changed:
            raise DataError(
                f"the latent-cache entry {entry} can no longer be read ({problem}), and its image {variant.path} "
                f"{changed}, so it cannot be encoded again. Put the image back as it was, or remove it, {AGAIN}")
        pixels = bucket_pixels(io.BytesIO(image), variant.bucket, variant.flip)
        mean, std = encode_posterior(self.vae, pixels[None])
        save_posterior(entry, mean[0], std[0])
        if not self.said:
            say(f"Latent cache: the entry {entry.relative_to(self.root)} ({variant.path.name}) was damaged during the "
                f"run ({problem}); it was encoded again from its image, as any other found damaged will be. Nothing "
                f"to do; if this recurs, check the disk that holds {self.root}.")
        self.said = True
        return mean[0], std[0]


class TrainDataset(torch.utils.data.Dataset):
    """Indexed by `Draw` (from BucketBatchSampler), not by int: a row needs its flip and seed too."""

    def __init__(
        self,
        items: list[ImageItem],
        tokenizer: CLIPTokenizer,
        options: DataOptions,
        latents: CachedLatents | None = None,
        scaling_factor: float = 1.0,
        masks: dict[Key, Path] | None = None,
    ):
        self.items = items
        self.tokenizer = tokenizer
        self.cond_dropout = options.cond_dropout
        self.shuffle_tags = options.shuffle_tags
        self.keep_tags = options.keep_tags
        self.latents = latents  # the cache entry of each (item index, flip)
        self.scaling_factor = scaling_factor
        self.weighting = MaskWeighting.of(options)  # None: no masked training
        self.masks = masks  # (item index, flip) -> cached latent-size mask (data/masking/cache.py), with latents
        self._token_ids: dict[str, torch.Tensor] = {}  # caption -> its token ids (each worker has its own)

    def __len__(self) -> int:
        return len(self.items)  # distinct images; an epoch's length (with repeats) is the sampler's

    def caption(self, draw: Draw) -> str:
        rng = random.Random(draw.seed)
        item = self.items[draw.index]
        # cond_dropout: training some steps on the empty caption teaches the unconditional prediction that
        # classifier-free guidance subtracts at sampling time (Ho & Salimans 2022)
        if rng.random() < own_or_run(item.cond_dropout, self.cond_dropout):
            return ""
        return shuffle_tags(item.caption, self.keep_tags, rng) if own_or_run(item.shuffle_tags, self.shuffle_tags) \
            else item.caption

    def loss_weight(self, draw: Draw) -> float:
        """The row's weight in the loss: the draw's (0 for a filler row) times its image's loss_scale."""
        loss_scale = self.items[draw.index].loss_scale
        return draw.weight if loss_scale is None else draw.weight * loss_scale

    def token_ids(self, caption: str) -> torch.Tensor:
        ids = self._token_ids.get(caption)
        if ids is None:
            ids = tokenize_captions(self.tokenizer, [caption])[0]
            if len(self._token_ids) < MAX_TOKENIZED:
                self._token_ids[caption] = ids
        return ids

    def __getitem__(self, draw: Draw) -> dict[str, torch.Tensor]:
        input_ids = self.token_ids(self.caption(draw))
        row = {"input_ids": input_ids, "loss_weight": torch.tensor(self.loss_weight(draw)), "seed": draw.seed}
        if self.latents is None:
            item = self.items[draw.index]
            row["pixel_values"] = read_during_run(lambda: bucket_pixels(item.path, item.bucket, draw.flip), item.path,
                                                  "image")
        else:
            mean, std = self.latents.read((draw.index, draw.flip))
            noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(draw.seed))
            row["latents"] = scaled_latents(mean, std, noise, self.scaling_factor)
        if self.weighting is not None:
            row["mask_weights"] = self.mask_weights(draw, row)
        return row

    def mask_weights(self, draw: Draw, row: dict[str, torch.Tensor]) -> torch.Tensor:
        """The row's weight map (data/masking/masks.py): at the latents' size from the cache, else at the bucket's pixels
        from the mask file; ones for an image without a mask."""
        item = self.items[draw.index]
        if item.mask is None:
            pixels = row.get("latents", row.get("pixel_values"))
            return torch.ones(1, *pixels.shape[-2:])
        if self.masks is None:
            mask = read_during_run(lambda: bucket_mask(item, draw.flip), item.mask, "mask")
        else:
            mask = self.cached_mask((draw.index, draw.flip))
        return self.weighting(mask)

    def cached_mask(self, key: Key) -> torch.Tensor:
        """A mask from the cache (1, h, w), checked as the latents' entries are; one damaged since ends the run
        (the next start makes it again)."""
        entry = self.masks[key]
        try:
            return read_entry(entry, (1, *self.latents.shapes[key][1:]), MASK_KEYS)["mask"]
        except DamagedEntry as damage:
            raise DataError(f"the latent-cache entry {entry} can no longer be read ({damage}): it was changed or "
                            f"deleted during the run. Remove it (the next start makes it again), {AGAIN}") from None


def collate(rows: list[dict]) -> dict:
    """torch's default collation, except that row seeds stay a list of ints: they seed CPU generators, and as a
    tensor accelerate would move them to the GPU, to be read back (a sync) every step. The rows' token ids are
    also kept on the host, as bytes (`caption_ids`), for the same reason."""
    seeds = [row.pop("seed") for row in rows]
    caption_ids = [row["input_ids"].numpy().tobytes() for row in rows]
    return {**torch.utils.data.default_collate(rows), "seed": seeds, "caption_ids": caption_ids}


class BucketBatchSampler(torch.utils.data.Sampler[list[Draw]]):
    """Yields the batches of Draws (data/schedule.py) of the epoch last given to `set_epoch` (0 before).

    The epoch changes only through `set_epoch`, which the training loop calls before each pass (accelerate's
    own set_epoch does not reach a batch sampler wrapped in its BatchSamplerShard). It must not count up by
    itself: torch's multi-worker loader iterates a batch sampler twice when it starts, which made runs with
    num_workers > 0 train a different schedule from runs without workers, or with more processes."""

    def __init__(self, items: list[ImageItem], batch_size: int, flip_p: float, seed: int):
        self.items, self.batch_size, self.flip_p, self.seed = items, batch_size, flip_p, seed
        self.epoch = 0
        self._length = batches_per_epoch(items, batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._length

    def __iter__(self):
        batches = epoch_batches(self.items, self.batch_size, self.flip_p, self.seed, self.epoch)
        assert len(batches) == self._length, "schedule.py promises the same batch count every epoch"
        return iter(batches)


def default_cache_dir(data_root: str | Path) -> Path:
    """`<data_root>/.latent_cache`: where a caller that did not choose (`choose_cache_dir`) gets its cache."""
    return Path(data_root) / LATENT_CACHE_FOLDER


def prepare_latents(
    options: DataOptions, scan: Scan, vae: torch.nn.Module, cache_dir: Path
) -> tuple[CachedLatents, dict[Key, Path] | None]:
    """Fill the latent cache in `cache_dir` for every (image, flip) the run can draw (`latent_keys`), and with
    masked training their masks (data/masking/cache.py); returns their entries: (latents, masks or None).

    The one place that writes the cache: in a multi-process run, call it on the main process first.
    """
    cache = LatentCache(cache_dir, vae_fingerprint(vae))
    keys = latent_keys(scan.items, options.flip_p)  # the same rule the preflight sized the cache by
    variants = image_variants(scan.items, options.flip_p)
    encoded, reused = fill_cache(cache, variants, vae, options.batch_size, options.num_workers)
    say(f"Latent cache: {encoded} encoded, {reused} reused, in {cache.folder}.")
    masks = fill_masks(cache, scan.items, keys, vae) if options.masked_training else None
    return CachedLatents(cache, keys, variants, vae), masks


def build_dataloader(
    options: DataOptions,
    tokenizer: CLIPTokenizer,
    vae: torch.nn.Module | None = None,
    scan: Scan | None = None,
    num_processes: int = 1,
    cache_dir: Path | None = None,
) -> torch.utils.data.DataLoader:
    """Scan data_root (unless `scan` is given), report it, fill the latent cache in `cache_dir` (None:
    `<data_root>/.latent_cache`) when cache_latents is on (needs the frozen `vae`), and return the DataLoader of
    bucket batches described in this module's docstring: global batches of `num_processes` x batch_size rows,
    for accelerate to split between the processes. Its workers leave stop signals to this process
    (data/workers.py)."""
    if scan is None:
        scan, _, _ = checked_masks(scan_data_root(Path(options.data_root), options.resolution), options)
        scan.tell()
    latents, masks, scaling_factor = None, None, 1.0
    if options.cache_latents:
        if vae is None:
            raise ValueError("cache_latents is on: build_dataloader needs the VAE to fill the cache")
        cache_dir = default_cache_dir(options.data_root) if cache_dir is None else cache_dir
        (latents, masks), scaling_factor = prepare_latents(options, scan, vae, cache_dir), vae.config.scaling_factor
    dataset = TrainDataset(scan.items, tokenizer, options, latents, float(scaling_factor), masks)
    batch_sampler = BucketBatchSampler(scan.items, options.batch_size * num_processes, options.flip_p, options.seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        collate_fn=collate,
        num_workers=options.num_workers,
        persistent_workers=options.num_workers > 0,  # no worker start-up (and tokenizer copy) every epoch
        prefetch_factor=4 if options.num_workers > 0 else None,  # batches prepared ahead while the GPU works
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=ignore_stop_signals,
    )


@dataclass
class TrainingData:
    loader: torch.utils.data.DataLoader
    validation: dict[str, list[dict[str, torch.Tensor]]]  # set name -> fixed batches (data/validation.py)

    @property
    def sampler(self) -> BucketBatchSampler:
        return self.loader.batch_sampler


def build_training_data(
    options: DataOptions,
    tokenizer: CLIPTokenizer,
    vae: torch.nn.Module,
    num_processes: int = 1,
    cache_dir: Path | None = None,
    scan: Scan | None = None,
    held_out: dict[str, list[ImageItem]] | None = None,
) -> TrainingData:
    """The training loader and the encoded validation sets; says the scan report of the training images.

    `scan` and `held_out` are the training images and the validation sets ({name: images}) when the caller has
    them already (train.py's preflight); else data_root is scanned and the validation images held out here. Writes the latent
    cache in `cache_dir` (None: `<data_root>/.latent_cache`; `choose_cache_dir` picks it from the config) when
    cache_latents is on: in a multi-process run, call it on the main process first (train.py does), so the
    others find the cache full and only read it."""
    from data.validation import encode_validation_set, validation_items

    if scan is None:
        scan, items = validation_items(options, scan_data_root(Path(options.data_root), options.resolution))
        scan, held_out, lines = checked_masks(scan, options, {"validation": items} if items else {})
        for line in lines:
            say(line)
    scan.tell()
    loader = build_dataloader(options, tokenizer, vae, scan=scan, num_processes=num_processes, cache_dir=cache_dir)
    validation = {name: encode_validation_set(items, tokenizer, vae, options.batch_size, MaskWeighting.of(options))
                  for name, items in (held_out or {}).items() if items}
    return TrainingData(loader, validation)
