"""Scanning data_root once at start: every usable image with its caption, size, bucket and repeat factor,
and every file that had to be skipped, with the reason.

Folder links are followed (users link folders in), but every real folder is read once and every real file
counted once, so a link loop cannot hang the scan or multiply the data set; the report names such links.

Nothing here loads a model or imports torch, so `train.py --dry_run` answers in seconds.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG

from common.console import say, warn
from data.buckets import Bucket, bucket_table, fit_image, nearest_bucket
from data.captions import CaptionError, read_caption, read_multiply
from data.errors import DataError
from data.images import IMAGE_EXTENSIONS, BadImage, probe

LISTED_AT_MOST = 20  # names printed per report; the rest are counted


@dataclass(frozen=True)
class ImageItem:
    path: Path
    caption: str
    size: tuple[int, int]  # width, height as shown (EXIF rotation applied)
    bucket: Bucket
    multiply: float  # the folder's multiply.txt
    upscaled: bool  # smaller than its bucket: it is enlarged, which blurs it


@dataclass(frozen=True)
class Scan:
    root: Path
    items: list[ImageItem]
    skipped: list[tuple[Path, str]]  # (file, reason)
    second_paths: list[SecondPath] = field(default_factory=list)  # folders not read twice (see walk_data_root)
    duplicates: list[tuple[Path, Path]] = field(default_factory=list)  # (path, path counted instead) to one file

    def report(self) -> list[str]:
        """The report as lines (the dry run lists them): images, buckets, skipped files, links not followed twice,
        and the warning about upscaled images."""
        warning = self.upscale_warning()
        return self.summary() + (f"Warning: {warning}".splitlines() if warning else [])

    def tell(self) -> None:
        """Say the report once at start; the upscaled images go out as a warning."""
        for line in self.summary():
            say(line)
        warning = self.upscale_warning()
        if warning:
            warn(warning)

    def summary(self) -> list[str]:
        """Images, buckets, repeats, skipped files, links not followed twice, files counted once."""
        lines = [f"Data: {len(self.items)} images in {self.root}, {len(self.skipped)} skipped."]
        per_bucket = Counter(item.bucket for item in self.items)
        lines.append("Data: images per bucket: " + ", ".join(f"{b} {n}" for b, n in sorted(per_bucket.items())))
        for folder, factor in sorted({(i.path.parent, i.multiply) for i in self.items if i.multiply != 1.0}):
            lines.append(f"Data: multiply.txt repeats images in {_relative(folder, self.root)} x{factor:g} per epoch.")
        if self.skipped:
            lines.append(f"Data: skipped {len(self.skipped)} unusable file(s):")
            lines += [f"  {_relative(p, self.root)}: {reason}" for p, reason in self.skipped[:LISTED_AT_MOST]]
            lines += _more(self.skipped)
        if self.second_paths:
            lines.append(
                f"Data: {len(self.second_paths)} folder path(s) lead to a folder already scanned (a link loop, or "
                "two links to one folder); each folder is read once, nothing to do unless a folder is missing:"
            )
            lines += [f"  {s.describe(self.root)}" for s in self.second_paths[:LISTED_AT_MOST]]
            lines += _more(self.second_paths)
        if self.duplicates:
            path, kept = self.duplicates[0]
            lines.append(
                f"Data: {len(self.duplicates)} more path(s) lead to images already found (file links or hard "
                f"links), each image is counted once; e.g. {_relative(path, self.root)} is "
                f"{_relative(kept, self.root)}."
            )
        return lines

    def upscale_warning(self) -> str | None:
        """The images smaller than their bucket, which training enlarges (blurs), one per line; None if none."""
        upscaled = [i for i in self.items if i.upscaled]
        if not upscaled:
            return None
        heading = (f"{len(upscaled)} image(s) are smaller than their bucket and will be upscaled (blurrier); "
                   "use larger images or a lower resolution:")
        listed = [f"  {_relative(i.path, self.root)}: {i.size[0]}x{i.size[1]} -> {i.bucket}" for i in upscaled[:LISTED_AT_MOST]]
        return "\n".join([heading, *listed, *_more(upscaled)])


def _more(listed: list) -> list[str]:
    return [f"  ... and {len(listed) - LISTED_AT_MOST} more"] if len(listed) > LISTED_AT_MOST else []


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root)) or "."
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class SecondPath:
    """A folder reached again by another path (a link back up the tree, or a second link to it): not read again."""

    path: Path
    target: str | None  # what the link at `path` says, None when `path` is no link itself (a link came first)
    scanned_as: Path

    def describe(self, root: Path) -> str:
        points = f" -> {self.target}" if self.target is not None else ""
        first = _relative(self.scanned_as, root)
        first = "data_root itself" if first == "." else first
        return f"{_relative(self.path, root)}{points} (already scanned as {first})"


@dataclass(frozen=True)
class FolderWalk:
    """What `walk_data_root` found: each real image file once, and the paths it did not follow or count."""

    files: list[Path]  # one path per real file, in walk order
    skipped: list[tuple[Path, str]]  # (path, reason): unreadable folders, image names that are not plain files
    second_paths: list[SecondPath]  # folders reached again: link loops, two links to one folder
    duplicates: list[tuple[Path, Path]]  # (path, the path counted instead) to one real file


def walk_data_root(root: Path) -> FolderWalk:
    """Every image file under `root`, following folder links (users link folders in), each real folder read
    once and each real file (by device and inode) counted once, so a link loop neither hangs the scan nor
    multiplies the data set. Walk order is stable: a folder's files by name, then its subfolders by name.
    Hidden folders (our .latent_cache) are skipped."""
    skipped: list[tuple[Path, str]] = []
    second_paths: list[SecondPath] = []
    found: list[tuple[Path, tuple[int, int] | None, bool]] = []  # (path, file identity, is a link)
    scanned: dict[tuple[int, int], Path] = {}  # real folder -> the path it was scanned by
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            identity = _identity(folder.stat())
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            skipped.append((folder, f"folder cannot be read ({err.strerror or err})"))
            continue
        if identity in scanned:
            second_paths.append(SecondPath(folder, _link_target(folder), scanned[identity]))
            continue
        scanned[identity] = folder
        subfolders = []
        for entry in entries:
            path = Path(entry.path)
            if _is_folder(entry):
                if not entry.name.startswith("."):
                    subfolders.append(path)
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                found.append(_image_file(path, entry, skipped))
        pending += reversed(subfolders)  # a stack: the first subfolder is walked next
    files, duplicates = _one_path_per_file([f for f in found if f is not None])
    return FolderWalk(files, skipped, second_paths, duplicates)


def _link_target(path: Path) -> str | None:
    try:
        return os.readlink(path)
    except OSError:  # not a link
        return None


def _identity(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links
    except OSError:
        return False


def _image_file(path: Path, entry: os.DirEntry, skipped: list) -> tuple[Path, tuple[int, int] | None, bool] | None:
    """(path, identity, is a link) of a file with an image name; None (and a skip) when it is no plain file: opening
    a named pipe would wait forever. A broken link keeps identity None, for `probe` to report it unreadable."""
    try:
        stat = path.stat()
    except OSError:
        return path, None, entry.is_symlink()
    if not S_ISREG(stat.st_mode):
        skipped.append((path, "not a regular file (a pipe, socket or device); remove it or move it away"))
        return None
    return path, _identity(stat), entry.is_symlink()


def _one_path_per_file(
    found: list[tuple[Path, tuple[int, int] | None, bool]],
) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """One path per real file, in walk order, and (other path, kept path) for the rest. The kept path is the
    file's own (not a link) when there is one: a link's name has none of the file's caption sidecars."""
    kept: dict[tuple[int, int], tuple[Path, bool]] = {}
    for path, identity, is_link in found:
        if identity is not None and (identity not in kept or (kept[identity][1] and not is_link)):
            kept[identity] = path, is_link
    files, duplicates = [], []
    for path, identity, _ in found:
        if identity is None or kept[identity][0] == path:
            files.append(path)
        else:
            duplicates.append((path, kept[identity][0]))
    return files, duplicates


def find_image_files(root: Path) -> list[Path]:
    """Image files under `root`, recursively, each real file once, in a stable order (see `walk_data_root`)."""
    return walk_data_root(root).files


def scan_data_root(root: Path, resolution: int, threads: int | None = None) -> Scan:
    """Every image under `root` checked, captioned and bucketed. Raises DataError when none is usable."""
    walk = walk_data_root(root)
    paths = walk.files
    if not paths:
        unreadable = [reason for path, reason in walk.skipped if path == root]
        found = f": {unreadable[0]}" if unreadable else (
            f" holds no images ({', '.join(IMAGE_EXTENSIONS)}), searched recursively"
            + (f"; skipped {_relative(walk.skipped[0][0], root)}: {walk.skipped[0][1]}" if walk.skipped else ""))
        raise DataError(f"data_root {str(root)!r}{found}. Point --data_root at your training images.")
    table = bucket_table(resolution)
    multiplies: dict[Path, float] = {}
    for folder in sorted({p.parent for p in paths}):
        try:
            multiplies[folder] = read_multiply(folder)
        except CaptionError as err:
            raise DataError(str(err)) from None

    def check(path: Path) -> ImageItem | tuple[Path, str]:
        try:
            width, height = probe(path)
            caption = read_caption(path)
        except (BadImage, CaptionError) as err:
            return path, str(err)
        except OSError as err:  # unreadable: permissions, a broken link, a file removed meanwhile
            if path.is_symlink() and not path.exists():
                return path, f"a broken link: it points to {os.readlink(path)}, which does not exist"
            return path, f"cannot be read ({err.strerror or err})"
        bucket = nearest_bucket(width, height, table)
        upscaled = fit_image(width, height, bucket)[2]
        return ImageItem(path, caption, (width, height), bucket, multiplies[path.parent], upscaled)

    # Decoding releases the GIL, so threads check files in parallel without pickling anything.
    with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(check, paths))
    items = [r for r in results if isinstance(r, ImageItem)]
    unusable = [r for r in results if not isinstance(r, ImageItem)]
    if not items:
        raise DataError(
            f"data_root {str(root)!r} has {len(paths)} image file(s) but none could be used, e.g. "
            f"{unusable[0][0].name}: {unusable[0][1]}. Replace or remove the broken files."
        )
    return Scan(root, items, walk.skipped + unusable, walk.second_paths, walk.duplicates)
