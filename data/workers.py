"""DataLoader worker processes: what each one sets up when it starts.

A stop request (`kill -TERM -- -<pgid>` from docker, systemd, SLURM or Kubernetes; Ctrl-C in a terminal) goes
to every process of the run, the workers included. A worker that dies of it crashes the run ("DataLoader
worker ... killed by signal") before the main process can save. So workers ignore the stop signals: the
main process handles the stop and shuts its workers down itself (they also exit on their own when the main
process is gone: torch's worker loop watches it).
"""

from __future__ import annotations

import signal

# Ctrl-C; what docker, systemd, SLURM and Kubernetes send; a closed terminal or ssh session (not on Windows)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader `worker_init_fn`: leave the stop signals to the main process. Module-level, so it pickles
    for the spawn start method (macOS, Windows)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def end_worker_processes() -> None:
    """Kill the worker processes still alive as the program ends. A loader shuts its workers down when it is
    garbage-collected; an error's traceback can keep it alive until the interpreter exits, and there
    multiprocessing sends the workers SIGTERM, which they ignore, and waits for them forever. They only ever
    read, so nothing is lost by killing them."""
    import multiprocessing

    children = multiprocessing.active_children()
    if children:  # torch's SIGCHLD handler would raise "worker killed by signal" in this very process
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
        child.join(timeout=10)
