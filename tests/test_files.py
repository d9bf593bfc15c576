"""common/files.py on real file systems: writes appear whole or not at all, stale partials go, places are probed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from common.files import (
    atomic_file,
    atomic_files,
    atomic_folder,
    free_bytes,
    is_partial,
    owner_tag,
    partial_path,
    place_problem,
    remove_stale_partials,
)


def test_a_folder_appears_whole_and_a_failed_one_leaves_nothing(tmp_path):
    with atomic_folder(tmp_path / "save") as partial:
        assert is_partial(partial) and partial.parent == tmp_path
        (partial / "weights").write_text("done")
    assert (tmp_path / "save" / "weights").read_text() == "done"
    assert [p.name for p in tmp_path.iterdir()] == ["save"]

    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C half way
        with atomic_folder(tmp_path / "other") as partial:
            (partial / "weights").write_text("half")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["save"]

    with pytest.raises(FileExistsError):  # never replaces a save
        with atomic_folder(tmp_path / "save"):
            pass
    assert (tmp_path / "save" / "weights").read_text() == "done"


def test_a_file_on_a_full_disk_leaves_the_old_one_and_no_partial(small_disk):
    disk = small_disk("disk", "64k")
    (disk / "index.json").write_text("old")
    with pytest.raises(OSError) as caught:
        with atomic_file(disk / "index.json") as partial:
            partial.write_bytes(b"x" * 200_000)
    assert caught.value.errno == 28  # ENOSPC, for real
    assert sorted(p.name for p in disk.iterdir()) == ["index.json"]
    assert (disk / "index.json").read_text() == "old"


def test_stale_partials_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = partial_path(tmp_path / "a", owner_tag().rsplit("-", 1)[0] + f"-{dead_pid}")
    live = partial_path(tmp_path / "b")  # this process's
    other_host = tmp_path / f".c.partial-elsewhere-{dead_pid}"  # its pid means nothing on this host
    for folder in (stale, live, other_host):
        folder.mkdir()
    assert remove_stale_partials(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other_host.exists()


def test_place_problems_name_the_place_and_the_reason(tmp_path, small_disk):
    assert place_problem(tmp_path / "new" / "deeper", "save_ckpt_dir") is None  # creatable
    assert not (tmp_path / "new").exists()  # the probe leaves nothing
    (tmp_path / "file").write_text("x")
    assert "save_ckpt_dir" in place_problem(tmp_path / "file", "save_ckpt_dir")
    assert "is a file" in place_problem(tmp_path / "file", "save_ckpt_dir")
    assert "cannot be created" in place_problem(tmp_path / "file" / "sub", "logdir")
    read_only = small_disk("ro", "1m", read_only=True)
    problem = place_problem(read_only / "ckpts", "save_ckpt_dir")
    assert "cannot be written: Read-only file system" in problem
    assert free_bytes(read_only / "ckpts" / "x") == free_bytes(read_only)
    assert os.listdir(read_only) == []


def test_a_single_file_and_its_yaml_appear_together_or_not_at_all(tmp_path, monkeypatch):
    """A second Ctrl-C between the yaml's rename and the weights' (here raised by the second rename itself) leaves
    neither: a yaml alone would make the save's name look taken and describe weights that are not there."""
    from convert.write import write_single_file

    renames = []

    def interrupted_second_rename(src, dst):
        renames.append(dst)
        if len(renames) == 2:
            raise KeyboardInterrupt
        os.rename(src, dst)

    monkeypatch.setattr("common.files.os.replace", interrupted_second_rename)
    with pytest.raises(KeyboardInterrupt):
        write_single_file(tmp_path / "m.safetensors", {"w": torch.ones(2)}, half=False, metadata={},
                          sidecar="model: {}\n")
    assert [p.name for p in renames] == ["m.yaml", "m.safetensors"] and list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    write_single_file(tmp_path / "m.safetensors", {"w": torch.ones(2)}, half=False, metadata={}, sidecar="model: {}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "m.yaml"]
    with atomic_files(tmp_path / "a.txt", tmp_path / "b.txt") as (a, b):
        a.write_text("a"), b.write_text("b")
    assert (tmp_path / "a.txt").read_text() + (tmp_path / "b.txt").read_text() == "ab"


def test_what_is_written_whole_is_readable_by_others_as_the_umask_allows(tmp_path):
    """safetensors writes 0600; a ComfyUI or AUTOMATIC1111 run by another user must be able to read a save."""
    from safetensors.torch import save_file

    umask = os.umask(0o022)
    try:
        with atomic_folder(tmp_path / "save") as partial:
            save_file({"w": torch.ones(1)}, str(partial / "weights.safetensors"))
        with atomic_file(tmp_path / "one.safetensors") as partial:
            save_file({"w": torch.ones(1)}, str(partial))
    finally:
        os.umask(umask)
    for written in (tmp_path / "save" / "weights.safetensors", tmp_path / "one.safetensors"):
        assert written.stat().st_mode & 0o777 == 0o644, oct(written.stat().st_mode)
