"""A warm Python for the tests' `python train.py ...` runs: one process that has imported torch, diffusers,
transformers and accelerate once, and forks a child for each run.

Importing those libraries costs about 8 s of a 13 s tiny run here, and the suite runs a few hundred. Each child is
a real process all the same: its own pid, session, signals, exit status, stdout and stderr (the caller's pipes,
passed over a unix socket), so tests that signal or kill a run, or read its exit code, see what they would see of
`python train.py`. What cannot be the same goes to a fresh `python` instead (`can_take`): an environment that
differs from the warm process's in a variable read at import time (the Hub's, OpenMP's, accelerate's), and runs
that need a `preexec_fn` or a launcher.

    python tests/warm_python.py <socket path>      # the server; tests/conftest.py starts one per session

Protocol, one request per connection: the client sends a JSON line {argv, cwd, env, new_session} with its
stdin, stdout and stderr as file descriptors; the server answers the child's pid as a line, and later its exit
status (negative: the signal that ended it, as subprocess reports it) as another.
"""

from __future__ import annotations

import io
import json
import os
import select
import signal
import socket
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# variables read at run time, or by nothing the warm process imported: a request may differ from the server in these
# (pytest sets PYTEST_CURRENT_TEST to each test's name: with it compared, every test after the one that started the
# server got a fresh `python`)
RUN_TIME_VARIABLES = {"PYTHONUNBUFFERED", "CKPT_CACHE_DIR", "COLUMNS", "LINES", "PWD", "OLDPWD", "_",
                      "PYTEST_CURRENT_TEST"}
# set by the server itself before importing torch, as train.py sets it (train.py sets it again in the child)
SERVER_SET = {"OMP_WAIT_POLICY": "PASSIVE"}


def can_take(env: dict[str, str], server_env: dict[str, str]) -> bool:
    """Whether a child forked from a server started with `server_env` behaves as a fresh `python` with `env`."""
    for key in set(env) | set(server_env):
        if key in RUN_TIME_VARIABLES:
            continue
        if env.get(key) != server_env.get(key) and not (key in SERVER_SET and key not in env):
            return False
    return True


# ---------------------------------------------------------------- server


def warm_up() -> None:
    """Import what a training run imports (the heavy libraries, through every module of the project, and what those
    import only when a run gets there: tensorboard's writer, the samplers' schedulers, PIL's image formats), without
    running anything that starts threads: a fork copies only the thread that calls it."""
    import importlib
    import pkgutil

    for key, value in SERVER_SET.items():
        os.environ.setdefault(key, value)
    sys.path.insert(0, str(REPO_ROOT))
    from diffusers import StableDiffusionPipeline  # noqa: F401  (diffusers loads its classes on first use)
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    for package in ("common", "convert", "data", "trainer"):
        for module in pkgutil.walk_packages([str(REPO_ROOT / package)], f"{package}."):
            importlib.import_module(module.name)
    import diffusers.optimization  # noqa: F401
    import diffusers.training_utils  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401
    from PIL import Image

    Image.init()
    from trainer.evaluation.prompts import SCHEDULERS

    for class_name, _ in SCHEDULERS.values():  # diffusers imports each scheduler class on first use
        getattr(importlib.import_module("diffusers"), class_name)


def serve(path: str) -> None:
    import gc

    warm_up()
    # What the imports made lives as long as the process: moved out of the collector's sight, a child's collections
    # no longer walk (and copy on write) the ~500k objects it inherits. Measured: a tokenizer load in a child took
    # 2.6 s with them in sight, 1.0 s frozen; a whole 2-step run about 0.6 s less.
    gc.collect()
    gc.freeze()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
    print(json.dumps({"ready": True, "env": ORIGINAL_ENV}), flush=True)  # the environment it was started with
    children: dict[int, socket.socket] = {}
    parent = os.getppid()
    while os.getppid() == parent:  # the test session that started it has not ended (even if it was killed)
        readable, _, _ = select.select([server], [], [], 0.02)
        if readable:
            connection, _ = server.accept()
            pid = start_child(connection, server, children)
            if pid:
                children[pid] = connection
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                connection = children.pop(pid)
                code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                with_ignored_errors(connection.sendall, f"{code}\n".encode())
                connection.close()


def with_ignored_errors(call, *args) -> None:
    try:
        call(*args)
    except OSError:  # the client went away (a test that timed out): the child's status has no reader
        pass


def start_child(connection: socket.socket, server: socket.socket, children: dict) -> int | None:
    message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
    request = json.loads(message.decode())
    pid = os.fork()
    if pid == 0:
        run_child(request, fds, [server, connection, *children.values()])  # never returns
    for fd in fds:
        os.close(fd)
    with_ignored_errors(connection.sendall, f"{pid}\n".encode())
    return pid


def run_child(request: dict, fds: list[int], sockets: list[socket.socket]) -> None:
    """In the forked child: become the requested `python <argv>` and exit with its status."""
    code = 1
    try:
        for sock in sockets:
            sock.close()
        if request["new_session"]:
            os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                                      write_through=unbuffered)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                      errors="backslashreplace", line_buffering=True)
        sys.__stdout__, sys.__stderr__ = sys.stdout, sys.stderr
        code = run_script(request["argv"])
    finally:
        finish(code)


def run_script(argv: list[str]) -> int:
    import runpy

    sys.argv = list(argv)
    sys.path[0] = str(Path(argv[0]).resolve().parent)
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else print_code(done.code))
    except KeyboardInterrupt:  # as Python does: end by the signal itself
        import traceback

        traceback.print_exc()
        finish_by_signal(signal.SIGINT)
    except BaseException:
        import traceback

        traceback.print_exc()
        return 1
    return 0


def print_code(code) -> int:
    print(code, file=sys.stderr)
    return 1


def finish(code: int) -> None:
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def finish_by_signal(signum: int) -> None:
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush(), sys.stderr.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    time.sleep(5)
    os._exit(128 + signum)


# ---------------------------------------------------------------- client


class WarmChild:
    """A run started by the server, with what tests use of subprocess.Popen: pid, stdout/stderr (text pipes),
    poll, wait, kill, communicate and returncode."""

    def __init__(self, path: str, argv: list[str], cwd: Path, env: dict[str, str], new_session: bool):
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        null = os.open(os.devnull, os.O_RDONLY)
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.connect(path)
        request = {"argv": argv, "cwd": str(cwd), "env": env, "new_session": new_session}
        socket.send_fds(self._socket, [json.dumps(request).encode()], [null, out_write, err_write])
        for fd in (null, out_write, err_write):
            os.close(fd)
        self._answers = self._socket.makefile("r", encoding="utf-8")
        self.pid = int(self._answers.readline())
        self.stdout = open(out_read, encoding="utf-8", errors="replace")
        self.stderr = open(err_read, encoding="utf-8", errors="replace")
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._socket], [], [], 0)[0]:
            self._read_status()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not select.select([self._socket], [], [], timeout)[0]:
                import subprocess

                raise subprocess.TimeoutExpired(self.pid, timeout)
            self._read_status()
        return self.returncode

    def _read_status(self) -> None:
        line = self._answers.readline()
        self.returncode = int(line) if line.strip() else -signal.SIGKILL  # the server died: so did its children
        self._socket.close()

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Both streams whole, then the exit status (read in threads, as subprocess does, so neither pipe fills)."""
        import threading

        chunks: dict[str, str] = {}
        readers = [threading.Thread(target=lambda n=name, s=stream: chunks.__setitem__(n, s.read()), daemon=True)
                   for name, stream in (("out", self.stdout), ("err", self.stderr))]
        for reader in readers:
            reader.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        for reader in readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                import subprocess

                self.kill()
                raise subprocess.TimeoutExpired(self.pid, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()) + 5)
        self.stdout.close(), self.stderr.close()
        return chunks["out"], chunks["err"]


# keep what the environment was before warm_up touched it, for `can_take`
ORIGINAL_ENV = dict(os.environ)

if __name__ == "__main__":
    serve(sys.argv[1])
