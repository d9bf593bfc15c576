"""The weight files of the frozen parts as the run loaded them: what a full fine-tune's save copies.

A save copies a frozen part (the VAE; the text encoder with disable_textenc_training) from the model's own files,
not from memory: the run holds it in the compute precision, and a bf16 copy of an fp32 VAE must not be what the
save keeps (trainer/saves/checkpoints.py). The bytes it copies must then be the bytes the run loaded, hours before,
while other programs may change the model folder:

- A replace by rename (rsync, `mv`, a download tool writing a temporary first): the path names a new file, and the
  one loaded is intact but has no name. Each file is opened before its part loads and the descriptor is kept for
  the run (`PinnedPart`): through it the loaded file stays readable, renamed over or deleted. A hard link made at
  load would survive a rename too, but needs a writable folder on the model's file system (a read-only mount or
  another user's Hub cache has none); a descriptor needs nothing. (On Windows an open file cannot be renamed over
  or deleted: there the replacement fails, and the run keeps its files.)
- A write in place (cp, `rsync --inplace`, a disk fault): the descriptor reads the new bytes too, and only the
  content can tell. Its sha256 is taken through the descriptor once the part has loaded, and again at each save
  from the very bytes the save copies (read into memory, hashed, then parsed: nothing can change between the check
  and the copy). Sizes and times cannot tell: cp -p and rsync -a keep the modification time, and a VAE fine-tuned
  from the same one has the same size.

When the content changed, the save keeps the part as the run holds it in memory, which is what it used; either
change is said once.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.console import warn
from convert.tables import WEIGHTED_COMPONENTS
from trainer.errors import UserError

WEIGHT_FILES = {c.name: c.weights for c in WEIGHTED_COMPONENTS}  # e.g. unet -> diffusion_pytorch_model.safetensors
CHUNK = 16 * 2**20  # bytes hashed at a time at load


def weight_files(model_dir: Path, component: str) -> list[Path]:
    """A component's safetensors weight files in `model_dir` (one, or the shards its index names); [] for none."""
    folder = Path(model_dir) / component
    single = folder / WEIGHT_FILES[component]
    if single.is_file():
        return [single]
    index = folder / f"{WEIGHT_FILES[component]}.index.json"
    if index.is_file():
        shards = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values()
        return [folder / shard for shard in sorted(set(shards))]
    return []


def _identity(stat: os.stat_result) -> tuple[int, ...]:
    """What changes with any write to a file or any replacement of it: the change time (ctime) is set by the
    system at each write and cannot be set back, unlike the modification time."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


@dataclass
class PinnedFile:
    path: Path
    fd: int
    opened: tuple[int, ...]  # its `_identity` when it was opened
    sha256: bytes = b""

    def named(self) -> bool:
        """Whether its path still names this very file (not another renamed over it, nor nothing)."""
        try:
            return _identity(os.stat(self.path))[:2] == self.opened[:2]
        except OSError:
            return False

    def contents(self) -> bytes:
        with open(self.fd, "rb", closefd=False) as file:
            file.seek(0)
            return file.read()


@dataclass
class PinnedPart:
    """One component's weight files, open since before it loaded, with their content's hash."""

    component: str
    model_dir: Path
    files: list[PinnedFile]
    said: set[str] = field(default_factory=set)  # the changes already said

    def seal(self) -> None:
        """Hash each file as the part just loaded it. Raises UserError when a file was written or replaced while
        it loaded: then what loaded is not known."""
        for pinned in self.files:
            digest = hashlib.sha256()
            with open(pinned.fd, "rb", closefd=False) as file:
                file.seek(0)
                while chunk := file.read(CHUNK):
                    digest.update(chunk)
            pinned.sha256 = digest.digest()
            if _identity(os.fstat(pinned.fd)) != pinned.opened or not pinned.named():
                raise UserError(f"{pinned.path} changed while the run loaded it (another program writing or "
                                f"replacing the {self.component}?); expected it to stay as it was. Run again once "
                                "that program is done.")

    def read(self) -> dict[str, torch.Tensor] | None:
        """The part's tensors exactly as loaded, from the pinned files; None when a file's content changed since
        (written in place)."""
        from safetensors.torch import load

        tensors = {}
        for pinned in self.files:
            data = pinned.contents()
            if hashlib.sha256(data).digest() != pinned.sha256:
                return None
            tensors.update(load(data))
        return tensors

    def say_change(self, kept_files: bool, held: torch.dtype) -> None:
        """Say once what happened to the part's files and what the saves keep instead: the files as loaded
        (`kept_files`: only renamed over or deleted), or the part as held in memory, in `held`."""
        if kept_files and all(pinned.named() for pinned in self.files):
            return
        change = "replaced" if kept_files else "changed"
        if change in self.said:
            return
        self.said.add(change)
        what = f"the {self.component} files of {self.model_dir}"
        if kept_files:
            warn(f"{what} were replaced or deleted during the run; saves keep the {self.component} files the run "
                 "loaded, unchanged (held open since loading), not the new ones.")
        else:
            warn(f"{what} changed on disk during the run; saves keep the {self.component} the run loaded and used, "
                 f"from memory ({str(held).removeprefix('torch.')}), instead of reading those files.")


def _pin(model_dir: Path, component: str) -> PinnedPart | None:
    paths = weight_files(model_dir, component)
    if not all(path.is_file() for path in paths):  # a shard missing: loading says so, in its own words
        return None
    files = []
    for path in paths:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        pinned = PinnedFile(path, fd, _identity(os.fstat(fd)))
        weakref.finalize(pinned, os.close, fd)
        files.append(pinned)
    return PinnedPart(component, Path(model_dir), files) if files else None


@contextmanager
def pinned_while_loading(model_dir: Path, components: Collection[str]) -> Iterator[dict[str, PinnedPart]]:
    """{component: its files pinned}, for each of `components` with safetensors files, opened before the block
    loads them and hashed after it (`PinnedPart.seal`)."""
    parts = {name: part for name in components if (part := _pin(model_dir, name)) is not None}
    yield parts
    for part in parts.values():
        part.seal()
