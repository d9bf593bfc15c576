#!/usr/bin/env python
"""Train the tiny models' VAE and write it where the project keeps it (trainer/tiny/assets/tiny_vae.safetensors).

    python utils/make_tiny_vae.py [--steps 1200] [--seed 0] [--out PATH]

Deterministic for a seed on one machine (a few minutes on 2 CPU cores). The demo and the tests load the file the
repository ships; run this only to make it again (trainer/tiny/vae.py says how it trains).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


def main(argv: list[str] | None = None) -> None:
    from trainer.tiny.vae import TRAINED_VAE_FILE

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1200, help="training steps of 16 scenes (default 1200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=TRAINED_VAE_FILE,
                        help="where to write it (default: the file the repository ships)")
    args = parser.parse_args(argv)

    import torch
    from safetensors.torch import save_file

    from trainer.tiny.vae import load_trained_vae, reconstruction_error, train_tiny_vae

    started = time.monotonic()

    def report(step: int, loss: float) -> None:
        print(f"step {step + 1}/{args.steps}: loss {loss:.4f} ({time.monotonic() - started:.0f} s)", flush=True)

    vae = train_tiny_vae(args.steps, seed=args.seed, on_progress=report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # fp16 halves the file; the VAE is loaded back in fp32 and its error is measured on what was written
    save_file({name: tensor.to(torch.float16).contiguous() for name, tensor in vae.state_dict().items()},
              str(args.out), metadata={"steps": str(args.steps), "seed": str(args.seed)})
    written = load_trained_vae(args.out)
    print(f"Wrote {args.out} ({args.out.stat().st_size / 2**20:.1f} MiB); reconstruction error on plain-background "
          f"scenes: {reconstruction_error(written):.4f} (pixels in -1..1; a grey guess gives about 0.3)")


if __name__ == "__main__":
    main()
