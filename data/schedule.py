"""Which images each epoch trains on, in which batches: repeats, flips, bucket batches, shuffling.

A pure function of (items, batch size, flip_p, seed, epoch), so every process and every worker agrees on it,
a resumed run can replay it, and the dry run can count steps without torch.

- multiply.txt: the whole part repeats every image; the fraction picks that share of each folder's images
  anew each epoch, split over the folder's buckets by largest remainder, so each bucket's count (and so the
  number of batches per epoch, which the LR schedule is built on) is the same every epoch.
- Each batch holds one bucket. A bucket's last, under-full batch is filled with other images of the same bucket
  with `weight` 0: shapes stay fixed, and a loss that honours the weights (sum of weight x loss / batch size)
  gives every real image the same 1/batch_size share, however full its batch was.
- Batches are shuffled across buckets so consecutive steps mix aspect ratios.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass

from data.buckets import Bucket
from data.scan import ImageItem


@dataclass(frozen=True)
class Draw:
    """One row of a batch: which image, flipped or not, the seed for its caption/noise choices, its loss weight."""

    index: int  # into the items list
    flip: bool
    seed: int
    weight: float = 1.0


def _epoch_rng(seed: int, epoch: int, salt: str) -> random.Random:
    return random.Random(f"{seed}/{epoch}/{salt}")  # str seeds hash stably across processes and runs


def epoch_items(items: list[ImageItem], seed: int, epoch: int) -> dict[Bucket, list[int]]:
    """Item indices trained this epoch (with repeats), per bucket, in a stable order."""
    groups: dict[tuple, list[int]] = defaultdict(list)  # (folder, bucket) -> indices
    for index, item in enumerate(items):
        groups[(item.path.parent, item.bucket)].append(index)
    per_bucket: dict[Bucket, list[int]] = defaultdict(list)
    rng = _epoch_rng(seed, epoch, "multiply")
    for folder in sorted({folder for folder, _ in groups}):
        folder_groups = sorted(((b, idx) for (f, b), idx in groups.items() if f == folder), key=lambda g: g[0])
        factor = items[folder_groups[0][1][0]].multiply
        whole, fraction = int(factor), factor - int(factor)
        extras = _largest_remainder([len(idx) * fraction for _, idx in folder_groups])
        for (bucket, indices), extra in zip(folder_groups, extras):
            per_bucket[bucket] += indices * whole + sorted(rng.sample(indices, extra))
    return {b: idx for b, idx in per_bucket.items() if idx}


def _largest_remainder(shares: list[float]) -> list[int]:
    """Integers summing to round(sum(shares)), each the floor of its share plus one for the largest remainders."""
    counts = [math.floor(s) for s in shares]
    missing = round(sum(shares)) - sum(counts)
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in by_remainder[:missing]:
        counts[i] += 1
    return counts


def batches_per_epoch(items: list[ImageItem], batch_size: int) -> int:
    return sum(math.ceil(len(idx) / batch_size) for idx in epoch_items(items, 0, 0).values())


def epoch_batches(items: list[ImageItem], batch_size: int, flip_p: float, seed: int, epoch: int) -> list[list[Draw]]:
    """The batches of `epoch`: single-bucket, full (filled with weight-0 rows), in shuffled order."""
    rng = _epoch_rng(seed, epoch, "batches")
    batches: list[list[Draw]] = []
    for bucket, indices in sorted(epoch_items(items, seed, epoch).items()):
        indices = list(indices)
        rng.shuffle(indices)
        draws = [Draw(i, rng.random() < flip_p, rng.getrandbits(63)) for i in indices]
        for start in range(0, len(draws), batch_size):
            batch = draws[start : start + batch_size]
            if len(batch) < batch_size:
                batch += _fill(draws, batch, batch_size - len(batch), rng)
            batches.append(batch)
    rng.shuffle(batches)
    return batches


def _fill(draws: list[Draw], batch: list[Draw], count: int, rng: random.Random) -> list[Draw]:
    """`count` weight-0 rows from the bucket, preferring images not already in this batch."""
    in_batch = {d.index for d in batch}
    others = [d for d in draws if d.index not in in_batch] or draws
    picks = [others[rng.randrange(len(others))] for _ in range(count)] if len(others) < count else rng.sample(others, count)
    return [Draw(d.index, d.flip, d.seed, weight=0.0) for d in picks]
