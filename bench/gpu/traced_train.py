"""`python train.py` as it is, with the GPU's peak memory written down when it ends: the train.py rows of
bench/gpu/bench_gpu.py start their runs as `python bench/gpu/traced_train.py <train.py's arguments>`.

train.py's own `__main__` runs unchanged in this process (runpy), so the run is the one a user starts; only its
exit is watched: then torch.cuda's peak allocated and reserved bytes over the whole process, and the wall time,
go as json to the file $TRACE_OUT names. train.py ends a one-process run with sys.exit, which this sees.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def write_trace(path: str, started: float, exit_code: object) -> None:
    torch = sys.modules.get("torch")  # a run that stopped before importing torch used no GPU memory
    cuda = torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized()
    trace = {"exit_code": exit_code, "wall_s": time.monotonic() - started,
             "peak_allocated": torch.cuda.max_memory_allocated() if cuda else None,
             "peak_reserved": torch.cuda.max_memory_reserved() if cuda else None}
    Path(path).write_text(json.dumps(trace) + "\n")


def main() -> None:
    started = time.monotonic()
    sys.argv = [str(REPO_ROOT / "train.py"), *sys.argv[1:]]
    sys.path[0] = str(REPO_ROOT)  # as if train.py had been started itself
    exit_code: object = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as stop:
        exit_code = stop.code
        raise
    finally:
        if os.environ.get("TRACE_OUT"):
            write_trace(os.environ["TRACE_OUT"], started, exit_code)


if __name__ == "__main__":
    main()
