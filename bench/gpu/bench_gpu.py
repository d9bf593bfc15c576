"""The one-call GPU check (issues 13 and 25): the trainer at full size on a GPU, measured against its goals.

What it measures, in order of importance, each row printed (and written to --out) as soon as it is measured:
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
  after it: the trainer's speed over the bare loop's (its log in bench_gpu_trainer.log beside --out);
- real `python train.py` runs at full size, checked as a user would check them (bench/gpu/gpu_runs.py): an SD1.5
  full fine-tune (bf16, adamw8bit, checkpointing, EMA on the GPU, a sample, a save diffusers loads and a single
  file with every key), its exact resume (3 + 3 steps against 6), a LoRA whose file diffusers loads, SD2.1-768-v
  with a validation loss, and an fp32 resume that must be equal bit for bit; each run's peak GPU memory beside
  the memory plan it printed (their logs in bench_gpu_runs.log beside --out);
- beside each peak, the memory plan's prediction (trainer/preflight/memory.py).
Then the goals, each PASS/FAIL (bench/gpu/gpu_report.py), and the `--only` that reruns what did not pass.

The VAE is on the GPU in every row, as in a run, though only the VAE row calls it; TF32 matmuls and
cudnn.benchmark are on and attention is PyTorch's SDPA. The plain loop uses fused AdamW, the fastest torch has,
so the trainer's ratio includes its optimizer choice. Speed: `--warmup` steps, then the mean of `--steps` steps
between two synchronisations. Peak memory does not count the CUDA context (nvidia-smi shows about 0.5-1 GiB more).

    bash bench/gpu/gpu_check.sh                  # on a bare CUDA machine: installs .gpu_wheels/ offline, then this
    python bench/gpu/bench_gpu.py [--budget_s 360] [--only speed,lora] [--steps 10] [--warmup 3] [--out table.txt]
    python bench/gpu/bench_gpu.py --dry          # CPU rehearsal: same code paths, tiny models, 2 steps

`--only` takes the names of GROUPS (rows) and of gpu_runs.GROUPS (train.py runs). `--budget_s` is a global
deadline: a row whose estimated time no longer fits is listed as skipped, and the goals are still printed. Without
CUDA (and without --dry) it says so in one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from bench.gpu import gpu_runs  # noqa: E402
from bench.gpu.gpu_report import Table, say_goals  # noqa: E402
from bench.gpu.gpu_rows import (  # noqa: E402
    FULL_FINETUNE_CASE,
    FUSED_FULL_FINETUNE_CASE,
    GOAL_SPEED_CASE,
    PAIR_CASE,
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
    sd15,
)
from bench.gpu.gpu_trainer import measure_trainer  # noqa: E402

RUNS_MINIMUM_S = 60  # the train.py runs are not started with less left
CHECKS_RESERVE_S = 25  # the runs are stopped this long before the deadline: their checks, then the goals


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


PAIR = "pair"  # the trainer-vs-bare entry
RUNS = "runs"  # where the train.py runs go
GRID = [sd15(batch, optimizer, checkpointing, text) for batch in (4, 8, 1) for text in (False, True)
        for checkpointing in (False, True) for optimizer in ("adamw", "adamw8bit")]
# The row groups `--only` names, in the order they run: the goals' rows, the train.py runs, then the rest.
GROUPS: dict[str, list[Case | str]] = {
    "speed": [GOAL_SPEED_CASE],
    "finetune": [FULL_FINETUNE_CASE, FUSED_FULL_FINETUNE_CASE],
    "pair": [PAIR],
    RUNS: [RUNS],
    "sd15_rows": [sd15(8, "adamw8bit"), sd15(4, vae=True)],
    "sd21v_rows": [Case("sd21v", 4), Case("sd21v", 4, "adamw8bit", True, True), Case("sd21v", 4, "adamw", True, False)],
    "grid": [c for c in GRID if c not in (GOAL_SPEED_CASE, PAIR_CASE, FULL_FINETUNE_CASE, sd15(8, "adamw8bit"))],
}


def chosen(only: str | None) -> tuple[list[str], list[str]]:
    """(row groups, train.py groups) that `--only` names, in their running order; all of them without it."""
    names = [n.strip() for n in only.split(",") if n.strip()] if only else [*GROUPS, *gpu_runs.GROUPS]
    unknown = [n for n in names if n not in GROUPS and n not in gpu_runs.GROUPS]
    if unknown:
        raise SystemExit(f"bench_gpu.py: --only {','.join(unknown)}: not a group; the groups are "
                         f"{', '.join(n for n in GROUPS if n != RUNS)} and the train.py runs "
                         f"{', '.join(gpu_runs.GROUPS)}")
    runs = [n for n in gpu_runs.GROUPS if n in names]
    rows = [n for n in GROUPS if n in names or (n == RUNS and runs)]
    return rows, runs


# ---------------------------------------------------------------------------------------------- running


class Bench:
    def __init__(self, args: argparse.Namespace, device: Device, table: Table, deadline: Deadline,
                 run_groups: list[str]):
        self.args, self.device, self.table, self.deadline = args, device, table, deadline
        self.run_groups = run_groups
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
        self.table.add("bare", self.resolution_of(case.model), case, result)
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

    def pair(self) -> bool:
        """The trainer's step between two plain-loop rows of the same case; its speed over their mean."""
        case = PAIR_CASE
        if not self.deadline.fits("pair"):
            reason = f"budget ({self.deadline.left():.0f} s left, needs ~{self.deadline.estimate('pair'):.0f} s)"
            self.table.add("trainer", self.resolution_of(case.model), case, Result(note=f"trainer: skipped: {reason}"))
            return False
        with self.deadline.timing("pair"):
            bare = [self.row(case, note="bare loop of the pair (1/2)")]
            result = self.trainer_row(case)
            bare.append(self.row(case, note="bare loop of the pair (2/2)"))
        times = [r.step_s for r in bare if r.step_s]
        if result.step_s and times:
            result.vs_bare = (sum(times) / len(times)) / result.step_s  # speed ratio: >1 is faster than bare
        self.table.add("trainer", self.resolution_of(case.model), case, result)
        return result.vs_bare is not None

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

    def run(self, row_groups: list[str]) -> None:
        try:
            for name in row_groups:
                measured = [self.entry(entry) for entry in GROUPS[name]]
                if not all(measured):
                    self.table.rows_unmeasured.append(name)
        finally:
            self.parts = None
            shutil.rmtree(self.work, ignore_errors=True)

    def entry(self, entry: Case | str) -> bool:
        """One entry of a group; whether all it was to measure was measured."""
        if entry == PAIR:
            return self.pair()
        if entry == RUNS:
            try:
                self.train_runs()
            except Exception as err:  # the rows after it are still worth their minutes
                self.table.say(f"  the train.py runs failed to start: {type(err).__name__}: {first_line(err)[:200]}")
            return True  # its groups each say whether they passed, and are rerun by their own names
        return self.row(entry).step_s is not None

    # ------------------------------------------------------------------------------------------ train.py runs

    def train_runs(self) -> None:
        """The chosen train.py groups: the models written as original files (from the parts the rows use), then
        the runs, `--parallel` at a time with the GPU left to them, then each group's checks."""
        runs = list(dict.fromkeys(run for name in self.run_groups for run in gpu_runs.GROUPS[name]))
        work = self.work / "runs"
        table = self.table
        table.wanted_groups = list(self.run_groups)
        table.run_header()
        if self.deadline.left() < RUNS_MINIMUM_S:
            table.say(f"  skipped: budget ({self.deadline.left():.0f} s left, the runs need ~{RUNS_MINIMUM_S} s)")
            return
        models = gpu_runs.Models()
        for model in dict.fromkeys(run.model for run in runs):
            file = work / "models" / f"{model}.safetensors"
            models.files[model] = gpu_runs.write_original_file(self.model(model), file, self.args.dry)
            models.bases[model] = gpu_runs.convert_once(file, work / "ckpt_cache", self.args.dry)
        self.parts = None  # the GPU's memory is the runs'
        self.device.reset_peak()
        free = shutil.disk_usage(work).free / GiB
        table.say(f"  {len(runs)} runs, {self.args.parallel} at a time, in {work}: {free:.0f} GiB free there (a run's "
                  "saves take up to ~12 GiB; with less than that per run, a smaller --parallel)")
        runner = gpu_runs.Runner(work, models.files, self.args.dry, self.args.parallel)
        try:
            gpu_runs.run_groups(self.run_groups, runner, models, self.resolution_of,
                                self.deadline.end - CHECKS_RESERVE_S, table.add_run, table.add_group)
        finally:  # a call cut short (gpu_check.sh's timeout) still brings back the logs of the runs that started
            self.keep_logs([runner.outcomes[run.name] for run in runs if run.name in runner.outcomes])
        shutil.rmtree(work, ignore_errors=True)  # saves of gigabytes each, on a small disk

    def resolution_of(self, model: str) -> int:
        spec = SPECS[model]
        return spec.dry_resolution if self.args.dry else spec.resolution

    def keep_logs(self, outcomes: list[gpu_runs.Outcome]) -> None:
        """Every run's log, one after another, in bench_gpu_runs.log beside --out (the device tool brings back
        few files)."""
        folder = self.args.out.parent if self.args.out else Path(tempfile.gettempdir())
        with open(folder / "bench_gpu_runs.log", "w") as out:
            for outcome in outcomes:
                out.write(f"\n===== {outcome.run.name}: exit {outcome.exit_code} {outcome.note}\n")
                if outcome.log.exists():
                    out.write(outcome.log.read_text(errors="replace"))


# ---------------------------------------------------------------------------------------------- the program


def versions() -> str:
    from importlib import metadata

    found = []
    for name in ("torch", "diffusers", "transformers", "accelerate", "peft", "huggingface_hub", "tokenizers",
                 "safetensors", "bitsandbytes"):
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
    parser.add_argument("--dry", action="store_true", help="CPU rehearsal: the same code paths, tiny models")
    parser.add_argument("--only", default=None, help="comma-separated groups to run (default: all): "
                        f"rows {', '.join(n for n in GROUPS if n != RUNS)}; train.py runs {', '.join(gpu_runs.GROUPS)}")
    parser.add_argument("--parallel", type=int, default=None, help="train.py runs at a time (default 3; --dry: 2)")
    args = parser.parse_args()
    for name, full, dry in (("budget_s", 360.0, 900.0), ("steps", 10, 2), ("warmup", 3, 1), ("trainer_steps", 15, 2),
                            ("parallel", 3, 2)):
        if getattr(args, name) is None:
            setattr(args, name, dry if args.dry else full)
    return args


def quiet_libraries() -> None:
    """The libraries' progress bars and notices would break up the table (read when they are first imported)."""
    for name, value in (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("DIFFUSERS_VERBOSITY", "error"),
                        ("TRANSFORMERS_VERBOSITY", "error")):
        os.environ.setdefault(name, value)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its notices about 4-bit kernels (unused here)


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
    row_groups, run_groups = chosen(args.only)
    table = Table(args.out)
    where = "CPU (--dry: tiny models)" if args.dry else (
        f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / GiB:.0f} GiB)")
    table.say(f"bench_gpu on {where}; {versions()}")
    table.say(f"bf16 autocast, fp32 masters, TF32 and cudnn.benchmark on; {args.warmup} warm-up + {args.steps} "
              f"timed steps a row (trainer: {args.trainer_steps}); budget {args.budget_s:.0f} s; groups "
              f"{', '.join(n for n in row_groups if n != RUNS)}; train.py runs {', '.join(run_groups) or 'none'}")
    table.header()
    # a `timeout` (gpu_check.sh's hard limit) ends the bench through the finally below: the goals still print
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        Bench(args, Device(args.dry), table, Deadline(args.budget_s, started), run_groups).run(row_groups)
    finally:
        say_goals(table, args.dry, time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
