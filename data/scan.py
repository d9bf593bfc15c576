"""Scanning data_root once at start: every usable image with its caption, size, bucket, settings (repeat
factor, flip_p, cond_dropout, loss_scale, batch_id, shuffle_tags from the data files: data/settings.py) and mask
file (`<stem>-masklabel.png`, never an image itself; data/masking/masks.py checks and reports masks), every file that had
to be skipped, with the reason, and the report that the dry run prints and the run says at start.

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
from typing import Protocol, TypeVar

from common.console import say, warn
from common.files import windows_path_hint
from data.buckets import Bucket, bucket_table, fit_image, nearest_bucket
from data.captions import CaptionError, read_caption
from data.errors import DataError
from data.images import IMAGE_EXTENSIONS, BadImage, is_mask_file, masked_stem, probe
from data.settings import SettingError, Settings, Unused, read_image_settings, settings_by_folder

LISTED_AT_MOST = 20  # names printed per report; the rest are counted
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


def walk_data_root(root: Path) -> FolderWalk:
    """Every image file under `root`, following folder links (users link folders in), each real folder read
    once and each real file (by device and inode) counted once, so a link loop neither hangs the scan nor
    multiplies the data set. Walk order is stable: a folder's files by name, then its subfolders by name.
    Hidden folders (our .latent_cache) are skipped; mask files (`<stem>-masklabel.png`) are listed apart."""
    skipped: list[tuple[Path, str]] = []
    second_paths: list[SecondPath] = []
    hidden: list[Path] = []
    masks: list[Path] = []
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
                (hidden if entry.name.startswith(".") else subfolders).append(path)
            elif is_mask_file(path):
                masks.append(path)
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                found.append(_image_file(path, entry, skipped))
        pending += reversed(subfolders)  # a stack: the first subfolder is walked next
    files, duplicates = _one_path_per_file([f for f in found if f is not None])
    return FolderWalk(files, skipped, second_paths, duplicates, hidden, masks)


def _hidden_images_hint(walk: FolderWalk, root: Path, role: str) -> str:
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


def scan_data_root(root: Path, resolution: int, threads: int | None = None, role: str = "data_root") -> Scan:
    """Every image under `root` checked, captioned, bucketed and given its settings. Raises DataError when none
    is usable, or when a settings file holds a value it cannot (each such file named). `role` names the folder
    in those messages (a validation set's folder is not data_root)."""
    walk = walk_data_root(root)
    paths = walk.files
    if not paths:
        unreadable = [reason for path, reason in walk.skipped if path == root]
        hidden = "" if unreadable else _hidden_images_hint(walk, root, role)
        found = f": {unreadable[0]}" if unreadable else hidden or (
            f" holds no images ({', '.join(IMAGE_EXTENSIONS)}), searched recursively"
            + (f"; skipped {relative_name(walk.skipped[0][0], root)}: {walk.skipped[0][1]}" if walk.skipped else ""))
        fix = "Point --data_root at your training images" if role == "data_root" else "Give a folder of images there"
        raise DataError(f"{role} '{root}'{found}{windows_path_hint(root)}." + ("" if hidden else f" {fix}."))
    table = bucket_table(resolution)
    by_folder, unused, problems = settings_by_folder(root, sorted({p.parent for p in paths}))

    # Decoding releases the GIL, so threads check files in parallel without pickling anything.
    masks, unmatched = _masks_by_image(walk)
    with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda path: _check_image(path, table, by_folder[path.parent],
                                                          masks.get((path.parent, path.stem))), paths))
    for _, notes in results:
        unused += notes
    problems += [str(r) for r, _ in results if isinstance(r, SettingError)]
    if problems:
        raise DataError(_settings_problems(problems, root))
    items = [r for r, _ in results if isinstance(r, ImageItem)]
    unusable = [r for r, _ in results if isinstance(r, tuple)]
    if not items:
        raise DataError(
            f"{role} '{root}' has {len(paths)} image file(s) but none could be used, e.g. "
            f"{unusable[0][0].name}: {unusable[0][1]}. Replace or remove the broken files."
        )
    return Scan(root, items, walk.skipped + unusable, walk.second_paths, walk.duplicates, unused, unmatched)


def _masks_by_image(walk: FolderWalk) -> tuple[dict[tuple[Path, str], Path], list[Path]]:
    """({(folder, image stem): its mask file}, the mask files with no image file of their name beside them). A
    -masklabel.png wins over another format of the same name."""
    images = {(path.parent, path.stem) for path in walk.files}
    masks: dict[tuple[Path, str], Path] = {}
    for mask in sorted(walk.masks, key=lambda m: m.suffix.lower() != ".png"):
        masks.setdefault((mask.parent, masked_stem(mask)), mask)
    return masks, [mask for mask in walk.masks if (mask.parent, masked_stem(mask)) not in images]


def _check_image(
    path: Path, table: list[Bucket], folder: Settings, mask: Path | None = None
) -> tuple[ImageItem | tuple[Path, str] | SettingError, Unused]:
    """(the image, or (path, why it is skipped), or the bad setting that stops the scan; its unused keys)."""
    try:
        width, height = probe(path)
        caption = read_caption(path)
        own, unused = read_image_settings(path)
    except SettingError as err:
        return err, []
    except (BadImage, CaptionError) as err:
        return (path, str(err)), []
    except OSError as err:  # unreadable: permissions, a broken link, a file removed meanwhile
        if path.is_symlink() and not path.exists():
            return (path, f"a broken link: it points to {os.readlink(path)}, which does not exist"), []
        return (path, f"cannot be read ({err.strerror or err})"), []
    bucket = nearest_bucket(width, height, table)
    upscaled = fit_image(width, height, bucket)[2]
    settings = own.over(folder)
    item = ImageItem(path, caption, (width, height), bucket, own_or_run(settings.multiply, 1.0), upscaled,
                     settings.flip_p, settings.cond_dropout, settings.loss_scale, settings.batch_id,
                     settings.shuffle_tags, mask)
    return item, unused


def _settings_problems(problems: list[str], root: Path) -> str:
    """One message for every settings file with an unusable value (each says what it holds and what it expects),
    so a data set is fixed in one pass, not one file per run."""
    if len(problems) == 1:
        return problems[0]
    listed = [f"  {problem}" for problem in problems[:LISTED_AT_MOST]] + count_more(problems)
    return "\n".join([f"{len(problems)} settings files under {root} hold values that cannot be used; correct "
                      "each, or delete it:", *listed])
