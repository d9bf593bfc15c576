#!/usr/bin/env python
"""The offline demo: make a tiny SD1-shaped model and a generated image set, fine-tune, and show what it learned.

Everything it does is what a user does, with real processes:
  1. writes a tiny model to ckpt_cache/tiny-sd1-shapes (the ckpt_cache folder train.py looks names up in:
     $CKPT_CACHE_DIR when set): a random UNet and text encoder, and the project's small trained VAE
     (trainer/tiny/vae.py), so that samples are pictures; and 32 captioned shape images to demo/data;
  2. draws samples for each caption ("a photo of a red circle, ...", "a drawing of a blue square, ...") from it;
  3. runs `python train.py --resume_ckpt tiny-sd1-shapes --data_root demo/data ...`;
  4. draws the same samples (same seeds) from the trained model, and writes demo/before_after.png: a row per
     caption before and after training, each sample marked with the shape colour it shows; then runs
     `python utils/generate.py` on the saved model, as a user would.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

DEMO_DIR = Path("demo")
MODEL_NAME = "tiny-sd1-shapes"
SEEDS = list(range(8))
TRAIN_ARGS = [
    "--resume_ckpt", MODEL_NAME, "--data_root", str(DEMO_DIR / "data"), "--resolution", "64",
    "--batch_size", "8", "--max_epochs", "150", "--lr", "1e-3", "--disable_textenc_training",
    "--mixed_precision", "no", "--gradient_checkpointing", "false", "--logdir", str(DEMO_DIR / "logs"),
    "--project_name", "demo", "--log_step", "5", "--zero_frequency_noise_ratio", "0",
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
    from trainer.tiny.pictures import before_after_sheet, matching_share, sample_captions
    from trainer.tiny.shapes import caption_losses, make_shapes_dataset

    model_dir = find_ckpt_cache().path / MODEL_NAME
    if not (model_dir / "model_index.json").is_file():
        print(f"Creating a tiny SD1-architecture model in {model_dir}", flush=True)
        save_tiny_model(model_dir, "sd1", vae="trained")
    make_shapes_dataset(DEMO_DIR / "data", images_per_concept=16, size=64)
    print(f"Sampling each caption with seeds {SEEDS} before training", flush=True)
    before = sample_captions(model_dir, SEEDS)
    output = run([sys.executable, str(REPO_ROOT / "train.py"), *TRAIN_ARGS])
    saved = Path([line.split("Saved model: ", 1)[1].strip() for line in output.splitlines()
                  if "Saved model: " in line][-1])
    after = sample_captions(saved, SEEDS)
    sheet = DEMO_DIR / "before_after.png"
    before_after_sheet(before, after).save(sheet)
    for label, model, samples in (("before", model_dir, before), ("after", saved, after)):
        own, other = caption_losses(model)
        print(f"{label.capitalize()} training: {matching_share(samples):.0%} of the samples show their caption's "
              f"shape colour; denoising loss {own:.4f} with the image's own caption, {other:.4f} with the other "
              f"concept's ({100 * (other / own - 1):+.1f}%).", flush=True)
    run([sys.executable, str(REPO_ROOT / "utils" / "generate.py"), "--model", str(saved),
         "--prompt", "a photo of a red circle, round shape", "--out", str(DEMO_DIR / "sample.png"), "--steps", "20"])
    print(f"Demo finished: model {saved}; before and after, side by side: {sheet.resolve()}")


if __name__ == "__main__":
    main()
