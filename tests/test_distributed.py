"""Multi-process training through accelerate, checked with two real CPU processes (gloo), and the shipped
accelerate configs. `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu` is what starts two CPU processes with
accelerate 1.15 (`--cpu --num_processes 2` starts one)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT, TrainProcess, run_train
from tests.test_loop import saved_paths

# Every sample's noise comes from its own seed, so what must match is only the arithmetic: fp32, no dropout.
# Adam's step m / (sqrt(v) + eps) turns float rounding in a near-zero gradient into a whole step of either sign;
# eps 1 makes the step linear in the gradient, so any real difference between the runs shows, and rounding not.
LINEAR_ADAM = {"base": {"epsilon": 1.0}}


# `accelerate launch` on two CPU processes, up to the script it starts
LAUNCH_TWO = ("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0")
CPU_RANKS = {"ACCELERATE_USE_CPU": "1"}


def launch_two(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`accelerate launch` of train.py on two CPU processes."""
    return subprocess.run([sys.executable, *LAUNCH_TWO, str(REPO_ROOT / "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **CPU_RANKS})


def trained_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    unet = load_file(model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    text_encoder = load_file(model_dir / "text_encoder" / "model.safetensors")
    return {**{f"unet.{k}": v for k, v in unet.items()}, **{f"text_encoder.{k}": v for k, v in text_encoder.items()}}


def assert_same_training(a: Path, b: Path, base: Path) -> None:
    wa, wb, w0 = trained_weights(a), trained_weights(b), trained_weights(base)
    assert wa.keys() == wb.keys()
    moved = max((wa[k] - w0[k]).abs().max().item() for k in wa)
    assert moved > 1e-5, "training did not change the weights: the comparison would prove nothing"
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-7, msg=key)


@pytest.fixture(scope="module")
def setup(tiny_model, shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Shared arguments (16 images, global batch 4: 4 steps per epoch, 3 epochs) and the one-process batch-4
    reference."""
    work = tmp_path_factory.mktemp("distributed")
    optimizer = work / "optimizer.json"
    optimizer.write_text(json.dumps(LINEAR_ADAM), encoding="utf-8")
    common = ["--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(shapes_dir), "--resolution", "64",
              "--mixed_precision", "no", "--gradient_checkpointing", "false", "--save_full_precision",
              "--save_single_file", "false", "--cond_dropout", "0", "--flip_p", "0", "--zero_frequency_noise_ratio",
              "0.1", "--lr", "1e-4", "--optimizer_config", str(optimizer), "--max_steps", "12", "--log_step", "1"]
    reference = run_train([*common, "--batch_size", "4", "--logdir", "one"], cwd=work)
    assert reference.returncode == 0, reference.stderr[-3000:]
    (final,) = saved_paths(reference.stdout)
    return dataclasses.make_dataclass("Setup", ["work", "common", "reference", "base"])(
        work, common, final, tiny_model("sd1"))


@pytest.mark.slow
def test_two_processes_train_what_one_process_with_twice_the_batch_does(setup):
    cache = setup.work / "fresh_cache"  # empty: one process must fill it, the other only read it
    two = launch_two([*setup.common, "--batch_size", "2", "--logdir", "two", "--latent_cache_dir", str(cache)],
                     cwd=setup.work)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "batch 2 x accum 1 x 2 process(es), 4 steps/epoch" in two.stdout
    assert "Weights agree on all 2 processes at step 12" in two.stdout  # checked across ranks before the save
    # the main process encoded the cache (the other found it full, and says nothing: one voice on the console)
    assert two.stdout.count("Latent cache: 16 encoded, 0 reused") == 1 and "0 encoded" not in two.stdout
    assert len(list(cache.rglob("*.safetensors"))) == 16
    assert len(list(setup.work.glob("two/*"))) == 1, "both processes must use the same run folder"
    (final,) = saved_paths(two.stdout)  # one process saved
    assert_same_training(setup.reference, final, setup.base)


@pytest.mark.slow
def test_resume_on_two_processes_from_a_one_process_save(setup):
    """Batch 4 on one process for 6 steps (half of epoch 2), then batch 2 on two processes (the same global batch)
    for the other 6: the same weights as 12 steps on one process."""
    first = run_train([*setup.common, "--batch_size", "4", "--max_steps", "6", "--save_optimizer",
                       "--logdir", "split"], cwd=setup.work)
    assert first.returncode == 0, first.stderr[-3000:]
    (half,) = saved_paths(first.stdout)
    resumed = launch_two([*setup.common, "--batch_size", "2", "--logdir", "split", "--resume_state", str(half)],
                         cwd=setup.work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step 6, epoch 2, 2 batches into it" in resumed.stdout and "re-planned" not in resumed.stdout
    (final,) = saved_paths(resumed.stdout)
    assert_same_training(setup.reference, final, setup.base)


def test_schedule_does_not_depend_on_workers_or_processes(shapes_dir: Path):
    """An epoch's rows, by seed: the same with and without worker processes, and a two-process loader's global
    batches (each process takes half of each) are the one-process loader's batches of twice the size."""
    from convert.tokenizer import clip_tokenizer
    from data.dataset import build_dataloader
    from trainer.config.schema import TrainConfig
    from trainer.preflight.device import for_this_machine

    cfg = for_this_machine(dataclasses.replace(TrainConfig(), data_root=str(shapes_dir), resolution=64,
                                               cache_latents=False))

    def epoch_seeds(batch_size: int, num_workers: int, num_processes: int) -> list[list[int]]:
        loader = build_dataloader(dataclasses.replace(cfg, batch_size=batch_size, num_workers=num_workers),
                                  clip_tokenizer(), num_processes=num_processes)
        loader.batch_sampler.set_epoch(3)
        return [batch["seed"] for batch in loader]

    two_processes = epoch_seeds(2, 0, 2)
    assert len(two_processes) == 4 and all(len(seeds) == 4 for seeds in two_processes)
    assert epoch_seeds(2, 2, 2) == two_processes  # torch iterates a batch sampler twice when its workers start
    assert epoch_seeds(4, 0, 1) == two_processes


@pytest.mark.parametrize("config", sorted((REPO_ROOT / "docs" / "accelerate").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_accelerate_configs_are_accepted(config: Path):
    """accelerate's own loader (unknown keys and bad enum values raise) and its launch-argument validation."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    loaded = load_config_from_file(str(config))
    assert loaded.distributed_type.value in ("MULTI_GPU", "FSDP", "DEEPSPEED")
    args = launch_command_parser().parse_args(["--config_file", str(config), "train.py"])
    validated = _validate_launch_command(args)[0]
    assert validated.num_processes == loaded.num_processes > 1


def test_each_documented_config_exists():
    text = (REPO_ROOT / "docs" / "DISTRIBUTED.md").read_text(encoding="utf-8")
    shipped = {p.name for p in (REPO_ROOT / "docs" / "accelerate").glob("*.yaml")}
    assert shipped == {"multi_gpu.yaml", "multi_node.yaml", "fsdp.yaml", "deepspeed_zero2_offload.yaml"}
    for name in shipped:
        assert f"docs/accelerate/{name}" in text, name


def test_help_and_config_error_answer_without_heavy_imports(tmp_path: Path):
    """torch, diffusers and accelerate are never imported for --help or a config error, so both answer at once
    (measured, not asserted: no timing in tests)."""
    for args, code in ((["--help"], 0), (["--batch_size", "zero"], 2)):
        result = subprocess.run([sys.executable, "-X", "importtime", str(REPO_ROOT / "train.py"), *args], cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == code, result.stderr[-2000:]
        imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
        assert not imported & {"torch", "diffusers", "accelerate", "transformers"}


@pytest.mark.slow
def test_fsdp_on_cpus_is_refused_in_one_line_with_accelerates_reason(shapes_dir: Path, tiny_model, tmp_path: Path):
    """accelerate 1.15 builds no FSDP plugin without an accelerator; the shipped FSDP config, launched on CPUs,
    says so (in accelerate's words) before any model loads, instead of a traceback."""
    config = tmp_path / "fsdp_cpu.yaml"
    text = (REPO_ROOT / "docs" / "accelerate" / "fsdp.yaml").read_text(encoding="utf-8")
    config.write_text(text.replace("mixed_precision: bf16", "mixed_precision: 'no'").replace("use_cpu: false",
                                                                                              "use_cpu: true"))
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port", "0",
         str(REPO_ROOT / "train.py"), "--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(shapes_dir),
         "--resolution", "64", "--max_steps", "1", "--disable_textenc_training", "--mixed_precision", "no"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "ACCELERATE_USE_CPU": "1"})
    assert result.returncode != 0
    assert 'train.py", line' not in result.stderr  # no traceback of ours (the launcher prints its own)
    assert "FSDP needs GPUs (or other accelerators)" in result.stderr
    assert "There are currently no available devices found" in result.stderr  # accelerate's own reason
    assert "Model:" not in result.stdout


def rank_pid(launcher: int, rank: int) -> int:
    """The pid of `rank`'s train.py among the launcher's child processes (each has RANK in its environment)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != launcher:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue  # ended while looked at
        if f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    raise AssertionError(f"no process of rank {rank} under the launcher {launcher}")


def wait_for_partial_save(folder: Path, timeout: float = 120) -> None:
    """Until a hidden partial save appears in `folder` (polled every few ms: it lives a fraction of a second)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if folder.is_dir() and any(p.name.startswith(".") for p in folder.iterdir()):
            return
        time.sleep(0.002)
    raise AssertionError(f"no partial save appeared in {folder}")


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="finds the ranks' processes in /proc")
@pytest.mark.parametrize("lost", [1, 0], ids=["rank 1 killed during a save", "rank 0 killed while training"])
def test_a_killed_process_ends_the_run_in_one_line_naming_it_and_the_save_to_go_on_from(setup, lost: int):
    """SIGKILL to one of two processes (what the out-of-memory killer sends): the survivor ends within the
    launcher's grace time with one line naming the lost process and the last complete save, which is whole; no
    traceback of ours and no partial save are left."""
    logdir = setup.work / f"lost{lost}"
    run = TrainProcess([*setup.common, "--batch_size", "2", "--max_steps", "400", "--save_every_n_epochs", "1",
                        "--save_optimizer", "--logdir", logdir.name], cwd=setup.work, env=CPU_RANKS,
                       launcher=LAUNCH_TWO)
    saved = run.wait_for("Saved model:").split("Saved model:")[1].strip()
    if lost == 1:  # the survivor is the main process, in the middle of writing the next save
        wait_for_partial_save(Path(saved).parent)
    pid = rank_pid(run.popen.pid, lost)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    code, _, err = run.finish(timeout=120)
    assert time.monotonic() - killed < 60, "the survivor must end well within the launcher's 30 s grace"
    assert code != 0
    (line,) = [line for line in err.splitlines() if "train.py: " in line]
    line = line[line.index("train.py: "):]  # after the lost process's unfinished progress bar, if any
    assert line.startswith(f"train.py: process {lost} of 2 (pid {pid}) was lost after step "), line
    assert f"Process {1 - lost} cannot go on without it" in line and "nothing more was saved" in line
    newest = max(p for p in Path(saved).parent.iterdir() if not p.name.startswith("."))
    assert f"--resume_state {newest / 'training_state'}." in line, (line, newest)
    assert (newest / "model_index.json").is_file() and (newest / "training_state").is_dir()
    assert "bug" not in err and not re.search(r'File ".*/(trainer|train\.py)', err), err[-3000:]
    assert not [p for p in Path(saved).parent.iterdir() if p.name.startswith(".")], "a partial save was left"
