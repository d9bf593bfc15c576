"""The embedding files: one `.safetensors` per token in AUTOMATIC1111's layout (`emb_params`, [vectors, width]),
which AUTOMATIC1111 and ComfyUI load from their embeddings folders and diffusers with `load_textual_inversion`,
named after the token (the name those programs know it by); and, in pivotal tuning, the same vectors bundled into
the LoRA file the way kohya and AUTOMATIC1111 bundle them (`bundle_emb.<name>.string_to_param.*`).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import torch

from trainer.adapters.embedding_tokens import bundle_name, file_name

TENSOR = "emb_params"
BUNDLE = "bundle_emb.{name}.string_to_param.*"


def file_tensors(vectors: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {TENSOR: vectors.detach().to("cpu", dtype).contiguous()}


def bundled_tensors(vectors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every token's vectors as a LoRA file's bundled embeddings."""
    return {BUNDLE.format(name=bundle_name(token)): v.detach().to("cpu", dtype).contiguous()
            for token, v in vectors.items()}


def file_metadata(cfg, info, token: str, vectors: int, *, step: int, epoch: int, images: int) -> dict[str, str]:
    """Stability's modelspec (base family, prediction, resolution) and what trained it."""
    v_prediction = info.prediction_type == "v_prediction"
    architecture = ("stable-diffusion-v1" if info.family == "sd1" else
                    "stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512")
    return {
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{architecture}/textual-inversion",
        "modelspec.implementation": "diffusers", "modelspec.title": file_name(token),
        "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "token": token, "vectors": str(vectors), "base_model": Path(cfg.resume_ckpt).name, "family": info.family,
        "step": str(step), "epoch": str(epoch), "images": str(images), "lr": f"{cfg.embedding_lr:g}",
        "format": "pt",
    }


def read_embedding_file(path: Path) -> torch.Tensor:
    """The vectors of an embedding file in AUTOMATIC1111's layouts (`emb_params`, or a single tensor), [n, width]."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    if TENSOR in tensors:
        vectors = tensors[TENSOR]
    elif len(tensors) == 1:
        vectors = next(iter(tensors.values()))
    else:
        raise ValueError(f"{path} holds {len(tensors)} tensors ({', '.join(sorted(tensors)[:4])}...), not one "
                         f"embedding ({TENSOR})")
    return vectors if vectors.dim() == 2 else vectors.unsqueeze(0)
