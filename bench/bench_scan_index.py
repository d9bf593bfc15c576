"""First start vs second start over large data sets: the scan's index (data/scanning/index.py) at work.

For each size, a folder of small real images (PNGs of 64x64, 96x64 and 64x96 px, each with a .txt caption, 1,000
to a subfolder) is made once under --root and reused by later runs. Then `python train.py --dry_run` runs as a real
process, twice: the first start with no index (it reads every image and writes the index), the second over the
unchanged folder (it reads the index). Interpreter start, imports, the preflight and the plan count alike on both
sides; a dry run over a one-image folder gives that fixed part. The model is a Hub id that is not downloaded, with
HF_HUB_OFFLINE=1: the dry run then skips its memory plan (which needs the model's configs, and builds the model on
the meta device: about 7 s and 350 MiB more here, the same for any data set), so what grows with the images stands
out. Each start's wall time and peak RSS (its own, from wait4) are printed with the ratios, the growth per image
between the sizes, and the index's bytes per image.

The images were just written or read, so both starts find them in the page cache: the first start's cost here
is decoding, not disk reads (on a cold disk it is higher; the second start reads no image at all).

    python bench/bench_scan_index.py [--sizes 20000 100000] [--root /tmp/sd-scan-bench] [--before DIR]

--before DIR: a copy of the trainer from before the index (git archive <commit> | tar -x -C DIR), whose dry run
is timed once per size too (each of its starts reads every image), beside the first start that writes the index.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np
from PIL import Image

from data.scanning.index import INDEX_NAME, SETTLED_NS

PER_FOLDER = 1000
SIZES = ((64, 64), (96, 64), (64, 96))


def make_images(folder: Path, count: int) -> Path:
    """`count` 64 px PNGs with .txt captions in `folder` (reused when a complete set is there)."""
    done = folder / ".complete"
    if done.is_file() and done.read_text() == str(count):
        return folder
    rng = np.random.default_rng(count)
    started = time.perf_counter()
    for number in range(count):
        part = folder / f"part{number // PER_FOLDER:04d}"
        if number % PER_FOLDER == 0:
            part.mkdir(parents=True, exist_ok=True)
        # smooth random color fields: each image different, decoding as much as a small photo thumbnail
        small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        small.resize(SIZES[number % len(SIZES)], Image.Resampling.BILINEAR).save(part / f"{number:07d}.png",
                                                                                  compress_level=1)
        (part / f"{number:07d}.txt").write_text(f"a photo of thing {number % 97}, tag{number % 13}\n")
    done.write_text(str(count))
    print(f"made {count} images in {folder} in {time.perf_counter() - started:.0f} s", flush=True)
    time.sleep(SETTLED_NS / 1e9)  # files changed in the last seconds are not indexed (racy mtimes): let them age
    return folder


def dry_run(data_root: Path, work: Path, trainer: Path = REPO_ROOT) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, stdout) of one `train.py --dry_run` process over `data_root` (`trainer`: the
    folder of the train.py that runs)."""
    command = [sys.executable, str(trainer / "train.py"), "--dry_run", "--data_root", str(data_root),
               "--resolution", "64", "--resume_ckpt", "someone/not-downloaded", "--logdir", str(work / "logs")]
    with open(work / "out.txt", "w+") as out, open(work / "err.txt", "w+") as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=work, stdout=out, stderr=err,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        said, problems = out.read(), err.read()
    if process.returncode:
        raise SystemExit(f"train.py --dry_run over {data_root} failed ({process.returncode}):\n{problems[-3000:]}")
    return wall, usage.ru_maxrss / 1024, said  # ru_maxrss: KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 100000])
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "sd-scan-bench")
    parser.add_argument("--before", type=Path, help="a copy of the trainer from before the index, timed too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        one = make_images(args.root / "one", 1)
        (one / INDEX_NAME).unlink(missing_ok=True)
        dry_run(one, work)  # the index of the one image, and the interpreter's files in the page cache
        fixed_wall, fixed_rss, _ = dry_run(one, work)
        rows = []
        for count in args.sizes:
            folder = make_images(args.root / str(count), count)
            (folder / INDEX_NAME).unlink(missing_ok=True)
            first = dry_run(folder, work)
            index_bytes = (folder / INDEX_NAME).stat().st_size
            second = dry_run(folder, work)
            assert f"Data: {count} images" in first[2] and f"Data: {count} images" in second[2], second[2][-2000:]
            before = dry_run(folder, work, args.before)[:2] if args.before else (math.nan, math.nan)
            rows.append((count, before, first[:2], second[:2], index_bytes))
            print(f"{count}: before {before[0]:.1f} s {before[1]:.0f} MiB, first {first[0]:.1f} s {first[1]:.0f} MiB, "
                  f"second {second[0]:.1f} s {second[1]:.0f} MiB, index {index_bytes / 2**20:.1f} MiB", flush=True)
    print(f"\ndry run over 1 image (interpreter, imports, preflight, plan): {fixed_wall:.2f} s, {fixed_rss:.0f} MiB\n")
    print("| images | before the index s | first start s | second start s | first / second | before / second "
          "| before, first, second peak RSS MiB | index MiB | index B/image |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for count, (before_s, before_mib), (first_s, first_mib), (second_s, second_mib), index_bytes in rows:
        print(f"| {count:,} | {before_s:.1f} | {first_s:.1f} | {second_s:.1f} | {first_s / second_s:.1f} | "
              f"{before_s / second_s:.1f} | {before_mib:.0f}, {first_mib:.0f}, {second_mib:.0f} | "
              f"{index_bytes / 2**20:.1f} | {index_bytes / count:.0f} |")
    if len(rows) > 1:
        (small, _, small_first, small_second, _), (large, _, large_first, large_second, _) = rows[0], rows[-1]
        grown = large - small
        print(f"\ngrowth per image from {small:,} to {large:,} images: first start "
              f"{(large_first[0] - small_first[0]) / grown * 1e6:.0f} us and "
              f"{(large_first[1] - small_first[1]) * 2**20 / grown:.0f} B, second start "
              f"{(large_second[0] - small_second[0]) / grown * 1e6:.0f} us and "
              f"{(large_second[1] - small_second[1]) * 2**20 / grown:.0f} B")


if __name__ == "__main__":
    main()
