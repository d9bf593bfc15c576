"""Progress on every long wait (the scan, the latent-cache fill, a single-file conversion, loading a model, sampling,
validation): one helper, so that each wait shows itself the same way and a run left alone tells where it is.

    from common.progress import progress

    with progress("Latent cache: encoding", total=len(missing), unit="image variants") as bar:
        for batch in loader:
            ...
            bar.update(len(batch))

`what` is the phrase the count follows, `unit` the plural noun counted ("images", "batches", "MiB"); `total` None
when the count is not known ahead, such as files found while walking a folder:

    with progress("Scan: found", total=None, unit="files") as bar:   # "Scan: found 4500 files so far, 1500/s"
        for entry in walk(root):
            bar.update()

What it shows, on the main process only (common/console.py `configure(main=...)`; the other processes of a run
show nothing):

- on a terminal (stderr is a tty), a tqdm bar, gone when the wait ends;
- every `every_s` seconds (`configure`; train.py passes the config's progress_every_n_seconds, 30 by default) a line
  that a log read later can use, and, at the end of a wait that wrote one, a line with the whole time:

      Latent cache: encoding 5200/20000 image variants (26%), 14.3/s, about 17 min left
      Latent cache: encoding 20000/20000 image variants, done in 23 min 10 s (14.4/s)

  The lines go into the run's train.log always (a line said before the run folder exists is held for it, see
  common/console.py `hold_for_log`), and to stdout as well unless the bar already shows on the terminal that stdout
  writes to. Where stderr is no terminal (nohup, SLURM, a pipe) there is no bar: tqdm redraws it with carriage
  returns, which make such a log one unreadable line.

A line is written by the update that finds the interval passed, so a wait whose updates are far apart writes lines
as far apart, and a wait shorter than the interval writes none. An update costs one clock read: no thread, no I/O
between lines.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from common.console import log_only, say, speaks

DEFAULT_EVERY_S = 30.0  # the default of the config's progress_every_n_seconds: a few lines per minute of a log


@dataclass
class _Settings:
    every_s: float = DEFAULT_EVERY_S


_settings = _Settings()


def configure(*, every_s: float) -> None:
    """Write a progress line every `every_s` seconds of a wait (the config's progress_every_n_seconds)."""
    if not every_s > 0:
        raise ValueError(f"the progress interval must be seconds > 0, got {every_s!r}")
    _settings.every_s = every_s


def _is_terminal(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class Progress:
    """One wait's count. `update` it as work gets done; `progress` makes one and closes it."""

    def __init__(self, what: str, total: int | None, unit: str):
        self.what, self.total, self.unit = what, total, unit
        self.done = 0
        self.started = self._last_line = time.monotonic()
        self._lines = 0
        self._speaks = speaks() and total != 0
        self._bar = None
        bar_on_terminal = self._speaks and _is_terminal(sys.stderr)
        if bar_on_terminal:
            from tqdm.auto import tqdm  # light, and only when a bar is drawn

            # " " + unit: tqdm writes the rate as f"{rate}{unit}/s"
            self._bar = tqdm(total=total, desc=what, unit=" " + unit, file=sys.stderr, leave=False,
                             dynamic_ncols=True)
        # a terminal that shows the bar needs no lines on it too; a stdout sent elsewhere (a file, a pipe) gets them
        self._say = log_only if bar_on_terminal and _is_terminal(sys.stdout) else say

    def update(self, count: int = 1) -> None:
        self.done += count
        if not self._speaks:
            return
        if self._bar is not None:
            self._bar.update(count)
        if self.total is not None and self.done >= self.total:
            return  # the closing line says it
        now = time.monotonic()
        if now - self._last_line >= _settings.every_s:
            self._last_line = now
            self._lines += 1
            self._say(progress_line(self.what, self.done, self.total, self.unit, now - self.started))

    def close(self, finished: bool = True) -> None:
        """End the bar; after a wait that wrote lines, one more with the whole time, or where it stopped (an error,
        or a stop request that ended the work short of its total)."""
        finished = finished and (self.total is None or self.done >= self.total)
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._speaks and self._lines:
            self._lines = 0
            self._say(closing_line(self.what, self.done, self.total, self.unit, time.monotonic() - self.started,
                                   finished))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close(finished=kind is None)


def progress(what: str, total: int | None, unit: str) -> Progress:
    """A wait's progress, shown as this module's docstring says; use it in a `with` block."""
    return Progress(what, total, unit)


# ------------------------------------------------------------------------------------------- the lines


def progress_line(what: str, done: int, total: int | None, unit: str, elapsed_s: float) -> str:
    """`<what> <done>/<total> <unit> (<pct>%), <rate>/s, about <time> left`; without a total, the count so far."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    if total is None:
        return f"{what} {done} {unit} so far, {rate_text(rate)}/s"
    percent = min(100, math.floor(100 * done / total)) if total else 100
    left = f"about {eta_text((total - done) / rate)} left" if rate > 0 else "time left not known yet"
    return f"{what} {done}/{total} {unit} ({percent}%), {rate_text(rate)}/s, {left}"


def closing_line(what: str, done: int, total: int | None, unit: str, elapsed_s: float, finished: bool) -> str:
    count = f"{done}/{total}" if total is not None else f"{done}"
    if not finished:
        return f"{what} stopped at {count} {unit} after {duration_text(elapsed_s)}"
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    return f"{what} {count} {unit}, done in {duration_text(elapsed_s)} ({rate_text(rate)}/s)"


def rate_text(rate: float) -> str:
    """Three significant digits, never in exponent notation: 1234, 14.3, 2.05, 0.352."""
    if rate >= 100:
        return f"{rate:.0f}"
    if rate >= 10:
        return f"{rate:.1f}"
    if rate >= 1:
        return f"{rate:.2f}"
    return f"{rate:.3g}"


def duration_text(seconds: float) -> str:
    """A time taken: 0.4 s, 42 s, 6 min 4 s, 2 h 5 min."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"


def eta_text(seconds: float) -> str:
    """A time left, no finer than it can be known: 40 s, 17 min, 2 h 5 min."""
    if seconds < 60:
        return f"{max(1, math.ceil(seconds))} s"
    minutes = math.ceil(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"
