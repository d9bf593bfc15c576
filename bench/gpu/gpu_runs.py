"""The train.py rows of bench/gpu/bench_gpu.py (issue 25 item 2): real `python train.py` processes at full size,
each a few steps on random-weight models built from the real configs, each checked as its user would check it.

- sd15_full: SD1.5 at 512, bf16, adamw8bit, gradient checkpointing, EMA on the GPU, a sample image, a save whose
  diffusers folder loads back in diffusers and whose single file has every key (and shape) of the file it started
  from;
- resume_bf16: the same run as 3 steps saved with its training state, then resumed for 3 more, against
  sd15_full's 6 straight: every saved weight compared, the difference said beside what training changed;
- lora: rank 16 on attention and feed-forward, the text encoder's too; diffusers' load_lora_weights puts each of
  the file's adapters on a layer, and no key is left over;
- sd21v: SD2.1-768-v at 768, v-prediction, with a validation loss;
- resume_fp32: 3 + 3 against 6 in fp32 (UNet only) with `deterministic` (trainer/run/repeatable.py), which must
  be equal bit for bit;
- repeat_fp32: `deterministic` itself: a second 6-step run, equal bit for bit to the first (an op torch has no
  ordered kernel for is named from its warning).

The models are original single files, what users download (with the yaml beside SD2's), converted here once by the
trainer's own ckpt_cache code before the runs start, so that runs started together never convert the same file at
once. Each run is a `bench/gpu/traced_train.py` process (train.py itself, with its peak GPU memory written down),
`parallel` at a time while the disk holds their saves: they are checked for what they did, not timed (the table
times the step), and each process's peak is its own. The memory plan each run printed is read from its log, beside
its measured peak. Each group is checked as soon as its runs have ended; a run's saves are removed once no group
still to be checked reads them.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.gpu.gpu_rows import REPO_ROOT, GiB, Parts, first_line
from bench.gpu.gpu_verify import (
    check_lora_file,
    check_single_file,
    compare_saves,
    load_back,
    sample_problem,
    train_log_problem,
)

TRACED_TRAIN = REPO_ROOT / "bench" / "gpu" / "traced_train.py"
DISK_MARGIN_GIB = 2.0  # left free beside the runs' saves (logs, latent caches, the checks' reading)
PLAN = re.compile(r"([\d.]+) GiB peak per device")
SAVED = re.compile(r"^.*Saved (model|LoRA|single file): (.+)$", re.MULTILINE)

# ---------------------------------------------------------------------------------------------- the runs


@dataclass(frozen=True, eq=False)  # one object per run, the same in every group
class Run:
    name: str  # its run folder, log and trace
    model: str  # a key of gpu_rows.SPECS
    settings: dict  # train.json keys, beside the paths the runner gives every run
    saves_gib: float = 5.0  # what its saves take on disk at full size (trainer/saves/footprint.py's sums)
    resumes: str | None = None  # the run whose last save this one resumes (resume_state)


# fp16 saves, as users get them (a run's with EMA and single files: 8.5 GB; in fp32 17 GB, on a 64 GB disk shared
# by three runs at a time); lr 1e-4 moves the weights well past fp16's rounding in 6 steps, so that the resume's
# difference is measured against a change the saves hold
SD15_FULL = dict(batch_size=1, max_steps=6, mixed_precision="bf16", optimizer="adamw8bit", lr=1e-4,
                 gradient_checkpointing=True, disable_textenc_training=False, ema_decay_rate=0.99, ema_device="gpu",
                 sample_steps=3, save_full_precision=False, save_single_file=True)
# deterministic: without it two fp32 runs of the same seed already part on CUDA (atomics, cudnn's autotuner)
FP32 = dict(batch_size=1, max_steps=6, mixed_precision="no", optimizer="adamw", lr=1e-5, deterministic=True,
            gradient_checkpointing=True, disable_textenc_training=True, save_full_precision=True,
            save_single_file=False)
FIRST_HALF = dict(max_steps=3, save_optimizer=True, save_single_file=False)

A = Run("sd15_full", "sd15", SD15_FULL, 8.5)  # fp16 folder, EMA twin, two single files
B = Run("resume_bf16-first", "sd15", {**SD15_FULL, **FIRST_HALF}, 14.0)  # + the state: fp32 masters, EMA, 8-bit
C = Run("resume_bf16-resumed", "sd15", {**SD15_FULL, "save_single_file": False}, 4.5, resumes=B.name)
F_STRAIGHT = Run("resume_fp32-straight", "sd15", FP32, 4.5)
F_FIRST = Run("resume_fp32-first", "sd15", {**FP32, **FIRST_HALF}, 14.5)  # + AdamW's two fp32 moments
F_RESUMED = Run("resume_fp32-resumed", "sd15", FP32, 4.5, resumes=F_FIRST.name)
F_AGAIN = Run("repeat_fp32-again", "sd15", FP32, 4.5)
LORA = Run("lora", "sd15", dict(batch_size=1, max_steps=4, mixed_precision="bf16", lr=1e-4, lora_rank=16,
                                lora_targets="attn_ff", lora_text_encoder=True, gradient_checkpointing=True), 0.2)
SD21V = Run("sd21v", "sd21v", dict(batch_size=2, max_steps=4, mixed_precision="bf16", lr=1e-5,
                                   gradient_checkpointing=True, validation_split=0.25,
                                   validation_every_n_epochs=1, save_single_file=True), 5.5)

# The groups `--only` names, in the order their runs start: the rows first, then what only explains.
GROUPS: dict[str, list[Run]] = {
    "sd15_full": [A],
    "resume_bf16": [A, B, C],
    "lora": [LORA],
    "sd21v": [SD21V],
    "resume_fp32": [F_FIRST, F_STRAIGHT, F_RESUMED],
    "repeat_fp32": [F_STRAIGHT, F_AGAIN],  # `deterministic` itself: two runs alike, equal bit for bit
}
IMAGES = {"sd15": 3, "sd21v": 4}  # per concept (two concepts): sd15's 6 images make one batch-1 epoch of 6 steps


@dataclass
class Outcome:
    run: Run
    log: Path
    exit_code: int | None = None  # None: never ended (killed at the deadline) or never started
    wall_s: float | None = None
    peak_gib: float | None = None
    reserved_gib: float | None = None
    plan_gib: float | None = None
    saved: dict[str, list[Path]] = field(default_factory=dict)  # "model" / "LoRA" / "single file" -> paths
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def last(self, kind: str) -> Path | None:
        """The run's last save of `kind` (model, LoRA, single file), not its EMA twin."""
        mine = [p for p in self.saved.get(kind, []) if not p.name.removesuffix(".safetensors").endswith("-ema")]
        return mine[-1] if mine else None


@dataclass
class GroupResult:
    name: str
    passed: bool | None  # None: not run (budget, or a run it needs failed before it)
    detail: str
    outcomes: list[Outcome]


# ---------------------------------------------------------------------------------------------- model files


def write_original_file(parts: Parts, path: Path, dry: bool) -> Path:
    """`parts` as an original fp16 single file (SD2's with its yaml, which says v-prediction); the dry run's tiny
    SD2 has no yaml that fits it, so its runs name the prediction type instead."""
    from safetensors.torch import save_file

    from convert.to_original import diffusers_to_original

    def half(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in module.state_dict().items()}

    vae_config = dict(parts.vae.config)
    state = diffusers_to_original(half(parts.unet), parts.unet_config, half(parts.vae), vae_config,
                                  half(parts.text_encoder), parts.spec.family)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    if parts.spec.family == "sd2" and not dry:
        path.with_suffix(".yaml").write_bytes((REPO_ROOT / parts.spec.yaml).read_bytes())
    return path


def convert_once(checkpoint: Path, cache_dir: Path, dry: bool) -> Path:
    """The trainer's ckpt_cache entry of `checkpoint` (its own code converts it), before any run asks for it."""
    from trainer.models.ckpt_cache import prepare_single_file

    v = dry and checkpoint.stem == "sd21v"  # as the runs' prediction_type says it (Runner.argv)
    return prepare_single_file(checkpoint, cache_dir, "v_prediction" if v else None).path


@dataclass
class Models:
    files: dict[str, Path] = field(default_factory=dict)  # model -> the original single file the runs start from
    bases: dict[str, Path] = field(default_factory=dict)  # model -> its ckpt_cache entry: the weights at step 0


# ---------------------------------------------------------------------------------------------- running them


class Runner:
    """Starts runs as traced train.py processes, `parallel` at a time, a resumed run after the one it resumes."""

    def __init__(self, work: Path, files: dict[str, Path], dry: bool, parallel: int):
        self.work, self.files, self.dry, self.parallel = work, files, dry, parallel
        self.outcomes: dict[str, Outcome] = {}

    def data(self, model: str, resolution: int) -> Path:
        from trainer.tiny.shapes import make_shapes_dataset

        folder = self.work / f"data-{model}"
        if not folder.exists():
            make_shapes_dataset(folder, images_per_concept=IMAGES[model], size=resolution)
        return folder

    def argv(self, run: Run, resolution: int) -> list[str]:
        settings = {
            "resume_ckpt": str(self.files[run.model]), "ckpt_cache_dir": str(self.work / "ckpt_cache"),
            "data_root": str(self.data(run.model, resolution)), "resolution": resolution,
            "logdir": str(self.work / "logs"), "run_name": run.name, "max_epochs": 1000, "seed": 555,
            # a resumed run reads the latents its first half encoded: the comparison is of the resume alone
            "log_step": 1, "latent_cache_dir": str(self.work / "latents" / (run.resumes or run.name)),
            **({"prediction_type": "v_prediction"} if self.dry and run.model == "sd21v" else {}),
            **run.settings,
        }
        if "sample_steps" in run.settings:
            settings["sample_prompts"] = str(self.sample_prompts())
        if run.resumes:
            settings["resume_state"] = str(self.outcomes[run.resumes].last("model"))
        args = [sys.executable, str(TRACED_TRAIN)]
        for key, value in settings.items():
            args += [f"--{key}", json.dumps(value) if isinstance(value, bool) else str(value)]
        return args

    def sample_prompts(self) -> Path:
        path = self.work / "samples.json"  # written once: runs already started read it
        if not path.exists():
            path.write_text(json.dumps({"num_inference_steps": 10, "cfgs": [7.0],
                                        "samples": [{"prompt": "a photo of a red circle", "seed": 1}]}))
        return path

    def run_all(self, runs: list[Run], resolution: Callable[[str], int], end: float,
                ended: Callable[[Outcome], None]) -> None:
        """Every run of `runs` (each once) until `end` (time.monotonic()), `ended` told of each as it ends: those
        still running at `end` are stopped, those not started then are left out, and are told too."""
        waiting = list(dict.fromkeys(runs))
        running: dict[str, tuple[subprocess.Popen, float]] = {}
        while (waiting or running) and time.monotonic() < end:
            for run in [r for r in waiting if self.ready(r)]:
                if len(running) < self.parallel and self.room_for(run, [self.outcomes[n].run for n in running]):
                    waiting.remove(run)
                    running[run.name] = self.start(run, resolution(run.model)), time.monotonic()
            for name, (process, started) in list(running.items()):
                if process.poll() is not None:
                    del running[name]
                    ended(self.finish(name, process.returncode, time.monotonic() - started))
            for run in [r for r in waiting if r.resumes and self.ended_badly(r.resumes)]:
                waiting.remove(run)  # what it resumes failed: nothing to resume
                self.outcomes[run.name] = Outcome(run, self.log(run), note=f"not run: {run.resumes} failed")
                ended(self.outcomes[run.name])
            time.sleep(0.5)
        for name, (process, started) in running.items():
            process.kill()
            process.wait()
            ended(self.finish(name, None, time.monotonic() - started, "stopped: out of budget"))
        for run in waiting:
            self.outcomes[run.name] = Outcome(run, self.log(run), note="not started: out of budget")
            ended(self.outcomes[run.name])

    def room_for(self, run: Run, running: list[Run]) -> bool:
        """Whether the disk holds `run`'s saves beside what the running runs will still write (their whole saves:
        a cautious count). With nothing running it starts anyway: its own preflight then says what is missing."""
        if self.dry or not running:
            return True
        free = shutil.disk_usage(self.work).free / GiB
        return free - sum(r.saves_gib for r in running) >= run.saves_gib + DISK_MARGIN_GIB

    def remove(self, name: str) -> None:
        """A run's folder (its saves) and latent cache; its log stays."""
        for folder in (self.work / "logs" / name, self.work / "latents" / name):
            shutil.rmtree(folder, ignore_errors=True)

    def ended_badly(self, name: str) -> bool:
        return name in self.outcomes and self.outcomes[name].wall_s is not None and not self.outcomes[name].ok

    def ready(self, run: Run) -> bool:
        return run.resumes is None or (run.resumes in self.outcomes and self.outcomes[run.resumes].ok)

    def log(self, run: Run) -> Path:
        return self.work / "run_logs" / f"{run.name}.log"

    def start(self, run: Run, resolution: int) -> subprocess.Popen:
        log = self.log(run)
        log.parent.mkdir(parents=True, exist_ok=True)
        self.outcomes[run.name] = Outcome(run, log)
        env = {**os.environ, "TRACE_OUT": str(log.with_suffix(".json"))}
        with open(log, "w") as out:
            return subprocess.Popen(self.argv(run, resolution), stdout=out, stderr=subprocess.STDOUT, env=env,
                                    cwd=self.work)

    def finish(self, name: str, exit_code: int | None, wall_s: float, note: str = "") -> Outcome:
        """The run's outcome, read from its log and trace."""
        outcome = self.outcomes[name]
        outcome.exit_code, outcome.wall_s = exit_code, wall_s
        text = outcome.log.read_text(errors="replace")
        for kind, path in SAVED.findall(text):
            outcome.saved.setdefault(kind, []).append(Path(path.split(" (+ ")[0].strip()))
        plans = PLAN.findall(text)
        outcome.plan_gib = float(plans[-1]) if plans else None
        trace = outcome.log.with_suffix(".json")
        if trace.exists():
            measured = json.loads(trace.read_text())
            if measured["peak_allocated"] is not None:
                outcome.peak_gib = measured["peak_allocated"] / GiB
                outcome.reserved_gib = measured["peak_reserved"] / GiB
        outcome.note = note or train_log_problem(text, exit_code) or ""
        return outcome


def run_groups(names: list[str], runner: Runner, models: Models, resolution: Callable[[str], int], end: float,
               said_run: Callable[[Outcome], None], said_group: Callable[[GroupResult], None]) -> None:
    """The runs of groups `names`; each group checked as soon as its runs have ended, then its runs' folders
    removed once no other group still needs them (a full-size fp32 save with EMA and single files is 17 GB), and
    a resumed run's source as soon as the resumed run has ended (only the resume read its training state)."""
    pending = {name: {run.name for run in GROUPS[name]} for name in names}
    runs = list(dict.fromkeys(run for name in names for run in GROUPS[name]))

    def ended(outcome: Outcome) -> None:
        said_run(outcome)
        if outcome.run.resumes:
            runner.remove(outcome.run.resumes)
        for name, waiting in list(pending.items()):
            waiting.discard(outcome.run.name)
            if not waiting:
                del pending[name]
                said_group(check_group(name, runner.outcomes, runner.work, models))
                for run in GROUPS[name]:
                    if not any(run in GROUPS[other] for other in pending):  # no group still to check reads it
                        runner.remove(run.name)

    runner.run_all(runs, resolution, end, ended)


# ---------------------------------------------------------------------------------------------- the checks


def check_group(name: str, outcomes: dict[str, Outcome], work: Path, models: Models) -> GroupResult:
    """The group's verdict from its runs' outcomes and what they saved."""
    mine = [outcomes[run.name] for run in GROUPS[name] if run.name in outcomes]
    failed = [o for o in mine if not o.ok]
    if len(mine) < len(GROUPS[name]) or failed:
        said = "; ".join(f"{o.run.name}: {o.note or f'exit {o.exit_code}'}" for o in failed) or "not all runs started"
        return GroupResult(name, False if any(o.exit_code is not None for o in failed) else None, said, mine)
    try:
        passed, detail = CHECKS[name](outcomes, work, models)
    except Exception as err:  # a check that breaks says so and costs the other groups nothing
        passed, detail = False, f"the check failed: {type(err).__name__}: {first_line(err)[:200]}"
    return GroupResult(name, passed, detail, mine)


def sd15_full_check(outcomes: dict[str, Outcome], work: Path, models: Models) -> tuple[bool, str]:
    run = outcomes[A.name]
    saved, single = run.last("model"), run.last("single file")
    problems = [p for p in (load_back(saved), load_back(saved.with_name(saved.name + "-ema")),
                            check_single_file(single, models.files["sd15"]), sample_problem(work / "logs" / A.name))
                if p]
    return not problems, "; ".join(problems) or (
        f"{saved.name} and its -ema twin load in diffusers; {single.name} has every key and shape of the file the "
        "run started from; the samples are images")


def resume_check(straight: Outcome, resumed: Outcome, base: Path, exact: bool) -> tuple[bool, str]:
    """3 + 3 steps against 6: bit for bit (exact), or within 5% of what training changed. A resumed run that did
    not resume (6 steps from the start) would equal the straight one: its log must say where it went on from."""
    went_on = re.search(r"Resumed from .*: step (\d+)", resumed.log.read_text(errors="replace"))
    if not went_on or int(went_on[1]) != FIRST_HALF["max_steps"]:
        return False, f"{resumed.run.name} did not say it resumed at step {FIRST_HALF['max_steps']}"
    compared = compare_saves(straight.last("model"), resumed.last("model"), base)
    said = compared.describe()
    ok = compared.equal if exact else compared.equal or compared.relative <= 0.05
    folders = [(straight.last("model"), resumed.last("model"))]
    if (twin := straight.last("model").with_name(straight.last("model").name + "-ema")).exists():
        folders.append((twin, resumed.last("model").with_name(resumed.last("model").name + "-ema")))
        ema = compare_saves(*folders[1], base)
        said += f"; EMA: {ema.describe()}"
        ok = ok and (ema.equal if exact else ema.equal or ema.relative <= 0.05)
    return ok, said


def resume_bf16_check(outcomes: dict[str, Outcome], work: Path, models: Models) -> tuple[bool, str]:
    return resume_check(outcomes[A.name], outcomes[C.name], models.bases["sd15"], exact=False)


def resume_fp32_check(outcomes: dict[str, Outcome], work: Path, models: Models) -> tuple[bool, str]:
    return resume_check(outcomes[F_STRAIGHT.name], outcomes[F_RESUMED.name], models.bases["sd15"], exact=True)


def repeat_fp32_check(outcomes: dict[str, Outcome], work: Path, models: Models) -> tuple[bool, str]:
    compared = compare_saves(outcomes[F_STRAIGHT.name].last("model"), outcomes[F_AGAIN.name].last("model"),
                             models.bases["sd15"])
    warned = sorted(set(re.findall(r"(\w+) does not have a deterministic implementation",
                                   outcomes[F_AGAIN.name].log.read_text(errors="replace"))))
    said = f"two deterministic 6-step runs: {compared.describe()}"
    return compared.equal, said + (f"; ops torch named as without an ordered kernel: {', '.join(warned)}" if warned
                                   else "")


def lora_check(outcomes: dict[str, Outcome], work: Path, models: Models) -> tuple[bool, str]:
    problem, said = check_lora_file(outcomes[LORA.name].last("LoRA"), models.bases["sd15"])
    return problem is None, problem or said


def sd21v_check(outcomes: dict[str, Outcome], work: Path, models: Models) -> tuple[bool, str]:
    run = outcomes[SD21V.name]
    text = run.log.read_text(errors="replace")
    losses = [float(x) for x in re.findall(r"Validation loss at step \d+: ([^\s,]+)", text)]
    problems = []
    if "prediction type v_prediction" not in text:
        problems.append("the run did not say prediction type v_prediction")
    if not losses or not all(math.isfinite(x) for x in losses):
        problems.append(f"validation losses {losses or 'none'} in its log")
    single = run.last("single file")
    if single is None or not single.with_suffix(".yaml").exists():
        problems.append(f"no single file with its yaml beside it ({single})")
    if (problem := load_back(run.last("model"))) is not None:
        problems.append(problem)
    return not problems, "; ".join(problems) or (
        f"v-prediction, validation losses {', '.join(f'{x:.4f}' for x in losses)}; the save loads in diffusers, "
        "its single file has its yaml")


CHECKS = {"sd15_full": sd15_full_check, "resume_bf16": resume_bf16_check, "resume_fp32": resume_fp32_check,
          "repeat_fp32": repeat_fp32_check, "lora": lora_check, "sd21v": sd21v_check}
