"""The precision a run computes in, and the dtype each part of the model is held in.

Trained weights are fp32 masters whatever dtype the model file stores (mixed precision casts them per op, and
the optimizer updates them in full precision). Frozen parts (the VAE; the text encoder when it is not trained;
in LoRA mode the whole base) are only ever run forward, so they are held in the compute precision itself: half the memory, no per-op casts.
"""

from __future__ import annotations

import torch

from common.console import warn
from trainer.config.schema import frozen_base
from trainer.models.load import ComponentDtypes

COMPUTE_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def training_precision(requested: str) -> str:
    """The mixed precision to run with: fp16 autocast needs CUDA, so a CPU-only machine trains in fp32 rather
    than fail, and says so (bf16 works on CPUs). `requested` is concrete: "auto" was resolved for the device
    (trainer/preflight/device.py: bf16 on GPUs that compute it natively, else fp16; no on a CPU)."""
    if requested not in COMPUTE_DTYPES:  # a programming error: the config skipped preflight.device.resolve
        raise ValueError(f"mixed_precision {requested!r} is not one of {', '.join(COMPUTE_DTYPES)}: resolve the "
                         "config for the device first (trainer.preflight.device.resolve)")
    if requested == "fp16" and not torch.cuda.is_available():
        warn("mixed_precision fp16 needs a CUDA GPU; none found, so this run trains in fp32.")
        return "no"
    return requested


def component_dtypes(cfg, precision: str) -> ComponentDtypes:
    """The UNet (trained) in fp32; the VAE in the compute dtype; the text encoder in fp32 when it is trained,
    else in the compute dtype. In LoRA and embedding mode the whole base is frozen, so all of it is in the compute
    dtype (the adapters and rows that train are fp32: trainer/adapters/), and a save holds only what trains. In a
    full fine-tune the saves copy the frozen parts' files, pinned as loaded (trainer/models/pinned.py)."""
    frozen = COMPUTE_DTYPES[precision]
    if frozen_base(cfg):
        return ComponentDtypes(unet=frozen, text_encoder=frozen, vae=frozen)
    text_encoder = frozen if cfg.disable_textenc_training else torch.float32
    copied = frozenset({"vae", "text_encoder"} if cfg.disable_textenc_training else {"vae"})
    return ComponentDtypes(unet=torch.float32, text_encoder=text_encoder, vae=frozen, copied_by_saves=copied)
