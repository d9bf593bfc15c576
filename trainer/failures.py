"""What the user is told about an exception that no check turned into a message: the environment's faults
(a full or read-only disk, out of memory) in one line with the fix, and anything else as what it is, a bug in
this program, with its traceback and how to report it.

An error that ends a run after training began is marked with how to go on from the run's last complete save
(`mark_how_to_go_on`, done by trainer/saves/saving.py `rescue`): its line ends with that, the same advice every
other stopped run gives (`continue with --resume_state <state>`), rather than with "run again", which would throw
away what trained.
"""

from __future__ import annotations

import errno
import traceback

from common.console import first_line

ISSUES_URL = "the project's issue tracker"
DISK_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EIO: "the disk reported an input/output error",
}
GO_ON = "trainer_how_to_go_on"  # the attribute `mark_how_to_go_on` sets on an error


def mark_how_to_go_on(err: BaseException, advice: str) -> None:
    """`err` ended a run that had begun training: its description ends with `advice`, how to go on from the run's
    last complete save (a sentence without its capital, trainer/saves/saving.py `how_to_go_on`)."""
    try:
        setattr(err, GO_ON, advice)
    except AttributeError:  # an exception type without attributes of its own: it keeps the general advice
        pass


def _go_on(err: BaseException, before_training: str) -> str:
    """How to go on after `err`: from the run's last save when it had begun training, else `before_training`."""
    return getattr(err, GO_ON, None) or before_training


def environment_message(err: BaseException) -> str | None:
    """One line for a fault of the machine rather than of this program, or None."""
    if isinstance(err, FileNotFoundError):  # raised again from a DataLoader worker, it has no errno
        return (f"a file the run was using is gone: {_detail(err)}. Was it deleted, or its disk unmounted, during "
                f"the run? Make it available again, then {_go_on(err, 'run again.')}")
    if isinstance(err, OSError):
        reason = DISK_ERRORS.get(err.errno, "a file operation failed")
        return (f"{reason}: {_detail(err)}. Free space or fix the permissions there, or move the files of that "
                "place to another disk with the setting that places them: logdir, save_ckpt_dir, latent_cache_dir, "
                f"ckpt_cache_dir (or CKPT_CACHE_DIR) or, for downloads, HF_HUB_CACHE; then {_go_on(err, 'run again.')}")
    if type(err).__name__ == "OutOfMemoryError" or isinstance(err, MemoryError):
        device = "GPU" if type(err).__name__ == "OutOfMemoryError" else "CPU"
        return (f"out of {device} memory ({_detail(err)}). Lower batch_size or resolution, turn "
                "gradient_checkpointing on, use optimizer adamw8bit, or freeze the text encoder "
                f"(disable_textenc_training); then {_go_on(err, 'run again.')}")
    return None


def _detail(err: BaseException) -> str:
    """The error's own words: for one raised again from a DataLoader worker, the original's last line."""
    if isinstance(err, OSError) and err.strerror:
        return first_line(err)
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def describe_unexpected(err: BaseException) -> str:
    """What to print for `err`: one line for the machine's faults, else the traceback and a bug report's how."""
    message = environment_message(err)
    if message is not None:
        return f"train.py: {message}"
    go_on = _go_on(err, "")
    return ("".join(traceback.format_exception(err)) + f"train.py: this is a bug in the trainer ({type(err).__name__} "
            "above): an input or environment problem would have been reported in one line. Please report it at "
            f"{ISSUES_URL}, with the command, your train.json and the output above."
            + (f" To go on meanwhile, {go_on}" if go_on else ""))
