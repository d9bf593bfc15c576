"""What bench/gpu/bench_gpu.py prints: the table (each row as soon as it is measured, copied into --out at once, so a
call cut short still returns what it had), the train.py runs and their checks, and the goals of issue 25, each
PASS or FAIL with its number (or NOT RUN with the reason), ending with the `--only` that reruns what did not pass.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bench.gpu.gpu_rows import (
    FULL_FINETUNE_CASE,
    FUSED_FULL_FINETUNE_CASE,
    SPECS,
    Case,
    Result,
)
from bench.gpu.gpu_runs import LORA, GroupResult, Outcome

GOAL_SAMPLES_PER_S = 100.0
GOAL_SAMPLES_PER_S_NEXT = 150.0  # the second step
GOAL_TRAINER_RATIO = 0.95
GOAL_FULL_FINETUNE_GIB = 10.0
GOAL_LORA_GIB = 4.0
GOAL_PLAN_ERROR = 0.10  # the memory plan within this share of each measured peak

COLUMNS = (("#", 3), ("model", 8), ("px", 4), ("batch", 5), ("optimizer", 10), ("fused bw", 8), ("ckpt", 4),
           ("text enc", 8), ("latents", 8), ("samples/s", 9), ("ms/step", 8), ("peak GiB", 8), ("reserved", 8),
           ("plan GiB", 8), ("vs bare", 7))
RUN_COLUMNS = (("run", 22), ("exit", 4), ("wall s", 6), ("peak GiB", 8), ("reserved", 8), ("plan GiB", 8),
               ("plan/peak", 9))


def number(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def on_off(flag: bool) -> str:
    return "on" if flag else "off"


def cells(values: tuple, columns: tuple) -> str:
    return " ".join(f"{cell:>{width}}" for cell, (_, width) in zip(values, columns, strict=True))


class Table:
    """Prints each row as it comes (flushed), and copies every line into `out` when given."""

    def __init__(self, out: Path | None):
        self.out = out
        self.rows: list[tuple[str, Case, Result]] = []  # (kind: bare | trainer, case, result)
        self.runs: list[Outcome] = []
        self.groups: list[GroupResult] = []
        self.wanted_groups: list[str] = []  # every train.py group this call was asked for, run or not
        self.rows_unmeasured: list[str] = []  # the row groups with a row skipped or failed
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
        values = (len(self.rows), SPECS[case.model].label, px, case.batch, case.optimizer,
                  on_off(case.fused_backward), on_off(case.checkpointing),
                  "trained" if case.train_text_encoder else "frozen", "VAE" if case.vae_in_step else "cached",
                  number(result.samples_per_s, ".1f"), number(result.step_s and result.step_s * 1e3, ".1f"),
                  number(result.peak_gib, ".2f"), number(result.reserved_gib, ".2f"), result.plan,
                  number(result.vs_bare, ".3f"))
        self.say(cells(values, COLUMNS) + f"  {result.note}")

    def run_header(self) -> None:
        self.say()
        self.say("train.py runs (each a real process at full size; peak: torch.cuda over the whole process):")
        self.say(" ".join(f"{name:>{width}}" for name, width in RUN_COLUMNS) + "  note")

    def add_run(self, outcome: Outcome) -> None:
        self.runs.append(outcome)
        ratio = outcome.plan_gib / outcome.peak_gib if outcome.plan_gib and outcome.peak_gib else None
        values = (outcome.run.name, number(outcome.exit_code, "d"), number(outcome.wall_s, ".0f"),
                  number(outcome.peak_gib, ".2f"), number(outcome.reserved_gib, ".2f"),
                  number(outcome.plan_gib, ".2f"), number(ratio, ".3f"))
        self.say(cells(values, RUN_COLUMNS) + f"  {outcome.note}")

    def add_group(self, result: GroupResult) -> None:
        self.groups.append(result)
        self.say(f"  {verdict(result.passed)}  {result.name}: {result.detail}")

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def numbered(self, kind: str, wanted: Callable[[Case], bool]) -> list[tuple[int, Case, Result]]:
        """(row number, case, result) of every row of `kind` whose case is `wanted`."""
        return [(n, c, r) for n, (k, c, r) in enumerate(self.rows, 1) if k == kind and wanted(c)]


# ---------------------------------------------------------------------------------------------- goals


def verdict(ok: bool | None) -> str:
    return "NOT RUN" if ok is None else "PASS" if ok else "FAIL"


def speed_goals(table: Table) -> list[str]:
    """>= 100 samples/s, then >= 150, on the best batch-8 UNet-only row."""
    what = "samples/s, SD1.5 512, UNet only, cached latents, bf16 (best batch-8 row)"
    speed = [(n, r) for n, _, r in table.numbered("bare", lambda c: c.model == "sd15" and c.batch == 8 and not
                                                  c.train_text_encoder and not c.vae_in_step) if r.samples_per_s]
    if not speed:
        return [f"NOT RUN  >= {GOAL_SAMPLES_PER_S:.0f} {what}: no such row was measured"]
    row, best = max(speed, key=lambda numbered: numbered[1].samples_per_s)
    return [f"{verdict(best.samples_per_s >= goal)}  >= {goal:.0f} {what}: #{row}, {best.samples_per_s:.1f} samples/s"
            for goal in (GOAL_SAMPLES_PER_S, GOAL_SAMPLES_PER_S_NEXT)]


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


def lora_memory_goal(table: Table) -> str:
    name = f"peak <= {GOAL_LORA_GIB:.0f} GiB, LoRA rank 16 (attn_ff, text encoder too), batch 1: the lora run"
    run = next((o for o in table.runs if o.run.name == LORA.name), None)
    if run is None or run.peak_gib is None:
        return f"NOT RUN  {name}: {'no GPU memory on a CPU' if run and run.ok else run.note if run else 'not run'}"
    return f"{verdict(run.peak_gib <= GOAL_LORA_GIB)}  {name}: {run.peak_gib:.2f} GiB allocated, " \
           f"{run.reserved_gib:.2f} reserved"


def plan_goal(table: Table) -> str:
    """Every measured peak, of a table row or a run, against the memory plan's prediction for it."""
    name = f"the memory plan within +-{GOAL_PLAN_ERROR:.0%} of each measured peak"
    pairs = [(f"#{n}", float(r.plan), r.peak_gib) for n, _, r in table.numbered("bare", lambda c: True)
             if r.peak_gib and r.plan.replace(".", "", 1).isdigit()]
    pairs += [(o.run.name, o.plan_gib, o.peak_gib) for o in table.runs if o.plan_gib and o.peak_gib]
    if not pairs:
        return f"NOT RUN  {name}: no peak was measured"
    off = [(what, plan / peak) for what, plan, peak in pairs if abs(plan / peak - 1) > GOAL_PLAN_ERROR]
    said = ", ".join(f"{what} {ratio:.2f}x" for what, ratio in off) or "none off"
    return f"{verdict(not off)}  {name}: {len(pairs) - len(off)} of {len(pairs)} within; plan/peak off: {said}"


def run_goals(table: Table) -> list[str]:
    """Each train.py group of issue 25 item 2 that this call was asked for."""
    done = {g.name: g for g in table.groups}
    return [f"{verdict(done[name].passed) if name in done else 'NOT RUN'}  train.py {name}: "
            f"{done[name].detail if name in done else 'not reached (budget or an earlier failure)'}"
            for name in table.wanted_groups]


def goal_lines(table: Table, dry: bool) -> list[str]:
    """Each goal PASS or FAIL from its row (with the row's number), or NOT RUN with the reason."""
    lines = [*speed_goals(table), trainer_goal(table), memory_goal(table), lora_memory_goal(table), plan_goal(table),
             *run_goals(table)]
    if dry:
        lines = [f"{line}  [dry: tiny models on a CPU, not a measurement]" for line in lines]
    return lines


def rerun_names(table: Table) -> list[str]:
    """The `--only` groups with a row skipped or failed, and the train.py groups that did not pass."""
    passed = {g.name for g in table.groups if g.passed}
    return table.rows_unmeasured + [name for name in table.wanted_groups if name not in passed]


def say_goals(table: Table, dry: bool, seconds: float) -> None:
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
    if names := rerun_names(table):
        table.say(f"Rerun what did not pass or was not measured: bash bench/gpu/gpu_check.sh --only {','.join(names)}")
    table.say(f"Total {seconds:.0f} s.")
