"""Reading original single files and their yamls: format sniffing, integrity, and loading without running code.

* a file's format comes from its first bytes, never its name or a flag: safetensors, torch zip or legacy
  torch pickle;
* integrity is judged before any tensor is read: a safetensors file declares its own size in its header
  (common/safetensors_header.py), a torch zip has its directory at the very end; a pickle that calls itself
  `.safetensors` is refused, as that name promises a file that cannot run code;
* `.ckpt` files load with `torch.load(weights_only=True)` only, memory-mapped; safetensors memory-mapped too;
* an LDM inference yaml, and a json config, parsed with one message per way they can be wrong.

trainer/models/checks.py judges the files of a diffusers folder with the same functions.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from common.console import first_line
from common.files import parse_problem, read_json_object
from common.safetensors_header import MAX_HEADER, HeaderError, read_header
from convert.errors import ConversionError
from convert.tables import STOCK_CONFIGS

if TYPE_CHECKING:
    from torch import Tensor

FileFormat = Literal["safetensors", "torch-zip", "torch-pickle"]
TORCH_ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOLS = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


# ------------------------------------------------------------------------------------------ formats


def format_of(head: bytes) -> FileFormat | None:
    """What a file is from its first 16 bytes, or None when it is none of the three."""
    if head.startswith(TORCH_ZIP_MAGIC):
        return "torch-zip"
    if len(head) >= 9:
        header_len = int.from_bytes(head[:8], "little")
        # a header longer than the file is a cut-off safetensors file, which `check_whole` reports as such
        if 0 < header_len <= MAX_HEADER and head[8:9] == b"{":
            return "safetensors"
    if head[:2] in PICKLE_PROTOCOLS:
        return "torch-pickle"
    return None


def is_torch_pickle(head: bytes) -> bool:
    """A torch checkpoint (zip or legacy pickle), from its first bytes."""
    return format_of(head) in ("torch-zip", "torch-pickle")


def sniff_format(path: Path) -> FileFormat:
    """What the file really is, from its first bytes (names and flags can lie)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise ConversionError(f"could not read {path}: {e.strerror or e}; check its permissions") from None
    found = format_of(head)
    if found is None:
        raise ConversionError(
            f"{path} is neither a safetensors file nor a torch checkpoint (it starts with {head[:8]!r}); "
            "expected a Stable Diffusion .ckpt or .safetensors file"
        )
    return found


# ---------------------------------------------------------------------------------------- integrity


def safetensors_problem(path: Path) -> str | None:
    """Whether `path` is a whole safetensors file, from its header alone (common/safetensors_header.py)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
        if is_torch_pickle(head):
            return (f"{path} is a torch pickle checkpoint, not a safetensors file as its name says; a pickle can run "
                    "code when loaded, which a .safetensors file is chosen to rule out.")
        problem = read_header(path).size_problem()
    except OSError as err:
        return f"could not read {path}: {err.strerror or err}."
    except HeaderError as err:
        return f"{path} is {err}."
    return f"{path} is {problem}." if problem else None


def torch_zip_problem(path: Path) -> str | None:
    """Whether a torch zip checkpoint is whole: its zip directory, at the very end, must be there."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except zipfile.BadZipFile as err:
        return (f"{path} is truncated or damaged: it starts as a torch zip checkpoint, but the zip directory that "
                f"ends a complete one is missing or broken ({err}); its size is {path.stat().st_size} bytes.")
    except OSError as err:
        return f"could not read {path}: {err.strerror or err}."
    return None


def check_whole(path: Path, file_format: FileFormat) -> None:
    """Refuse a pickle that calls itself .safetensors, and a file cut short, before reading any tensor."""
    if path.suffix.lower() == ".safetensors" and file_format != "safetensors":
        raise ConversionError(
            f"{path} is named .safetensors but is a torch pickle checkpoint ({file_format}), not a safetensors "
            "file. A pickle can run code when loaded, which the .safetensors name promises this file cannot, so "
            "it is not loaded under that name. Get the real .safetensors file or, if you trust where this one "
            f"came from, rename it to {path.stem}.ckpt (a .ckpt is loaded with weights_only=True)."
        )
    if file_format == "safetensors":
        problem = safetensors_problem(path)
    else:
        problem = torch_zip_problem(path) if file_format == "torch-zip" else None
    if problem is not None:
        raise ConversionError(f"{problem} Download or copy the file again.")


# ------------------------------------------------------------------------------------------ loading


@dataclass
class LoadedCheckpoint:
    """A flat original state dict (memory-mapped tensors) plus what the file says about itself."""

    state: dict[str, Tensor]
    file_format: FileFormat
    metadata: dict[str, str]
    notes: list[str]
    global_step: int | None = None
    path: Path = field(default_factory=Path)  # where it was read from; its name and sidecar yaml are evidence


def load_checkpoint(path: Path, from_safetensors: bool | None = None) -> LoadedCheckpoint:
    """Read an original checkpoint without executing anything and without copying it into memory.

    `from_safetensors` is what the user claimed; the content decides, and a disagreement becomes a note.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint {path} does not exist; pass the path of a .ckpt or .safetensors file")
    file_format = sniff_format(path)
    notes: list[str] = []
    is_safetensors = file_format == "safetensors"
    if from_safetensors is True and not is_safetensors:
        notes.append(f"--from_safetensors was given, but {path.name} is a torch checkpoint ({file_format}); "
                     "loaded it as a .ckpt with weights_only=True")
    elif from_safetensors is False and is_safetensors:
        notes.append(f"{path.name} is a safetensors file although --from_safetensors was not given; "
                     "loaded it as safetensors")

    check_whole(path, file_format)
    if is_safetensors:
        metadata, state = _load_safetensors(path)
        return LoadedCheckpoint(state, file_format, metadata, notes, path=path)
    state, global_step = _load_torch(path, file_format)
    return LoadedCheckpoint(state, file_format, {}, notes, global_step, path=path)


def _load_safetensors(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        # load_file memory-maps: each tensor's bytes are read once, when the conversion writes them
        return metadata, load_file(str(path))
    except SafetensorError as e:  # a header that is whole but wrong (an unknown dtype, overlapping tensors)
        raise ConversionError(f"could not read {path} as safetensors ({e}); download or copy the file again") from None


def _load_torch(path: Path, file_format: FileFormat) -> tuple[dict[str, Tensor], int | None]:
    from torch import Tensor

    obj = _torch_load_weights_only(path, mmap=file_format == "torch-zip")
    global_step = obj.get("global_step") if isinstance(obj, dict) else None
    # Lightning checkpoints wrap the weights in "state_dict" (some tools nest it twice)
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not state:
        raise ConversionError(f"{path} contains no tensors; expected a Stable Diffusion state dict")
    return state, global_step if isinstance(global_step, int) else None


def _torch_load_weights_only(path: Path, mmap: bool) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # the weights-only unpickler stops at the first global it does not allow, before calling it
        found = re.search(r"(?:Unsupported global|unsupported GLOBAL|GLOBAL)[:\s]+(?:GLOBAL\s+)?([\w.]+)", str(e))
        what = f" (it calls {found.group(1)} as it loads)" if found else ""
        raise ConversionError(
            f"refused to load {path}: it is a pickle that needs Python objects beyond tensors{what}, and "
            "only weights_only=True loading is allowed, so nothing in it was run. Get a .safetensors "
            "version of this model, or re-save its state_dict with a tool you trust."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise ConversionError(f"could not read {path} as a torch checkpoint ({first_line(e)}); expected a complete "
                              "file: download or copy it again") from None


# ---------------------------------------------------------------------------------------- configs


def sidecar_yaml_path(checkpoint: Path) -> Path:
    """AUTOMATIC1111's convention: `model.safetensors` is described by `model.yaml` beside it."""
    return Path(checkpoint).with_suffix(".yaml")


def load_original_config(path: Path) -> dict[str, Any]:
    """An LDM/CompVis inference yaml (v1-inference.yaml, v2-inference.yaml, ...), parsed."""
    path = Path(path)
    if not path.is_file():
        shipped = ", ".join(stock.yaml for stock in STOCK_CONFIGS.values())
        raise ConversionError(f"original config {path} does not exist; the repository ships {shipped}")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConversionError(f"{path} is not valid yaml ({parse_problem(e)}); correct it") from None
    params = config.get("model", {}).get("params", {}) if isinstance(config, dict) else {}
    if not isinstance(params, dict) or "unet_config" not in params or "first_stage_config" not in params:
        raise ConversionError(
            f"{path} is not a Stable Diffusion inference config: expected model.params.unet_config and "
            "model.params.first_stage_config, like v1-inference.yaml"
        )
    return config


def load_sidecar_config(path: Path) -> dict[str, Any]:
    """The yaml beside a single file (`sidecar_yaml_path`), parsed; a problem with it says why it was read at all:
    a user may not know the file is there, or that it counts."""
    try:
        return load_original_config(path)
    except ConversionError as err:
        raise ConversionError(f"{err} (it is read because it sits beside the file with the same name, "
                              "AUTOMATIC1111's convention; to have the model's configuration detected from the file "
                              "itself instead, move it away)") from None


def read_json(path: Path) -> dict:
    """A json config the converter needs, or a ConversionError saying what is wrong with it."""
    data, problem = read_json_object(path)
    if problem is not None:
        raise ConversionError(problem)
    return data
