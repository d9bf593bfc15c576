"""Trainer overhead: our training step against a bare PyTorch loop, side by side in one run.

Ours runs as a user would: the config's defaults, resolved for this machine as train.py resolves them
(trainer/preflight/device.py: precision, gradient checkpointing, loader workers, channels_last), and the threads'
wait policy train.py sets; the bench fixes only the model, data, batch size, resolution and step count. Both
train the same models (text encoder and UNet) with the same resolved precision, checkpointing and memory format,
and the same optimizer: torch's AdamW with the learning rate ours plans, fused where torch has the kernel, as
ours builds it (trainer/optim/build.py). The bare loop is the least a training step can be: fixed latents and
token ids already in memory, noise, forward, MSE, backward, step. Ours is a real `train()` run (accelerate, the
bucket data loader reading the latent cache, per-sample noise, the divergence guard, logging). A step's time is
the median interval between consecutive UNet forwards after a warm-up, measured by a pre-forward hook in both.

    python bench/bench_overhead.py [--steps 30] [--batch_size 4] [--rounds 2]

Models: "tiny" (the test model, 64px) and "small SD-shaped" (SD1's four UNet levels, two resnets per level,
cross-attention on the first three, at reduced width, 128px). Goal: ours / bare <= 1.02.

The last column is the divergence guard's share of our step (trainer/run/guard.py: the loss and the largest weight
checked after every optimizer step, on the device): its `after_step` timed alone over the same trained
parameters, divided by our step time. Goal: <= 2%.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train.py sets it, before torch loads: both loops share it

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from data.dataset import build_training_data  # noqa: E402
from data.options import DataOptions  # noqa: E402
from trainer.config.schema import TrainConfig  # noqa: E402
from trainer.models.load import load_models  # noqa: E402
from trainer.models.precision import COMPUTE_DTYPES, component_dtypes, training_precision  # noqa: E402
from trainer.optim.build import fused_kernels_fit  # noqa: E402
from trainer.optim.plan import plan_optimizers  # noqa: E402
from trainer.preflight.checks import run_preflight  # noqa: E402
from trainer.preflight.device import for_this_machine  # noqa: E402
from trainer.run.guard import WeightGuard  # noqa: E402
from trainer.run.loop import train  # noqa: E402
from trainer.tiny.model import TEXT_WIDTH, make_tiny_pipeline  # noqa: E402
from trainer.tiny.shapes import make_shapes_dataset  # noqa: E402

WARMUP = 5


def small_sd_unet() -> UNet2DConditionModel:
    """SD1.5's UNet layout (4 levels, 2 resnets each, cross-attention on 3) at 1/5 of its width."""
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(64, 128, 256, 256),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def save_model(folder: Path, kind: str) -> Path:
    pipeline = make_tiny_pipeline("sd1")
    if kind == "small":
        torch.manual_seed(0)
        pipeline.unet = small_sd_unet()
        pipeline.register_modules(unet=pipeline.unet)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


def step_times(stamps: list[float]) -> float:
    intervals = [b - a for a, b in zip(stamps[WARMUP:], stamps[WARMUP + 1:])]
    return statistics.median(intervals)


def user_config(model_dir: Path, data_root: Path, work: Path, args, resolution: int) -> TrainConfig:
    """The defaults, resolved for this machine; only what the bench must fix is set."""
    return for_this_machine(dataclasses.replace(
        TrainConfig(), resume_ckpt=str(model_dir), data_root=str(data_root), resolution=resolution,
        batch_size=args.batch_size, max_steps=args.steps, logdir=str(work / "logs"),
        latent_cache_dir=str(work / "cache"),
    ))


def time_ours(cfg: TrainConfig, work: Path) -> float:
    run_dir = work / "run"
    preflight = run_preflight(cfg, run_dir)
    precision = training_precision(cfg.mixed_precision)
    models = load_models(cfg.resume_ckpt, dtypes=component_dtypes(cfg, precision))
    data = build_training_data(DataOptions.from_config(cfg), models.tokenizer, models.vae,
                               cache_dir=preflight.cache_dir, scan=preflight.scan, held_out=preflight.validation)
    stamps: list[float] = []
    models.unet.register_forward_pre_hook(lambda module, inputs: stamps.append(time.perf_counter()))
    run_dir.mkdir(parents=True)
    train(cfg, models, data, run_dir, preflight, precision)
    return step_times(stamps)


def time_guard(model_dir: Path, calls: int = 50) -> float:
    """The guard's per-step work alone, over the parameters a run trains (UNet and text encoder)."""
    models = load_models(str(model_dir))
    params = [*models.unet.parameters(), *models.text_encoder.parameters()]
    guard = WeightGuard(params, half_saves=True, device=torch.device("cpu"))
    times = []
    for step in range(1, calls + 1):
        start = time.perf_counter()
        guard.add_loss(torch.tensor(0.5))
        guard.after_step(step)
        times.append(time.perf_counter() - start)
    assert guard.breakage() is None
    return statistics.median(times)


def time_bare(cfg: TrainConfig, lr: float) -> float:
    """The same models, precision, checkpointing, memory format and optimizer as ours, and nothing else."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = training_precision(cfg.mixed_precision)
    models = load_models(cfg.resume_ckpt)
    unet, text_encoder, scheduler = models.unet.to(device), models.text_encoder.to(device), models.noise_scheduler
    unet.train(), text_encoder.train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        text_encoder.activation_checkpointing_enable()
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    unet.to(memory_format=memory_format)
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, fused=fused_kernels_fit([{"params": params}], device) or None)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    latent = cfg.resolution // 8
    latents = torch.randn(cfg.batch_size, 4, latent, latent, device=device)
    input_ids = torch.randint(0, 49408, (cfg.batch_size, 77), device=device)
    stamps: list[float] = []
    unet.register_forward_pre_hook(lambda module, inputs: stamps.append(time.perf_counter()))
    for _ in range(cfg.max_steps):
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (cfg.batch_size,), device=device)
        with torch.autocast(device.type, COMPUTE_DTYPES[precision], enabled=precision != "no"):
            states = text_encoder(input_ids)[0]
            noisy = scheduler.add_noise(latents, noise, timesteps).contiguous(memory_format=memory_format)
            prediction = unet(noisy, timesteps, states).sample
        scaler.scale(F.mse_loss(prediction.float(), noise)).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    stamps.append(time.perf_counter())  # bounds the last step like the next step's forward would
    return step_times(stamps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--models", default="tiny,small")
    parser.add_argument("--rounds", type=int, default=2, help="ours, then bare, this many times over")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for kind in args.models.split(","):
            resolution = 64 if kind == "tiny" else 128
            model_dir = save_model(tmp / f"model-{kind}", kind)
            data_root = make_shapes_dataset(tmp / f"data-{kind}", images_per_concept=8, size=resolution)
            configs = [user_config(model_dir, data_root, tmp / f"ours-{kind}-{i}", args, resolution)
                       for i in range(args.rounds)]
            lr = plan_optimizers(configs[0]).unet.lr
            # ours, bare, ours, bare, ...: the median of each side evens out a machine that speeds up or slows down
            ours, bare = [], []
            for i, cfg in enumerate(configs):
                ours.append(time_ours(cfg, tmp / f"ours-{kind}-{i}"))
                bare.append(time_bare(cfg, lr))
            rows.append((kind, resolution, statistics.median(ours), statistics.median(bare), time_guard(model_dir)))
    cfg = configs[0]
    print(f"\nTrainer overhead, batch {args.batch_size}, as a user runs it on this machine: mixed_precision "
          f"{cfg.mixed_precision}, gradient_checkpointing {cfg.gradient_checkpointing}, num_workers {cfg.num_workers}, "
          f"channels_last {cfg.channels_last}, AdamW (fused where torch has it) in both, {torch.get_num_threads()} "
          f"threads, OMP_WAIT_POLICY {os.environ['OMP_WAIT_POLICY']}, {'CUDA' if torch.cuda.is_available() else 'CPU'}; "
          f"median step time after {WARMUP} warm-up steps:")
    print(f"{'model':<8} {'px':>4} {'ours ms':>9} {'bare ms':>9} {'ours/bare':>10} {'guard ms':>9} {'guard/ours':>11}")
    for kind, resolution, ours, bare, guard in rows:
        print(f"{kind:<8} {resolution:>4} {ours * 1e3:>9.1f} {bare * 1e3:>9.1f} {ours / bare:>10.3f} "
              f"{guard * 1e3:>9.2f} {guard / ours:>10.1%}")


if __name__ == "__main__":
    main()
