#!/usr/bin/env python
"""The offline demo: make a tiny random SD1-shaped model and a generated image set, fine-tune, then sample.

Everything it does is what a user does, with real processes:
  1. writes a tiny model to ckpt_cache/tiny-sd1-demo (the ckpt_cache folder train.py looks names up in:
     $CKPT_CACHE_DIR when set) and 32 captioned shape images to demo/data;
  2. runs `python train.py --resume_ckpt tiny-sd1-demo --data_root demo/data ...`;
  3. measures what the captions are worth to the model before and after (the denoising loss with each
     image's own caption vs the other concept's), then runs `python utils/generate.py` on the saved model.
The tiny model's VAE is random, so the sample is not a picture of anything: it shows the pipeline runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

DEMO_DIR = Path("demo")
MODEL_NAME = "tiny-sd1-demo"
TRAIN_ARGS = [
    "--resume_ckpt", MODEL_NAME, "--data_root", str(DEMO_DIR / "data"), "--resolution", "64",
    "--batch_size", "8", "--max_epochs", "60", "--lr", "1e-3", "--disable_textenc_training",
    "--mixed_precision", "no", "--gradient_checkpointing", "false", "--logdir", str(DEMO_DIR / "logs"),
    "--project_name", "demo", "--log_step", "5", "--cond_dropout", "0", "--zero_frequency_noise_ratio", "0",
]


def run(command: list[str]) -> str:
    print("$ " + " ".join(command), flush=True)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    lines = []
    for line in process.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    if process.wait() != 0:
        sys.exit(f"demo: '{' '.join(command[:2])}' failed with exit status {process.returncode}")
    return "".join(lines)


def main() -> None:
    from trainer.models.ckpt_cache import find_ckpt_cache
    from trainer.tiny.model import save_tiny_model
    from trainer.tiny.shapes import caption_losses, make_shapes_dataset

    model_dir = find_ckpt_cache().path / MODEL_NAME
    if not model_dir.is_dir():
        print(f"Creating a tiny random SD1-architecture model in {model_dir}", flush=True)
        save_tiny_model(model_dir, "sd1")
    make_shapes_dataset(DEMO_DIR / "data", images_per_concept=16, size=64)
    output = run([sys.executable, str(REPO_ROOT / "train.py"), *TRAIN_ARGS])
    saved = [line.split("Saved model: ", 1)[1].strip() for line in output.splitlines() if "Saved model: " in line]
    for label, model in (("before", model_dir), ("after", Path(saved[-1]))):
        own, other = caption_losses(model)
        print(f"Denoising loss {label} training: {own:.4f} with the image's own caption, {other:.4f} with the "
              f"other concept's ({100 * (other / own - 1):+.1f}%).", flush=True)
    run([sys.executable, str(REPO_ROOT / "utils" / "generate.py"), "--model", saved[-1],
         "--prompt", "a photo of a red circle, round shape", "--out", str(DEMO_DIR / "sample.png"), "--steps", "20"])
    print(f"Demo finished: model {saved[-1]}, sample {(DEMO_DIR / 'sample.png').resolve()}")


if __name__ == "__main__":
    main()
