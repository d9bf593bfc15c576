"""Writing what the converter made: a diffusers folder, or one original-layout .safetensors with its yaml.

Both appear whole or not at all (common/files.py): the folder is assembled under a hidden partial name beside
its final place and renamed in at the end; the single file and its sidecar yaml likewise. Any failure on the
way (a full disk, a yaml whose schedule cannot build a scheduler) leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from common.files import atomic_files, atomic_folder
from common.progress import progress
from convert.read import sidecar_yaml_path
from convert.tables import EXTRAS_FILE, WEIGHTED_COMPONENTS
from convert.to_diffusers import DiffusersParts


def write_weights(path: Path, tensors: Mapping[str, Tensor], dtype: torch.dtype | None,
                  metadata: Mapping[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    for key, value in tensors.items():
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.contiguous()
    save_file(out, str(path), metadata={"format": "pt", **(metadata or {})})


def written_mib(tensors: Mapping[str, Tensor], dtype: torch.dtype | None) -> int:
    """The MiB `write_weights` writes of `tensors` (floating ones in `dtype` when given), at least 1."""
    def size(value: Tensor) -> int:
        itemsize = dtype.itemsize if dtype is not None and value.is_floating_point() else value.element_size()
        return value.numel() * itemsize

    return max(1, round(sum(size(value) for value in tensors.values()) / 2**20))


def write_model_index(folder: Path, scheduler_class: str, inpainting: bool) -> None:
    import diffusers

    index = {
        "_class_name": "StableDiffusionInpaintPipeline" if inpainting else "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_diffusers_folder(dump_path: Path, parts: DiffusersParts, *, pad_token: str, scheduler_class: type,
                           scheduler_config: Mapping[str, Any], inpainting: bool, half: bool) -> None:
    """The converted parts as a diffusers folder at `dump_path` (which must not exist), whole or not at all.
    Each component's tensors are released once written, so at most one is materialised at a time."""
    from convert.tokenizer import clip_tokenizer  # transformers: imported when a folder is written

    dtype = torch.float16 if half else None
    dump_path.parent.mkdir(parents=True, exist_ok=True)
    sizes = {c.name: written_mib(parts.tensors[c.name], dtype) for c in WEIGHTED_COMPONENTS}
    # the conversion's wait: each tensor is read from the file (memory-mapped) only as it is written, seconds for a
    # full-size model from a warm disk cache (SD1.5, fp16: 2.5 s on 2 CPU cores), much longer from a slow disk
    with atomic_folder(dump_path) as tmp, progress("Conversion: writing", sum(sizes.values()), "MiB") as bar:
        for component in WEIGHTED_COMPONENTS:
            write_weights(tmp / component.name / component.weights, parts.tensors.pop(component.name), dtype)
            bar.update(sizes[component.name])
            model = parts.models[component.name]
            if component.name == "text_encoder":
                config = model.config
                config.architectures = ["CLIPTextModel"]
                # fp32 whatever the file stores: transformers' default dtype ("auto") takes it, as diffusers
                # loads the UNet in fp32, so that a plain from_pretrained(folder) runs (trainer/saves/checkpoints.py)
                config.dtype = torch.float32
                config.save_pretrained(tmp / component.name)
            else:
                model.save_config(tmp / component.name)
        if parts.extras:
            write_weights(tmp / EXTRAS_FILE, parts.extras, None)
        clip_tokenizer(pad_token).save_pretrained(tmp / "tokenizer")
        scheduler = scheduler_class.from_config(dict(scheduler_config))
        scheduler.save_pretrained(tmp / "scheduler")
        write_model_index(tmp, type(scheduler).__name__, inpainting=inpainting)


def write_single_file(checkpoint_path: Path, state: Mapping[str, Tensor], *, half: bool,
                      metadata: Mapping[str, str], sidecar: Path | str | None) -> Path | None:
    """`state` as one .safetensors at `checkpoint_path`, with its sidecar `<file>.yaml`: a shipped yaml copied
    as it is (comments and all), or yaml text; None writes none. Returns the sidecar's path if written."""
    checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
    sidecar_path = sidecar_yaml_path(checkpoint_path)
    # the yaml is put in place first: whoever finds the weights finds their yaml; a failure leaves neither
    finals = (sidecar_path, checkpoint_path) if sidecar is not None else (checkpoint_path,)
    with atomic_files(*finals) as partials:
        write_weights(partials[-1], state, torch.float16 if half else None, metadata)
        if isinstance(sidecar, Path):
            shutil.copyfile(sidecar, partials[0])
        elif sidecar is not None:
            partials[0].write_text(sidecar)
    return sidecar_path if sidecar is not None else None
