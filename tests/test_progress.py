"""Progress on long waits (common/progress.py): the line's words and numbers, where the lines go (train.log always,
stdout unless a bar shows there, nothing on other processes), the bar on a terminal, lines said before train.log
exists reaching it, and a real run whose latent-cache fill writes its progress into train.log."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import console, progress
from tests.conftest import REPO_ROOT, run_train

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "  # the time console puts before each line of train.log


@pytest.fixture
def log(tmp_path: Path):
    """train.log attached, progress lines at every update; the console and interval as they were afterwards."""
    path = tmp_path / "train.log"
    console.attach_log(path)
    progress.configure(every_s=1e-9)
    yield path
    console.attach_log(None)
    console.configure(main=True)
    progress.configure(every_s=progress.DEFAULT_EVERY_S)


def test_the_line_says_done_of_total_rate_and_time_left():
    line = progress.progress_line("Latent cache: encoding", 5200, 20000, "image variants", 400.0)
    # 13 a second; 14800 left take 1138 s: 19 minutes, rounded up
    assert line == "Latent cache: encoding 5200/20000 image variants (26%), 13.0/s, about 19 min left"
    assert progress.progress_line("Sampling", 1, 8, "images", 40.0) == (
        "Sampling 1/8 images (12%), 0.025/s, about 5 min left")
    assert progress.progress_line("Scan: found", 4500, None, "files", 3.0) == "Scan: found 4500 files so far, 1500/s"
    assert progress.progress_line("Validating", 0, 4, "batches", 2.0) == (
        "Validating 0/4 batches (0%), 0/s, time left not known yet")
    assert progress.closing_line("Latent cache: encoding", 20000, 20000, "image variants", 1390.0, True) == (
        "Latent cache: encoding 20000/20000 image variants, done in 23 min 10 s (14.4/s)")
    assert progress.closing_line("Sampling", 3, 8, "images", 75.0, False) == (
        "Sampling stopped at 3/8 images after 1 min 15 s")


@pytest.mark.parametrize("seconds, eta, duration", [
    (0.4, "1 s", "0.4 s"), (42.2, "43 s", "42 s"), (364, "7 min", "6 min 4 s"), (7500, "2 h 5 min", "2 h 5 min"),
])
def test_times_read_as_a_person_says_them(seconds: float, eta: str, duration: str):
    assert progress.eta_text(seconds) == eta
    assert progress.duration_text(seconds) == duration


def test_rates_keep_three_digits_without_exponents():
    assert [progress.rate_text(r) for r in (1234.4, 14.34, 2.048, 0.3521, 0.0)] == ["1234", "14.3", "2.05", "0.352",
                                                                                    "0"]


def test_lines_go_to_train_log_and_to_a_stdout_that_is_no_terminal(log: Path, capsys):
    with progress.progress("Encoding", total=3, unit="images") as bar:
        for _ in range(3):
            time.sleep(0.01)
            bar.update()
    lines = log.read_text().splitlines()
    assert [re.fullmatch(STAMP + r"(Encoding \d/3 images.*)", line) is not None for line in lines] == [True] * 3
    assert re.fullmatch(STAMP + r"Encoding 1/3 images \(33%\), [\d.]+/s, about \d+ s left", lines[0]), lines
    assert re.fullmatch(STAMP + r"Encoding 2/3 images \(66%\), [\d.]+/s, about \d+ s left", lines[1]), lines
    assert re.fullmatch(STAMP + r"Encoding 3/3 images, done in 0\.\d s \([\d.]+/s\)", lines[2]), lines
    out, err = capsys.readouterr()
    assert out.splitlines() == [line[len("2026-01-01 00:00:00 "):] for line in lines]  # pytest's stdout: no tty
    assert err == ""  # no bar where stderr is no terminal


def test_a_wait_shorter_than_the_interval_writes_nothing(log: Path, capsys):
    progress.configure(every_s=60)
    with progress.progress("Encoding", total=3, unit="images") as bar:
        bar.update(3)
    assert not log.exists() and capsys.readouterr() == ("", "")


def test_a_stop_before_the_total_is_said_as_one(log: Path, capsys):
    with pytest.raises(KeyboardInterrupt), progress.progress("Sampling", total=4, unit="images") as bar:
        bar.update()
        raise KeyboardInterrupt
    assert re.fullmatch(STAMP + r"Sampling stopped at 1/4 images after 0\.\d s", log.read_text().splitlines()[-1])


def test_other_processes_of_a_run_say_nothing(log: Path, capsys):
    console.configure(main=False)
    with progress.progress("Encoding", total=3, unit="images") as bar:
        for _ in range(3):
            time.sleep(0.01)
            bar.update()
    assert bar.done == 3
    assert not log.exists() and capsys.readouterr() == ("", "")


def test_what_is_said_before_train_log_opens_is_written_first_in_order(tmp_path: Path, capsys):
    progress.configure(every_s=1e-9)
    console.hold_for_log()
    try:
        console.say("Config: first")
        with progress.progress("Latent cache: encoding", total=2, unit="image variants") as bar:
            bar.update()
            bar.update()
        console.warn("something")
        console.attach_log(tmp_path / "train.log")
        console.say("Run folder: here")
    finally:
        console.attach_log(None)
        progress.configure(every_s=progress.DEFAULT_EVERY_S)
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert [re.sub(STAMP, "", line, count=1).split(" (")[0].split(",")[0] for line in lines] == [
        "Config: first", "Latent cache: encoding 1/2 image variants", "Latent cache: encoding 2/2 image variants",
        "Warning: something", "Run folder: here"]
    assert all(re.match(STAMP, line) for line in lines)


TERMINAL_SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
from common import progress
progress.configure(every_s=1e-9)
with progress.progress("Encoding", total=4, unit="images") as bar:
    for _ in range(4):
        time.sleep(0.02)
        bar.update()
print("finished")
"""


def on_terminal(stdout_too: bool) -> tuple[str, str]:
    """(what the terminal showed, what stdout wrote elsewhere) for TERMINAL_SCRIPT run with stderr on a terminal
    (a pseudo-terminal of 120 columns), and stdout on it as well or on a pipe."""
    import fcntl
    import struct
    import termios

    terminal, child_side = pty.openpty()
    fcntl.ioctl(child_side, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen([sys.executable, "-c", TERMINAL_SCRIPT.format(root=str(REPO_ROOT))],
                               stdout=child_side if stdout_too else subprocess.PIPE, stderr=child_side)
    os.close(child_side)
    shown = b""
    while True:
        try:
            chunk = os.read(terminal, 65536)
        except OSError:  # the child closed its side
            break
        if not chunk:
            break
        shown += chunk
    piped = process.stdout.read().decode() if process.stdout else ""
    assert process.wait(timeout=60) == 0, shown
    os.close(terminal)
    return shown.decode(errors="replace"), piped


def test_a_terminal_shows_a_bar_and_a_redirected_stdout_gets_the_lines():
    shown, _ = on_terminal(stdout_too=True)
    assert "\rEncoding:   0%|" in shown and "| 0/4 [" in shown and " images/s]" in shown  # tqdm's bar
    assert "(50%)" not in shown and "done in" not in shown  # the bar says it: no lines on the same terminal
    shown, piped = on_terminal(stdout_too=False)
    assert "\rEncoding:   0%|" in shown
    assert re.search(r"^Encoding 2/4 images \(50%\), [\d.]+/s, about \d+ s left$", piped, re.MULTILINE), piped
    assert re.search(r"^Encoding 4/4 images, done in 0\.\d s", piped, re.MULTILINE) and "\r" not in piped, piped


@pytest.mark.slow
def test_a_long_latent_cache_fill_writes_its_progress_into_train_log(tiny_model, shapes_dir: Path, tmp_path: Path):
    """A run under nohup or SLURM (stdout and stderr no terminal) fills the latent cache of 32 image variants before
    train.log exists; with progress lines at every update (the interval lowered through the config's own key),
    train.log holds each step of the fill, in order, with its time, count, rate and time left."""
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    result = run_train(
        ["--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(shapes_dir), "--resolution", "64",
         "--batch_size", "1", "--flip_p", "0.5", "--max_steps", "1", "--mixed_precision", "no",
         "--gradient_checkpointing", "false", "--latent_cache_dir", str(tmp_path / "cache"),
         "--validation_split", "0.25", "--sample_prompts", "prompts.txt", "--progress_every_n_seconds", "1e-9",
         "--logdir", "logs", "--run_name", "r"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "logs" / "r" / "train.log").read_text()
    lines = log.splitlines()
    assert all(re.match(STAMP, line) for line in lines), lines[:5]
    said = [line[len("2026-01-01 00:00:00 "):] for line in lines]
    fill = [line for line in said if line.startswith("Latent cache: encoding ")]
    # 12 training images (4 held out for validation), each flipped and not: 24 variants, one a batch
    assert fill[0] == "Latent cache: encoding 24 of 24 image variants on cpu into " + str(next(
        (tmp_path / "cache").glob("vae-*"))) + "."
    counts = [re.fullmatch(r"Latent cache: encoding (\d+)/24 image variants \((\d+)%\), [\d.]+/s, about \d+ s left",
                           line) for line in fill[1:-1]]
    assert all(counts), fill
    assert [int(m[1]) for m in counts] == list(range(1, 24)) and int(counts[11][2]) == 50
    assert re.fullmatch(r"Latent cache: encoding 24/24 image variants, done in [\d.]+ (min \d+ )?s \([\d.]+/s\)",
                        fill[-1]), fill[-1]
    # held until the run folder opened, then written first: the config's lines before, the folder after
    assert said.index(fill[0]) > next(i for i, line in enumerate(said) if line.startswith("Threads: "))
    assert said.index(fill[-1]) < next(i for i, line in enumerate(said) if line.startswith("Run folder: "))
    for what in ("Model: loading", "Validation: encoding", "Validating", "Sampling"):
        assert any(line.startswith(what + " ") and " done in " in line for line in said), what
    assert "\n".join(fill[1:]) in result.stdout  # stdout is no terminal: the lines are there too
    assert "Latent cache: encoding:" not in result.stderr  # and no bar
