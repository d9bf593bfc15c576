"""Training settings from the files beside images (EveryDream2's data conventions): per folder and per image.

An image's settings (`Settings`: multiply, flip_p, cond_dropout, loss_scale, batch_id, shuffle_tags) come from,
nearest first (a nearer file wins each key it sets; a key none sets takes the run's value, 1 for multiply and
loss_scale):
  1. its own `<stem>.yaml`, `<stem>.yml`, `<stem>.json` (in that order), whatever holds its caption;
  2. its folder's own files, which do not reach subfolders: `local.yaml` / `local.yml`, and the one-value
     files `multiply.txt`, `flip_p.txt`, `cond_dropout.txt`, `loss_scale.txt`, `batch_id.txt`, and
     `shuffle_tags.txt` (its presence turns shuffling on). Both in one folder: EveryDream2's order decides,
     `FOLDER_OWN`: local.yaml beats multiply/flip_p/cond_dropout.txt, batch_id/loss_scale/shuffle_tags.txt beat it;
  3. `global.yaml` / `global.yml` of its folder, then of each folder above it up to data_root.
multiply 2.5 repeats an image twice per epoch plus, for a random half of its folder's images with that
multiply, once more (data/schedule.py). A value its key cannot take is a `SettingError` naming the file (the
scan stops); an image's own yaml/json that cannot be read skips the image, as a broken caption does; keys used
for nothing here (folder captions, `rating`, typos) are reported, not errors.

Reading settings imports no torch (the preflight and `--dry_run` scan with it).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, fields
from pathlib import Path

from data.captions import CaptionError, parse_structured, read_text

MULTIPLY_FILE = "multiply.txt"
SETTING_KEYS = ("multiply", "flip_p", "cond_dropout", "loss_scale", "batch_id", "shuffle_tags")
# Files read in these orders; a later one wins a key that an earlier one set too. EveryDream2's orders: odd in
# places (local.yaml beats flip_p.txt, loss_scale.txt beats local.yaml), kept so its data sets train the same.
FOLDER_WIDE = ("global.yaml", "global.yml")  # for the folder and every subfolder
FOLDER_OWN = ("multiply.txt", "cond_dropout.txt", "flip_p.txt", "local.yaml", "local.yml", "batch_id.txt",
              "loss_scale.txt", "shuffle_tags.txt")  # for the folder's own images only
IMAGE_SETTINGS = (".json", ".yml", ".yaml")  # `<stem>.yaml` wins, as in EveryDream2; .json is ours
CAPTION_KEYS = ("main_prompt", "tags", "caption")
FOLDER_CAPTIONS = "folder captions are not used here; put the words in each image's caption"
# keys EveryDream2 reads that mean nothing here: named in the scan report with the reason, never an error
NOT_USED = {"main_prompt": FOLDER_CAPTIONS, "tags": FOLDER_CAPTIONS, "caption": FOLDER_CAPTIONS,
            "rating": "rated data sets are not used here; multiply or loss_scale weigh images",
            "max_caption_length": "captions are cut to the text encoder's window"}
EXPECTED = {
    "multiply": "one number >= 0 such as 2 or 0.5",
    "flip_p": "a probability from 0 to 1 such as 0.5",
    "cond_dropout": "a probability from 0 to 1 such as 0.1",
    "loss_scale": "a number >= 0 such as 0.5 or 2 (1: unchanged)",
    "batch_id": "a group name such as my_horses, on one line",
    "shuffle_tags": "true or false",
}

# (file, [(key, why it is not used)]): the keys of settings files used for nothing here
Unused = list[tuple[Path, list[tuple[str, str]]]]


class SettingError(CaptionError):
    """A settings file holds a value its key cannot take. Unlike an unreadable caption, which skips its image,
    it stops the scan: what the user asked for would otherwise not happen."""


@dataclass(frozen=True)
class Settings:
    """An image's training settings from data files; None: not set there (the folder above's, else the run's)."""

    multiply: float | None = None
    flip_p: float | None = None
    cond_dropout: float | None = None
    loss_scale: float | None = None
    batch_id: str | None = None
    shuffle_tags: bool | None = None

    def over(self, base: Settings) -> Settings:
        """These settings, and `base`'s for the keys these leave unset: a nearer file wins."""
        return Settings(**{f.name: _first(getattr(self, f.name), getattr(base, f.name)) for f in fields(self)})


def _first(value, base):
    return base if value is None else value




def setting_value(key: str, value: object) -> float | str | bool | None:
    """`value` as setting `key` holds it (numbers as float), or None when `key` cannot take it."""
    if key == "shuffle_tags":
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):  # yaml's yes/no are bools, and bool is an int to Python
        return None
    if key == "batch_id":
        text = str(value).strip() if isinstance(value, (str, int)) else ""
        return text if text and "\n" not in text else None
    if not isinstance(value, (int, float)):
        return None
    number = float(value)
    at_most = 1.0 if key in ("flip_p", "cond_dropout") else math.inf
    return number if math.isfinite(number) and 0.0 <= number <= at_most else None


def _shown(value: object) -> str:
    return "nothing" if value is None else f"{value!r} (text)" if isinstance(value, str) else repr(value)


def settings_from_text(path: Path) -> Settings:
    """The one setting of a one-value file (`flip_p.txt` sets flip_p); shuffle_tags.txt turns shuffling on by
    being there, whatever it holds (EveryDream2's rule)."""
    key = path.stem
    if key == "shuffle_tags":
        return Settings(shuffle_tags=True)
    text = read_text(path)
    try:
        found = text if key == "batch_id" else float(text)
    except ValueError:
        found = text
    value = setting_value(key, found)
    if value is None:
        raise SettingError(f"{path} holds {text!r}; expected {EXPECTED[key]}. Correct it, or delete the file.")
    return Settings(**{key: value})


def settings_from_mapping(path: Path, captioned: bool) -> tuple[Settings, list[tuple[str, str]]]:
    """The settings of a yaml/json file and its keys used for nothing here; the caption keys count as used in an
    image's own file (`captioned`), not in a folder's. CaptionError when the file cannot be read, SettingError for
    a value its key cannot take."""
    data = parse_structured(path)
    if data is None and path.suffix != ".json":  # an empty yaml file
        data = {}
    if not isinstance(data, dict):
        raise CaptionError(f"{path} must hold a mapping of keys such as flip_p: 0.5, found {type(data).__name__}.")
    values, unused = {}, []
    for key, raw in data.items():
        key = str(key)
        if key in SETTING_KEYS:
            values[key] = setting_value(key, raw)
            if values[key] is None:
                raise SettingError(f"{path} holds {key}: {_shown(raw)}; expected {EXPECTED[key]}. Correct the value, "
                                   "or remove the key.")
        elif not (captioned and key in CAPTION_KEYS):
            unused.append((key, NOT_USED.get(key) or _unknown_key(key)))
    return Settings(**values), unused


def _unknown_key(key: str) -> str:
    close = difflib.get_close_matches(key, SETTING_KEYS, n=1)
    return f"did you mean {close[0]}?" if close else "not a setting: " + ", ".join(SETTING_KEYS)


def _read_files(paths: list[Path], captioned: bool, problems: list[str] | None = None) -> tuple[Settings, Unused]:
    """The settings of the files in `paths` that exist, a later file winning, and their unused keys. A file that
    cannot be used raises CaptionError, or with `problems` is listed there and the others are still read."""
    settings, unused = Settings(), []
    for path in paths:
        if not path.is_file():
            continue
        try:
            if path.suffix == ".txt":
                found, notes = settings_from_text(path), []
            else:
                found, notes = settings_from_mapping(path, captioned)
        except CaptionError as err:
            if problems is None:
                raise
            problems.append(str(err))
            continue
        if notes:
            unused.append((path, notes))
        settings = found.over(settings)
    return settings, unused


def read_image_settings(image_path: Path) -> tuple[Settings, Unused]:
    """The settings in the image's own `<stem>.yaml`/`.yml`/`.json` and their unused keys. CaptionError when one
    cannot be read (its image is skipped), SettingError for a value a key cannot take."""
    return _read_files([image_path.with_suffix(suffix) for suffix in IMAGE_SETTINGS], captioned=True)


def read_folder_settings(folder: Path, problems: list[str]) -> tuple[Settings, Settings, Unused]:
    """(for the folder and its subfolders, for its own images only, unused keys) from `folder`'s files; each file
    that cannot be used is listed in `problems` (a folder's file speaks for many images: refused, never skipped)."""
    wide, unused = _read_files([folder / name for name in FOLDER_WIDE], False, problems)
    own, unused_own = _read_files([folder / name for name in FOLDER_OWN], False, problems)
    return wide, own, unused + unused_own


def settings_by_folder(root: Path, folders: list[Path]) -> tuple[dict[Path, Settings], Unused, list[str]]:
    """Each folder's settings for its own images (its own files over the global files of it and of each folder
    above it up to `root`), the unused keys, and every problem found (one message per file)."""
    read: dict[Path, tuple[Settings, Settings]] = {}
    unused: Unused = []
    problems: list[str] = []

    def files_of(folder: Path) -> tuple[Settings, Settings]:
        if folder not in read:
            wide, own, notes = read_folder_settings(folder, problems)
            read[folder] = wide, own
            unused.extend(notes)
        return read[folder]

    resolved: dict[Path, Settings] = {}
    for folder in folders:
        inherited = Settings()
        for above in _folders_down_to(root, folder):
            inherited = files_of(above)[0].over(inherited)
        resolved[folder] = files_of(folder)[1].over(inherited)
    return resolved, unused, problems


def _folders_down_to(root: Path, folder: Path) -> list[Path]:
    """`root`, each folder below it on the way to `folder`, and `folder`."""
    try:
        parts = folder.relative_to(root).parts
    except ValueError:  # not below root: only its own files apply
        return [folder]
    return [root.joinpath(*parts[:depth]) for depth in range(len(parts) + 1)]


def read_multiply(folder: Path) -> float:
    """The repeat factor that `folder`'s multiply.txt gives its images, else 1."""
    path = folder / MULTIPLY_FILE
    return settings_from_text(path).multiply if path.is_file() else 1.0
