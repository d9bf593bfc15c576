"""Full size on this machine: peak memory of real-size training against its floor, for SD1.5 and SD2.1-768-v.

Builds random-weight models from the real configs (v1-inference.yaml; v2-inference-v.yaml at 768 with its
sidecar), writes each as an original fp16 single file, and gives it to `python train.py` as resume_ckpt: it is
converted once into ckpt_cache/, trained 2 steps at 64 px with batch 1 (UNet and text encoder), and saved as an
fp16 folder plus a single file, with the training state (to weigh the optimizer's state). Each run is a fresh
process; it prints

- peak RSS against the floor of that run: trained parameters x (fp32 weight + fp32 gradient + optimizer state
  bytes) + frozen parameters x their bytes (the VAE, fp32 on a CPU);
- the optimizer state's bytes per trained parameter, read from the saved state (8-bit state: about 2);
- bytes the process wrote against the size of what it left on disk (1.0: each tensor written once);
- the peak the run's memory plan predicted (trainer/preflight/memory.py), and its ratio to the measured peak.

    python bench/bench_fullsize.py [--keep-dir DIR] [--models sd15 sd21v] [--optimizers adamw adamw8bit adamw8bit+fused]

About 2-3 minutes and up to 17 GiB of memory per run on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

GiB = 2**30
STATE_FILE = "optimizer.bin"  # accelerate's save_state: the optimizer's state_dict
MODELS = {  # name -> (original yaml, image size, upcast attention, family, text width, text layers)
    "sd15": ("v1-inference.yaml", 512, False, "sd1", 768, 12),
    "sd21v": ("v2-inference-v.yaml", 768, True, "sd2", 1024, 23),
}


def make_checkpoint(name: str, path: Path) -> None:
    """A random fp16 original single file of model `name` (and its yaml sidecar for SD2), from the real config."""
    import torch
    from safetensors.torch import save_file

    from convert.configs import text_encoder_config, unet_config_from_ldm, vae_config_from_ldm
    from convert.read import load_original_config
    from convert.to_diffusers import meta_model
    from convert.to_original import diffusers_to_original

    yaml, size, upcast, family, width, layers = MODELS[name]
    original = load_original_config(REPO_ROOT / yaml)
    unet_cfg, vae_cfg = unet_config_from_ldm(original, size, upcast, None), vae_config_from_ldm(original, size)
    parts = {part: meta_model(part, cfg).state_dict() for part, cfg in
             (("unet", unet_cfg), ("vae", vae_cfg), ("text_encoder", text_encoder_config(family, width, layers)))}
    generator = torch.Generator().manual_seed(0)

    def random_like(state):
        return {k: (torch.randn(v.shape, generator=generator) * 0.02).half() for k, v in state.items()}

    save_file(diffusers_to_original(random_like(parts["unet"]), unet_cfg, random_like(parts["vae"]), vae_cfg,
                                    random_like(parts["text_encoder"]), family), str(path))
    if family == "sd2":
        shutil.copyfile(REPO_ROOT / yaml, path.with_suffix(".yaml"))


def train_once(work: Path, checkpoint: Path, variant: str, data: Path) -> dict:
    """One `python train.py` process: its wall time, peak RSS, bytes written, what it saved, and the peak its
    memory plan predicted. `variant`: an optimizer name, with "+fused" for fused_backward."""
    optimizer, fused = variant.removesuffix("+fused"), variant.endswith("+fused")
    run = f"{checkpoint.stem}-{variant.replace('+', '-')}"
    shutil.rmtree(work / "logs" / run, ignore_errors=True)  # a kept work folder's earlier run (and its saves)
    argv = [sys.executable, str(REPO_ROOT / "train.py"), "--resume_ckpt", str(checkpoint), "--data_root", str(data),
            "--resolution", "64", "--batch_size", "1", "--max_steps", "2", "--optimizer", optimizer,
            "--gradient_checkpointing", "false", "--save_optimizer", "--logdir", str(work / "logs"),
            "--run_name", run, "--latent_cache_dir", str(work / f"cache-{checkpoint.stem}"), "--num_workers", "0",
            "--fused_backward", str(fused).lower()]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"train.py with {checkpoint.name}, {optimizer} failed:\n{out[-3000:]}")
    saved = [Path(line.split("Saved model: ", 1)[1].strip()) for line in out.splitlines() if "Saved model: " in line]
    plan = next(line for line in out.splitlines() if line.startswith("Memory plan ("))
    return {"wall": time.perf_counter() - start, "peak": usage.ru_maxrss * 1024, "written": usage.ru_oublock * 512,
            "save": saved[-1], "run_dir": work / "logs" / run, "latent_cache": work / f"cache-{checkpoint.stem}",
            "plan": float(plan.split(" GiB peak")[0].rsplit(" ", 1)[1]) * GiB}


def folder_bytes(*paths: Path) -> int:
    return sum(f.stat().st_size for p in paths if p.exists() for f in ([p] if p.is_file() else p.rglob("*"))
               if f.is_file())


def report(name: str, optimizer: str, result: dict, cache: Path) -> str:
    from trainer.saves import footprint

    counts = footprint.component_numels_in_folder(cache)
    trained, frozen = counts["unet"] + counts["text_encoder"], counts["vae"]
    state = next(result["save"].rglob(STATE_FILE)).stat().st_size / trained
    gradients = 0 if optimizer.endswith("+fused") else 4  # fused_backward never holds the gradients
    floor = trained * (4 + gradients + state) + frozen * 4
    first = not result.get("reused_cache")  # the first run of a model also converted it and filled the latent cache
    outputs = folder_bytes(result["run_dir"], *([cache, result["latent_cache"]] if first else []))
    return (f"{name:7}{optimizer:16}{trained / 1e6:9.0f}M{result['peak'] / GiB:9.2f}{floor / GiB:9.2f}"
            f"{result['peak'] / floor:8.2f}x{result['plan'] / GiB:9.2f}{result['plan'] / result['peak']:9.2f}"
            f"{state:10.2f}{result['written'] / max(outputs, 1):10.2f}{result['wall']:8.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep-dir", default=None, help="work here and keep the files (default: a temp dir)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "adamw8bit"],
                        help="optimizer names; NAME+fused trains with fused_backward (e.g. adamw8bit+fused)")
    parser.add_argument("--generate", nargs=2, metavar=("MODEL", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        make_checkpoint(args.generate[0], Path(args.generate[1]))
        return
    work = Path(args.keep_dir or tempfile.mkdtemp(prefix="bench_fullsize-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run(work, args.models, args.optimizers)
    finally:
        if not args.keep_dir:
            shutil.rmtree(work, ignore_errors=True)


def run(work: Path, models: list[str], optimizers: list[str]) -> None:
    from trainer.tiny.shapes import make_shapes_dataset

    data = work / "data"
    if not data.is_dir():
        make_shapes_dataset(data, images_per_concept=2, size=64)
    rows = []
    for name in models:
        checkpoint = work / f"{name}.safetensors"
        if not checkpoint.is_file():
            print(f"writing a random fp16 {name} single file ...", flush=True)
            # in a child: a parent's peak RSS would be carried into the runs it starts
            subprocess.run([sys.executable, __file__, "--generate", name, str(checkpoint)], check=True)
        for index, optimizer in enumerate(optimizers):
            print(f"training {name} with {optimizer} ...", flush=True)
            result = train_once(work, checkpoint, optimizer, data)
            result["reused_cache"] = index > 0  # the first run converted the file; the others found it converted
            rows.append(report(name, optimizer, result, work / "ckpt_cache" / name))
    print(f"\n{'model':7}{'optim':16}{'trained':>10}{'peak GiB':>9}{'floor':>9}{'ratio':>9}{'plan GiB':>9}"
          f"{'plan/pk':>9}{'state B/p':>10}{'wr/out':>10}{'wall s':>8}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
