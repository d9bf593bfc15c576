"""Epoch-1 vs epoch-2 time with the latent cache off, on (first run: fills it) and on (second run: reuses it).

Real `train()` runs of the tiny SD1 model on generated images; a pre-forward hook on the UNet timestamps every
step, so an epoch's time is from its first step to the next epoch's first step (epoch 1 starts when train()
is called, so it also carries accelerate's set-up, the same in every mode; a third epoch bounds epoch 2). "loader" is build_dataloader:
scanning, plus filling the cache when it is on.

    python bench/bench_latent_cache.py [--images 16] [--resolution 128] [--batch_size 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from data.dataset import build_dataloader, build_training_data  # noqa: E402
from data.options import DataOptions  # noqa: E402
from trainer.config.schema import TrainConfig  # noqa: E402
from trainer.models.load import load_models  # noqa: E402
from trainer.preflight.checks import run_preflight  # noqa: E402
from trainer.preflight.device import for_this_machine  # noqa: E402
from trainer.run.loop import train  # noqa: E402
from trainer.tiny.model import save_tiny_model  # noqa: E402
from trainer.tiny.shapes import make_shapes_dataset  # noqa: E402


def timed_run(cfg: TrainConfig, model_dir: Path, run_dir: Path) -> dict[str, float]:
    preflight = run_preflight(cfg, run_dir)
    models = load_models(str(model_dir))
    start = time.perf_counter()
    data = build_training_data(DataOptions.from_config(cfg), models.tokenizer, models.vae,
                               cache_dir=preflight.cache_dir, scan=preflight.scan, held_out=preflight.validation)
    loader = data.loader
    loader_s = time.perf_counter() - start
    stamps: list[float] = []
    cpu: list[float] = []

    def stamp(module, args) -> None:
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())

    models.unet.register_forward_pre_hook(stamp)
    encoder_calls: list[int] = []
    models.vae.encoder.register_forward_hook(lambda module, args, out: encoder_calls.append(1))
    steps = len(loader)
    begin, cpu_begin = time.perf_counter(), time.process_time()
    run_dir.mkdir(parents=True, exist_ok=True)
    train(cfg, models, data, run_dir, preflight, "no")
    end = time.perf_counter()
    assert len(stamps) == 3 * steps, (len(stamps), steps)
    return {
        "loader": loader_s,
        "epoch 1": stamps[steps] - begin,
        "epoch 2": stamps[2 * steps] - stamps[steps],
        "epoch 1 cpu": cpu[steps] - cpu_begin,
        "epoch 2 cpu": cpu[2 * steps] - cpu[steps],
        "encoder calls": float(len(encoder_calls)),
        "_total": end - begin,
    }


def data_path_per_epoch(cfg: TrainConfig, model_dir: Path) -> float:
    """Seconds per epoch to produce the latents the UNet needs, without the UNet: loader (+ VAE when uncached)."""
    from trainer.run.loop import encode_images

    models = load_models(str(model_dir))
    loader = build_dataloader(DataOptions.from_config(cfg), models.tokenizer, models.vae)
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        for batch in loader:
            if "latents" not in batch:
                encode_images(models.vae, batch["pixel_values"], generator)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = save_tiny_model(tmp / "model", "sd1")
        data = make_shapes_dataset(tmp / "data", images_per_concept=args.images // 2, size=args.resolution)
        base = for_this_machine(dataclasses.replace(
            TrainConfig(), data_root=str(data), resolution=args.resolution, batch_size=args.batch_size, max_epochs=3,
            # num_workers 0: all data work happens in this process, so its CPU time counts it; on a shared
            # machine CPU-seconds are steadier than wall time
            mixed_precision="no", gradient_checkpointing=False, num_workers=0, logdir=str(tmp / "logs"),
            latent_cache_dir=str(tmp / "cache"), save_ckpt_dir=str(tmp / "saves"),
        ))
        modes = {
            "cache off": dataclasses.replace(base, cache_latents=False),
            "cache on, 1st run": base,
            "cache on, 2nd run": base,
        }
        results = {name: timed_run(cfg, model_dir, tmp / f"run{i}") for i, (name, cfg) in enumerate(modes.items())}
        data_off = data_path_per_epoch(modes["cache off"], model_dir)
        data_on = data_path_per_epoch(base, model_dir)

    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\n{args.images} images at {args.resolution}px, batch {args.batch_size}, tiny SD1, {device}; seconds")
    rows = ["loader", "epoch 1", "epoch 2", "epoch 1 cpu", "epoch 2 cpu", "encoder calls"]
    print(f"{'':18}" + "".join(f"{r:>14}" for r in rows) + f"{'ep2/ep1':>10}{'ep2/ep1 cpu':>13}")
    for name, r in results.items():
        cells = "".join(f"{r[k]:>14.0f}" if k == "encoder calls" else f"{r[k]:>14.2f}" for k in rows)
        print(f"{name:18}{cells}{r['epoch 2'] / r['epoch 1']:>10.2f}{r['epoch 2 cpu'] / r['epoch 1 cpu']:>13.2f}")
    off, cold, warm = results.values()
    for unit, suffix in (("wall", ""), ("cpu", " cpu")):
        print(
            f"cache off / on, {unit}: epoch 2 x{off['epoch 2' + suffix] / cold['epoch 2' + suffix]:.2f}; "
            f"second run's epoch 1 x{off['epoch 1' + suffix] / warm['epoch 1' + suffix]:.2f}"
        )
    print(
        f"data path alone (loader, + VAE encode when uncached), best of 2 epochs: cache off {data_off:.2f} s, "
        f"cache on {data_on:.3f} s per epoch: x{data_off / data_on:.0f}"
    )


if __name__ == "__main__":
    main()
