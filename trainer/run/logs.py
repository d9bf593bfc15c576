"""The run folder's logs, train.log and the tensorboard events, and what happens when they cannot be written: the
folder deleted during the run (a clean-up script, a user in the wrong terminal), or its disk full or gone.

Logs never stop a run. The loss is kept by the console, and the saves, which matter, make their folders again:
so a log that cannot be written is said once, in one line, and is left alone from then on. The tensorboard
writer writes from a thread of its own, which would print its error as a traceback; here the error is said
once from the main thread instead (`quiet_writer_threads`).
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any, Protocol

from common.console import attach_log, first_line, on_log_folder_gone, warn


class Run(Protocol):
    """What this module reads of the run (trainer/run/setup.py's Run), named here so that setup can import this."""

    accelerator: Any
    run_dir: Path
    save_dir: Path
    logs_stopped: bool
    tensorboard_lost: Path | None


def watch_logs(run: Run) -> None:
    """From the run's start: its logs' failures are said once each, from the main thread."""
    quiet_writer_threads()

    def train_log_folder_gone() -> None:
        if not run.logs_stopped:
            stop_logs(run, _deleted(run))

    on_log_folder_gone(train_log_folder_gone)


def quiet_writer_threads() -> None:
    """A tensorboard writer thread that meets a file-system error ends without printing it: the next log call
    raises it again on the main thread, where `log_to_trackers` says it once."""
    previous = threading.excepthook
    if getattr(previous, "quiets_writer_threads", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard."):
            return
        previous(args)

    hook.quiets_writer_threads = True
    threading.excepthook = hook


def watch_run_folder(run: Run) -> None:
    """Once a step, on the main process (a stat): a run folder that has gone is said once, before anything else
    tries to write there. A tensorboard folder found gone during the step is said here too, now that it is known
    whether the whole run folder went with it (`rm -r` deletes what is inside first)."""
    if run.logs_stopped or not run.accelerator.is_main_process:
        return
    if not run.run_dir.is_dir():
        stop_logs(run, _deleted(run))
    elif run.tensorboard_lost is not None:
        warn(f"the tensorboard folder {run.tensorboard_lost} was deleted during the run: its log stops here, and "
             "training goes on.")
    run.tensorboard_lost = None


def _deleted(run: Run) -> str:
    return f"the run folder {run.run_dir} was deleted during the run"


def stop_logs(run: Run, reason: str) -> None:
    """Stop writing train.log and the tensorboard log, and say so in one line."""
    run.logs_stopped = True
    attach_log(None)
    _drop_tensorboard(run)
    saves = f"the saves go on into {run.save_dir}"
    if run.run_dir in run.save_dir.parents:
        saves += ", made again when the next save comes"
    warn(f"{reason}: train.log and the tensorboard log stop here, and training goes on; {saves}.")


def log_to_trackers(run: Run, values: dict, step: int) -> None:
    """`values` to the trackers (tensorboard, and wandb when asked); a tracker that cannot write is said once."""
    try:
        run.accelerator.log(values, step=step)
    except OSError as err:
        _tensorboard_failed(run, err, step_goes_on=True)


def tensorboard_writer(run: Run):
    """The tensorboard SummaryWriter, for what accelerate's log does not take (images), or None once it failed."""
    for tracker in run.accelerator.trackers:
        if tracker.name == "tensorboard":
            return tracker.tracker
    return None


def add_image(run: Run, tag: str, image, step: int) -> None:
    writer = tensorboard_writer(run)
    if writer is None:
        return
    try:
        writer.add_image(tag, image, step, dataformats="HWC")
    except OSError as err:
        _tensorboard_failed(run, err, step_goes_on=True)


def end_trackers(run: Run) -> None:
    """accelerate's end of training (the trackers' last flush, the process group), a last flush that fails said
    once: the run is complete and saved by now."""
    watch_run_folder(run)  # a folder found gone since the last step
    for tracker in list(run.accelerator.trackers):
        try:
            tracker.finish()
        except OSError as err:
            _tensorboard_failed(run, err)
    run.accelerator.trackers = []  # finished; end_training would finish them again
    run.accelerator.end_training()
    on_log_folder_gone(None)  # its watch lets go of the run: in a caller's process that goes on, the run is freed


def _tensorboard_failed(run: Run, err: OSError, step_goes_on: bool = False) -> None:
    """Said once; a folder found gone during a step is said by the watch after it (`watch_run_folder`), which
    tells a deleted run folder from a deleted tensorboard folder."""
    if not run.run_dir.is_dir():
        stop_logs(run, _deleted(run))
        return
    folder = _tensorboard_folder(run)
    _drop_tensorboard(run)
    if isinstance(err, FileNotFoundError) and step_goes_on:
        run.tensorboard_lost = folder
        return
    warn(f"could not write the tensorboard log in {folder} ({err.strerror or first_line(err)}); it stops here, and "
         "training goes on.")


def _tensorboard_folder(run: Run):
    writer = tensorboard_writer(run)
    return getattr(writer, "log_dir", None) or run.run_dir


def _drop_tensorboard(run: Run) -> None:
    """Close the tensorboard writer (its last flush may fail too) and log no more to it; other trackers stay."""
    keep = []
    for tracker in run.accelerator.trackers:
        if tracker.name == "tensorboard":
            with contextlib.suppress(OSError):
                tracker.finish()
        else:
            keep.append(tracker)
    run.accelerator.trackers = keep
