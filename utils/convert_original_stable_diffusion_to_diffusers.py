"""Convert an original SD1.x/SD2.x single-file checkpoint (.ckpt or .safetensors) into a diffusers folder.

Offline and exact; a thin command line over the convert/ package. Example:

    python utils/convert_original_stable_diffusion_to_diffusers.py --scheduler_type ddim \\
      --original_config_file v1-inference.yaml --image_size 512 --checkpoint_path my_sd15_model.ckpt \\
      --to_safetensors --prediction_type epsilon --dump_path "ckpt_cache/my_sd15_model"
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python utils/...` from anywhere
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def str2bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "y"):
        return True
    if lowered in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    from convert import SCHEDULER_TYPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", required=True, help="the .ckpt or .safetensors file to convert")
    p.add_argument("--dump_path", required=True, help="the diffusers folder to create (must not exist yet)")
    p.add_argument("--original_config_file", default=None,
                   help="the model's yaml: v1-inference.yaml (SD1.x), v2-inference.yaml (SD2.0 512 base), "
                        "v2-inference-v.yaml (SD2.x 768-v). Default: <checkpoint>.yaml if present, else the "
                        "shipped yaml the weights call for")
    p.add_argument("--image_size", type=int, default=None,
                   help="resolution the model was trained at (512 for SD1.x and SD2 base, 768 for SD2 768-v)")
    p.add_argument("--prediction_type", default=None, choices=["epsilon", "v_prediction"],
                   help="what the UNet predicts; must agree with the yaml and with the file's own metadata")
    p.add_argument("--scheduler_type", default="pndm", choices=SCHEDULER_TYPES,
                   help="inference scheduler written into the folder")
    p.add_argument("--upcast_attention", "--upcast_attn", nargs="?", const=True, default=None, type=str2bool,
                   help="compute attention in fp32 (needed by SD2.1 768-v); takes True/False or no value")
    p.add_argument("--extract_ema", action="store_true",
                   help="convert the EMA weights of a checkpoint that holds both EMA and non-EMA UNets")
    p.add_argument("--num_in_channels", type=int, default=None,
                   help="UNet input channels when the yaml is wrong about them (9 for inpainting)")
    p.add_argument("--from_safetensors", action="store_true",
                   help="the checkpoint is safetensors (the file's content is checked and wins)")
    p.add_argument("--to_safetensors", action="store_true",
                   help="accepted for compatibility; weights are always written as .safetensors")
    p.add_argument("--half", action="store_true", help="store fp16 weights (default: keep the file's dtype)")
    p.add_argument("--device", default=None,
                   help="accepted for compatibility; conversion only renames tensors and runs on the CPU")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from convert import ConversionError, convert_checkpoint_file

    try:
        result = convert_checkpoint_file(
            args.checkpoint_path, args.dump_path,
            original_config=args.original_config_file,
            prediction_type=args.prediction_type,
            image_size=args.image_size,
            upcast_attention=args.upcast_attention,
            num_in_channels=args.num_in_channels,
            extract_ema=args.extract_ema,
            half=args.half,
            scheduler_type=args.scheduler_type,
            from_safetensors=args.from_safetensors,
        )
    except ConversionError as e:
        print(f"error: {e}\nnothing was written.", file=sys.stderr)
        return 1
    for note in result.notes:
        print(f"note: {note}")
    print(f"converted {args.checkpoint_path} -> {result.dump_path}")
    print(f"  family {result.family}, prediction_type {result.prediction_type}, image_size {result.image_size}, "
          f"upcast_attention {result.upcast_attention}, in_channels {result.in_channels}")
    for line in result.evidence:
        print(f"  evidence: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
