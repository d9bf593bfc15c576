"""A safetensors file's header, read without its tensors: what the file holds, and whether it is whole.

A safetensors file is 8 bytes of header length, a json header naming each tensor's dtype, shape and byte range,
then the tensor data. Reading the header alone (a few KB) tells a truncated download or a half-written file from
a whole one, and counts parameters, without reading or mapping gigabytes. The safetensors library's own errors
("incomplete metadata, file not fully covered") cannot say by how much a file is short; these can.

Imports nothing of the project.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers too


class HeaderError(ValueError):
    """The file is not a safetensors file; the text says what it is instead."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # "F32", "F16", "BF16", ...
    shape: tuple[int, ...]
    end: int  # where its bytes end, counted from the end of the header

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    header_size: int
    file_size: int

    @property
    def declared_size(self) -> int:
        """The file's size as its header says: 8 + the header + the end of the last tensor's data."""
        return 8 + self.header_size + max((t.end for t in self.tensors.values()), default=0)

    def size_problem(self) -> str | None:
        """'truncated: ...' or 'longer than ...' when the file's size is not the one its header declares."""
        if self.file_size == self.declared_size:
            return None
        state = "truncated" if self.file_size < self.declared_size else "longer than its header declares"
        return (f"{state}: it is {self.file_size} bytes, but its safetensors header declares {self.declared_size} "
                f"(8 + {self.header_size} header + {self.declared_size - 8 - self.header_size} tensor data)")


def read_header(path: Path) -> Header:
    """The header of the safetensors file at `path`. Raises HeaderError when it is not one (or is cut short
    within its header), OSError when it cannot be read."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise HeaderError(f"cut short: {size} bytes, less than the 8-byte header length every safetensors "
                              "file starts with")
        length = int.from_bytes(head, "little")
        if length > MAX_HEADER:
            raise HeaderError(f"not a safetensors file: it starts with {head!r}, not a header length")
        if 8 + length > size:
            raise HeaderError(f"cut short within its header: {size} bytes, the header alone should take "
                              f"{8 + length}")
        raw = f.read(length)
    try:
        header = json.loads(raw)
        tensors = {name: TensorInfo(str(info["dtype"]), tuple(int(n) for n in info["shape"]),
                                    int(info["data_offsets"][1]))
                   for name, info in header.items() if name != "__metadata__"}
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError, IndexError):
        raise HeaderError("not a safetensors file: its header is not a json map of tensors") from None
    return Header(tensors, dict(header.get("__metadata__") or {}), length, size)
