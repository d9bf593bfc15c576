"""The scan's index (data/scanning/index.py) on real files: a second scan takes unchanged images from it without
reading them, sees every new, removed and changed image and caption, answers what a scan without it answers, and
a damaged, foreign or unwritable index only costs reading the images again.

That a second scan reads no image is shown without mocks: after the first scan an image's bytes are replaced by
zeros of the same length and its mtime put back (os.utime), which no decoder accepts; the second scan still takes
it, and once its mtime differs, it is read again and reported.
"""

from __future__ import annotations

import gzip
import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from common.progress import DEFAULT_EVERY_S
from common.progress import configure as configure_progress
from data.scan import Scan, scan_data_root
from data.scanning.index import INDEX_NAME
from tests.messy_data import make_linked_folder, make_messy_folder

SETTLED = time.time_ns() - 3600 * 10**9  # an hour ago: files this old are kept in the index
SECOND = 10**9
DAMAGED = "is damaged (truncated or changed)"


def write_images(root: Path, sizes: dict[str, tuple[int, int]], captions: dict[str, str] | None = None) -> Path:
    """PNGs of `sizes` (name -> width, height) and .txt `captions` (stem -> text) in `root`, all settled."""
    root.mkdir(parents=True, exist_ok=True)
    for name, size in sizes.items():
        Image.new("RGB", size, (200, 30, 30)).save(root / name)
    for stem, caption in (captions or {}).items():
        (root / f"{stem}.txt").write_text(caption, encoding="utf-8")
    return settle(root)


def settle(root: Path, mtime_ns: int = SETTLED) -> Path:
    """Give every file and folder under `root` the same old mtime (links left alone, and not followed)."""
    for folder, folders, files in os.walk(root):
        for name in [*folders, *files]:
            if not os.path.islink(os.path.join(folder, name)):
                os.utime(os.path.join(folder, name), ns=(mtime_ns, mtime_ns))
    return root


def spoil(path: Path) -> None:
    """Replace `path`'s bytes by as many zeros and put its mtime back: it looks unchanged by size and mtime, and
    nothing can read it any more."""
    stat = path.stat()
    path.write_bytes(b"\0" * stat.st_size)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def touch(path: Path, seconds_later: int = 5) -> None:
    """`path` with a settled mtime other than the one the index knows."""
    os.utime(path, ns=(SETTLED + seconds_later * SECOND, SETTLED + seconds_later * SECOND))


def indexed(root: Path) -> dict[str, list]:
    return json.loads(gzip.decompress((root / INDEX_NAME).read_bytes()))["images"]


def captions(scan: Scan) -> dict[str, str]:
    return {item.path.name: item.caption for item in scan.items}


def without_index(root: Path, resolution: int = 64) -> Scan:
    """What scanning `root` answers when every file is read (the index set aside and put back)."""
    index, aside = root / INDEX_NAME, root.parent / "index-aside"
    index.rename(aside)
    try:
        return scan_data_root(root, resolution)
    finally:
        (root / INDEX_NAME).unlink(missing_ok=True)
        aside.rename(index)


def test_a_second_scan_takes_unchanged_images_from_the_index_without_reading_them(tmp_path: Path):
    root = write_images(tmp_path / "data", {"a.png": (64, 32), "b.png": (32, 64)}, {"a": "a red thing"})
    first = scan_data_root(root, 64)
    assert set(indexed(root)) == {"a.png", "b.png"}

    spoil(root / "a.png")
    second = scan_data_root(root, 64)
    assert second.items == first.items and second.skipped == []  # a.png as it was: never opened

    touch(root / "a.png")  # the same bytes, another mtime: read again, and now it cannot be used
    third = scan_data_root(root, 64)
    assert [(path.name, reason) for path, reason in third.skipped] == [("a.png", "not an image file PIL can read")]
    assert [item.path.name for item in third.items] == ["b.png"] and set(indexed(root)) == {"b.png"}


def test_new_removed_and_changed_images_and_captions_are_seen(tmp_path: Path):
    root = write_images(tmp_path / "data", {"a.png": (64, 64), "b.png": (64, 64), "c.png": (64, 64), "d.png": (64, 64)},
                        {"a": "apple", "c": "cherry"})
    scan_data_root(root, 64)
    write_images(root, {"e.png": (64, 64)})  # new
    (root / "d.png").unlink()  # removed
    Image.new("RGB", (96, 48), (0, 0, 200)).save(root / "c.png")  # another picture
    touch(root / "c.png")
    (root / "a.txt").write_text("grape", encoding="utf-8")  # the same length: only its mtime tells
    touch(root / "a.txt")
    (root / "b.txt").write_text("banana", encoding="utf-8")  # a caption for an unchanged image
    touch(root / "b.txt")
    (root / "c.txt").unlink()  # its caption is the file name again

    second = scan_data_root(root, 64)
    assert captions(second) == {"a.png": "grape", "b.png": "banana", "c.png": "c", "e.png": "e"}
    assert {item.path.name: item.size for item in second.items}["c.png"] == (96, 48)
    assert set(indexed(root)) == {"a.png", "b.png", "c.png", "e.png"}
    assert without_index(root) == second == scan_data_root(root, 64)


def test_own_settings_and_their_unused_keys_come_from_the_index_as_read(tmp_path: Path):
    root = write_images(tmp_path / "data", {"a.png": (64, 64), "b.png": (64, 64)})
    (root / "a.yaml").write_text("main_prompt: a cat\ntags: [fluffy]\nflip_p: 0.25\nbatch_id: cats\nrating: 5\n",
                                 encoding="utf-8")
    (root / "multiply.txt").write_text("2", encoding="utf-8")
    settle(root)
    first = scan_data_root(root, 64)
    assert captions(first)["a.png"] == "a cat, fluffy" and first.items[0].flip_p == 0.25
    assert [(path.name, keys) for path, keys in first.unused][-1][0] == "a.yaml"

    spoil(root / "a.png")
    spoil(root / "a.yaml")  # its facts come from the index: neither file is read
    assert scan_data_root(root, 64) == first


def test_a_scan_with_its_index_answers_what_a_scan_without_it_answers(tmp_path: Path, shapes_dir: Path):
    """The messy folder (every image format and mode, broken files, sidecars of each kind, settings files) and the
    linked one (folder links, a loop, file links and hard links)."""
    for root in (make_messy_folder(tmp_path / "messy"), make_linked_folder(tmp_path / "linked", shapes_dir)):
        settle(root)
        first = scan_data_root(root, 128)
        assert indexed(root) and scan_data_root(root, 128) == first == without_index(root, 128)


@pytest.mark.parametrize("damage", ["truncated", "a byte changed", "garbage", "not json", "another version",
                                    "foreign json"])
def test_a_damaged_or_foreign_index_costs_a_rescan_and_one_line(tmp_path: Path, damage: str, capsys):
    root = write_images(tmp_path / "data", {"a.png": (64, 64), "b.png": (64, 64)})
    first = scan_data_root(root, 64)
    index = root / INDEX_NAME
    blob = index.read_bytes()
    document = json.loads(gzip.decompress(blob))
    index.write_bytes({
        "truncated": blob[: len(blob) // 2],
        "a byte changed": blob[:-12] + bytes([blob[-12] ^ 0xFF]) + blob[-11:],
        "garbage": b"\x89PNG not an index at all",
        "not json": gzip.compress(b"{images: []"),
        "another version": gzip.compress(json.dumps({**document, "version": 0}).encode()),
        "foreign json": gzip.compress(json.dumps({"images": ["a.png"]}).encode()),
    }[damage])
    spoil(root / "a.png")  # the index no longer stands for it: it is read, and reported
    capsys.readouterr()

    second = scan_data_root(root, 64)
    said = capsys.readouterr().out.splitlines()
    assert [path.name for path, _ in second.skipped] == ["a.png"] and second.items == first.items[1:]
    problem = {"truncated": DAMAGED, "a byte changed": DAMAGED, "garbage": DAMAGED,
               "not json": DAMAGED, "another version": "was written by another version of the scan",
               "foreign json": "is not a scan index"}[damage]
    assert [line for line in said if "scan index" in line] == [
        f"Data: the scan index {index} {problem}; every image is read again and the index rewritten."]
    assert set(indexed(root)) == {"b.png"}  # rewritten whole
    scan_data_root(root, 64)
    assert "scan index" not in capsys.readouterr().out


def test_files_changed_in_the_last_seconds_are_read_again_next_time(tmp_path: Path):
    """A file's next write within the same tick of the file system's clock would leave its mtime as it was, so a
    file this fresh is not kept: git's "racy" files."""
    root = write_images(tmp_path / "data", {"old.png": (64, 64)})
    Image.new("RGB", (64, 64)).save(root / "fresh.png")
    scan_data_root(root, 64)
    assert set(indexed(root)) == {"old.png"}
    spoil(root / "fresh.png")
    assert [path.name for path, _ in scan_data_root(root, 64).skipped] == ["fresh.png"]


def test_only_the_first_process_on_a_machine_writes_the_index(tmp_path: Path, monkeypatch):
    root = write_images(tmp_path / "data", {"a.png": (64, 64)})
    monkeypatch.setenv("LOCAL_RANK", "1")  # as accelerate launch and torchrun set it
    scan_data_root(root, 64)
    assert not (root / INDEX_NAME).exists()
    monkeypatch.setenv("LOCAL_RANK", "0")
    scan_data_root(root, 64)
    assert set(indexed(root)) == {"a.png"}


def test_a_read_only_data_root_scans_as_before_says_so_once_and_reads_an_index_it_has(small_disk, capsys):
    def images(point: Path) -> None:
        write_images(point, {"a.png": (64, 32), "b.png": (32, 64)}, {"a": "a red thing"})

    bare = small_disk("bare", "1m", read_only=True, fill=images)
    first = scan_data_root(bare, 64)
    said = capsys.readouterr().out
    assert f"Data: the scan index cannot be written in {bare} (Read-only file system)" in said
    assert scan_data_root(bare, 64) == first and "scan index" not in capsys.readouterr().out  # said once
    assert not (bare / INDEX_NAME).exists() and captions(first) == {"a.png": "a red thing", "b.png": "b"}

    def indexed_images(point: Path) -> None:
        images(point)
        scan_data_root(point, 64)
        spoil(point / "a.png")

    with_index = small_disk("indexed", "1m", read_only=True, fill=indexed_images)
    capsys.readouterr()
    second = scan_data_root(with_index, 64)
    assert captions(second) == captions(first) and second.skipped == []  # a.png from the index
    assert "scan index" not in capsys.readouterr().out  # nothing new to write


def test_the_scan_shows_progress_while_it_reads_and_none_when_the_index_knows_everything(tmp_path: Path, capsys):
    root = write_images(tmp_path / "data", {f"{n}.png": (64, 64) for n in range(3)})
    configure_progress(every_s=1e-9)  # a line at every update
    try:
        scan_data_root(root, 64)
        first = capsys.readouterr().out
        scan_data_root(root, 64)
        second = capsys.readouterr().out
    finally:
        configure_progress(every_s=DEFAULT_EVERY_S)
    assert "Data: checking 1/3 images (33%)" in first and "Data: checking 3/3 images, done in" in first
    assert "Data: checking" not in second

