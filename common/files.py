"""Files and folders that appear whole or not at all, the checks that a place can take them, and json files
read with a message that says what is wrong with them.

Every writer of the project goes through here. A write goes to a hidden sibling, `.<name>.partial-<host>-<pid>`,
and one rename puts it in place: a reader sees the old state or the new one, never half of one. Any failure on
the way (a full disk, a read-only mount, a second Ctrl-C) removes the partial before the error goes on, and
`remove_stale_partials` removes those that a killed process left behind (its pid is gone on this host).

This module imports nothing of the project: data/, trainer/ and the converter all stand on it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_HOST = re.sub(r"[^\w.]", "_", socket.gethostname()) or "host"
_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-(?P<host>[\w.]+)-(?P<pid>\d+)$")


_UMASK = os.umask(0o022)  # read once (reading it means setting it): the mode new files should get
os.umask(_UMASK)


def readable_as_umask(path: Path) -> None:
    """Give `path` (a file, or every file under a folder) the mode the umask gives new files, usually 0644:
    safetensors writes its files 0600, which a ComfyUI or AUTOMATIC1111 run by another user could not read."""
    path = Path(path)
    for file in [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file() and not p.is_symlink()):
        os.chmod(file, 0o666 & ~_UMASK)


def owner_tag() -> str:
    """This process as a partial's owner: `<host>-<pid>`."""
    return f"{_HOST}-{os.getpid()}"


def partial_path(final: Path, owner: str | None = None) -> Path:
    """The hidden sibling a write of `final` goes to. `owner` (an `owner_tag()`, default this process's) names
    the process that owns the write: in a multi-process save, the main one's, so every process of the run
    writes its part into the same folder."""
    return final.with_name(f".{final.name}.partial-{owner or owner_tag()}")


def is_partial(path: Path) -> bool:
    return _PARTIAL.match(path.name) is not None


def remove(path: Path) -> None:
    """Delete a file or a folder tree; a missing one is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError):  # not there, or a file stands where its folder would
            pass
        except OSError:
            if os.path.lexists(path):  # a read-only mount refuses even to unlink what is not there (EROFS)
                raise


def remove_whole(path: Path) -> None:
    """Delete a file or folder so that its name goes at once: renamed to a partial first, then deleted. A kill
    while a large folder is deleted then leaves a partial (which `remove_stale_partials` clears at the next start),
    never a half-deleted folder under the name of something whole."""
    if not os.path.lexists(path):
        return
    doomed = partial_path(Path(path))
    os.rename(path, doomed)
    remove(doomed)


@contextmanager
def atomic_folder(final: Path, *, owner: str | None = None) -> Iterator[Path]:
    """Yield an empty partial folder to fill; on success it is renamed to `final`, on any error removed.

    `final` must not exist: a save never replaces another one (choose the name before)."""
    final = Path(final)
    if final.exists():
        raise FileExistsError(errno.EEXIST, "refusing to replace an existing folder", str(final))
    partial = partial_path(final, owner)
    remove(partial)
    partial.mkdir(parents=True)
    try:
        yield partial
        readable_as_umask(partial)
        os.rename(partial, final)
    except BaseException:
        remove(partial)
        raise


def replace_folder(new: Path, final: Path) -> None:
    """Put the complete folder `new` at `final`, replacing what is there: the old one is renamed away (under a
    partial name, so a crash leaves nothing that looks whole), the new one renamed in, the old one removed."""
    old = partial_path(final.with_name(final.name + ".replaced"))
    if final.exists():
        os.rename(final, old)
    os.rename(new, final)
    remove(old)


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a partial path to write; on success it replaces `final` in one step, on any error it is removed."""
    final = Path(final)
    partial = partial_path(final)
    try:
        yield partial
        readable_as_umask(partial)
        os.replace(partial, final)
    except BaseException:
        remove(partial)
        raise


@contextmanager
def atomic_files(*finals: Path) -> Iterator[tuple[Path, ...]]:
    """`atomic_file` for files that belong together (a single file and its yaml): yield a partial path for each;
    on success they are put in place in the order given, and a failure at any point, between two of those renames
    too (a second Ctrl-C), leaves none of them."""
    finals = tuple(Path(final) for final in finals)
    partials = tuple(partial_path(final) for final in finals)
    placed: list[Path] = []
    try:
        yield partials
        for partial, final in zip(partials, finals):
            readable_as_umask(partial)
            os.replace(partial, final)
            placed.append(final)
    except BaseException:
        for path in (*partials, *placed):
            remove(path)
        raise


def write_bytes_atomically(path: Path, data: bytes) -> None:
    with atomic_file(path) as partial:
        partial.write_bytes(data)


def write_text_atomically(path: Path, text: str) -> None:
    write_bytes_atomically(path, text.encode("utf-8"))


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        return True
    return True


def remove_stale_partials(folder: Path) -> list[Path]:
    """Remove the partials in `folder` whose writer, a process on this host, is gone; returns them."""
    if not folder.is_dir():
        return []
    stale = []
    for entry in folder.iterdir():
        match = _PARTIAL.match(entry.name)
        if match and match["host"] == _HOST and not process_alive(int(match["pid"])):
            remove(entry)
            stale.append(entry)
    return stale


def modified_ns(path: Path) -> int | None:
    """A file's modification time in ns; None for a file gone since it was listed (a save pruned by another run
    between a search's listing and its look at the file)."""
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def nearest_existing(path: Path) -> Path:
    """`path`, or the closest of its parents that exists (what a mkdir of `path` would start from)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def place_problem(folder: Path, role: str) -> str | None:
    """Why `folder` (its `role`, as the user knows it, e.g. "save_ckpt_dir") cannot be created and written to,
    or None. Creates nothing that stays: it writes and deletes one temporary file in the nearest existing folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        return f"{role} {folder} is a file, not a folder; remove it or choose another path."
    base = nearest_existing(folder)
    if not base.is_dir():
        return f"{role} {folder} cannot be created: {base} is a file; remove it or choose another path."
    try:
        with tempfile.TemporaryFile(dir=base, prefix=".write-test-"):
            pass
    except OSError as err:
        where = "" if base == Path(os.path.abspath(folder)) else f" (tested in {base}, the part that exists)"
        return (f"{role} {folder} cannot be written: {err.strerror or err}{where}; choose a writable place or "
                "fix its permissions.")
    return None


def free_bytes(folder: Path) -> int:
    """Free bytes for a non-root user on the file system that `folder` is (or would be created) on."""
    return shutil.disk_usage(nearest_existing(folder)).free


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError


def read_json_object(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the json object in `path`, None), or (None, what is wrong with the file) as a sentence naming it. UTF-8,
    with or without the BOM Windows editors write."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        return None, f"{path} does not exist."
    except OSError as err:
        return None, f"could not read {path}: {err.strerror or err}."
    except UnicodeDecodeError:
        return None, f"{path} is not a text file (not UTF-8); expected json."
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        return None, (f"{path} is not valid json ({err.msg}: line {err.lineno}, column {err.colno} of its "
                      f"{len(text)} characters); expected a complete json object.")
    if not isinstance(data, dict):
        return None, f"{path} holds a json {type(data).__name__}; expected a json object {{\"key\": value, ...}}."
    return data, None


def parse_problem(err: Exception) -> str:
    """A json or yaml parser's complaint and its place in the file, in one line ("expected ',' or ']', but got ':'
    at line 2, column 2"), rather than yaml's first line ("while parsing a flow sequence")."""
    if isinstance(err, json.JSONDecodeError):
        return f"{err.msg} at line {err.lineno}, column {err.colno}"
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or (str(err).strip().splitlines() or [type(err).__name__])[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def windows_path_hint(path: str | Path) -> str:
    """A hint for a Windows path (C:\\data, data\\images) given on a machine whose paths use '/' (EveryDream2's
    files come from Windows machines); "" otherwise."""
    text = str(path)
    if os.sep != "/" or not ("\\" in text or (len(text) > 1 and text[1] == ":" and text[0].isalpha())):
        return ""
    return " (a Windows path: on this machine write folders with '/', and without a drive letter)"
