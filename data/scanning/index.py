"""The scan's index: what scanning learned of each image file, kept in data_root, so that the next start over
unchanged files reads none of them again (over 100,000 images that is most of a start: docs/PERFORMANCE.md).

Per image file, keyed by its path under data_root:
  - its size and modification time (to the ns): the check that it is the file that was read; a file whose size
    or mtime differ is read again, a new file is read, a removed one is dropped;
  - its width and height as shown, which took decoding it whole (data/images.py `probe`, the scan's main cost);
  - its caption, own settings and their unused keys (data/captions.py, data/settings.py), with the size and mtime
    of each of its caption and settings files (`<stem>.txt`, `.caption`, `.yaml`, `.yml`, `.json`) that is
    there: a caption edited, added or removed is read again, though the image did not change.

The one accepted limit: a file replaced by another of the same size and the same mtime, to the nanosecond, is taken
for the one read before (a copy that keeps mtimes, cp -p, rsync -a, an archive unpacked over the folder, could do
that; delete the index, `.scan_index.json.gz`, after such a swap). So is a file made unreadable since (chmod)
without a change to its size or mtime: it fails when training reads it, not in the scan. Nothing else lets the
index answer what reading the files would not:
  - a file changed in the last seconds before the scan is read but not kept: a next write in the same tick of
    the file system's clock could leave its mtime as it was (git's "racy" files);
  - the index belongs to the code that wrote it: another version of its format, of the modules whose rules read
    images, captions and settings, or of PIL or PyYAML makes it foreign, and every file is read again;
  - it is gzip'ed json, whose checksum finds a truncated or damaged file: read again and rewritten, one line said.

One process per machine writes it (LOCAL_RANK 0 under accelerate launch and torchrun; each write is a whole file
put in place by one rename, common/files.py, so two writers could not mix their files either). A data_root that
cannot be written keeps no index: said once, and the scan reads every file as it did before there was an index.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
import zlib
from functools import cache
from pathlib import Path
from stat import S_ISREG
from typing import NamedTuple

import PIL
import yaml

import data.captions
import data.images
import data.settings
from common.console import say
from common.files import remove_stale_partials, write_bytes_atomically
from data.captions import STRUCTURED_SIDECARS, TEXT_SIDECARS
from data.scanning.walk import FileFacts, FolderWalk
from data.settings import SETTING_KEYS, Settings, Unused

INDEX_NAME = ".scan_index.json.gz"  # hidden: the walk reads no hidden folder, and no file that is not an image
FORMAT = "sd-finetuner scan index"
VERSION = 1
SIDECARS = TEXT_SIDECARS + STRUCTURED_SIDECARS  # every file beside an image that its caption or settings come from
# A file modified this recently is not kept: a file system's clock ticks are up to 2 s (FAT) coarse, and one more
# second covers a timestamp rounded up.
SETTLED_NS = 3_000_000_000
NO_SETTINGS = Settings()

Signature = list[list]  # [[suffix, size, mtime_ns], ...]: the caption and settings files beside an image
_told: set[Path] = set()  # the index files whose write failed, said once per process


# NamedTuples: one of each per image, made a million times for a million images, and a tuple is made fastest
class Sidecars(NamedTuple):
    """What an image's caption and settings files gave: its caption, its own settings, their unused keys."""

    caption: str
    own: Settings
    unused: Unused


class Known(NamedTuple):
    """What the index knows of one image file as it is now: its `key` in the index, its `facts` from the walk
    (None: it could not be stat'ed), the `signature` of the files beside it, and what still holds of what was read
    before (None: read it); `record` is the index's record when all of it holds."""

    key: str
    facts: FileFacts | None
    signature: Signature
    size: tuple[int, int] | None = None  # width, height as shown
    sidecars: Sidecars | None = None
    record: list | None = None


class ScanIndex:
    """The index of one scanned folder: `open` it, `look_up` each image, `keep` what was learned, `save`."""

    def __init__(self, root: Path, records: dict[str, list]):
        self.root = root
        self.path = root / INDEX_NAME
        self._old = records
        self._new: dict[str, list] = {}
        self._changed = False
        self._prefix = os.path.join(str(root), "")
        self._settled_before = time.time_ns() - SETTLED_NS

    @classmethod
    def open(cls, root: Path) -> ScanIndex:
        """The index in `root`; an empty one when there is none, or when it is damaged or foreign (one line said)."""
        path = root / INDEX_NAME
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return cls(root, {})
        except OSError as err:
            return cls._ignored(root, f"cannot be read ({err.strerror or err})")
        try:
            found = json.loads(gzip.decompress(blob))
        except (OSError, EOFError, zlib.error, ValueError):  # gzip's checksum and length, then json's syntax
            return cls._ignored(root, "is damaged (truncated or changed)")
        if not isinstance(found, dict) or found.get("format") != FORMAT or not isinstance(found.get("images"), dict):
            return cls._ignored(root, "is not a scan index")
        if found.get("version") != VERSION or found.get("code") != code_fingerprint():
            return cls._ignored(root, "was written by another version of the scan")
        return cls(root, found["images"])

    @classmethod
    def _ignored(cls, root: Path, problem: str) -> ScanIndex:
        say(f"Data: the scan index {root / INDEX_NAME} {problem}; every image is read again and the index rewritten.")
        return cls(root, {})

    def look_up(self, image: Path, walk: FolderWalk) -> Known:
        """What still holds of what the index knows of `image`, judged from the walk's stat of it and a stat of
        each caption or settings file beside it (taken now, before any reading: a file changed while it is read
        then differs next time)."""
        name = str(image)
        key = name.removeprefix(self._prefix)  # the walk's paths are data_root's own joined with names
        facts = walk.facts.get(name)
        signature = sidecar_signature(name, walk.names.get(os.path.dirname(name)))
        record = self._old.get(key)
        if facts is None or record is None:
            return Known(key, facts, signature)
        try:
            if record[0] != facts[0] or record[1] != facts[1]:
                return Known(key, facts, signature)
            size, sidecars = (record[2], record[3]), record[4]
            if sidecars is None or sidecars[0] != signature:
                return Known(key, facts, signature, size)
            settings = NO_SETTINGS if sidecars[2] is None else Settings(**dict(zip(SETTING_KEYS, sidecars[2])))
            unused = [(image.with_suffix(suffix), [(setting, why) for setting, why in notes])
                      for suffix, notes in sidecars[3]]
            return Known(key, facts, signature, size, Sidecars(sidecars[1], settings, unused), record)
        except (TypeError, ValueError, IndexError, KeyError):  # a record of another shape: read the file again
            return Known(key, facts, signature)

    def keep(self, known: Known, size: tuple[int, int], sidecars: Sidecars | None) -> None:
        """Remember the `size` and `sidecars` (None: they could not be read) of the image `known` stands for, for
        the next scan, unless it or a file beside it changed too recently to be told apart from its next change by
        its mtime."""
        if known.record is not None:  # all of it held: the record stays as it was
            self._new[known.key] = known.record
            return
        if known.facts is None or known.facts[1] >= self._settled_before:
            return
        if sidecars is not None and any(mtime >= self._settled_before for _, _, mtime in known.signature):
            sidecars = None
        record = [*known.facts, *size, None if sidecars is None else _sidecars_record(known.signature, sidecars)]
        self._new[known.key] = record
        self._changed = self._changed or self._old.get(known.key) != record

    def save(self) -> None:
        """Write what this scan learned when it differs from what was there (a new, changed or removed file), from
        one process per machine; a place that cannot be written is said once, and the run goes on."""
        if not (self._changed or len(self._new) != len(self._old)) or not writes_here():
            return
        document = {"format": FORMAT, "version": VERSION, "code": code_fingerprint(), "images": self._new}
        # json's ASCII escapes keep a file name that is not UTF-8 (surrogates in Python) as it is; gzip level 1: a
        # fifth of the json's size in milliseconds; mtime 0: the same scan, the same bytes
        blob = gzip.compress(json.dumps(document, separators=(",", ":")).encode("ascii"), compresslevel=1, mtime=0)
        try:
            remove_stale_partials(self.root)  # a write killed mid-way leaves one (`.scan_index.json.gz.partial-...`)
            write_bytes_atomically(self.path, blob)
        except OSError as err:
            if self.path not in _told:
                _told.add(self.path)
                say(f"Data: the scan index cannot be written in {self.root} ({err.strerror or err}), so each start "
                    "reads every image again; training is not affected.")


def sidecar_signature(image: str, listed: frozenset[str] | None) -> Signature:
    """[suffix, size, mtime_ns] of each caption or settings file beside `image` that is a file, in SIDECARS order.
    Only names in the folder's listing (`listed`, casefolded; None: unknown) are stat'ed: a name that is not
    there in any case cannot be opened, on a case-sensitive file system or not."""
    stem = os.path.splitext(image)[0]
    base = os.path.basename(stem).casefold()
    found = []
    for suffix in SIDECARS:
        if listed is not None and base + suffix not in listed:
            continue
        try:
            stat = os.stat(stem + suffix)
        except OSError:  # absent, or unreadable: what reads it says so
            continue
        if S_ISREG(stat.st_mode):
            found.append([suffix, stat.st_size, stat.st_mtime_ns])
    return found


def writes_here() -> bool:
    """Whether this process writes the index: the first process on each machine (LOCAL_RANK, as accelerate launch
    and torchrun set it; unset when alone). Every process scans, and a data_root on each machine's own disk gets
    an index too."""
    return os.environ.get("LOCAL_RANK", "0") in ("", "0")


@cache
def code_fingerprint() -> str:
    """The code whose rules the index's facts follow: this module, how images are probed, captions and settings
    read, and the versions of the libraries that parse them. A change to any makes older indexes foreign."""
    digest = hashlib.sha256(f"{VERSION} {PIL.__version__} {yaml.__version__}".encode())
    for source in (data.images.__file__, data.captions.__file__, data.settings.__file__, __file__):
        try:
            digest.update(Path(source).read_bytes())
        except (OSError, TypeError):  # no source to read (a frozen install): the versions above still count
            digest.update(str(source).encode())
    return digest.hexdigest()[:16]


def _sidecars_record(signature: Signature, sidecars: Sidecars) -> list:
    own = [getattr(sidecars.own, key) for key in SETTING_KEYS]
    unused = [[path.suffix, [[setting, why] for setting, why in notes]] for path, notes in sidecars.unused]
    return [signature, sidecars.caption, None if all(value is None for value in own) else own, unused]
