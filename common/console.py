"""Telling the user things: one channel for every module, quiet on all but the main process, mirrored into the
run's train.log once there is one.

Library code never calls `print`; it calls `say` (stdout) or `warn` (stderr, "Warning: ..."). Both go through
`tqdm.write`, so a progress bar on the terminal stays whole. `log_only` writes into train.log alone, for what the
terminal shows another way (a progress bar, common/progress.py). Under `accelerate launch` every process runs the
same code: `configure(main=False)` on the others keeps the console to one voice. A log file that cannot be
written (a full disk) is said once and then left alone: telling the user things never stops a run.

The run folder, and so train.log, is made only once the model has loaded and the latent cache is full, minutes into
a large run; train.py calls `hold_for_log` first thing, so that what is said until then (the config's notices, the
model, the scan, the cache fill's progress) is kept and written at the top of train.log when `attach_log` opens it,
in order and with the time each line was said.

A console that can no longer be written never stops a run either: train.py calls `outlive_the_console` first
thing, after which a write to stdout or stderr that fails (the reader of a pipe ended, as `| head` does; a terminal
hung up; a full disk under `> out.txt`) points that descriptor at /dev/null, for every writer in the process (ours,
the libraries' loggers and bars, the interpreter's last flush), says so once on the other stream and in train.log,
and the run goes on; train.log keeps every message.
"""

from __future__ import annotations

import errno
import io
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


def quiet_library_noise() -> None:
    """Silence what libraries say at import that would only mislead a user of ours. bitsandbytes' CPU backend
    (imported with peft, and so with diffusers) warns that an optional 4-bit kernel package is missing; nothing
    here runs 4-bit kernels, and its advice (pip install kernels) would send users after a package they do not
    need."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


@dataclass
class _Channel:
    main: bool = True
    log_file: Path | None = None
    log_folder_gone: Callable[[], None] | None = None  # says, in the caller's words, that the log's folder went
    held: list[str] | None = None  # the log's lines said before it was attached (`hold_for_log`); None: none kept


_channel = _Channel()


def configure(*, main: bool = True) -> None:
    """Whether this process speaks (the main process of a run does; the others stay quiet)."""
    _channel.main = main


def speaks() -> bool:
    """Whether this process says things (`configure`): what shows a progress bar decides by it too."""
    return _channel.main


def hold_for_log() -> None:
    """Keep what is said from now on until `attach_log` opens the run's log, which then starts with it."""
    _channel.held = []


def attach_log(path: Path | None) -> None:
    """Mirror every message into `path` from now on (the run's train.log), beginning with the lines held for it
    (`hold_for_log`); None stops mirroring, and drops the lines held."""
    held, _channel.held = _channel.held, None
    _channel.log_file = path
    _channel.log_folder_gone = None
    if path is not None and held:
        _append_to_log("".join(held))


def on_log_folder_gone(say_it: Callable[[], None] | None) -> None:
    """`say_it` is called, instead of the usual line, when the log cannot be written because its folder is gone:
    a run whose folder was deleted says that once, for all of its logs, in its own words (None: the usual line)."""
    _channel.log_folder_gone = say_it


def say(message: str) -> None:
    _emit(message, sys.stdout)


def say_from_signal_handler(message: str) -> None:
    """`say` for a signal handler. A handler runs between any two bytecodes of the main thread, so also inside a
    write to stdout or stderr (whose lowest layer, `_ConsoleFile.write`, is Python): writing through those streams'
    buffers again from there fails ("reentrant call inside <_io.BufferedWriter>", a closed terminal's SIGHUP met
    it). So the line goes straight to stdout's descriptor, on a line of its own where a progress bar may be showing;
    train.log gets it as from `say` (each append opens the file anew)."""
    if not _channel.main:
        return
    _to_log(message)
    try:
        fd = sys.stdout.fileno()
        text = ("\n" if os.isatty(fd) else "") + message + "\n"
        os.write(fd, text.encode(sys.stdout.encoding or "utf-8", errors="replace"))
    except (OSError, ValueError):  # a console that is gone (or none) loses the line; train.log has it
        pass


def warn(message: str) -> None:
    _emit(f"Warning: {message}", sys.stderr)


def log_only(message: str) -> None:
    """Into train.log alone (held for it until it opens): what the terminal already shows another way."""
    if _channel.main:
        _to_log(message)


def _emit(message: str, stream) -> None:
    if not _channel.main:
        return
    from tqdm.auto import tqdm  # light, and only once something is said

    _to_log(message)  # first: a console that fails never costs train.log the line
    tqdm.write(message, file=stream)
    stream.flush()


def report(message: str) -> None:
    """The one message a run ends with (`train.py: ...`): on stderr from every process (the one that failed need not
    be the main one), and into train.log where it is open."""
    if _channel.main:
        _to_log(message)
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def _to_log(message: str) -> None:
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n"
    if _channel.log_file is not None:
        _append_to_log(line)
    elif _channel.held is not None:
        _channel.held.append(line)


def _append_to_log(text: str) -> None:
    try:
        with open(_channel.log_file, "a", encoding="utf-8") as log:
            log.write(text)
    except OSError as err:
        failed, _channel.log_file = _channel.log_file, None
        if isinstance(err, FileNotFoundError) and _channel.log_folder_gone is not None:
            _channel.log_folder_gone()  # appending creates the file: only its folder can be missing
        else:
            from tqdm.auto import tqdm

            tqdm.write(f"Warning: cannot write {failed} ({err.strerror}); messages go on here only.", file=sys.stderr)


# ------------------------------------------------------------------------------------------- a lost console


class _ConsoleFile(io.FileIO):
    """stdout's or stderr's descriptor, written as Python writes it, except that a write it can no longer take
    loses it (`_lose`) instead of raising into whichever writer met it first."""

    lost = False

    def write(self, data) -> int | None:
        try:
            return super().write(data)
        except OSError as err:  # (a descriptor set non-blocking that is full returns None, as FileIO's does)
            _lose(self, err)
            return len(data)


def outlive_the_console() -> None:
    """From now on a stdout or stderr that can no longer be written (this module's docstring) costs nothing.

    The streams are made again over `_ConsoleFile`, with the interpreter's own settings; libraries imported later
    (their loggers keep the stream they found) and tqdm's bars write through them too."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, io.TextIOWrapper) or isinstance(_raw(stream), _ConsoleFile):
            continue  # done already
        try:
            fd = stream.fileno()
        except (OSError, ValueError):
            continue  # a stream with no descriptor (pytest's capture) is not a console
        stream.flush()
        raw = _ConsoleFile(fd, "w", closefd=False)
        raw.name = f"<{name}>"
        # the interpreter's layers: unbuffered (PYTHONUNBUFFERED, -u) writes go straight to the descriptor
        binary = io.BufferedWriter(raw) if isinstance(stream.buffer, io.BufferedWriter) else raw
        setattr(sys, name, io.TextIOWrapper(binary, encoding=stream.encoding, errors=stream.errors,
                                            line_buffering=stream.line_buffering, write_through=stream.write_through))


def _raw(stream):
    """The descriptor's layer under a text stream (its buffer's raw file, or the buffer where it has none)."""
    binary = getattr(stream, "buffer", None)
    return getattr(binary, "raw", binary)


_WHY = {errno.EPIPE: "what read it has ended, as `| head` does", errno.EIO: "its terminal was closed"}


def _lose(console: _ConsoleFile, err: OSError) -> None:
    """`console` to /dev/null: the write that failed and all that follow, by any writer in the process, succeed
    unseen. Said once in train.log and, where it still works, on the other stream."""
    console.lost = True
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, console.fileno())
    finally:
        os.close(devnull)
    if not _channel.main or sys.is_finalizing():  # the interpreter's last flush: the run has nothing more to say
        return
    name = console.name.strip("<>")
    why = f"{err.strerror}: {_WHY[err.errno]}" if err.errno in _WHY else err.strerror or str(err)
    note = f"{name} can no longer be written ({why}); the run goes on, and its messages go on into train.log."
    _to_log(f"Warning: {note}")
    other = sys.stderr if name == "stdout" else sys.stdout
    if isinstance(_raw(other), _ConsoleFile) and not _raw(other).lost:
        other.write(f"Warning: {note}\n")
        other.flush()


def first_line(err: BaseException) -> str:
    """The first line of an exception's text (its type when it has none), for one-line messages; a file-system
    error as its reason and file ("File exists: logs/r/samples"), without the errno and quotes."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror + (f": {os.fsdecode(err.filename)}" if err.filename else "")  # tensorboard's are bytes
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
