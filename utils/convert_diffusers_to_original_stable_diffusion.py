"""Write a diffusers SD1.x/SD2.x folder as one original-layout .safetensors file.

The file loads in AUTOMATIC1111 and ComfyUI (old-style VAE attention as 1x1 convolutions, the OpenCLIP
layout for SD2 text encoders); SD2 models also get a `<file>.yaml` beside it. A thin command line over
the convert/ package. Example:

    python utils/convert_diffusers_to_original_stable_diffusion.py --model_path ckpt_cache/my_model \\
      --checkpoint_path my_model.safetensors --half
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True, help="the diffusers folder (unet/, vae/, text_encoder/, ...)")
    p.add_argument("--checkpoint_path", required=True, help="the .safetensors file to write")
    p.add_argument("--half", action="store_true", help="store fp16 weights (default: keep the folder's dtype)")
    args = p.parse_args(argv)
    from convert import ConversionError, export_single_file

    try:
        result = export_single_file(args.model_path, args.checkpoint_path, half=args.half)
    except ConversionError as e:
        print(f"error: {e}\nnothing was written.", file=sys.stderr)
        return 1
    print(f"wrote {result.checkpoint_path} ({result.num_tensors} tensors, {result.family}, {result.prediction_type})")
    if result.sidecar_yaml:
        print(f"wrote {result.sidecar_yaml} (keep it beside the checkpoint: it tells A1111 how to load it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
