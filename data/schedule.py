"""Which images each epoch trains on, in which batches: repeats, flips, bucket and batch_id batches, shuffling.

A pure function of (items, batch size, flip_p, seed, epoch), so every process and every worker agrees on it,
a resumed run can replay it, and the dry run can count steps without torch. The items carry their own
settings from the data files (data/settings.py); where one is None the run's value applies.

- multiply (multiply.txt, or a yaml's multiply): the whole part repeats every image; the fraction picks that
  share of the images of one folder with that multiply anew each epoch, split over their batch groups by
  largest remainder, so each group's count (and so the number of batches per epoch, which the LR schedule is
  built on) is the same every epoch. A share rounds: one image at 0.5 alone in its folder is never picked.
- Each batch holds one group: one bucket and one batch_id (EveryDream2's named batches; images without one
  form a group of their own). A group's last, under-full batch is filled with other images of the same group
  with `weight` 0: shapes stay fixed, batch_ids never mix, and a loss that honours the weights (sum of weight x
  loss / batch size) gives every real image the same 1/batch_size share, however full its batch was.
- Each row is flipped with its image's flip_p, else the run's.
- Batches are shuffled across groups so consecutive steps mix aspect ratios.

For items without settings of their own this is, draw for draw, the schedule before settings existed
(tests/test_folder_conventions.py pins it). `plan_record` is what the plan depends on in the data, which a training
state keeps, so that a resumed run knows when its data changed (trainer/saves/resume.py).
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.buckets import Bucket
from data.scan import ImageItem, own_or_run


@dataclass(frozen=True)
class Draw:
    """One row of a batch: which image, flipped or not, the seed for its caption/noise choices, its loss weight."""

    index: int  # into the items list
    flip: bool
    seed: int
    weight: float = 1.0


def _epoch_rng(seed: int, epoch: int, salt: str) -> random.Random:
    return random.Random(f"{seed}/{epoch}/{salt}")  # str seeds hash stably across processes and runs


DEFAULT_GROUP = ""  # the batch_id of images without one (a batch_id is never empty); sorts first in a bucket
Group = tuple[Bucket, str]  # (bucket, batch_id): the rows one batch may hold


def epoch_groups(items: list[ImageItem], seed: int, epoch: int) -> dict[Group, list[int]]:
    """Item indices trained this epoch (with repeats), per (bucket, batch_id) group, the groups sorted (so
    without batch_ids: by bucket, as `epoch_batches` always drew them), each in a stable order."""
    pools: dict[tuple[Path, float], dict[Group, list[int]]] = defaultdict(lambda: defaultdict(list))
    for index, item in enumerate(items):  # a pool: the images of one folder with one multiply
        pools[(item.path.parent, item.multiply)][(item.bucket, item.batch_id or DEFAULT_GROUP)].append(index)
    per_group: dict[Group, list[int]] = defaultdict(list)
    rng = _epoch_rng(seed, epoch, "multiply")
    for folder, factor in sorted(pools):
        groups = sorted(pools[folder, factor].items())
        whole, fraction = int(factor), factor - int(factor)
        extras = _largest_remainder([len(idx) * fraction for _, idx in groups])
        for (group, indices), extra in zip(groups, extras):
            per_group[group] += indices * whole + sorted(rng.sample(indices, extra))
    return {g: idx for g, idx in sorted(per_group.items()) if idx}


def epoch_items(items: list[ImageItem], seed: int, epoch: int) -> dict[Bucket, list[int]]:
    """Item indices trained this epoch (with repeats), per bucket, in a stable order."""
    per_bucket: dict[Bucket, list[int]] = defaultdict(list)
    for (bucket, _), indices in epoch_groups(items, seed, epoch).items():
        per_bucket[bucket] += indices
    return dict(per_bucket)


def _largest_remainder(shares: list[float]) -> list[int]:
    """Integers summing to round(sum(shares)), each the floor of its share plus one for the largest remainders."""
    counts = [math.floor(s) for s in shares]
    missing = round(sum(shares)) - sum(counts)
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in by_remainder[:missing]:
        counts[i] += 1
    return counts


def plan_record(items: list[ImageItem], root: Path) -> dict[str, Any]:
    """What the epochs' plan takes from the data: the image count, and a digest of each image's part in it, in the
    scan's order (its path under `root`, which names its pool, its bucket, multiply and batch_id). Equal records
    plan equal epochs for equal settings; moving the whole data_root changes nothing, while an image added,
    removed, renamed or resized, or a changed multiply.txt or batch_id does."""
    digest = hashlib.blake2b(digest_size=8)
    for item in items:
        place = os.path.relpath(item.path, root)
        digest.update(f"{place}|{item.bucket.width}x{item.bucket.height}|{item.multiply!r}|{item.batch_id}\n".encode())
    return {"images": len(items), "digest": digest.hexdigest()}


def batches_per_epoch(items: list[ImageItem], batch_size: int) -> int:
    return sum(batches_per_bucket(items, batch_size).values())


def batches_per_bucket(items: list[ImageItem], batch_size: int) -> dict[Bucket, int]:
    """Batches per epoch of each bucket: each of its batch_id groups fills its own batches."""
    counts: dict[Bucket, int] = defaultdict(int)
    for (bucket, _), indices in epoch_groups(items, 0, 0).items():
        counts[bucket] += math.ceil(len(indices) / batch_size)
    return dict(counts)


def epoch_batches(items: list[ImageItem], batch_size: int, flip_p: float, seed: int, epoch: int) -> list[list[Draw]]:
    """The batches of `epoch`: single-group, full (filled with weight-0 rows), in shuffled order. `flip_p` is the
    run's, for the items without their own."""
    rng = _epoch_rng(seed, epoch, "batches")
    batches: list[list[Draw]] = []
    for indices in epoch_groups(items, seed, epoch).values():
        indices = list(indices)
        rng.shuffle(indices)
        draws = [Draw(i, rng.random() < own_or_run(items[i].flip_p, flip_p), rng.getrandbits(63)) for i in indices]
        for start in range(0, len(draws), batch_size):
            batch = draws[start : start + batch_size]
            if len(batch) < batch_size:
                batch += _fill(draws, batch, batch_size - len(batch), rng)
            batches.append(batch)
    rng.shuffle(batches)
    return batches


def _fill(draws: list[Draw], batch: list[Draw], count: int, rng: random.Random) -> list[Draw]:
    """`count` weight-0 rows from the group, preferring images not already in this batch."""
    in_batch = {d.index for d in batch}
    others = [d for d in draws if d.index not in in_batch] or draws
    picks = [others[rng.randrange(len(others))] for _ in range(count)] if len(others) < count else rng.sample(others, count)
    return [Draw(d.index, d.flip, d.seed, weight=0.0) for d in picks]
