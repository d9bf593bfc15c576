"""The precision a run computes in, and the dtype each part of the model is held in.

Trained weights are fp32 masters whatever dtype the model file stores (mixed precision casts them per op, and
the optimizer updates them in full precision). Frozen parts (the VAE; the text encoder when it is not trained)
are only ever run forward, so they are held in the compute precision itself: half the memory, no per-op casts.
"""

from __future__ import annotations

import torch

COMPUTE_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def training_precision(requested: str, cuda_available: bool) -> tuple[str, str | None]:
    """The mixed precision to run with, and a warning when it differs from the request: fp16 autocast needs
    CUDA, so a CPU-only machine trains in fp32 rather than fail (bf16 works on CPUs)."""
    if requested == "fp16" and not cuda_available:
        return "no", "mixed_precision fp16 needs a CUDA GPU; none found, so this run trains in fp32."
    return requested, None


def frozen_dtype(precision: str) -> torch.dtype:
    return COMPUTE_DTYPES[precision]
