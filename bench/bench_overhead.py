"""Trainer overhead: our training step against a bare PyTorch loop, side by side in one run.

Both train the same model (text encoder and UNet), the same batch size and resolution, with torch's AdamW at
the same settings. The bare loop is the least a training step can be: fixed latents and token ids already in
memory, noise, forward, MSE, backward, step. Ours is a real `train()` run (accelerate, the bucket data loader
reading the latent cache, per-sample noise, the nan check, logging). A step's time is the median interval
between consecutive UNet forwards after a warm-up, measured by a pre-forward hook in both.

    python bench/bench_overhead.py [--steps 30] [--batch_size 4]

Models: "tiny" (the test model, 64px) and "small SD-shaped" (SD1's four UNet levels, two resnets per level,
cross-attention on the first three, at reduced width, 128px). Goal: ours / bare <= 1.05.

The last column is the divergence guard's share of our step (trainer/guard.py: the loss and the largest weight
checked after every optimizer step, on the device): its `after_step` timed alone over the same trained
parameters, divided by our step time. Goal: <= 2%.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from data.dataset import build_training_data  # noqa: E402
from data.options import DataOptions  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.guard import WeightGuard  # noqa: E402
from trainer.loop import train  # noqa: E402
from trainer.models import load_models  # noqa: E402
from trainer.preflight import run_preflight  # noqa: E402
from trainer.synthetic import make_shapes_dataset  # noqa: E402
from trainer.tiny import TEXT_WIDTH, make_tiny_pipeline  # noqa: E402

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


def time_ours(model_dir: Path, data_root: Path, work: Path, args, resolution: int) -> float:
    cfg = dataclasses.replace(
        TrainConfig(), resume_ckpt=str(model_dir), data_root=str(data_root), resolution=resolution,
        batch_size=args.batch_size, max_steps=args.steps, max_epochs=10_000, mixed_precision="no",
        gradient_checkpointing=False, lr=1e-5, log_step=25, sample_steps=10**9, save_single_file=False,
        logdir=str(work / "logs"), latent_cache_dir=str(work / "cache"), num_workers=args.num_workers,
    )
    run_dir = work / "run"
    preflight = run_preflight(cfg, run_dir)
    models = load_models(str(model_dir))
    data = build_training_data(DataOptions.from_config(cfg), models.tokenizer, models.vae,
                               cache_dir=preflight.cache_dir, scan=preflight.scan, held_out=preflight.validation)
    stamps: list[float] = []
    models.unet.register_forward_pre_hook(lambda module, inputs: stamps.append(time.perf_counter()))
    run_dir.mkdir(parents=True)
    train(cfg, models, data, run_dir, preflight, "no")
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


def time_bare(model_dir: Path, args, resolution: int) -> float:
    models = load_models(str(model_dir))
    unet, text_encoder, scheduler = models.unet.train(), models.text_encoder.train(), models.noise_scheduler
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    latent = resolution // 8
    latents = torch.randn(args.batch_size, 4, latent, latent)
    input_ids = torch.randint(0, 49408, (args.batch_size, 77))
    stamps: list[float] = []
    unet.register_forward_pre_hook(lambda module, inputs: stamps.append(time.perf_counter()))
    for _ in range(args.steps):
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (args.batch_size,))
        states = text_encoder(input_ids)[0]
        prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, states).sample
        F.mse_loss(prediction.float(), noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    stamps.append(time.perf_counter())  # bounds the last step like the next step's forward would
    return step_times(stamps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_workers", type=int, default=0, help="our loader's workers (0: in the main process)")
    parser.add_argument("--models", default="tiny,small")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for kind in args.models.split(","):
            resolution = 64 if kind == "tiny" else 128
            model_dir = save_model(tmp / f"model-{kind}", kind)
            data_root = make_shapes_dataset(tmp / f"data-{kind}", images_per_concept=8, size=resolution)
            ours_first = time_ours(model_dir, data_root, tmp / f"ours-{kind}-a", args, resolution)
            bare = time_bare(model_dir, args, resolution)
            ours = time_ours(model_dir, data_root, tmp / f"ours-{kind}-b", args, resolution)
            bare_second = time_bare(model_dir, args, resolution)
            guard = time_guard(model_dir)
            # ours, bare, ours, bare: the median of each pair evens out a machine that speeds up or slows down
            rows.append((kind, resolution, (ours_first + ours) / 2, (bare + bare_second) / 2, guard))
    print(f"\nTrainer overhead, batch {args.batch_size}, fp32, AdamW, {torch.get_num_threads()} CPU threads, "
          f"{'CUDA' if torch.cuda.is_available() else 'CPU'}; median step time after {WARMUP} warm-up steps:")
    print(f"{'model':<8} {'px':>4} {'ours ms':>9} {'bare ms':>9} {'ours/bare':>10} {'guard ms':>9} {'guard/ours':>11}")
    for kind, resolution, ours, bare, guard in rows:
        print(f"{kind:<8} {resolution:>4} {ours * 1e3:>9.1f} {bare * 1e3:>9.1f} {ours / bare:>10.3f} "
              f"{guard * 1e3:>9.2f} {guard / ours:>10.1%}")


if __name__ == "__main__":
    main()
