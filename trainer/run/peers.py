"""The processes of a multi-process run, and what a survivor says when one of them is lost.

Under `accelerate launch` every process takes part in each step's gradient all-reduce and in each save. When one
is killed (SIGKILL from the out-of-memory killer, a crashed node), the survivors' next collective fails with the
backend's error (gloo: "Connection reset by peer"; NCCL: a DistBackendError), and torch's launcher sends them
SIGTERM, then SIGKILL 30 s later. Nothing more can be saved: a save needs every process. So a survivor says in
one line which process was lost and which complete save to go on from, and ends at once.

Which process: each process's host and pid are gathered once, as the run starts (`roster`); at the failure the
ones on this host are looked up (a killed process is gone, or a zombie until the launcher reaps it).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from trainer.errors import UserError

# How long a survivor waits for a lost peer to be seen gone: its sockets close as it dies, so by the time the
# collective fails it is almost always a zombie already; this covers a peer still ending its own error.
SETTLE_S = 2.0


class LostProcess(UserError):
    """Another process of the run ended mid-run; this one cannot go on alone."""


def roster(accelerator) -> list[tuple[str, int]]:
    """(host, pid) of every process, in rank order (one collective, while they are all alive)."""
    here = (socket.gethostname(), os.getpid())
    if accelerator.num_processes == 1:
        return [here]
    from accelerate.utils import gather_object

    return list(gather_object([here]))


def is_collective_failure(err: BaseException) -> bool:
    """Whether `err` is a collective that failed because the other end went away (the backends' errors)."""
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(mark in text for mark in ("gloo", "NCCL", "ProcessGroup", "c10d"))


def lost_ranks(processes: list[tuple[str, int]], settle_s: float = SETTLE_S) -> list[int]:
    """The ranks whose process on this host has ended (waiting up to `settle_s` for one to be seen gone)."""
    host, me = socket.gethostname(), os.getpid()
    local = [(rank, pid) for rank, (h, pid) in enumerate(processes) if h == host and pid != me]
    deadline = time.monotonic() + settle_s
    while True:
        gone = [rank for rank, pid in local if _ended(pid)]
        if gone or time.monotonic() >= deadline:
            return gone
        time.sleep(0.1)


def _ended(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.is_dir():  # Linux: a zombie ("Z") has ended, only its exit status waits to be read
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except FileNotFoundError:
            return True
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def lost_process(err: BaseException, processes: list[tuple[str, int]], step: int, go_on: str) -> LostProcess | None:
    """The one-line error for a collective failure caused by a lost process, or None when `err` is not one.
    `go_on` says how to continue from the last complete save."""
    if len(processes) < 2 or not is_collective_failure(err):
        return None
    gone = lost_ranks(processes)
    count = len(processes)
    if gone:
        who = ", ".join(f"process {rank} of {count} (pid {processes[rank][1]})" for rank in gone)
        how = ("ended without a word, as a process killed by SIGKILL does (the out-of-memory killer: see dmesg), or "
               "stopped by an error of its own printed above")
    else:  # on another host, or not yet seen gone
        who = f"another of the run's {count} processes"
        how = f"stopped answering ({first_sentence(err)})"
    return LostProcess(f"{who} was lost after step {step}: it {how}. Process {_my_rank(processes)} cannot go on "
                       f"without it, so training stopped and nothing more was saved. {go_on}")


def _my_rank(processes: list[tuple[str, int]]) -> int:
    return processes.index((socket.gethostname(), os.getpid()))


def first_sentence(err: BaseException) -> str:
    """The backend's reason without its source location ("[.../pair.cc:537] Read error ...: Connection reset by
    peer. This is typically ..." -> "Connection reset by peer")."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = text.split("] ", 1)[-1] if text.startswith("[") else text
    return text.split(". ", 1)[0].rsplit(": ", 1)[-1].rstrip(".")
