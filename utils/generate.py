#!/usr/bin/env python
"""Generate images from a saved diffusers model folder, to look at what a run learned.

    python utils/generate.py --model logs/<run>/ckpts/last-... --prompt "a red circle" --out sample.png

With `--lora file[:strength]` (repeatable) LoRA adapter files, such as a LoRA run's saves, apply to the model at
their strengths (default 1.0) without changing it: the same adapters and strengths utils/merge_lora.py fuses in.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python utils/...` from anywhere
# a text encoder's adapters make transformers list every base weight as "MISSING" (an adapter file holds none)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from utils.merge_lora import LoraError, apply_loras, parse_loras  # noqa: E402  (after sys.path above)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="diffusers model folder (e.g. a 'Saved model:' path)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--out", default="sample.png", help="PNG to write")
    parser.add_argument("--size", type=int, default=None, help="width and height; default: the model's native size")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                        help="a LoRA adapter file to apply, at a strength (default 1.0); repeat for several")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        loras = parse_loras(args.lora)  # judged before the slow imports and the model load
    except LoraError as err:
        print(f"generate.py: {err}", file=sys.stderr)
        return err.exit_code
    import torch
    from diffusers import StableDiffusionPipeline

    if not (Path(args.model) / "model_index.json").is_file():
        print(f"generate.py: {args.model} is not a diffusers model folder (no model_index.json).", file=sys.stderr)
        return 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = StableDiffusionPipeline.from_pretrained(
        args.model, dtype=torch.float16 if device == "cuda" else torch.float32
    ).to(device)
    if loras:
        try:
            apply_loras(pipe, loras)
        except LoraError as err:
            print(f"generate.py: {err}", file=sys.stderr)
            return err.exit_code
        print("LoRA: " + ", ".join(spec.describe() for spec in loras))
    size = args.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    image = pipe(
        args.prompt,
        height=size,
        width=size,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=torch.Generator(device).manual_seed(args.seed),
    ).images[0]
    image.save(args.out)
    print(f"Wrote {Path(args.out).resolve()} ({size}x{size}, {args.prompt!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
