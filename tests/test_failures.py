"""What the user reads about an exception no check turned into a message: the machine's faults in one line, bugs
as bugs, with their traceback."""

from __future__ import annotations

import errno

import torch

from trainer.failures import describe_unexpected


def reported(err: BaseException, capsys) -> tuple[int, str]:
    try:
        raise err
    except BaseException as raised:
        return 1, describe_unexpected(raised) + "\n"


def test_a_full_disk_is_one_line(capsys):
    code, err = reported(OSError(errno.ENOSPC, "No space left on device", "logs/r/train.log"), capsys)
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("train.py: the disk is full: No space left on device: logs/r/train.log. Free space")


def test_a_file_gone_from_under_a_dataloader_worker_is_one_line(capsys):
    # how torch raises a worker's error again in the main process: the same type, its traceback as the message
    again = FileNotFoundError("Caught FileNotFoundError in DataLoader worker process 0.\nOriginal Traceback (most "
                              "recent call last):\n  ...\nFileNotFoundError: [Errno 2] No such file or directory: "
                              "'cache/ab/x.safetensors'\n")
    code, err = reported(again, capsys)
    assert code == 1 and "Traceback" not in err.splitlines()[0] and err.count("\n") == 1
    assert "a file the run was using is gone: FileNotFoundError: [Errno 2] No such file" in err


def test_out_of_memory_is_one_line_with_what_to_change(capsys):
    code, err = reported(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), capsys)
    assert code == 1 and err.startswith("train.py: out of GPU memory (CUDA out of memory. Tried to allocate")
    assert "batch_size" in err and "gradient_checkpointing" in err


def test_anything_else_is_a_bug_with_its_traceback(capsys):
    code, err = reported(KeyError("unet"), capsys)
    assert code == 1 and "Traceback (most recent call last)" in err and "KeyError: 'unet'" in err
    assert "train.py: this is a bug in the trainer (KeyError above)" in err
