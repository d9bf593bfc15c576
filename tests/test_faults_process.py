"""Faults in what surrounds a run's process, with real processes: a console whose reader went away (`| head`
closing its end of the pipe, a terminal window closed) and a stop signal to `accelerate launch`'s launcher rather than to train.py.
docs/RELIABILITY.md lists them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, TrainProcess, run_train
from tests.test_distributed import CPU_RANKS, LAUNCH_TWO, rank_pid

pytestmark = pytest.mark.slow

# a run that says everything it says in a few seconds; no progress line (their count depends on the machine's speed)
BASE = ["--resolution", "64", "--batch_size", "2", "--mixed_precision", "no", "--gradient_checkpointing", "false",
        "--lr", "1e-4", "--logdir", "logs", "--latent_cache_dir", "cache", "--progress_every_n_seconds", "3600",
        "--max_steps", "4"]
LOST = "can no longer be written"


def args(model: Path, data: Path, *more: str) -> list[str]:
    return ["--resume_ckpt", str(model), "--data_root", str(data), *BASE, *more]


def shell_env() -> dict[str, str]:
    """A shell's environment: stdout into a pipe is block-buffered (the suite may run with PYTHONUNBUFFERED)."""
    return {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}


def train_log(cwd: Path) -> list[str]:
    """The messages of the one run under `cwd`, without their times, with `cwd` and every number masked (run
    folder stamps, timings): what two runs of the same command say alike."""
    (log,) = (cwd / "logs").glob("*/train.log")
    lines = log.read_text(encoding="utf-8").splitlines()
    return [re.sub(r"\d+(\.\d+)?", "#", line[20:].replace(str(cwd), "<cwd>")) for line in lines]


@pytest.fixture(scope="module")
def reference_log(tiny_model, shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """train.log of the same run with stdout and stderr kept open to the end."""
    cwd = tmp_path_factory.mktemp("console-kept")
    done = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), *args(tiny_model("sd1"), shapes_dir)],
                          cwd=cwd, capture_output=True, text=True, timeout=300, env=shell_env(), check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return train_log(cwd)


@pytest.mark.parametrize("closed", ["stdout", "stdout and stderr"], ids=["| head", "2>&1 | head"])
def test_a_closed_output_pipe_costs_the_run_nothing_and_train_log_keeps_every_message(
        tiny_model, shapes_dir, tmp_path, reference_log, closed):
    """`python train.py ... | head -n 3`: the pipe's reader takes three lines and ends, and every later write to it
    fails (Python ignores SIGPIPE: EPIPE). The run trains to its end and saves (exit 0); train.log holds every
    message, those said after the pipe closed too, and one line saying stdout was lost; nothing is printed at exit."""
    stderr_file = tmp_path / "stderr.txt"
    with open(stderr_file, "w", encoding="utf-8") as stderr:
        process = subprocess.Popen([sys.executable, str(REPO_ROOT / "train.py"), *args(tiny_model("sd1"), shapes_dir)],
                                   cwd=tmp_path, stdout=subprocess.PIPE, text=True, env=shell_env(),
                                   stderr=subprocess.STDOUT if closed == "stdout and stderr" else stderr)
        read = [process.stdout.readline() for _ in range(3)]
        process.stdout.close()  # what `head -n 3` does once it has its lines
        code = process.wait(timeout=300)
    printed = stderr_file.read_text(encoding="utf-8")

    assert all(line.strip() for line in read), read  # the run was writing to the pipe when it closed
    assert code == 0, printed[-3000:]
    logged = train_log(tmp_path)
    lost = [name for name in ("stdout", "stderr") if any(line.startswith(f"Warning: {name} {LOST}") for line in logged)]
    assert lost == closed.split(" and "), logged
    assert [line for line in logged if LOST not in line] == reference_log  # every message, in order
    assert len(reference_log) > 10 and any(line.startswith("Saved model: ") for line in logged)
    (saved,) = (tmp_path / "logs").glob("*/ckpts/last-*-gs00004")
    assert (saved / "model_index.json").is_file()
    assert "Traceback" not in printed and "Exception ignored" not in printed, printed[-3000:]
    if closed == "stdout":  # stderr still works: the loss is said there too, once
        assert printed.count(f"Warning: stdout {LOST} (Broken pipe") == 1, printed[-3000:]


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs util-linux's setsid, which gives the run a terminal")
def test_a_closed_terminal_stops_the_run_with_its_save_and_train_log_keeps_every_message(tiny_model, shapes_dir,
                                                                                          tmp_path):
    """A terminal window closed under a run started without nohup: SIGHUP to the run, and from then on every write
    to the terminal fails (EIO), the stop's own lines included. The run stops after the step, saves
    `interrupted-...` with its training state and ends with 129; train.log says all of it."""
    import select

    terminal, its_device = os.openpty()
    # `setsid --ctty`: a session of its own whose controlling terminal is this one (stdin), as a shell's job has
    process = subprocess.Popen(
        ["setsid", "--ctty", sys.executable, str(REPO_ROOT / "train.py"),
         *args(tiny_model("sd1"), shapes_dir, "--max_steps", "2000", "--save_optimizer")],
        cwd=tmp_path, stdin=its_device, stdout=its_device, stderr=its_device, env=shell_env())
    os.close(its_device)
    shown = b""
    while b"First step done" not in shown and select.select([terminal], [], [], 240)[0]:
        try:
            shown += os.read(terminal, 65536)
        except OSError:  # the run ended: its side of the terminal is closed
            break
    os.close(terminal)  # the window closes: the kernel hangs the terminal up
    code = process.wait(timeout=300)

    assert b"First step done" in shown, shown[-3000:]
    logged = train_log(tmp_path)
    assert code == 128 + signal.SIGHUP, logged[-20:]
    assert any(line.startswith("SIGHUP: stopping after this step") for line in logged), logged[-20:]
    for name in ("stdout", "stderr"):
        assert any(line.startswith(f"Warning: {name} {LOST} (Input/output error") for line in logged), logged[-20:]
    (done,) = [line for line in logged if line.startswith("Interrupted at step ")]
    (saved,) = [path for path in (tmp_path / "logs").glob("*/ckpts/interrupted-*") if path.is_dir()]
    assert re.sub(r"\d+", "#", f"saved <cwd>/{saved.relative_to(tmp_path)}.") in done, done
    assert (saved / "model_index.json").is_file() and (saved / "training_state" / "trainer_state.json").is_file()

@pytest.mark.skipif(sys.platform != "linux", reason="finds the ranks' processes in /proc")
@pytest.mark.parametrize("to", ["launcher", "every process"],
                         ids=["the launcher alone (docker stop, Kubernetes)", "every process (systemd, SLURM)"])
def test_sigterm_to_accelerate_launch_saves_and_the_launcher_ends_as_torch_makes_it(tiny_model, shapes_dir, tmp_path,
                                                                                     to):
    """SIGTERM to the launcher of a two-process run (alone, or with the ranks as well): the launcher sends it on,
    the processes stop after the same step and save `interrupted-...` with its training state, whole, within the
    launcher's grace time; the main process says what the launcher then does: torch's launcher ends with exit
    status 1 and its SignalException traceback, which nothing in the processes can change (docs/DISTRIBUTED.md),
    and its grace time, as TORCH_ELASTIC_SHUTDOWN_TIMEOUT sets it. No traceback of ours; the save resumes."""
    common = args(tiny_model("sd1"), shapes_dir, "--save_optimizer")
    grace = {} if to == "launcher" else {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120"}  # 30 s by default
    run = TrainProcess([*common, "--max_steps", "2000"], cwd=tmp_path, env={**CPU_RANKS, **grace},
                       launcher=LAUNCH_TWO)
    run.wait_for("First step done")
    targets = [run.popen.pid] + ([rank_pid(run.popen.pid, rank) for rank in (0, 1)] if to == "every process" else [])
    for pid in targets:
        os.kill(pid, signal.SIGTERM)
    code, out, err = run.finish(timeout=200)

    assert code == 1, err[-3000:]  # torch's launcher, after a stop signal, whatever its processes did
    assert err.rstrip().splitlines()[-1].startswith("torch.distributed.elastic.multiprocessing.api.SignalException: "
                                                    f"Process {run.popen.pid} got signal: 15"), err[-3000:]
    assert err.count("Traceback") == 1 and not re.search(r'File ".*/(trainer|data|common|train\.py)', err), err[-3000:]
    assert "Unable to shutdown process" not in err, err[-3000:]  # the processes ended within the launcher's grace
    (stopping,) = [line for line in out.splitlines() if line.startswith("SIGTERM: stopping after this step")]
    seconds = grace.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "30")
    assert f"The launcher (accelerate launch) gives the processes {seconds} s for it (TORCH_ELASTIC_SHUTDOWN_TIMEOUT" \
        in stopping
    assert "ends with exit status 1 and torch's SignalException traceback" in stopping and "Ctrl-C again" not in stopping
    (done,) = [line for line in out.splitlines() if line.startswith("Interrupted at step ")]
    saved = Path(done.split("; saved ", 1)[1].split(". Continue with", 1)[0])
    assert saved.name.startswith("interrupted-") and (saved / "model_index.json").is_file()
    assert (saved / "training_state" / "trainer_state.json").is_file()
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")], "a partial save was left"
    if to == "launcher":
        step = int(saved.name.rsplit("-gs", 1)[1])
        resumed = run_train([*common, "--max_steps", str(step + 1), "--resume_state", str(saved)], cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"Resumed from {saved / 'training_state'}" in resumed.stdout

