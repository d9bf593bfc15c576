"""The one-call GPU check (issue 13 item 7): training speed and memory at full size, against the goals.

What it measures, in ONE table, rows in order of importance (each printed as soon as it is measured):
- samples/s, ms per step, and peak GPU memory (torch.cuda.max_memory_allocated and max_memory_reserved) of a
  plain training loop on random-weight models built from the real configs (the shipped v1-inference.yaml and
  v2-inference-v.yaml, through the same converters the trainer uses): SD1.5 at 512 px (batch 1/4/8; AdamW
  fused / bitsandbytes' AdamW8bit; gradient checkpointing on/off; text encoder trained/frozen; cached latents,
  i.e. random latents as inputs, and one row with the VAE encode in the step; the batch-1 full fine-tune also
  with fused_backward, the trainer's per-parameter optimizer stepped inside backward) and SD2.1-768-v at 768 px,
  batch 4 (bench/gpu/gpu_rows.py);
- the trainer's own step: a real run through the library's public functions in train.py's order, final save
  included (bench/gpu/gpu_trainer.py), on a random SD1.5-size model saved as a diffusers folder, 512 px, batch 4,
  UNet only, cached latents, against the plain loop with the same model and settings run just before and just
  after it: the trainer's speed over the bare loop's (its log in bench_gpu_trainer.log beside --out; the memory
  plan the trainer makes of it among the notes);
- beside each peak, the memory plan's prediction (trainer/preflight/memory.py `predict_peak_gib`).
Then the goals, each PASS/FAIL: >= 100 samples/s for SD1.5 512, UNet only, cached latents, bf16 (the best
batch-8 row); the trainer >= 0.95x the bare loop; peak <= 10 GiB for a full SD1.5 fine-tune (UNet + text
encoder) at batch 1 with adamw8bit and checkpointing (with or without fused_backward: the lower peak counts).

The VAE is on the GPU in every row, as in a run, though only the VAE row calls it; TF32 matmuls and
cudnn.benchmark are on and attention is PyTorch's SDPA. The plain loop uses fused AdamW, the fastest torch has,
so the trainer's ratio includes its optimizer choice. Speed: `--warmup` steps, then the mean of `--steps` steps
between two synchronisations. Peak memory does not count the CUDA context (nvidia-smi shows about 0.5-1 GiB more).

    bash bench/gpu/gpu_check.sh                  # on a bare CUDA machine: installs .gpu_wheels/ offline, then this
    python bench/gpu/bench_gpu.py [--budget_s 360] [--steps 10] [--warmup 3] [--out table.txt]
    python bench/gpu/bench_gpu.py --dry          # CPU self-check: same code paths, tiny models, 2 steps

`--budget_s` is a global deadline: a row whose estimated time no longer fits is listed as skipped, and the goals
are still printed. Without CUDA (and without --dry) it says so in one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from bench.gpu.gpu_rows import (  # noqa: E402
    SPECS,
    Case,
    Device,
    GiB,
    Parts,
    Result,
    build_parts,
    eight_bit_problem,
    first_line,
    predicted_peak,
    run_case,
)
from bench.gpu.gpu_trainer import measure_trainer  # noqa: E402

GOAL_SAMPLES_PER_S = 100.0
GOAL_TRAINER_RATIO = 0.95
GOAL_FULL_FINETUNE_GIB = 10.0

# ---------------------------------------------------------------------------------------------- the table


COLUMNS = (("#", 3), ("model", 8), ("px", 4), ("batch", 5), ("optimizer", 10), ("fused bw", 8), ("ckpt", 4),
           ("text enc", 8), ("latents", 8), ("samples/s", 9), ("ms/step", 8), ("peak GiB", 8), ("reserved", 8),
           ("plan GiB", 8), ("vs bare", 7))


def number(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def on_off(flag: bool) -> str:
    return "on" if flag else "off"


class Table:
    """Prints each row as it comes (flushed), and copies every line into `out` when given."""

    def __init__(self, out: Path | None):
        self.out = out
        self.rows: list[tuple[str, Case, Result]] = []  # (kind: bare | trainer, case, result)
        self.notes: list[str] = []
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("")

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        if self.out:
            with open(self.out, "a") as file:
                file.write(line + "\n")

    def header(self) -> None:
        self.say(" ".join(f"{name:>{width}}" for name, width in COLUMNS) + "  note")

    def add(self, kind: str, px: int, case: Case, result: Result) -> None:
        self.rows.append((kind, case, result))
        cells = (len(self.rows), SPECS[case.model].label, px, case.batch, case.optimizer, on_off(case.fused_backward),
                 on_off(case.checkpointing), "trained" if case.train_text_encoder else "frozen",
                 "VAE" if case.vae_in_step else "cached", number(result.samples_per_s, ".1f"),
                 number(result.step_s and result.step_s * 1e3, ".1f"), number(result.peak_gib, ".2f"),
                 number(result.reserved_gib, ".2f"), result.plan, number(result.vs_bare, ".3f"))
        self.say(" ".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, COLUMNS)) + f"  {result.note}")

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def numbered(self, kind: str, wanted: Callable[[Case], bool]) -> list[tuple[int, Case, Result]]:
        """(row number, case, result) of every row of `kind` whose case is `wanted`."""
        return [(n, c, r) for n, (k, c, r) in enumerate(self.rows, 1) if k == kind and wanted(c)]


class Deadline:
    """The global budget: a row starts only if its estimate (1.5x the slowest row of its kind so far, or a
    default before the first) fits in what is left."""

    DEFAULTS: ClassVar[dict[str, float]] = {"sd15": 10.0, "sd21v": 20.0, "build": 20.0, "pair": 90.0}

    def __init__(self, budget_s: float, started: float):
        self.end = started + budget_s
        self.seen: dict[str, float] = {}

    def left(self) -> float:
        return self.end - time.monotonic()

    def fits(self, kind: str) -> bool:
        return self.left() > self.estimate(kind)

    def estimate(self, kind: str) -> float:
        return 1.5 * self.seen[kind] if kind in self.seen else self.DEFAULTS[kind]

    @contextlib.contextmanager
    def timing(self, kind: str) -> Iterator[None]:
        start = time.monotonic()
        yield
        self.seen[kind] = max(self.seen.get(kind, 0.0), time.monotonic() - start)


# ---------------------------------------------------------------------------------------------- the plan of rows


PAIR = "pair"  # the trainer-vs-bare entry in the row order


def sd15(batch: int, optimizer: str = "adamw", checkpointing: bool = False, text: bool = False,
         vae: bool = False) -> Case:
    return Case("sd15", batch, optimizer, checkpointing, text, vae)


GOAL_SPEED_CASE = sd15(8)
PAIR_CASE = sd15(4)  # UNet only, cached latents, no checkpointing
FULL_FINETUNE_CASE = sd15(1, "adamw8bit", checkpointing=True, text=True)
FUSED_FULL_FINETUNE_CASE = dataclasses.replace(FULL_FINETUNE_CASE, fused_backward=True)


def row_order() -> list[Case | str]:
    """The goals' rows first, then SD2.1-v (the issue asks for it), then the rest of the SD1.5 grid."""
    first = [GOAL_SPEED_CASE, PAIR, FULL_FINETUNE_CASE, FUSED_FULL_FINETUNE_CASE, sd15(8, "adamw8bit"),
             sd15(4, vae=True)]
    sd21 = [Case("sd21v", 4), Case("sd21v", 4, "adamw8bit", True, True), Case("sd21v", 4, "adamw", True, False)]
    grid = [sd15(batch, optimizer, checkpointing, text) for batch in (4, 8, 1)
            for text in (False, True) for checkpointing in (False, True) for optimizer in ("adamw", "adamw8bit")]
    return first + sd21 + [case for case in grid if case not in first and case != PAIR_CASE]


# ---------------------------------------------------------------------------------------------- running


class Bench:
    def __init__(self, args: argparse.Namespace, device: Device, table: Table, deadline: Deadline):
        self.args, self.device, self.table, self.deadline = args, device, table, deadline
        self.parts: Parts | None = None
        self.eight_bit: str | None = "unchecked"
        self.work = Path(tempfile.mkdtemp(prefix="bench_gpu-"))

    def model(self, key: str) -> Parts:
        """The parts of model `key`, built now if another model (or none) is on the device: one at a time, so
        each peak is its own."""
        if self.parts is None or self.parts.key != key:
            self.parts = None
            self.device.reset_peak()
            with self.deadline.timing("build"):
                self.parts = build_parts(key, self.device.torch, self.args.dry)
        return self.parts

    def skip_reason(self, case: Case) -> str | None:
        if case.optimizer == "adamw8bit":
            if self.eight_bit == "unchecked":
                self.eight_bit = eight_bit_problem(self.device)
                if self.eight_bit:
                    self.table.note(f"8-bit rows skipped: bitsandbytes' AdamW8bit cannot run here ({self.eight_bit}).")
            if self.eight_bit:
                return "skipped: no bitsandbytes (see notes)"
        kinds = [case.model] + ([] if self.parts and self.parts.key == case.model else ["build"])
        needed = sum(self.deadline.estimate(kind) for kind in kinds)
        if self.deadline.left() < needed:
            return f"skipped: budget ({self.deadline.left():.0f} s left, needs ~{needed:.0f} s)"
        return None

    def row(self, case: Case, note: str = "") -> Result:
        """One plain-loop row of `case`: measured, or skipped with the reason, and printed."""
        reason = self.skip_reason(case)
        result = Result(note=reason) if reason else self.measure(case)
        result.note = " ".join(filter(None, [note, result.note]))
        self.table.add("bare", self.resolution(case), case, result)
        return result

    def measure(self, case: Case) -> Result:
        try:
            parts = self.model(case.model)
            with self.deadline.timing(case.model):
                result = run_case(parts, case, self.args.warmup, self.args.steps, self.device)
        except torch.cuda.OutOfMemoryError:
            return Result(note="out of memory")
        except Exception as err:  # one broken row must not cost the others
            return Result(note=f"failed: {type(err).__name__}: {first_line(err)[:120]}")
        result.plan = self.plan(parts, case)
        return result

    def plan(self, parts: Parts, case: Case) -> str:
        """The plan column: a failure of the prediction is noted, and costs no measurement."""
        try:
            return predicted_peak(parts, case)
        except Exception as err:
            self.table.note(f"predict_peak_gib failed: {type(err).__name__}: {first_line(err)}")
            return "err"

    def pair(self) -> None:
        """The trainer's step between two plain-loop rows of the same case; its speed over their mean."""
        case = PAIR_CASE
        if not self.deadline.fits("pair"):
            reason = f"budget ({self.deadline.left():.0f} s left, needs ~{self.deadline.estimate('pair'):.0f} s)"
            self.table.add("trainer", self.resolution(case), case, Result(note=f"trainer: skipped: {reason}"))
            return
        with self.deadline.timing("pair"):
            bare = [self.row(case, note="bare loop of the pair (1/2)")]
            result = self.trainer_row(case)
            bare.append(self.row(case, note="bare loop of the pair (2/2)"))
        times = [r.step_s for r in bare if r.step_s]
        if result.step_s and times:
            result.vs_bare = (sum(times) / len(times)) / result.step_s  # speed ratio: >1 is faster than bare
        self.table.add("trainer", self.resolution(case), case, result)

    def resolution(self, case: Case) -> int:
        spec = SPECS[case.model]
        return spec.dry_resolution if self.args.dry else spec.resolution

    def trainer_row(self, case: Case) -> Result:
        parts = self.model(case.model)
        work = self.work / "trainer"
        work.mkdir()
        log = (self.args.out.parent if self.args.out else Path(tempfile.gettempdir())) / "bench_gpu_trainer.log"
        try:
            measure = measure_trainer(parts, case, self.args.warmup, self.args.trainer_steps, self.device, work, log)
        except Exception as err:
            return Result(note=f"trainer: failed: {type(err).__name__}: {first_line(err)[:160]} (log: {log})")
        finally:
            shutil.rmtree(work, ignore_errors=True)  # its model, data and save: gigabytes on a small disk
        for line in measure.memory_plan:
            self.table.note(f"the trainer's own {line[0].lower()}{line[1:]}")
        if measure.left_gib > 0.25:
            self.table.note(f"the trainer's run left {measure.left_gib:.2f} GiB allocated after it ended: the peaks "
                            "of the rows after it include that much")
        return Result(case.batch / measure.step_s, measure.step_s, measure.peak_gib, measure.reserved_gib,
                      self.plan(parts, case), note="trainer: a real run's step (its peak: the whole run)")

    def run(self) -> None:
        try:
            for entry in row_order():
                if entry == PAIR:
                    self.pair()
                else:
                    self.row(entry)
        finally:
            self.parts = None
            shutil.rmtree(self.work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- goals


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def speed_goal(table: Table) -> str:
    name = f">= {GOAL_SAMPLES_PER_S:.0f} samples/s, SD1.5 512, UNet only, cached latents, bf16 (best batch-8 row)"
    speed = [(n, r) for n, _, r in table.numbered("bare", lambda c: c.model == "sd15" and c.batch == 8 and not
                                                  c.train_text_encoder and not c.vae_in_step) if r.samples_per_s]
    if not speed:
        return f"NOT RUN  {name}: no such row was measured"
    row, best = max(speed, key=lambda numbered: numbered[1].samples_per_s)
    return f"{verdict(best.samples_per_s >= GOAL_SAMPLES_PER_S)}  {name}: #{row}, {best.samples_per_s:.1f} samples/s"


def trainer_goal(table: Table) -> str:
    name = f"trainer >= {GOAL_TRAINER_RATIO}x the bare loop (SD1.5 512, batch 4, UNet only, cached latents)"
    trainer = table.numbered("trainer", lambda c: True)
    if not trainer or not trainer[0][2].vs_bare:
        return f"NOT RUN  {name}: {trainer[0][2].note if trainer else 'no trainer row'}"
    row, _, result = trainer[0]
    return f"{verdict(result.vs_bare >= GOAL_TRAINER_RATIO)}  {name}: #{row}, {result.vs_bare:.3f}x"


def memory_goal(table: Table) -> str:
    """Judged on the lower peak of the two full fine-tune rows (fused_backward off and on); both are named."""
    name = (f"peak <= {GOAL_FULL_FINETUNE_GIB:.0f} GiB, full SD1.5 fine-tune (UNet + text encoder), batch 1, "
            "adamw8bit, checkpointing")
    rows = table.numbered("bare", lambda c: c in (FULL_FINETUNE_CASE, FUSED_FULL_FINETUNE_CASE))
    measured = [(n, c, r) for n, c, r in rows if r.peak_gib is not None]
    if not measured:
        return f"NOT RUN  {name}: {(rows[0][2].note or 'no GPU memory on a CPU') if rows else 'no row'}"
    said = "; ".join(f"#{n} ({'with' if c.fused_backward else 'without'} fused_backward) {r.peak_gib:.2f} GiB "
                     f"allocated, {r.reserved_gib:.2f} reserved" for n, c, r in measured)
    return f"{verdict(min(r.peak_gib for _, _, r in measured) <= GOAL_FULL_FINETUNE_GIB)}  {name}: {said}"


def goal_lines(table: Table, dry: bool) -> list[str]:
    """Each goal PASS or FAIL from its row (with the row's number), or NOT RUN with the reason."""
    lines = [speed_goal(table), trainer_goal(table), memory_goal(table)]
    if dry:
        lines = [f"{line}  [dry: tiny models on a CPU, not a measurement]" for line in lines]
    return lines


# ---------------------------------------------------------------------------------------------- the program


def versions() -> str:
    from importlib import metadata

    found = []
    for name in ("torch", "diffusers", "transformers", "accelerate", "bitsandbytes"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} missing")
    return ", ".join(found)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget_s", type=float, default=None, help="global deadline in seconds (default 360; "
                        "--dry: 900): rows that no longer fit are listed as skipped")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10; --dry: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; --dry: 1)")
    parser.add_argument("--trainer_steps", type=int, default=None, help="timed trainer steps (default 15; --dry: 2)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (gpu_check.sh: $OUT)")
    parser.add_argument("--dry", action="store_true", help="CPU self-check: the same code paths, tiny models")
    args = parser.parse_args()
    for name, full, dry in (("budget_s", 360.0, 900.0), ("steps", 10, 2), ("warmup", 3, 1), ("trainer_steps", 15, 2)):
        if getattr(args, name) is None:
            setattr(args, name, dry if args.dry else full)
    return args


def quiet_libraries() -> None:
    """The libraries' progress bars and notices would break up the table (read when they are first imported)."""
    for name, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("DIFFUSERS_VERBOSITY", "error"),
                        ("TRANSFORMERS_VERBOSITY", "error")):
        os.environ.setdefault(name, value)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its notices about 4-bit kernels (unused here)


def say_goals(table: Table, dry: bool, started: float) -> None:
    table.say()
    table.say("Goals:")
    for line in goal_lines(table, dry):
        table.say(f"  {line}")
    table.say("Columns: fused bw: fused_backward (trainer/optim/fused_backward.py); peak GiB and reserved: "
              "torch.cuda.max_memory_allocated/reserved over the row (weights included); plan GiB: "
              "trainer/preflight/memory.py's predict_peak_gib; vs bare: the trainer's speed over the mean of the two "
              "bare-loop rows just before and after it.")
    for note in table.notes:
        table.say(f"Note: {note}")
    table.say(f"Total {time.monotonic() - started:.0f} s.")


def main() -> int:
    started = time.monotonic()
    args = parse_args()
    quiet_libraries()
    if not args.dry and not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU and torch sees none here (--dry runs its CPU self-check).",
              file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True  # as the trainer sets them on a GPU
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # fixed shapes per row; the autotuning falls in the warm-up steps
    table = Table(args.out)
    where = "CPU (--dry: tiny models)" if args.dry else (
        f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / GiB:.0f} GiB)")
    table.say(f"bench_gpu on {where}; {versions()}")
    table.say(f"bf16 autocast, fp32 masters, TF32 and cudnn.benchmark on; {args.warmup} warm-up + {args.steps} "
              f"timed steps a row (trainer: {args.trainer_steps}); budget {args.budget_s:.0f} s")
    table.header()
    # a `timeout` (gpu_check.sh's hard limit) ends the bench through the finally below: the goals still print
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        Bench(args, Device(args.dry), table, Deadline(args.budget_s, started)).run()
    finally:
        say_goals(table, args.dry, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
