"""LoRA against full fine-tuning on the same model: peak memory and step time, side by side in one run.

Each variant is a real `python train.py` run, as a user would start it, of the same random-weight model (a
diffusers folder built from SD1.5's real configs) on the same generated images, each in its own process so that
its peak memory is its own:

- full adamw: UNet and text encoder trained, fp32 masters, AdamW (the trainer's defaults);
- full adamw8bit: the same with bitsandbytes' 8-bit AdamW;
- LoRA rank 16 attn_ff: adapters on the UNet's attention and feed-forward layers, the text encoder frozen (its
  embeddings cached, as the trainer does for a frozen encoder), the whole base frozen in the compute dtype;
- LoRA rank 16 all + text encoder: adapters on every UNet block layer (LoCon) and on the text encoder;
- DoRA, LoHa, LoKr rank 16 attn_ff: the other adapter kinds (lora_kind) on LoRA's layers, beside its row.

With `--checkpointing on` or `both`, each is measured with gradient checkpointing too (one table per setting).

The child process runs train.py's own `main` with two read-only probes around the trainer's functions: a
pre-forward hook on the loaded UNet stamps each step's start (on CUDA a CUDA event, so no step waits for the
GPU), and, just before the trainer's final save (`trainer.run.loop.finish`), the clock stops and the peak is read:
on a CPU the process's peak RSS (VmHWM: loading, latent caching and every step; the final save is left out), on
CUDA `torch.cuda.max_memory_allocated`. A step's time is the median interval between consecutive steps after
the warm-up steps; on a CPU also in the process's CPU seconds, which other work on the same cores inflates far
less than the wall clock (for wall times that count, measure on an idle machine). The trainable parameters are
counted from the run's prepared models; "plan GiB" is the peak the trainer's memory plan printed for the run
(trainer/preflight/memory.py).

    python bench/bench_lora.py [--size small|full] [--device auto|cpu|cuda] [--checkpointing off|on|both]
                               [--variants full-adamw lora16-attn_ff ...] [--rounds N] [--keep-dir DIR]

Sizes: "small" (SD1.5's layout at half width: UNet, CLIP text encoder of width 384; the real VAE) at 128 px,
batch 1: 4-7 minutes on 2 CPU cores (bitsandbytes' 8-bit AdamW is slow on a CPU). "full" (SD1.5 as it is) at
512 px, batch 1: about 17 GiB of RAM for full AdamW, and 10-20 minutes on 2 CPU cores. Ratios are to the
table's "full adamw" row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

GiB = 2**30
BASELINE = "full-adamw"
PRECISIONS = {"no": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}  # accelerate's mixed_precision


@dataclass(frozen=True)
class Size:
    label: str
    resolution: int
    batch: int
    warmup: dict[str, int]  # device -> warm-up steps (not timed)
    steps: dict[str, int]  # device -> timed steps


SIZES = {
    "small": Size("small SD1 (SD1.5's layout at half width, random weights)", 128, 1,
                  {"cpu": 2, "cuda": 5}, {"cpu": 5, "cuda": 20}),
    "full": Size("SD1.5 (random weights)", 512, 1, {"cpu": 1, "cuda": 5}, {"cpu": 3, "cuda": 20}),
}
LORA = ("--lora_rank", "16", "--lora_unet_lr", "1e-4")
VARIANTS = {  # name -> train.py options
    "full-adamw": ("--optimizer", "adamw"),
    "full-adamw8bit": ("--optimizer", "adamw8bit"),
    "lora16-attn_ff": (*LORA, "--lora_targets", "attn_ff", "--optimizer", "adamw"),
    "lora16-all+te": (*LORA, "--lora_targets", "all", "--lora_text_encoder", "true", "--lora_text_encoder_lr", "5e-5",
                      "--optimizer", "adamw"),
    # the other adapter kinds (lora_kind) on LoRA's attn_ff layers at the same rank
    **{f"{kind}16-attn_ff": (*LORA, "--lora_kind", kind, "--lora_targets", "attn_ff", "--optimizer", "adamw")
       for kind in ("dora", "loha", "lokr")},
}


# ---------------------------------------------------------------- the model and the data (in a child process)


def make_model(size: str, folder: Path) -> None:
    """A random-weight SD1.5-architecture diffusers folder (UNet and text encoder stored in fp16), from the real
    configs as the converter makes them; "small" halves the UNet's and the text encoder's widths."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bench.gpu.gpu_rows import SPECS, Parts, real_configs
    from bench.gpu.gpu_trainer import save_model_folder
    from trainer.tiny.model import SD_BETAS

    spec = SPECS["sd15"]
    unet_config, vae_config, text_config = real_configs(spec)
    if size == "small":
        text_config.update(hidden_size=384, intermediate_size=1536, num_attention_heads=6, projection_dim=384)
        unet_config.update(block_out_channels=tuple(c // 2 for c in unet_config["block_out_channels"]),
                           cross_attention_dim=384)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(unet_config)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    vae = AutoencoderKL.from_config(vae_config)
    parts = Parts("sd15", spec, SIZES[size].resolution, unet, text_encoder, vae,
                  DDPMScheduler(**SD_BETAS, prediction_type=spec.prediction), unet_config, text_config)
    save_model_folder(parts, folder)


def prepare(work: Path, size: str, images: int) -> tuple[Path, Path]:
    """The model folder (built once: a kept work folder reuses it) and a generated image set of `images`."""
    from trainer.tiny.shapes import make_shapes_dataset

    model = work / f"model-{size}"
    if not (model / "model_index.json").is_file():
        print(f"building a random-weight {SIZES[size].label} model ...", flush=True)
        shutil.rmtree(model, ignore_errors=True)
        # in a child: this process stays small, and its memory is no part of any run's
        subprocess.run([sys.executable, __file__, "--make-model", size, str(model)], check=True)
    data = work / f"data-{size}-{images}"
    if not data.is_dir():
        make_shapes_dataset(data, images_per_concept=math.ceil(images / 2), size=SIZES[size].resolution)
    return model, data


# ---------------------------------------------------------------- one training run, measured (in a child process)


class StepClock:
    """Stamps each step's start (the UNet's forward): on CUDA with events, so that no step waits for the GPU; on a
    CPU the wall clock and the process's CPU time (all its threads: what other processes on the cores do not
    inflate as much as the wall)."""

    def __init__(self, cuda: bool):
        import torch

        self.torch, self.cuda, self.stamps, self.cpu_stamps = torch, cuda, [], []

    def tick(self, *_) -> None:
        if self.cuda:
            event = self.torch.cuda.Event(enable_timing=True)
            event.record()
            self.stamps.append(event)
        else:
            self.stamps.append(time.perf_counter())
            self.cpu_stamps.append(time.process_time())

    def intervals(self) -> dict[str, list[float] | None]:
        """Seconds between consecutive stamps: {"wall": ..., "cpu": ... (None on CUDA)}."""
        if self.cuda:
            self.torch.cuda.synchronize()
            return {"wall": [a.elapsed_time(b) / 1e3 for a, b in pairwise(self.stamps)], "cpu": None}
        return {"wall": [b - a for a, b in pairwise(self.stamps)], "cpu": [b - a for a, b in pairwise(self.cpu_stamps)]}


def peak_memory(cuda: bool) -> int:
    """Bytes: CUDA's peak allocation, or this process's peak RSS (VmHWM: this process image's own, not a parent's)."""
    if cuda:
        import torch

        return torch.cuda.max_memory_allocated()
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024


def probe(target, name: str, wrap: Callable) -> None:
    """Replace `target.name` by `wrap(original)`."""
    setattr(target, name, wrap(getattr(target, name)))


def measured_run(out: Path, device: str, argv: list[str]) -> int:
    """train.py's `main(argv)` in this process, with the step clock and the peak read before the final save;
    writes what it measured to `out` as json."""
    import runpy

    # train.py as a program (run, not imported: nothing imports the entry point); loading it sets the threads'
    # wait policy before torch loads, and gives its main()
    train_main = runpy.run_path(str(REPO_ROOT / "train.py"), run_name="bench_lora_child")["main"]

    import torch

    import trainer.models.load
    import trainer.run.loop

    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        sys.exit("bench_lora: --device cuda, but torch sees no CUDA GPU")
    clock, measured = StepClock(cuda), {}

    def clocked(load_models):
        def load(*args, **kwargs):
            models = load_models(*args, **kwargs)
            models.unet.register_forward_pre_hook(clock.tick)
            return models
        return load

    def measured_finish(finish):
        def finish_measured(run, state):
            clock.tick()  # the last step's end
            measured.update(peak=peak_memory(cuda), precision=run.accelerator.mixed_precision,
                            device=torch.cuda.get_device_name() if cuda else "CPU", threads=torch.get_num_threads(),
                            trainable=sum(p.numel() for m in run.trained for p in m.parameters() if p.requires_grad))
            return finish(run, state)
        return finish_measured

    probe(trainer.models.load, "load_models", clocked)
    probe(trainer.run.loop, "finish", measured_finish)
    code = train_main(argv)
    out.write_text(json.dumps({**measured, **clock.intervals()}))
    return code


# ---------------------------------------------------------------- the parent: the variants side by side


@dataclass
class Row:
    variant: str
    trainable: int
    peak: int
    step_s: float
    cpu_step_s: float | None  # CPU seconds a step (on a CPU only)
    plan_gib: float | None
    precision: str
    device: str
    threads: int


def run_variant(work: Path, model: Path, data: Path, args, variant: str, checkpointing: bool, tag: str,
                steps: tuple[int, int]) -> Row:
    """One train.py process of `variant`; its log is kept in the work folder."""
    warmup, timed = steps
    name = f"{variant.replace('+', '-')}{'-ckpt' if checkpointing else ''}-{tag}"
    run_dir, log, out = work / "logs" / name, work / f"{name}.log", work / f"{name}.json"
    shutil.rmtree(run_dir, ignore_errors=True)
    out.unlink(missing_ok=True)  # a kept work folder's earlier measurement
    size = SIZES[args.size]
    argv = ["--resume_ckpt", str(model), "--data_root", str(data), "--resolution", str(size.resolution),
            "--batch_size", str(size.batch), "--max_steps", str(warmup + timed), "--gradient_checkpointing",
            str(checkpointing).lower(), "--logdir", str(work / "logs"), "--run_name", name,
            "--latent_cache_dir", str(work / f"latents-{args.size}"), "--save_single_file", "false",
            *VARIANTS[variant]]
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    command = [sys.executable, __file__, "--measure", str(out), args.device, "--", *argv]
    with log.open("w") as handle:
        code = subprocess.run(command, cwd=work, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
    text = log.read_text(errors="replace")
    if code != 0 or not out.is_file():
        sys.exit(f"{variant} failed (exit {code}); the end of {log}:\n{text[-3000:]}")
    shutil.rmtree(run_dir, ignore_errors=True)  # the saved model: not needed, and full size is GiBs
    result = json.loads(out.read_text())
    if "peak" not in result:
        sys.exit(f"{variant}: the run ended without reaching its final save; see {log}")
    wall, cpu = result["wall"][warmup:], result["cpu"] and result["cpu"][warmup:]
    if len(wall) != timed:
        sys.exit(f"{variant}: {len(wall)} timed steps, expected {timed} (the UNet ran other than once a step?)")
    return Row(variant, result["trainable"], result["peak"], statistics.median(wall), cpu and statistics.median(cpu),
               planned_peak(text), result["precision"], result["device"], result["threads"])


def planned_peak(log: str) -> float | None:
    """The peak GiB of the memory plan the run printed."""
    for line in log.splitlines():
        if line.startswith("Memory plan (") and " GiB peak" in line:
            return float(line.split(" GiB peak")[0].rsplit(" ", 1)[1])
    return None


def median_row(rows: list[Row]) -> Row:
    """The median over rounds of one variant's step time and peak."""
    first = rows[0]
    cpu = None if first.cpu_step_s is None else statistics.median(r.cpu_step_s for r in rows)
    return Row(first.variant, first.trainable, int(statistics.median(r.peak for r in rows)),
               statistics.median(r.step_s for r in rows), cpu, first.plan_gib, first.precision, first.device,
               first.threads)


def table(rows: list[Row], checkpointing: bool, args, steps: tuple[int, int]) -> str:
    size, base = SIZES[args.size], next((r for r in rows if r.variant == BASELINE), rows[0])
    on_cpu = base.cpu_step_s is not None
    memory = "peak RSS until the last step (the final save left out)" if on_cpu else \
        "peak allocated (torch.cuda.max_memory_allocated)"
    header = f"{'variant':<16}{'trainable':>11}{'peak GiB':>10}{'x full':>8}{'s/step':>9}{'x full':>8}"
    lines = [f"\nLoRA vs full fine-tuning: {size.label} at {size.resolution}px, batch {size.batch}, {base.device} "
             f"({base.threads} threads), {PRECISIONS.get(base.precision, base.precision)}, gradient checkpointing "
             f"{'on' if checkpointing else 'off'}; median of {steps[1]} steps after {steps[0]} warm-up, "
             f"{args.rounds} round(s); memory: {memory}; ratios to {base.variant}",
             header + (f"{'CPU s/step':>11}{'x full':>8}" if on_cpu else "") + f"{'plan GiB':>10}"]
    for r in rows:
        cpu = f"{r.cpu_step_s:>11.3f}{r.cpu_step_s / base.cpu_step_s:>8.2f}" if on_cpu else ""
        plan = f"{r.plan_gib:>10.2f}" if r.plan_gib is not None else f"{'-':>10}"
        lines.append(f"{r.variant:<16}{r.trainable / 1e6:>10.2f}M{r.peak / GiB:>10.2f}{r.peak / base.peak:>8.2f}"
                     f"{r.step_s:>9.3f}{r.step_s / base.step_s:>8.2f}{cpu}{plan}")
    return "\n".join(lines)


def resolve_device(requested: str) -> str:
    """auto: cuda when torch sees a GPU, else cpu."""
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run(work: Path, args) -> None:
    args.device = device = resolve_device(args.device)
    steps = (args.warmup if args.warmup is not None else SIZES[args.size].warmup[device],
             args.steps if args.steps is not None else SIZES[args.size].steps[device])
    model, data = prepare(work, args.size, SIZES[args.size].batch * (sum(steps) + 1))  # one epoch holds every step
    settings = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    tables = []
    for checkpointing in settings:
        measured: dict[str, list[Row]] = {variant: [] for variant in args.variants}
        for round_ in range(args.rounds):  # each round runs every variant: a machine that slows down hits all
            for variant in args.variants:
                print(f"{variant}, checkpointing {'on' if checkpointing else 'off'}, round {round_ + 1} ...",
                      flush=True)
                start = time.perf_counter()
                row = run_variant(work, model, data, args, variant, checkpointing, f"r{round_}", steps)
                print(f"  {row.step_s:.3f} s/step, peak {row.peak / GiB:.2f} GiB "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
                measured[variant].append(row)
        tables.append(table([median_row(rows) for rows in measured.values()], checkpointing, args, steps))
    print("\n".join(tables))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":  # a child: one measured train.py run
        out, device, _, *argv = sys.argv[2:]
        sys.exit(measured_run(Path(out), device, argv))
    if len(sys.argv) > 1 and sys.argv[1] == "--make-model":  # a child: builds the model folder
        make_model(sys.argv[2], Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="small")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: a CUDA GPU when torch sees one, else the CPU")
    parser.add_argument("--checkpointing", choices=["off", "on", "both"], default="off",
                        help="gradient checkpointing in every variant: off, on, or a table of each")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=1, help="run every variant this many times (median)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default: by size and device)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: by size and device)")
    parser.add_argument("--keep-dir", default=None, help="work here and keep the model, data and logs")
    args = parser.parse_args()
    work = Path(args.keep_dir or tempfile.mkdtemp(prefix="bench_lora-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        run(work, args)
    finally:
        if not args.keep_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
