"""Faults a real training job meets, injected into real `python train.py` processes: full and failing disks,
stop signals to the whole process group, diverging learning rates, reused names, changed resume settings, data
vanishing mid-run. Each test checks the exit status, the one message, and what is on disk afterwards: earlier
saves byte-identical, no partial output, no non-finite value in any save. docs/RELIABILITY.md lists them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.files import owner_tag, remove_whole
from tests.conftest import TrainProcess, run_train
from trainer.saves import footprint

pytestmark = pytest.mark.slow

BASE = ["--resolution", "64", "--batch_size", "2", "--mixed_precision", "no", "--gradient_checkpointing", "false",
        "--lr", "1e-4", "--logdir", "logs"]


def args(model: Path, data: Path, *more: str) -> list[str]:
    return ["--resume_ckpt", str(model), "--data_root", str(data), *BASE, *more]


def saved_paths(output: str) -> list[Path]:
    return [Path(line.split("Saved model: ", 1)[1].strip()) for line in output.splitlines() if "Saved model: " in line]


def one_message(stderr: str) -> str:
    """The one `train.py: ...` message (its first line) of a run that ended on a problem, and no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    messages = [line for line in stderr.splitlines() if line.startswith("train.py: ")]
    assert len(messages) == 1, stderr[-3000:]
    return messages[0]


def fingerprint(folder: Path) -> dict[str, str]:
    """Every file under `folder` with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def partials(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".partial" in p.name]


def assert_all_finite(folder: Path) -> None:
    for file in folder.rglob("*.safetensors"):
        for key, tensor in load_file(file).items():
            assert torch.isfinite(tensor).all(), f"{file}: {key}"


def tiny_save_bytes(model: Path) -> int:
    """What the trainer estimates one default save (fp16 folder + single file) of `model` needs."""
    counts = footprint.component_numels_in_folder(model)
    return footprint.save_bytes(footprint.model_size(counts, True), half=True, single_file=True, ema=False,
                                training_state=False, optimizer="adamw")


# ---------------------------------------------------------------- found before any model loads


def test_problems_in_places_and_files_are_all_reported_before_any_model_loads(tiny_model, shapes_dir, tmp_path):
    (tmp_path / "logs" / "taken").mkdir(parents=True)
    (tmp_path / "not_a_folder").write_text("x")
    (tmp_path / "prompts.json").write_text(json.dumps({"samples": [{"prompt": "a", "size": [100, 100]}]}))
    result = run_train(args(tiny_model("sd1"), shapes_dir, "--run_name", "taken", "--save_ckpt_dir", "not_a_folder",
                            "--sample_prompts", "prompts.json"), cwd=tmp_path)
    assert result.returncode == 2
    message = one_message(result.stderr)
    assert message == "train.py: 3 problems found before training started:"
    assert "run_name 'taken'" in result.stderr and "not_a_folder is a file" in result.stderr
    assert "sample 1 size: got [100, 100]" in result.stderr
    assert "Model source" not in result.stdout  # no model was loaded
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["taken"]
    assert not (shapes_dir / ".latent_cache").exists() or "encoded" not in result.stdout


def test_run_names_cannot_leave_logdir(tmp_path):
    (tmp_path / "train.json").write_text('{"resume_ckpt": "x"}')
    before = fingerprint(tmp_path)
    result = run_train(["--run_name", "..", "--data_root", "."], cwd=tmp_path)
    assert result.returncode == 2 and "run_name: got '..'" in result.stderr
    assert "a single folder name" in result.stderr
    assert fingerprint(tmp_path) == before


# ---------------------------------------------------------------- saves fail safe


def test_a_full_save_disk_sends_the_next_saves_to_the_run_folder_and_keeps_the_earlier_one(
        tiny_model, shapes_dir, tmp_path, small_disk):
    model = tiny_model("sd1")
    needed = tiny_save_bytes(model)
    disk = small_disk("disk", f"{(needed + 2**20) // 1024}k")  # room for one save, not two
    run = TrainProcess(args(model, shapes_dir, "--save_ckpt_dir", str(disk), "--save_every_n_epochs", "1",
                            "--max_epochs", "3", "--run_name", "r"), cwd=tmp_path)
    first = Path(run.wait_for("Saved model: ").split("Saved model: ", 1)[1].strip())
    run.wait_for("Saved single file: ")
    before = fingerprint(disk)
    code, out, err = run.finish()

    assert code == 0, err[-3000:]
    assert "Traceback" not in err
    (warning,) = [line[line.index("Warning: "):] for line in err.splitlines() if "Warning: " in line]
    assert warning.startswith(f"Warning: could not save into save_ckpt_dir {disk} (not enough free space")
    assert warning.endswith("This save and those after it go into the run folder instead: logs/r/ckpts."), warning
    assert first.parent == disk and fingerprint(disk) == before and not partials(disk)
    later = saved_paths(out)[1:]
    assert [p.name for p in later] == ["myproj-ep02-gs00016", "last-myproj-ep03-gs00024"]
    assert all(p.parent == (tmp_path / "logs" / "r" / "ckpts").resolve() and (p / "model_index.json").is_file()
               for p in later)


def test_a_save_failing_mid_write_leaves_nothing_and_says_how_to_go_on(tiny_model, shapes_dir, tmp_path):
    def limit_file_size():  # writes past 30 MB fail (EFBIG): the training state's 50 MB optimizer.bin does
        resource.setrlimit(resource.RLIMIT_FSIZE, (30 * 2**20, 30 * 2**20))

    run = TrainProcess(args(tiny_model("sd1"), shapes_dir, "--save_every_n_epochs", "1", "--max_epochs", "50",
                            "--run_name", "r"), cwd=tmp_path, preexec_fn=limit_file_size)
    first = Path(run.wait_for("Saved model: ").split("Saved model: ", 1)[1].strip())
    run.wait_for("Saved single file: ")
    ckpts = tmp_path / "logs" / "r" / "ckpts"
    before = fingerprint(ckpts)
    run.signal_group(signal.SIGTERM)  # the interrupted save holds a training state
    code, out, err = run.finish()

    assert code == 1
    message = one_message(err)
    # torch.save words EFBIG as an iostream error; the message adds the free space to go by
    assert message.startswith("train.py: could not save the model at step ") and "iostream error" in message
    assert "free there" in message
    assert f"--resume_ckpt {first}" in message
    assert fingerprint(ckpts) == before and not partials(tmp_path / "logs")


def test_sampling_that_fails_costs_nothing(tiny_model, shapes_dir, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    run = TrainProcess(args(tiny_model("sd1"), shapes_dir, "--max_steps", "4", "--sample_steps", "2",
                            "--sample_prompts", "prompts.txt", "--run_name", "r"), cwd=tmp_path)
    run.wait_for("Run folder: ")
    (tmp_path / "logs" / "r" / "samples").write_text("a file where the samples folder goes")
    code, out, err = run.finish()

    assert code == 0, err[-3000:]
    assert err.count("Warning: sampling at step") == 2  # at step 2, and at the end after the final save
    (final,) = saved_paths(out)
    assert final.name == "last-myproj-ep01-gs00004" and (final / "model_index.json").is_file()
    log = (tmp_path / "logs" / "r" / "train.log").read_text()  # both streams, in order
    assert log.index("Saved model:") < log.index("Warning: sampling at step 4")


def test_a_run_folder_deleted_during_training_is_said_once_and_the_run_goes_on(tiny_model, shapes_dir, tmp_path):
    """A clean-up script (or a user in the wrong terminal) deletes the run folder mid-run: one warning, no
    traceback from the tensorboard writer's thread, and the saves and samples that follow are made whole."""
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    run = TrainProcess(args(tiny_model("sd1"), shapes_dir, "--max_steps", "16", "--save_every_n_epochs", "1",
                            "--sample_steps", "8", "--sample_prompts", "prompts.txt", "--log_step", "1",
                            "--run_name", "r"), cwd=tmp_path)
    run.wait_for("First step done")
    shutil.rmtree(tmp_path / "logs" / "r")
    code, out, err = run.finish()

    assert code == 0, err[-3000:]
    assert "Traceback" not in err and "Exception in thread" not in err, err[-3000:]
    warnings = [line[line.index("Warning: "):] for line in err.splitlines() if "Warning: " in line]
    assert warnings == ["Warning: the run folder logs/r was deleted during the run: train.log and the tensorboard "
                        "log stop here, and training goes on; the saves go on into logs/r/ckpts, made again when "
                        "the next save comes."], warnings
    saves = saved_paths(out)
    assert [p.name for p in saves] == ["myproj-ep01-gs00008", "last-myproj-ep02-gs00016"]
    for save in saves:
        assert (save / "model_index.json").is_file()
        assert_all_finite(save)
    assert list((tmp_path / "logs" / "r" / "samples").glob("gs00008*")), out[-2000:]  # written after the deletion


@pytest.fixture
def logged_run(tmp_path: Path, monkeypatch, capsys):
    """A run's logs as a run starts them (trainer/run/logs.py): train.log mirrored by the console and accelerate's
    real tensorboard tracker writing into logs/r; the run's fields that logs.py reads (its `Run` protocol)."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from common import console
    from trainer.run.logs import log_to_trackers, watch_logs

    monkeypatch.chdir(tmp_path)
    run_dir = Path("logs/r")
    run_dir.mkdir(parents=True)
    accelerator = Accelerator(log_with="tensorboard", project_dir=str(run_dir))
    accelerator.init_trackers("tensorboard")
    run = SimpleNamespace(accelerator=accelerator, run_dir=run_dir, save_dir=run_dir / "ckpts", logs_stopped=False,
                          tensorboard_lost=None)
    console.attach_log(run_dir / "train.log")
    watch_logs(run)
    log_to_trackers(run, {"loss": 1.0}, step=1)
    console.say("First step done")
    assert (run_dir / "tensorboard").is_dir() and (run_dir / "train.log").is_file()
    capsys.readouterr()
    yield run
    console.attach_log(None)


def one_step(run, step: int) -> None:
    """What a step of the loop does with the logs: log the loss, say something, then watch the run folder."""
    from common.console import say
    from trainer.run.logs import log_to_trackers, watch_run_folder

    log_to_trackers(run, {"loss": 1.0}, step=step)
    say(f"step {step}")
    watch_run_folder(run)


def test_a_run_folder_removed_from_the_inside_out_is_said_once_as_the_run_folder(logged_run, capsys):
    """`rm -r` deletes what is inside first: the tensorboard log fails while logs/r still exists, and the folder
    goes an instant later. One line, naming the run folder, as when the whole folder goes at once."""
    shutil.rmtree(logged_run.run_dir / "tensorboard")
    from trainer.run.logs import log_to_trackers

    log_to_trackers(logged_run, {"loss": 1.0}, step=2)  # fails: its folder is gone, and logs/r is still there
    shutil.rmtree(logged_run.run_dir)
    for step in (2, 3, 4):
        one_step(logged_run, step)
    err = capsys.readouterr().err
    assert err.splitlines() == ["Warning: the run folder logs/r was deleted during the run: train.log and the "
                                "tensorboard log stop here, and training goes on; the saves go on into logs/r/ckpts, "
                                "made again when the next save comes."], err


def test_a_deleted_tensorboard_folder_alone_is_said_once_and_train_log_goes_on(logged_run, capsys):
    shutil.rmtree(logged_run.run_dir / "tensorboard")
    for step in (2, 3, 4):
        one_step(logged_run, step)
    err = capsys.readouterr().err
    assert err.splitlines() == ["Warning: the tensorboard folder logs/r/tensorboard was deleted during the run: its "
                                "log stops here, and training goes on."], err
    assert "step 4" in (logged_run.run_dir / "train.log").read_text()
    assert not (logged_run.run_dir / "tensorboard").exists()  # not made again by a writer still running


def fill_up(disk: Path) -> None:
    """Write zeros into `disk` until it has no room left."""
    with open(disk / "filler", "wb") as filler:
        try:
            while True:
                filler.write(b"\0" * 65536)
                filler.flush()
        except OSError:
            pass


def test_logs_on_a_disk_that_fills_mid_run_are_said_once_and_the_run_goes_on(tiny_model, shapes_dir, tmp_path,
                                                                             small_disk):
    """train.log and tensorboard on a disk that fills after the first step (the saves go elsewhere): each log
    says once that it stops, no writer thread prints a traceback, and the run ends trained and saved."""
    disk = small_disk("logs", "2m")
    run = TrainProcess(args(tiny_model("sd1"), shapes_dir, "--max_steps", "48", "--log_step", "1", "--run_name", "r",
                            "--logdir", str(disk), "--save_ckpt_dir", str(tmp_path / "ckpts")), cwd=tmp_path)
    run.wait_for("First step done")
    fill_up(disk)
    code, out, err = run.finish()

    assert code == 0, err[-3000:]
    assert "Traceback" not in err and "Exception in thread" not in err, err[-3000:]
    warnings = [line[line.index("Warning: "):] for line in err.splitlines() if "Warning: " in line]
    # tmpfs fills by pages: train.log, written only when something is said, may still fit in its last one
    assert [w for w in warnings if "train.log" not in w] == [
        f"Warning: could not write the tensorboard log in {disk}/r/tensorboard (No space left on device); it stops "
        "here, and training goes on."], warnings
    assert all(w.startswith(f"Warning: cannot write {disk}/r/train.log (No space left on device") for w in warnings
               if "train.log" in w) and len(warnings) <= 2, warnings
    (final,) = saved_paths(out)
    assert (final / "model_index.json").is_file()


# ---------------------------------------------------------------- stops


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_to_the_process_group_saves_and_resumes(tiny_model, shapes_dir, tmp_path, signum):
    """What docker stop, systemd, SLURM and Kubernetes do (SIGTERM), and a closed terminal or ssh session to a run
    started without nohup (SIGHUP): the signal to every process, DataLoader workers too."""
    common = args(tiny_model("sd1"), shapes_dir, "--max_epochs", "500", "--num_workers", "2")
    run = TrainProcess(common, cwd=tmp_path)
    run.wait_for("First step done")
    time.sleep(1)
    run.signal_group(signum)
    code, out, err = run.finish()

    assert code == 128 + signum, err[-3000:]
    assert f"{signal.Signals(signum).name}: stopping after this step" in out and "DataLoader worker" not in err
    (saved,) = saved_paths(out)
    assert saved.name.startswith("interrupted-myproj-ep") and (saved / "training_state" / "trainer_state.json").is_file()
    assert f"Continue with --resume_state {saved}" in out
    step = int(saved.name.rsplit("-gs", 1)[1])
    resumed = run_train([*common, "--max_steps", str(step + 2), "--resume_state", str(saved)], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from {saved / 'training_state'}" in resumed.stdout


def test_a_save_folder_that_turns_read_only_mid_run_costs_nothing(tiny_model, shapes_dir, tmp_path, small_disk):
    disk = small_disk("saves", "64m")
    run = TrainProcess(args(tiny_model("sd1"), shapes_dir, "--max_steps", "6", "--save_ckpt_dir", str(disk),
                            "--run_name", "r"), cwd=tmp_path)
    run.wait_for("First step done")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    code, out, err = run.finish()

    assert code == 0, err[-3000:]
    assert "Traceback" not in err
    (warning,) = [line[line.index("Warning: "):] for line in err.splitlines() if "Warning: " in line]
    assert warning.startswith(f"Warning: could not save into save_ckpt_dir {disk} (Read-only file system"), warning
    (final,) = saved_paths(out)
    assert final == (tmp_path / "logs" / "r" / "ckpts" / "last-myproj-ep01-gs00006").resolve()
    assert (final / "model_index.json").is_file() and not list(disk.iterdir())


@pytest.mark.parametrize("change", ["replaced", "damaged"])
def test_a_frozen_part_changed_on_disk_during_the_run_is_saved_as_the_run_used_it(tiny_model, tmp_path, shapes_dir,
                                                                                  change):
    """The base model's VAE file is replaced by another of the same shapes, or cut short, while the run trains:
    the saves hold the VAE the run loaded and used (said once), and the run ends well."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model("sd1"), model)
    vae_file = model / "vae" / "diffusion_pytorch_model.safetensors"
    loaded = {k: v.clone() for k, v in load_file(vae_file).items()}  # not memory-mapped: the file will change
    other_vae = tiny_model("sd1", "fp16") / "vae" / "diffusion_pytorch_model.safetensors"  # built before the run
    run = TrainProcess(args(model, shapes_dir, "--max_steps", "12", "--save_every_n_epochs", "1"), cwd=tmp_path)
    run.wait_for("First step done")
    if change == "replaced":  # the same VAE stored in fp16: every shape the same, the values not
        shutil.copyfile(other_vae, vae_file)  # in place, as cp does
    else:
        vae_file.write_bytes(vae_file.read_bytes()[:1000])
    code, out, err = run.finish()

    assert code == 0, err[-3000:]
    warnings = [line[line.index("Warning: "):] for line in err.splitlines() if "Warning: " in line]
    assert warnings == [f"Warning: the vae files of {model} changed on disk during the run; saves keep the vae the "
                        "run loaded and used, from memory (float32), instead of reading those files."], warnings
    saves = saved_paths(out)
    assert len(saves) == 2
    for save in saves:
        saved = load_file(save / "vae" / "diffusion_pytorch_model.safetensors")
        assert saved.keys() == loaded.keys()
        assert all(torch.equal(saved[k], loaded[k].half().float()) for k in loaded)  # fp16 saves, as loaded


def damage_images(data: Path) -> None:
    for image in data.glob("*.png"):
        image.write_text("not an image any more")


def damage_cache_entries(data: Path) -> None:
    for entry in (data / ".latent_cache").rglob("*.safetensors"):
        entry.write_bytes(entry.read_bytes()[:50])


@pytest.mark.parametrize("damage, more, what", [
    (damage_images, ["--cache_latents", "false"], "image"),
    (damage_images, ["--cache_latents", "false", "--num_workers", "2"], "image"),
    (damage_cache_entries, ["--num_workers", "1"], "latent-cache entry"),  # the main process encodes it again
], ids=["image", "image read by a worker", "latent-cache entry"])
def test_a_file_damaged_during_the_run_is_named_in_one_line_after_saving_what_trained(
        tiny_model, shapes_dir, tmp_path, damage, more, what):
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    common = args(tiny_model("sd1"), data, "--max_epochs", "500", *more)
    run = TrainProcess(common, cwd=tmp_path)
    run.wait_for("First step done")
    damage(data)
    code, out, err = run.finish()

    assert code == 1, err[-3000:]
    message = one_message(err)
    assert message.startswith(f"train.py: the {what} {data}") and "can no longer be read" in message, message
    assert message.endswith("then continue from the run's last save with --resume_state findlast."), message
    assert "Warning: the error below stopped training at step" in err  # and what trained was saved first
    (saved,) = saved_paths(out)
    assert saved.name.startswith("interrupted-") and (saved / "training_state").is_dir()
    if what == "latent-cache entry":  # the advice: resuming encodes the damaged entries again
        resumed = run_train([*common, "--max_epochs", "1", "--max_steps", str(int(saved.name[-5:]) + 2),
                             "--resume_state", "findlast"], cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "damaged entries will be encoded again" in resumed.stdout


def test_a_stop_during_the_final_save_says_what_it_does(tiny_model, shapes_dir, tmp_path):
    """The final save has begun: a stop can only skip what follows it, and says so (no interrupted save is
    promised); the final save is whole."""
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    run = TrainProcess(args(tiny_model("sd1"), shapes_dir, "--max_steps", "4", "--sample_prompts", "prompts.txt",
                            "--run_name", "r"), cwd=tmp_path)
    ckpts = tmp_path / "logs" / "r" / "ckpts"
    deadline = time.monotonic() + 240
    while not (ckpts.is_dir() and any(p.name.startswith(".") for p in ckpts.iterdir())):
        assert time.monotonic() < deadline and run.popen.poll() is None, "the final save never began"
        time.sleep(0.002)
    run.signal_group(signal.SIGTERM)
    code, out, err = run.finish()

    assert code == 143, err[-3000:]
    assert "SIGTERM: the final save is being written; the run stops once it is whole" in out
    assert "interrupted" not in out
    (final,) = saved_paths(out)
    assert final.name == "last-myproj-ep01-gs00004" and (final / "model_index.json").is_file()
    assert f"the trained model is {final}" in out and "Samples at step" not in out


def test_a_stop_during_sampling_ends_it_and_saves(tiny_model, shapes_dir, tmp_path):
    (tmp_path / "prompts.json").write_text(json.dumps({"samples": [{"prompt": f"a red circle {i}", "steps": 50}
                                                                   for i in range(40)]}))
    run = TrainProcess(args(tiny_model("sd1"), shapes_dir, "--max_epochs", "500", "--sample_steps", "2",
                            "--sample_prompts", "prompts.json", "--run_name", "r"), cwd=tmp_path)
    run.wait_for("First step done")
    time.sleep(2)  # step 2 is done and its 40 samples have begun
    run.signal_group(signal.SIGTERM)
    code, out, err = run.finish()

    assert code == 143, err[-3000:]
    (saved,) = saved_paths(out)
    assert saved.name == "interrupted-myproj-ep01-gs00002"  # the stop came in the samples of step 2
    samples = tmp_path / "logs" / "r" / "samples"
    assert len(list(samples.glob("gs00002-[0-9]*.png")) if samples.exists() else []) < 40


def test_a_stop_during_the_samples_after_the_final_save_says_the_model_is_saved(tiny_model, shapes_dir, tmp_path):
    """The final save is whole before the end's samples: a stop then cuts only those, and says so (no promise of
    an interrupted save that never comes)."""
    (tmp_path / "prompts.json").write_text(json.dumps({"samples": [{"prompt": f"a red circle {i}", "steps": 50}
                                                                   for i in range(40)]}))
    run = TrainProcess(args(tiny_model("sd1"), shapes_dir, "--max_steps", "2", "--sample_steps", "1000",
                            "--sample_prompts", "prompts.json", "--run_name", "r"), cwd=tmp_path)
    final = Path(run.wait_for("Saved model: ").split("Saved model: ", 1)[1].strip())
    run.wait_for("Saved single file: ")
    run.signal_group(signal.SIGTERM)
    code, out, err = run.finish()

    assert code == 143, err[-3000:]
    assert final.name == "last-myproj-ep01-gs00002" and (final / "model_index.json").is_file()
    assert f"SIGTERM: the final model is already saved ({final}); stopping the validation and samples" in out
    assert f"Stopped during the final save or the validation and samples after it; the trained model is {final}." in out
    assert "interrupted" not in out and not partials(tmp_path / "logs")


def test_a_second_ctrl_c_aborts_and_leaves_no_partial(tiny_model, shapes_dir, tmp_path):
    """Both Ctrl-C must land before the interrupted save is whole, however slowly this test notices the first: steps
    of about 1.3 s here (8 accumulated micro-steps at 192 px) leave the run that long to go. With 80 ms steps, the
    second one once came after the run had saved and ended (CI, under load)."""
    run = TrainProcess(args(tiny_model("sd1"), shapes_dir, "--max_epochs", "500", "--save_optimizer",
                            "--resolution", "192", "--grad_accum", "8"), cwd=tmp_path)
    run.wait_for("First step done")
    run.signal_group(signal.SIGINT)
    run.wait_for("SIGINT: stopping")  # two signals at once would arrive as one
    run.signal_group(signal.SIGINT)
    code, out, err = run.finish()

    assert code == 130, err[-3000:]
    assert one_message(err).startswith("train.py: aborted by a second Ctrl-C at step ")
    assert "Saved model" not in out and not partials(tmp_path / "logs")


def test_ctrl_c_while_a_stopped_run_ends_leaves_its_save_and_no_traceback(tiny_model, shapes_dir, tmp_path):
    """An impatient user presses Ctrl-C again and again once the interrupted save is whole: each lands either in the
    loop's last moments (an abort that keeps the whole save) or while the program ends (ignored). Never a
    traceback from the interpreter's exit functions, and the exit status stays Ctrl-C's."""
    run = TrainProcess(args(tiny_model("sd1"), shapes_dir, "--max_epochs", "500", "--run_name", "r"), cwd=tmp_path)
    run.wait_for("First step done")
    run.signal_group(signal.SIGINT)
    saved = Path(run.wait_for("Interrupted at step ").split("saved ", 1)[1].split(". Continue", 1)[0])
    while run.popen.poll() is None:
        try:
            run.signal_group(signal.SIGINT)
        except ProcessLookupError:  # it ended between the two calls
            break
        time.sleep(0.005)
    code, out, err = run.finish()

    assert code == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "Exception ignored" not in err, err[-3000:]
    assert (saved / "model_index.json").is_file() and not partials(tmp_path / "logs")


def test_a_second_ctrl_c_during_the_interrupted_save_leaves_nothing_behind(tiny_model, shapes_dir, tmp_path):
    """The second Ctrl-C lands while the interrupted save (model and training state) is being written: its hidden
    partial folder goes with it. Sent when the partial appears, so the signal comes inside the save each time."""
    run = TrainProcess(args(tiny_model("sd1"), shapes_dir, "--max_epochs", "500", "--save_optimizer",
                            "--run_name", "r"), cwd=tmp_path)
    run.wait_for("First step done")
    run.signal_group(signal.SIGINT)
    ckpts = tmp_path / "logs" / "r" / "ckpts"
    deadline = time.monotonic() + 120
    while not (ckpts.is_dir() and partials(ckpts)) and run.popen.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    run.signal_group(signal.SIGINT)
    for _ in range(8):  # an impatient user: more Ctrl-C while the abort cleans up and the program ends
        time.sleep(0.03)
        if run.popen.poll() is None:
            run.signal_group(signal.SIGINT)
    code, out, err = run.finish()

    assert code == 130, err[-3000:]
    assert one_message(err).startswith("train.py: aborted by a second Ctrl-C at step ")
    assert "Exception ignored" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "Saved model" not in out
    assert not partials(tmp_path / "logs") and not any(ckpts.iterdir())


def test_a_run_whose_planned_folder_another_run_took_saves_into_its_own(tiny_model, shapes_dir, tmp_path):
    """Two runs planned in the same second: the second makes `<name>-2`, and its saves go there, never into the
    first run's ckpts/ (where its max_saves could prune the other run's saves)."""
    from datetime import datetime, timedelta

    now = datetime.now()
    for second in range(600):  # every name this run could plan is taken, with saves in it
        taken = tmp_path / "logs" / f"myproj_{now + timedelta(seconds=second):%Y%m%d-%H%M%S}" / "ckpts"
        taken.mkdir(parents=True)
    result = run_train(args(tiny_model("sd1"), shapes_dir, "--max_steps", "2", "--save_single_file", "false"),
                       cwd=tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = Path(next(line for line in result.stdout.splitlines() if line.startswith("Run folder: ")).split(": ")[1])
    assert run_dir.name.endswith("-2")
    (saved,) = saved_paths(result.stdout)
    assert saved.parent == run_dir / "ckpts"
    assert all(file.stat().st_mode & 0o044 == 0o044 for file in saved.rglob("*") if file.is_file())  # others read


# ---------------------------------------------------------------- divergence


def test_a_diverging_step_is_named_and_never_saved(tiny_model, shapes_dir, tmp_path):
    result = run_train(args(tiny_model("sd1"), shapes_dir, "--lr", "1e6", "--max_steps", "1"), cwd=tmp_path)
    assert result.returncode == 1
    message = one_message(result.stderr)
    assert message.startswith("train.py: training diverged at step 1: ")
    assert "This run has no save; the base model is unchanged" in message and "lower lr (now unet 1e+06" in message
    assert "Saved model" not in result.stdout and not list((tmp_path / "logs").rglob("*.safetensors"))


def test_a_kill_while_an_old_save_is_pruned_leaves_no_half_save_under_its_name(tiny_model, shapes_dir, tmp_path):
    """max_saves deletes the oldest save once the next is whole. A SIGKILL (nothing can clean up) while its folder
    is being deleted leaves a hidden partial, which the next start removes, never a half-deleted folder under the
    save's own name. The save is made large (50,000 files moved into it) so that the kill lands in the deletion."""
    bulk = tmp_path / "bulk"
    bulk.mkdir()
    for i in range(50_000):
        (bulk / f"f{i:05d}").touch()
    run = TrainProcess(args(tiny_model("sd1"), shapes_dir, "--run_name", "r", "--save_every_n_epochs", "2",
                            "--max_saves", "1", "--max_epochs", "40"), cwd=tmp_path)
    first = Path(run.wait_for("Saved model: ").split("Saved model: ", 1)[1].strip())
    bulk.rename(first / "bulk")
    unchanged = (first / "bulk").stat().st_mtime_ns  # each file deleted from it changes it: a cheap, early sign
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run.popen.poll() is None:
        try:
            if (first / "bulk").stat().st_mtime_ns != unchanged:
                break  # the deletion is under way
        except FileNotFoundError:
            break  # the folder left its name
        time.sleep(0.0005)
    run.signal_group(signal.SIGKILL)
    run.finish()

    assert not first.exists(), f"{first} is half deleted: {len(list((first / 'bulk').iterdir()))} of 50000 files left"
    # what the kill left of it, if the deletion had not ended, is a hidden partial: the next start clears it
    again = run_train(args(tiny_model("sd1"), shapes_dir, "--run_name", "r2", "--max_steps", "1"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not partials(first.parent) and not first.exists()


def test_max_saves_never_prunes_a_good_save_for_a_broken_one(tiny_model, shapes_dir, tmp_path):
    shared = ["--save_ckpt_dir", "saves", "--save_every_n_epochs", "1", "--max_saves", "1", "--max_epochs", "3"]
    good = run_train(args(tiny_model("sd1"), shapes_dir, *shared), cwd=tmp_path)
    assert good.returncode == 0, good.stderr[-3000:]
    before = fingerprint(tmp_path / "saves")
    single_files = [name for name in before if "/" not in name and name.endswith(".safetensors")]
    assert len(single_files) == 2  # the last periodic save and the final one

    broken = run_train(args(tiny_model("sd1"), shapes_dir, *shared, "--lr", "1e6"), cwd=tmp_path)
    assert broken.returncode == 1 and "training diverged at step 1" in one_message(broken.stderr)
    assert fingerprint(tmp_path / "saves") == before
    assert_all_finite(tmp_path / "saves")


def test_max_saves_never_prunes_another_runs_saves_in_a_shared_folder(tiny_model, shapes_dir, tmp_path):
    shared = ["--save_ckpt_dir", "saves", "--save_every_n_epochs", "1", "--max_epochs", "3"]
    first = run_train(args(tiny_model("sd1"), shapes_dir, *shared, "--project_name", "a"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    before = fingerprint(tmp_path / "saves")

    second = run_train(args(tiny_model("sd1"), shapes_dir, *shared, "--project_name", "b", "--max_saves", "1"),
                       cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Pruned old save b-ep01-gs00008" in second.stdout and "Pruned old save a-" not in second.stdout
    after = fingerprint(tmp_path / "saves")
    assert {k: v for k, v in after.items() if k in before} == before  # the first run's saves, byte for byte
    assert sorted(p.name for p in (tmp_path / "saves").iterdir() if p.is_dir() and p.name.startswith("b-")) == [
        "b-ep02-gs00016"]


# ---------------------------------------------------------------- names


def test_runs_sharing_a_save_folder_never_replace_each_others_saves(tiny_model, shapes_dir, tmp_path):
    common = args(tiny_model("sd1"), shapes_dir, "--max_steps", "1", "--save_ckpt_dir", "saves")
    first = run_train(common, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    before = fingerprint(tmp_path / "saves")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = owner_tag().rsplit("-", 1)[0]
    stale = tmp_path / "saves" / f".killed.partial-{host}-{int(dead.stdout)}"  # a killed save of this host
    foreign = tmp_path / "saves" / f".other.partial-elsewhere-{int(dead.stdout)}"  # another host's: not ours to judge
    stale.mkdir(), foreign.mkdir()

    second = run_train(common, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert [p.name for p in saved_paths(second.stdout)] == ["last-myproj-ep01-gs00001-2"]
    assert {k: v for k, v in fingerprint(tmp_path / "saves").items() if k in before} == before
    assert len(list((tmp_path / "logs").iterdir())) == 2  # two run folders, though maybe started in one second
    assert not stale.exists() and foreign.exists()


# ---------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def saved_state(tiny_model, shapes_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(a work folder, the save of an SD1 run stopped at step 3 with its training state)."""
    work = tmp_path_factory.mktemp("resume")
    result = run_train(args(tiny_model("sd1"), shapes_dir, "--max_steps", "3", "--save_optimizer",
                            "--run_name", "first"), cwd=work)
    assert result.returncode == 0, result.stderr[-3000:]
    (save,) = saved_paths(result.stdout)
    return work, save


def test_a_run_refused_at_load_leaves_no_run_folder_and_the_fixed_command_runs(saved_state, tiny_model, shapes_dir):
    """A training state damaged in a way only loading finds (its optimizer file cut short) is refused after the run
    folder was made: the folder goes, so the same run_name, fixed, is not refused as taken."""
    work, save = saved_state
    damaged = work / "damaged"
    shutil.copytree(save, damaged)
    optimizer_file = damaged / "training_state" / "optimizer.bin"
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:1000])
    # its own logdir: the other tests of this module's saved state expect theirs to hold the first run alone
    common = args(tiny_model("sd1"), shapes_dir, "--max_steps", "5", "--run_name", "second", "--logdir", "refused")
    result = run_train([*common, "--resume_state", str(damaged)], cwd=work)

    assert result.returncode == 1, result.stderr[-3000:]
    assert one_message(result.stderr).startswith(f"train.py: could not load the training state {damaged}")
    assert not (work / "refused" / "second").exists()
    fixed = run_train([*common, "--resume_state", str(save)], cwd=work)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert (work / "refused" / "second" / "ckpts").is_dir()


def test_a_state_resumed_onto_another_model_family_is_refused_before_the_cache(saved_state, tiny_model, shapes_dir):
    work, save = saved_state
    result = run_train(args(tiny_model("sd2"), shapes_dir, "--resume_state", str(save), "--max_steps", "6",
                            "--latent_cache_dir", "other_cache"), cwd=work)
    assert result.returncode == 1
    message = one_message(result.stderr)
    assert "cannot continue this run: model family SD1 then, SD2 now" in message
    assert not (work / "other_cache").exists() and sorted(p.name for p in (work / "logs").iterdir()) == ["first"]


def test_a_changed_optimizer_is_refused_and_changed_rates_and_batch_are_honoured(saved_state, tiny_model, shapes_dir):
    work, save = saved_state
    refused = run_train(args(tiny_model("sd1"), shapes_dir, "--resume_state", str(save), "--max_steps", "6",
                             "--optimizer", "lion"), cwd=work)
    assert refused.returncode == 2 and "optimizer: adamw then, lion now" in refused.stderr
    nothing_left = run_train(args(tiny_model("sd1"), shapes_dir, "--resume_state", str(save), "--max_steps", "3"),
                             cwd=work)
    assert nothing_left.returncode == 2 and "nothing is left to train" in nothing_left.stderr

    honoured = run_train(args(tiny_model("sd1"), shapes_dir, "--resume_state", str(save), "--max_steps", "5",
                              "--lr", "3e-4", "--batch_size", "4", "--log_step", "1", "--run_name", "second"), cwd=work)
    assert honoured.returncode == 0, honoured.stderr[-3000:]
    (notice,) = [line for line in honoured.stdout.splitlines() if "with changes, honoured" in line]
    assert "lr (unet) 0.0001 -> 0.0003" in notice and "global batch 2 -> 4" in notice
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(work / "logs" / "second" / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert [(e.step, e.value) for e in events.Scalars("lr/unet")] == [(4, pytest.approx(3e-4)), (5, pytest.approx(3e-4))]


# ---------------------------------------------------------------- places and data


def test_a_read_only_data_root_caches_its_latents_in_logdir(tiny_model, shapes_dir, tmp_path, small_disk):
    data = small_disk("data", "4m", read_only=True, fill=lambda d: shutil.copytree(shapes_dir, d, dirs_exist_ok=True))
    result = run_train(args(tiny_model("sd1"), data, "--max_steps", "1"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (notice,) = [line for line in result.stdout.splitlines() if "Caching in" in line]
    assert "Read-only file system" in notice and str(Path("logs") / "latent_cache") in notice
    assert list((tmp_path / "logs" / "latent_cache").rglob("*.safetensors"))


def test_data_vanishing_mid_run_still_saves_what_was_trained(tiny_model, shapes_dir, tmp_path):
    """A bug or an environment fault deep in a run (here its latent cache deleted under it) must not cost the
    steps already trained: they are saved with their training state before the error is reported. (A DataLoader
    worker reads the cache: the main process would encode the entries again, test_faults_data.py.)"""
    run = TrainProcess(args(tiny_model("sd1"), shapes_dir, "--max_epochs", "500", "--latent_cache_dir", "cache",
                            "--num_workers", "1"), cwd=tmp_path)
    run.wait_for("First step done")
    shutil.rmtree(tmp_path / "cache")
    code, out, err = run.finish()

    assert code == 1
    assert "No such file or directory" in one_message(err)
    (saved,) = saved_paths(out)
    assert saved.name.startswith("interrupted-") and (saved / "training_state" / "trainer_state.json").is_file()
    assert f"the weights trained so far were saved first: {saved}" in err
    assert_all_finite(saved)


# ---------------------------------------------------------------- resuming from what is there now


def hold_at_first_read(fifo: Path, run: TrainProcess) -> int:
    """The write end of `fifo`, a named pipe the run reads as a json file, once the run has opened it: the run then
    waits in that read, at a known point of its start, until the test writes the file's text and closes it."""
    deadline = time.monotonic() + 240
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until the run opens it to read
        except OSError as err:
            if err.errno != errno.ENXIO:
                raise
        assert run.popen.poll() is None and time.monotonic() < deadline, f"the run never read {fifo}"
        time.sleep(0.01)


def release(hold: int, text: bytes = b"{}") -> None:
    os.write(hold, text)
    os.close(hold)


def test_a_findlast_model_pruned_before_it_loads_gives_way_to_the_newest_that_is_left(tiny_model, shapes_dir,
                                                                                      tmp_path):
    """resume_ckpt findlast picks the newest save; another run's max_saves pruning removes it (renamed away, then
    deleted, as prune_saves does) after the pick, while the model is being read: the run says so in one line and
    trains from the newest complete save left, never calling the removed one damaged. A named pipe among the
    picked save's tokenizer files holds the run inside its load while the save is removed."""
    first = run_train(args(tiny_model("sd1"), shapes_dir, "--max_epochs", "2", "--save_every_n_epochs", "1",
                           "--save_single_file", "false", "--run_name", "first"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    older, newest = saved_paths(first.stdout)
    picked = newest.relative_to(tmp_path)  # as findlast finds it under logdir "logs"
    os.mkfifo(newest / "tokenizer" / "a-held.json")  # read first of the tokenizer's json files when the model loads
    run = TrainProcess(["--resume_ckpt", "findlast", "--data_root", str(shapes_dir), *BASE, "--max_steps", "2",
                        "--save_single_file", "false", "--run_name", "second"], cwd=tmp_path)
    hold = hold_at_first_read(newest / "tokenizer" / "a-held.json", run)
    remove_whole(newest)  # what another run's max_saves does to it
    release(hold)
    code, out, err = run.finish()

    assert code == 0, err[-3000:]
    assert f"resume_ckpt findlast: continuing from {picked}" in out
    warnings = [line[line.index("Warning: "):] for line in err.splitlines() if "Warning: " in line]
    said = (f"Warning: resume_ckpt findlast: {picked} was removed before this run had read it (by another run's "
            f"max_saves pruning, most likely); continuing from {older.relative_to(tmp_path)}, the newest saved model "
            "that still exists.")
    assert warnings == [said], warnings
    assert f"Model source: diffusers folder {older}" in out and "damaged" not in err
    (final,) = saved_paths(out)
    assert final.name == "last-myproj-ep01-gs00002" and (final / "model_index.json").is_file()


@pytest.mark.parametrize("processes", [1, 2], ids=["one process", "two processes"])
def test_a_findlast_state_pruned_before_it_loads_gives_way_to_the_newest_that_is_left(tiny_model, shapes_dir,
                                                                                      tmp_path, processes):
    """resume_state findlast: the state the preflight read is removed (as max_saves prunes) while the base model
    loads, before the state loads: one line, and the run goes on from the newest training state left, from its
    own step; with two processes (each loads the model in turn) both go on from that one."""
    common, older, newest = two_states(tiny_model, shapes_dir, tmp_path)
    code, out, err = resume_while_removed(common, tmp_path, tiny_model, newest, "findlast", processes)

    assert code == 0, err[-3000:]
    warnings = [line[line.index("Warning: "):] for line in err.splitlines() if "Warning: " in line]
    said = (f"Warning: resume_state findlast: {newest} was removed before this run had read it (by another run's "
            f"max_saves pruning, most likely); continuing from {older}, the newest training state that still exists.")
    assert warnings == [said], warnings
    assert f"Resumed from {older}: step 8, epoch 2, 0 batches into it." in out
    assert [save.name for save in saved_paths(out)] == ["myproj-ep02-gs00016", "last-myproj-ep03-gs00018"]


def test_a_named_state_removed_before_it_loads_is_said_removed(tiny_model, shapes_dir, tmp_path):
    """A training state named by its path is not replaced by another when it goes: that it was removed is said."""
    common, _, newest = two_states(tiny_model, shapes_dir, tmp_path)
    code, _, err = resume_while_removed(common, tmp_path, tiny_model, newest, str(newest), 1)

    assert code == 1, err[-3000:]
    assert one_message(err) == (f"train.py: resume_state {newest} was removed before this run had read it (by another "
                                "run's max_saves pruning, most likely): nothing was trained. Resume from another save "
                                "(--resume_state findlast takes the newest that exists).")


def two_states(tiny_model, shapes_dir: Path, tmp_path: Path) -> tuple[list[str], Path, Path]:
    """(the arguments, the older and the newest training state) of a run saved at steps 8 and 16."""
    common = args(tiny_model("sd1"), shapes_dir, "--save_optimizer", "--save_single_file", "false",
                  "--save_every_n_epochs", "1", "--max_epochs", "3")
    first = run_train([*common, "--max_steps", "16", "--run_name", "first"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    older, newest = (save.relative_to(tmp_path) / "training_state" for save in saved_paths(first.stdout))
    return common, older, newest


def resume_while_removed(common: list[str], tmp_path: Path, tiny_model, newest: Path, resume_state: str,
                         processes: int) -> tuple[int, str, str]:
    """A run resuming `resume_state` to step 18, and `newest`'s save removed as max_saves removes it once the (main)
    process has read it in its preflight, before it loads: a named pipe among the base model's tokenizer files
    holds each process inside its model load meanwhile."""
    from tests.test_distributed import CPU_RANKS, LAUNCH_TWO

    base = tmp_path / "base"
    shutil.copytree(tiny_model("sd1"), base)
    held = base / "tokenizer" / "a-held.json"
    os.mkfifo(held)
    launch = {"env": CPU_RANKS, "launcher": LAUNCH_TWO} if processes == 2 else {}
    run = TrainProcess([*common, "--resume_ckpt", str(base), "--resume_state", resume_state, "--max_steps", "18",
                        "--batch_size", str(2 // processes), "--run_name", "second"], cwd=tmp_path, **launch)
    hold = hold_at_first_read(held, run)
    remove_whole(tmp_path / newest.parent)
    release(hold)
    if processes == 2:  # the other loads the model once the main process has, and has closed the pipe
        run.wait_for("Memory plan")
        release(hold_at_first_read(held, run))
    held.unlink()
    return run.finish()


def grown_or_shrunk(data: Path, folder: Path, images: int) -> Path:
    """A copy of `data` (20 images) with `images` images: more (copies under new names) or fewer."""
    shutil.copytree(data, folder)
    pngs = sorted(folder.glob("*.png"))
    for png in pngs[images:]:
        png.unlink(), png.with_suffix(".txt").unlink()
    for i, png in enumerate(pngs[: max(0, images - len(pngs))]):
        shutil.copyfile(png, folder / f"extra_{i:03d}.png")
        shutil.copyfile(png.with_suffix(".txt"), folder / f"extra_{i:03d}.txt")
    return folder


@pytest.mark.parametrize("images, epoch, end", [
    (30, "epoch 2 goes on in the new data's order after the 10 samples it had trained", 40),
    (12, "epoch 2 goes on in the new data's order after the 10 samples it had trained", 22),
    (8, ("epoch 2 had trained 10 samples, as many as the new data's epoch holds: it is over, and the next begins "
         "with the new data"), 19),
], ids=["30 images", "12 images", "8 images"])
def test_a_data_set_changed_since_the_save_is_said_and_its_epochs_are_trained_whole(tiny_model, tmp_path, images,
                                                                                    epoch, end):
    """Saved 5 batches into epoch 2 of 20 images (10 batches an epoch), resumed on 30, 12 or 8: one line says the
    counts then and now and what resuming does; the epoch in progress goes on in the new data's plan after the
    samples it had trained, every later epoch trains the new data whole, and the run ends where epoch 3 ends."""
    from trainer.tiny.shapes import make_shapes_dataset

    data = make_shapes_dataset(tmp_path / "data", images_per_concept=10, size=64)
    common = args(tiny_model("sd1"), data, "--save_single_file", "false", "--max_epochs", "3")
    first = run_train([*common, "--max_steps", "15", "--save_optimizer", "--run_name", "first"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (save,) = saved_paths(first.stdout)
    changed = grown_or_shrunk(data, tmp_path / "changed", images)
    resumed = run_train([*common, "--data_root", str(changed), "--resume_state", str(save), "--run_name", "second"],
                        cwd=tmp_path)

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (notice,) = [line for line in resumed.stdout.splitlines() if "with changes, honoured" in line]
    assert notice == (f"resuming {save / 'training_state'} with changes, honoured: total_steps 15 -> {end}; data_root "
                      f"20 -> {images} images ({epoch}; every epoch after it trains the new data whole, and the run "
                      "ends where its last epoch ends)."), notice
    assert f"Resumed from {save / 'training_state'}: step 15, epoch 2," in resumed.stdout
    (final,) = saved_paths(resumed.stdout)
    assert final.name == f"last-myproj-ep03-gs{end:05d}" and (final / "model_index.json").is_file()


def test_an_output_disk_turning_read_only_mid_run_ends_in_one_line_that_says_how_to_go_on(tiny_model, shapes_dir,
                                                                                         tmp_path, small_disk):
    """The disk of the run's outputs (run folder, saves, latent cache) turns read-only mid-run, as a file system
    mounted errors=remount-ro does after a fault, and the run must write there outside a save: a latent-cache entry
    damaged since the start is encoded again and written back (data/dataset.py). The rescue save cannot be written
    either; the one line names the read-only file system and, as every stopped run does, how to go on from the
    last complete save, and that advice works."""
    disk = small_disk("out", "256m")
    writable = tmp_path / "writable"  # the same file system through a mount of its own that stays writable
    writable.mkdir()
    subprocess.run(["mount", "--bind", str(disk), str(writable)], check=True)
    try:
        common = args(tiny_model("sd1"), shapes_dir, "--logdir", str(disk / "logs"), "--latent_cache_dir",
                      str(disk / "cache"), "--save_optimizer", "--save_single_file", "false")
        run = TrainProcess([*common, "--save_every_n_epochs", "1", "--max_epochs", "500", "--run_name", "r"],
                           cwd=tmp_path)
        first = Path(run.wait_for("Saved model: ").split("Saved model: ", 1)[1].strip())
        subprocess.run(["mount", "-o", "remount,bind,ro", str(disk)], check=True)  # the run's view of it only
        for entry in (writable / "cache").rglob("*.safetensors"):
            entry.write_bytes(entry.read_bytes()[:50])
        code, _, err = run.finish()

        assert code == 1, err[-3000:]
        message = one_message(err)
        assert message.startswith("train.py: the file system is read-only: "), message
        assert message.endswith(f"; then continue with --resume_state {first / 'training_state'}."), message
        assert "and the weights could not be saved either" in err
        subprocess.run(["mount", "-o", "remount,bind,rw", str(disk)], check=True)
        resumed = run_train([*common, "--resume_state", str(first / "training_state"), "--max_steps", "10",
                             "--run_name", "r2"], cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"Resumed from {first / 'training_state'}: step 8" in resumed.stdout
    finally:
        subprocess.run(["umount", "-l", str(writable)], capture_output=True, check=False)
