"""The folder walk of a scan: every image file under a folder, each real folder read once and each real file counted
once, with what one `stat` of it says (its size and modification time, for the scan's index), the names beside
it (so that the index looks only for the caption files that are there), and the paths it did not follow or count.

Folder links are followed (users link folders in), but a link loop can neither hang the walk nor multiply the
data set: each real folder (by device and inode) is read once, each real file counted once, and the report names
the paths that were not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG

from common.progress import progress
from data.images import IMAGE_EXTENSIONS, is_mask_file

FileFacts = tuple[int, int]  # (size in bytes, modification time in ns) from one stat of a file


def relative_name(path: Path, root: Path) -> str:
    """`path` as a report names it: relative to the scanned folder `root` when it is inside it."""
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
        first = relative_name(self.scanned_as, root)
        first = "data_root itself" if first == "." else first
        return f"{relative_name(self.path, root)}{points} (already scanned as {first})"


@dataclass(frozen=True)
class FolderWalk:
    """What `walk_data_root` found: each real image file once, the mask files, and the paths it did not follow or
    count."""

    files: list[Path]  # one path per real file, in walk order
    skipped: list[tuple[Path, str]]  # (path, reason): unreadable folders, image names that are not plain files
    second_paths: list[SecondPath]  # folders reached again: link loops, two links to one folder
    duplicates: list[tuple[Path, Path]]  # (path, the path counted instead) to one real file
    hidden: list[Path] = field(default_factory=list)  # hidden folders not read (.latent_cache, .git, .photos)
    masks: list[Path] = field(default_factory=list)  # <stem>-masklabel files: masks, not images, in walk order
    # str(file) -> its size and mtime, from the stat the walk made anyway; none for a file it could not stat
    facts: dict[str, FileFacts] = field(default_factory=dict)
    # str(folder) -> the names in it, casefolded: what can be beside an image there (its caption files)
    names: dict[str, frozenset[str]] = field(default_factory=dict)


def walk_data_root(root: Path) -> FolderWalk:
    """Every image file under `root`, following folder links (users link folders in), each real folder read
    once and each real file (by device and inode) counted once, so a link loop neither hangs the scan nor
    multiplies the data set. Walk order is stable: a folder's files by name, then its subfolders by name.
    Hidden folders (our .latent_cache) are skipped; mask files (`<stem>-masklabel.png`) are listed apart."""
    skipped: list[tuple[Path, str]] = []
    second_paths: list[SecondPath] = []
    hidden: list[Path] = []
    masks: list[Path] = []
    found: list[_Found] = []
    names: dict[str, frozenset[str]] = {}
    scanned: dict[tuple[int, int], Path] = {}  # real folder -> the path it was scanned by
    pending, counted = [root], 0
    # a walk of a million files takes tens of seconds: a bar on a terminal, a line every so often in a log
    with progress("Data: finding", total=None, unit="image files") as finding:
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
            names[str(folder)] = frozenset(entry.name.casefold() for entry in entries)
            subfolders = []
            for entry in entries:
                if _is_folder(entry):
                    (hidden if entry.name.startswith(".") else subfolders).append(Path(entry.path))
                # the extension first: a data set is mostly images and their captions, and a Path per caption costs
                elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                    path = folder / entry.name
                    if is_mask_file(path):
                        masks.append(path)
                    elif (image := _image_file(path, entry, skipped)) is not None:
                        found.append(image)
            pending += reversed(subfolders)  # a stack: the first subfolder is walked next
            finding.update(len(found) - counted)
            counted = len(found)
    files, duplicates = _one_path_per_file(found)
    facts = {str(path): stat for path, _, _, stat in found if stat is not None}
    return FolderWalk(files, skipped, second_paths, duplicates, hidden, masks, facts, names)


def find_image_files(root: Path) -> list[Path]:
    """Image files under `root`, recursively, each real file once, in a stable order (see `walk_data_root`)."""
    return walk_data_root(root).files


def hidden_images_hint(walk: FolderWalk, root: Path, role: str) -> str:
    """For a data_root with no images to read: how many image files sit in the hidden folders it skipped, and
    how to include them; "" when there are none. Counted only then, so a normal scan never walks a .git."""
    counts = {folder: sum(1 for _, _, names in os.walk(folder) for name in names
                          if Path(name).suffix.lower() in IMAGE_EXTENSIONS) for folder in walk.hidden}
    counts = {folder: count for folder, count in counts.items() if count}
    if not counts:
        return ""
    first = next(iter(counts))
    plain = first.with_name(first.name.lstrip("."))
    listed = ", ".join(f"{relative_name(folder, root)}/ ({count})" for folder, count in counts.items())
    return (f" holds no images outside hidden folders, which are not read; {sum(counts.values())} image file(s) "
            f"are in them: {listed}. To use them, rename the folder without its leading '.' (mv '{first}' "
            f"'{plain}'), link it in under a plain name (ln -s '{first.name}' '{plain}'), or pass it as {role} "
            "itself")


# (path, file identity, is a link, (size, mtime_ns)); identity and facts are None when the file cannot be stat'ed
_Found = tuple[Path, tuple[int, int] | None, bool, FileFacts | None]


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


def _image_file(path: Path, entry: os.DirEntry, skipped: list) -> _Found | None:
    """What the walk knows of a file with an image name; None (and a skip) when it is no plain file: opening a
    named pipe would wait forever. A broken link keeps identity None, for `probe` to report it unreadable."""
    try:
        # os.stat, not entry.stat(): on Windows the entry's own stat has no inode, which tells files apart
        stat = os.stat(entry.path)
    except OSError:
        return path, None, entry.is_symlink(), None
    if not S_ISREG(stat.st_mode):
        skipped.append((path, "not a regular file (a pipe, socket or device); remove it or move it away"))
        return None
    return path, _identity(stat), entry.is_symlink(), (stat.st_size, stat.st_mtime_ns)


def _one_path_per_file(found: list[_Found]) -> tuple[list[Path], list[tuple[Path, Path]]]:
    """One path per real file, in walk order, and (other path, kept path) for the rest. The kept path is the
    file's own (not a link) when there is one: a link's name has none of the file's caption sidecars."""
    kept: dict[tuple[int, int], tuple[Path, bool]] = {}
    for path, identity, is_link, _ in found:
        if identity is not None and (identity not in kept or (kept[identity][1] and not is_link)):
            kept[identity] = path, is_link
    files, duplicates = [], []
    for path, identity, _, _ in found:
        if identity is None or kept[identity][0] is path:  # the same object: a Path's == compares its parts
            files.append(path)
        else:
            duplicates.append((path, kept[identity][0]))
    return files, duplicates
