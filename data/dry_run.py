"""`python train.py --dry_run`: what a run would train on, without loading a model.

Prints the scan report (images per bucket, multiply.txt factors, skipped files, upscaled images), then the
batches per bucket and the steps per epoch and in total, the numbers the real run will print.
"""

from __future__ import annotations

import math
from pathlib import Path

from data.scan import scan_data_root
from data.schedule import epoch_items
from trainer.config import TrainConfig


def plan_lines(cfg: TrainConfig) -> list[str]:
    scan = scan_data_root(Path(cfg.data_root), cfg.resolution)
    lines = scan.report()
    per_bucket = epoch_items(scan.items, cfg.seed, 0)
    batches = {bucket: math.ceil(len(rows) / cfg.batch_size) for bucket, rows in sorted(per_bucket.items())}
    samples = sum(len(rows) for rows in per_bucket.values())
    lines.append(
        "Data: per epoch, images (with repeats) / batches per bucket: "
        + ", ".join(f"{b} {len(per_bucket[b])}/{n}" for b, n in batches.items())
    )
    steps_per_epoch = math.ceil(sum(batches.values()) / cfg.grad_accum)
    total = steps_per_epoch * cfg.max_epochs
    if cfg.max_steps:
        total = min(total, cfg.max_steps)
    lines.append(
        f"Dry run: {samples} images per epoch in {sum(batches.values())} batches of {cfg.batch_size}, "
        f"{steps_per_epoch} steps/epoch (grad_accum {cfg.grad_accum}), {total} steps in all "
        f"(max_epochs {cfg.max_epochs}, max_steps {cfg.max_steps or 'none'}), on one process."
    )
    return lines


def print_plan(cfg: TrainConfig) -> None:
    for line in plan_lines(cfg):
        print(line)
