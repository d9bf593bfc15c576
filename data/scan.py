"""Scanning data_root once at start: every usable image with its caption, size, bucket, settings (repeat
factor, flip_p, cond_dropout, loss_scale, batch_id, shuffle_tags from the data files: data/settings.py) and mask
file (`<stem>-masklabel.png`, never an image itself; data/masking/masks.py checks and reports masks), every file that had
to be skipped, with the reason, and the report that the dry run prints and the run says at start.

Folder links are followed (users link folders in), but every real folder is read once and every real file
counted once, so a link loop cannot hang the scan or multiply the data set; the report names such links (the walk:
data/scanning/walk.py). What was read of each image file (its size, by decoding it whole, and what its caption and
settings files gave) is kept in data_root by the scan's index (data/scanning/index.py): a second start over
unchanged files reads none of them again, only what changed.

Nothing here loads a model or imports torch, so `train.py --dry_run` answers in seconds.
"""

from __future__ import annotations

import gc
import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from common.console import say, warn
from common.files import windows_path_hint
from common.progress import progress
from data.buckets import Bucket, bucket_table, fit_image, nearest_bucket
from data.captions import CaptionError, read_caption
from data.errors import DataError
from data.images import IMAGE_EXTENSIONS, BadImage, masked_stem, probe
from data.scanning.index import NO_SETTINGS, Known, ScanIndex, Sidecars
from data.scanning.walk import (  # noqa: F401  (find_image_files: the scan's public name for the walk's files)
    FolderWalk,
    SecondPath,
    find_image_files,
    hidden_images_hint,
    relative_name,
    walk_data_root,
)
from data.settings import SettingError, Settings, Unused, read_image_settings, settings_by_folder

LISTED_AT_MOST = 20  # names printed per report; the rest are counted
READ_CHUNK = 1024  # images handed to the reading threads at a time
T = TypeVar("T")


@dataclass(frozen=True)
class ImageItem:
    path: Path
    caption: str
    size: tuple[int, int]  # width, height as shown (EXIF rotation applied)
    bucket: Bucket
    multiply: float  # repeats per epoch, from its data files (data/settings.py); 1 when none sets it
    upscaled: bool  # smaller than its bucket: it is enlarged, which blurs it
    # from its data files; None: the run's value (DataOptions) applies
    flip_p: float | None = None
    cond_dropout: float | None = None
    loss_scale: float | None = None  # a per-sample weight on its loss; None: 1
    batch_id: str | None = None  # images of different batch_ids never share a batch; None: the unnamed group
    shuffle_tags: bool | None = None
    # the file its mask is read from: its <stem>-masklabel file, found by the scan (used with masked_training only);
    # with mask_from_alpha and no such file, the image itself (its alpha channel); None: none, or one that cannot be
    # used (data/masking/masks.py `check_masks`)
    mask: Path | None = None


def own_or_run(own: T | None, run: T) -> T:
    """An image's own setting (an ImageItem field), else the run's value for it."""
    return run if own is None else own


class _Reported(Protocol):
    def lines(self, root: Path) -> list[str]: ...


@dataclass(frozen=True)
class Scan:
    root: Path
    items: list[ImageItem]
    skipped: list[tuple[Path, str]]  # (file, reason)
    second_paths: list[SecondPath] = field(default_factory=list)  # folders not read twice (see walk_data_root)
    duplicates: list[tuple[Path, Path]] = field(default_factory=list)  # (path, path counted instead) to one file
    unused: Unused = field(default_factory=list)  # keys of settings files used for nothing here
    unmatched_masks: list[Path] = field(default_factory=list)  # -masklabel files with no image of their name
    masks: _Reported | None = None  # what data/masking/masks.py found of the masks (`with_masks`), for the report

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
        """Images, buckets, settings from data files, skipped files, links not followed twice, files counted
        once."""
        lines = [f"Data: {len(self.items)} images in {self.root}, {len(self.skipped)} skipped."]
        per_bucket = Counter(item.bucket for item in self.items)
        lines.append("Data: images per bucket: " + ", ".join(f"{b} {n}" for b, n in sorted(per_bucket.items())))
        lines += settings_lines(self.items, self.root) + unused_lines(self.unused, self.root)
        lines += self.masks.lines(self.root) if self.masks else []
        if self.skipped:
            lines.append(f"Data: skipped {len(self.skipped)} unusable file(s):")
            lines += [f"  {relative_name(p, self.root)}: {reason}" for p, reason in self.skipped[:LISTED_AT_MOST]]
            lines += count_more(self.skipped)
        if self.second_paths:
            lines.append(
                f"Data: {len(self.second_paths)} folder path(s) lead to a folder already scanned (a link loop, or "
                "two links to one folder); each folder is read once, nothing to do unless a folder is missing:"
            )
            lines += [f"  {s.describe(self.root)}" for s in self.second_paths[:LISTED_AT_MOST]]
            lines += count_more(self.second_paths)
        if self.duplicates:
            path, kept = self.duplicates[0]
            lines.append(
                f"Data: {len(self.duplicates)} more path(s) lead to images already found (file links or hard "
                f"links), each image is counted once; e.g. {relative_name(path, self.root)} is "
                f"{relative_name(kept, self.root)}."
            )
        return lines

    def upscale_warning(self) -> str | None:
        """The images smaller than their bucket, which training enlarges (blurs), one per line; None if none."""
        upscaled = [i for i in self.items if i.upscaled]
        if not upscaled:
            return None
        heading = (f"{len(upscaled)} image(s) are smaller than their bucket and will be upscaled (blurrier); "
                   "use larger images or a lower resolution:")
        listed = [f"  {relative_name(i.path, self.root)}: {i.size[0]}x{i.size[1]} -> {i.bucket}" for i in upscaled[:LISTED_AT_MOST]]
        return "\n".join([heading, *listed, *count_more(upscaled)])


# setting -> (how one value reads, what the images without one of their own get)
SETTING_WORDS = {
    "multiply": (lambda v: f"x{v:g} per epoch", "the others train once per epoch"),
    "flip_p": (lambda v: f"{v:g}", "the others use the run's flip_p"),
    "cond_dropout": (lambda v: f"{v:g}", "the others use the run's cond_dropout"),
    "loss_scale": (lambda v: f"{v:g}", "the others use 1"),
    "batch_id": (lambda v: f'"{v}"', "images of different batch_ids never share a batch, the others batch together"),
    "shuffle_tags": (lambda v: "on" if v else "off", "the others use the run's shuffle_tags"),
}


def settings_lines(items: list[ImageItem], root: Path) -> list[str]:
    """One line per setting that data files set for some images: where (a folder, or one image) and the value."""
    lines = []
    for key, (shown, others) in SETTING_WORDS.items():
        unset = 1.0 if key == "multiply" else None
        groups: dict[tuple[Path, object], list[ImageItem]] = {}  # (folder, value) -> images, in walk order
        for item in items:
            if getattr(item, key) != unset:
                groups.setdefault((item.path.parent, getattr(item, key)), []).append(item)
        if not groups:
            continue
        entries = [f"{relative_name(group[0].path, root)} {shown(value)}" if len(group) == 1 else
                   f"{relative_name(folder, root)} {shown(value)} ({len(group)} images)"
                   for (folder, value), group in groups.items()]
        more = f", and {len(entries) - LISTED_AT_MOST} more" if len(entries) > LISTED_AT_MOST else ""
        count = sum(len(group) for group in groups.values())
        lines.append(f"Data: {key} from data files for {count} of {len(items)} images: "
                     f"{', '.join(entries[:LISTED_AT_MOST])}{more}; {others}.")
    return lines


def unused_lines(unused: Unused, root: Path) -> list[str]:
    """The keys of settings files used for nothing here, with the reason, one file per line."""
    if not unused:
        return []
    lines = [f"Data: {len(unused)} settings file(s) hold keys not used here, ignored:"]
    for path, notes in unused[:LISTED_AT_MOST]:
        reasons: dict[str, list[str]] = {}
        for key, reason in notes:
            reasons.setdefault(reason, []).append(key)
        lines.append(f"  {relative_name(path, root)}: " + "; ".join(f"{', '.join(keys)} ({reason})"
                                                               for reason, keys in reasons.items()))
    return lines + count_more(unused)


def count_more(listed: list) -> list[str]:
    """The line that counts what a report lists no more of (it names LISTED_AT_MOST); none when it named all."""
    return [f"  ... and {len(listed) - LISTED_AT_MOST} more"] if len(listed) > LISTED_AT_MOST else []


def scan_data_root(root: Path, resolution: int, threads: int | None = None, role: str = "data_root") -> Scan:
    """Every image under `root` checked, captioned, bucketed and given its settings. Raises DataError when none
    is usable, or when a settings file holds a value it cannot (each such file named). `role` names the folder
    in those messages (a validation set's folder is not data_root). What the scan's index in `root` knows of an
    unchanged file is not read again (data/scanning/index.py)."""
    # A scan makes a few objects per image that it keeps, or drops without a reference cycle; the cyclic collector,
    # left on, walks every one of them again each time their number grows by a step: 2.4x the time of a scan over
    # 100,000 images that the index knew (7.4 s against 3.0 s).
    with _collector_paused():
        return _scan(root, resolution, threads, role)


@contextmanager
def _collector_paused() -> Iterator[None]:
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def _scan(root: Path, resolution: int, threads: int | None, role: str) -> Scan:
    walk = walk_data_root(root)
    paths = walk.files
    if not paths:
        unreadable = [reason for path, reason in walk.skipped if path == root]
        hidden = "" if unreadable else hidden_images_hint(walk, root, role)
        found = f": {unreadable[0]}" if unreadable else hidden or (
            f" holds no images ({', '.join(IMAGE_EXTENSIONS)}), searched recursively"
            + (f"; skipped {relative_name(walk.skipped[0][0], root)}: {walk.skipped[0][1]}" if walk.skipped else ""))
        fix = "Point --data_root at your training images" if role == "data_root" else "Give a folder of images there"
        raise DataError(f"{role} '{root}'{found}{windows_path_hint(root)}." + ("" if hidden else f" {fix}."))
    table = bucket_table(resolution)
    folders = _folders(paths)
    by_folder, unused, problems = settings_by_folder(root, sorted(set(folders)))
    masks, unmatched = _masks_by_image(walk)
    index = ScanIndex.open(root)
    known = [index.look_up(path, walk) for path in paths]
    read = _read_the_rest(paths, known, threads)
    fits: dict[tuple[int, int], tuple[Bucket, bool]] = {}  # size -> (bucket, upscaled): sizes repeat in data sets
    results: list[ImageItem | tuple[Path, str] | SettingError] = []
    for number, path in enumerate(paths):
        size, found = read.get(number) or (known[number].size, known[number].sidecars)
        if size is not None:
            index.keep(known[number], size, found if isinstance(found, Sidecars) else None)
        if not isinstance(found, Sidecars):
            results.append(found)
            continue
        if size not in fits:
            bucket = nearest_bucket(*size, table)
            fits[size] = bucket, fit_image(*size, bucket)[2]
        unused += found.unused
        mask = masks.get((folders[number], path.stem)) if masks else None
        results.append(_item(path, size, fits[size], found, by_folder[folders[number]], mask))
    problems += [str(r) for r in results if isinstance(r, SettingError)]
    if problems:
        raise DataError(_settings_problems(problems, root))
    del known, read  # what was read is in the items and the index now: freed before the index's json is made
    index.save()
    items = [r for r in results if isinstance(r, ImageItem)]
    unusable = [r for r in results if isinstance(r, tuple)]
    if not items:
        raise DataError(
            f"{role} '{root}' has {len(paths)} image file(s) but none could be used, e.g. "
            f"{unusable[0][0].name}: {unusable[0][1]}. Replace or remove the broken files."
        )
    return Scan(root, items, walk.skipped + unusable, walk.second_paths, walk.duplicates, unused, unmatched)


def _folders(paths: list[Path]) -> list[Path]:
    """Each path's folder, as one Path object per folder: a Path computes its hash once, and a data set's
    thousands of images per folder then look their folder up without hashing its path again."""
    seen: dict[str, Path] = {}
    folders = []
    for path in paths:
        name = os.path.dirname(str(path))
        folder = seen.get(name)
        if folder is None:
            folder = seen[name] = path.parent
        folders.append(folder)
    return folders


def _masks_by_image(walk: FolderWalk) -> tuple[dict[tuple[Path, str], Path], list[Path]]:
    """({(folder, image stem): its mask file}, the mask files with no image file of their name beside them). A
    -masklabel.png wins over another format of the same name."""
    if not walk.masks:
        return {}, []
    images = {(path.parent, path.stem) for path in walk.files}
    masks: dict[tuple[Path, str], Path] = {}
    for mask in sorted(walk.masks, key=lambda m: m.suffix.lower() != ".png"):
        masks.setdefault((mask.parent, masked_stem(mask)), mask)
    return masks, [mask for mask in walk.masks if (mask.parent, masked_stem(mask)) not in images]


# what reading an image's file and the files beside it gave: its size (None: it cannot be used), and its caption
# and settings, or (path, why it is skipped), or the bad setting that stops the scan
_Read = tuple[tuple[int, int] | None, Sidecars | tuple[Path, str] | SettingError]


def _read_the_rest(paths: list[Path], known: list[Known], threads: int | None) -> dict[int, _Read]:
    """Each image's number -> what was read of it, for the images the index did not know all of."""
    todo = [number for number, facts in enumerate(known) if facts.size is None or facts.sidecars is None]
    if not todo:
        return {}
    read: dict[int, _Read] = {}
    # Decoding releases the GIL, so threads check files in parallel without pickling anything. pool.map makes a
    # future for each item it is given at once, about 1 KB each: the images go to it a chunk at a time.
    with (ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool,
          progress("Data: checking", total=len(todo), unit="images") as bar):
        for start in range(0, len(todo), READ_CHUNK):
            chunk = todo[start : start + READ_CHUNK]
            for number, result in zip(chunk, pool.map(lambda number: _read(paths[number], known[number]), chunk)):
                read[number] = result
                bar.update()
    return read


def _read(path: Path, known: Known) -> _Read:
    """What the index does not know of `path`, read: the image decoded whole (`probe`) unless its size is known,
    its caption and settings files unless what they gave is known."""
    size = known.size
    try:
        if size is None:
            size = probe(path)
        if known.sidecars is not None:
            return size, known.sidecars
        return size, Sidecars(read_caption(path), *read_image_settings(path))
    except SettingError as err:
        return size, err
    except (BadImage, CaptionError) as err:
        return size, (path, str(err))
    except OSError as err:  # unreadable: permissions, a broken link, a file removed meanwhile
        if path.is_symlink() and not path.exists():
            return size, (path, f"a broken link: it points to {os.readlink(path)}, which does not exist")
        return size, (path, f"cannot be read ({err.strerror or err})")


def _item(path: Path, size: tuple[int, int], fit: tuple[Bucket, bool], found: Sidecars, folder: Settings,
          mask: Path | None) -> ImageItem:
    """The image as training takes it: its own settings over its folder's (no own settings, the usual case, is
    its folder's), in `fit` = (its bucket, whether it is enlarged to it)."""
    settings = folder if found.own == NO_SETTINGS else found.own.over(folder)
    return ImageItem(path, found.caption, size, fit[0], own_or_run(settings.multiply, 1.0), fit[1], settings.flip_p,
                     settings.cond_dropout, settings.loss_scale, settings.batch_id, settings.shuffle_tags, mask)


def _settings_problems(problems: list[str], root: Path) -> str:
    """One message for every settings file with an unusable value (each says what it holds and what it expects),
    so a data set is fixed in one pass, not one file per run."""
    if len(problems) == 1:
        return problems[0]
    listed = [f"  {problem}" for problem in problems[:LISTED_AT_MOST]] + count_more(problems)
    return "\n".join([f"{len(problems)} settings files under {root} hold values that cannot be used; correct "
                      "each, or delete it:", *listed])
