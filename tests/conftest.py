"""Shared fixtures: tiny real SD models (built once per session), a generated image set, and test tiers.

Tests marked `slow` (real `python train.py` processes, full conversions) are skipped unless `--run-slow`
is given; CI and the README's test command pass it, with `-n auto` (pytest-xdist: one worker per core, each with
its own warm Python and tiny models).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.hub_server import hub_server  # noqa: F401  (fixture shared by all tests)
from tests.warm_python import WarmChild, can_take

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow (end-to-end runs)")


def pytest_configure(config: pytest.Config) -> None:
    # the quick tier (`python -m pytest`, the edit-test loop) stays under 2 minutes on 2 cores: every test that
    # starts a `train.py` process, and every other that took over about 1.3 s there, is in the slow tier
    config.addinivalue_line("markers", "slow: a train.py process, or over about a second: run with --run-slow")
    share_the_cores()


def share_the_cores() -> None:
    """Under pytest-xdist, each worker's processes (its tests, its warm Python and the runs it starts) use its share
    of the cores (OMP_NUM_THREADS, read by torch at import): N workers each running torch on every core would ask
    N times the cores there are. A value set by the user wins."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        # the long tests first: with several workers (-n), the last test to start is then a short one, so no
        # worker finishes long after the others (the order is the same in every worker, as pytest-xdist needs)
        items.sort(key=lambda item: "slow" not in item.keywords)
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def first_fast(*values):
    """Parameters for a test over variants: the first in the default tier, the others with --run-slow only (the
    default tier must stay quick; CI runs them all)."""
    return [values[0], *(pytest.param(value, marks=pytest.mark.slow) for value in values[1:])]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    """`tiny_model(family)` -> path of a tiny random diffusers model of that family, built once."""
    from trainer.tiny.model import save_tiny_model

    built: dict[tuple[str, str, str], Path] = {}

    def get(family: str = "sd1", dtype: str = "fp32", vae: str = "random") -> Path:
        """`dtype` fp16 or bf16 stores every weight in that dtype, as most downloaded checkpoints do; `vae="trained"`
        the VAE that reconstructs the shapes (trainer/tiny/vae.py)."""
        if (family, dtype, vae) not in built:
            built[family, dtype, vae] = save_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}-{dtype}-{vae}"),
                                                        family, dtype=dtype, vae=vae)
        return built[family, dtype, vae]

    return get


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 generated 64px images (red circles, blue squares) with .txt captions."""
    from trainer.tiny.shapes import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), images_per_concept=8, size=64)


NAMED_TOKEN = "sks-thing"  # the embedding token named_shapes' circle captions use


@pytest.fixture(scope="session")
def named_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 generated 64px images, the circles' captions naming NAMED_TOKEN (embeddings, pivotal tuning)."""
    from trainer.tiny.shapes import make_shapes_dataset

    folder = make_shapes_dataset(tmp_path_factory.mktemp("named"), images_per_concept=4, size=64)
    for caption in folder.glob("circle_*.txt"):
        caption.write_text(f"a photo of a {NAMED_TOKEN}, round shape\n", encoding="utf-8")
    return folder


class WarmServer:
    """The session's warm Python (tests/warm_python.py), started at the first run that it can take; WARM_PYTHON=0
    turns it off (every run a fresh `python`)."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.path = ""
        self.env: dict[str, str] = {}
        self.failed = os.environ.get("WARM_PYTHON") == "0" or sys.platform != "linux"

    def child(self, argv: list[str], cwd: Path, env: dict[str, str], new_session: bool) -> WarmChild | None:
        """The run as a child of the warm Python, or None where only a fresh `python` behaves the same."""
        if not self.failed and self.process is None:
            self._start()
        if self.failed or not can_take(env, self.env):
            return None
        return WarmChild(self.path, argv, cwd, env, new_session)

    def _start(self) -> None:
        import atexit
        import json
        import tempfile

        folder = tempfile.mkdtemp(prefix="warm-python-")
        self.path = os.path.join(folder, "socket")
        self.process = subprocess.Popen([sys.executable, str(REPO_ROOT / "tests" / "warm_python.py"), self.path],
                                        stdout=subprocess.PIPE, text=True, start_new_session=True)
        line = self.process.stdout.readline()
        if not line.startswith("{"):  # it could not start: every run is a fresh `python`, which still works
            self.failed = True
            return
        self.env = json.loads(line)["env"]
        atexit.register(self._stop, folder)

    def _stop(self, folder: str) -> None:
        import shutil

        self.process.kill()
        self.process.wait()
        shutil.rmtree(folder, ignore_errors=True)


WARM = WarmServer()


def run_train(args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """A real `python train.py ...` process, run from `cwd` (forked from the warm Python when it can be)."""
    return run_script(REPO_ROOT / "train.py", args, cwd, timeout, env)


def run_script(script: Path, args: list[str], cwd: Path, timeout: float = 300,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """A real `python <script> ...` process, run from `cwd` with `env` added to this environment (forked from the
    warm Python when it can be)."""
    argv = [str(script), *args]
    full_env = {**os.environ, **(env or {})}
    child = WARM.child(argv, cwd, full_env, new_session=False)
    if child is None:
        return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              env=full_env)
    out, err = child.communicate(timeout)
    return subprocess.CompletedProcess([sys.executable, *argv], child.returncode, out, err)


class TrainProcess:
    """A `python train.py` in a process group of its own (as docker, systemd or SLURM start one), its output
    collected line by line as it comes, so a test can wait for a moment of the run and then signal it."""

    def __init__(self, args: list[str], cwd: Path, env: dict | None = None, preexec_fn=None,
                 launcher: tuple[str, ...] = ()):
        """`launcher`: what starts train.py instead of plain python (`accelerate launch` and its flags)."""
        argv = [str(REPO_ROOT / "train.py"), *args]
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        warm = None if preexec_fn or launcher else WARM.child(argv, cwd, full_env, new_session=True)
        self.popen = warm or subprocess.Popen(
            [sys.executable, *launcher, *argv], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=full_env, start_new_session=True, preexec_fn=preexec_fn,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                         for stream, lines in ((self.popen.stdout, self.out), (self.popen.stderr, self.err))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    def wait_for(self, text: str, timeout: float = 240, stream: str = "out") -> str:
        """The first output line holding `text`; fails with the output so far if the run ends or times out."""
        lines = self.out if stream == "out" else self.err
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(lines):
                if text in line:
                    return line
            if self.popen.poll() is not None and not any(r.is_alive() for r in self._readers):
                break
            time.sleep(0.05)
        self.popen.kill()
        raise AssertionError(f"never printed {text!r}:\n{''.join(self.out)[-3000:]}\n{''.join(self.err)[-3000:]}")

    def signal_group(self, signum: int) -> None:
        """`signum` to every process of the run, workers included: what `kill -TERM -- -<pgid>` does."""
        os.killpg(self.popen.pid, signum)

    def finish(self, timeout: float = 300) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) once the run has ended."""
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, 9)
            raise
        for reader in self._readers:
            reader.join(timeout=10)
        return code, "".join(self.out), "".join(self.err)


@pytest.fixture
def small_disk(tmp_path: Path):
    """`small_disk(name, size)` -> a real tmpfs of `size` (e.g. "4m") mounted at tmp_path/name, so writes hit a
    full disk for real; `read_only=True` remounts it read-only after `fill(path)` put files there. Needs root
    on Linux; skipped with the reason elsewhere. Unmounted after the test."""
    mounts: list[Path] = []

    def mount(name: str, size: str, read_only: bool = False, fill=None) -> Path:
        if sys.platform != "linux" or os.geteuid() != 0:
            pytest.skip("a real small or read-only file system needs root on Linux (mount -t tmpfs)")
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounts.append(point)
        if fill is not None:
            fill(point)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)
        return point

    yield mount
    for point in reversed(mounts):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)
