"""The training loop's promises, checked on real `python train.py` processes with tiny models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT, run_train

FAST = ["--resolution", "64", "--mixed_precision", "no", "--gradient_checkpointing", "false",
        "--zero_frequency_noise_ratio", "0.05", "--log_step", "2"]


def saved_paths(output: str, marker: str = "Saved model: ") -> list[Path]:
    return [Path(line.split(marker, 1)[1].strip()) for line in output.splitlines() if marker in line]


def unet_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "unet" / "diffusion_pytorch_model.safetensors")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = unet_weights(a), unet_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.slow
def test_exact_resume_mid_epoch(tiny_model, shapes_dir: Path, tmp_path: Path):
    """2N steps straight == N steps, stop, resume for N more (N=5: the stop falls mid-epoch, 8 steps/epoch)."""
    common = ["--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(shapes_dir), "--batch_size", "2",
              "--max_epochs", "3", "--lr", "1e-4", "--flip_p", "0.5", "--ema_decay_rate", "0.9",
              "--save_full_precision", "--save_single_file", "false", *FAST]
    straight = run_train([*common, "--max_steps", "10", "--logdir", "straight"], cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = run_train([*common, "--max_steps", "5", "--logdir", "split", "--save_optimizer"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (half,) = [p for p in saved_paths(first.stdout) if not p.name.endswith("-ema")]
    assert (half / "training_state" / "trainer_state.json").is_file()
    resumed = run_train([*common, "--max_steps", "10", "--logdir", "split", "--resume_state", "findlast"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stdout and "step 5, epoch 1, 5 batches into it" in resumed.stdout
    end_straight = [p for p in saved_paths(straight.stdout)]
    end_resumed = [p for p in saved_paths(resumed.stdout)]
    assert [p.name for p in end_resumed] == [p.name for p in end_straight] == ["last-myproj-ep02-gs00010",
                                                                               "last-myproj-ep02-gs00010-ema"]
    for a, b in zip(end_straight, end_resumed):
        assert_same_weights(a, b)  # the model and its EMA


@pytest.mark.slow
def test_ctrl_c_saves_interrupted_and_resumes(tiny_model, shapes_dir: Path, tmp_path: Path):
    args = ["--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(shapes_dir), "--batch_size", "2",
            "--max_epochs", "500", "--logdir", "logs", "--save_single_file", "false", *FAST]
    process = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "train.py"), *args], cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 240
    for line in process.stdout:  # wait until training really runs
        if line.startswith("Training SD1") or time.monotonic() > deadline:
            break
    time.sleep(3)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=240)
    assert process.returncode == 130, err[-3000:]
    assert "SIGINT: stopping after this step" in out
    (saved,) = saved_paths(out)
    assert saved.name.startswith("interrupted-myproj-ep")
    assert (saved / "training_state" / "trainer_state.json").is_file()
    assert f"Continue with --resume_state {saved}" in out
    # a state with nothing left to train under the new settings is refused up front
    done = run_train([*args[:-len(FAST)], *FAST, "--resume_state", str(saved), "--max_steps", "1"], cwd=tmp_path)
    assert done.returncode == 2 and "nothing is left to train" in done.stderr
    step = int(saved.name.rsplit("-gs", 1)[1])
    resumed = run_train([*args[:-len(FAST)], *FAST, "--resume_state", str(saved), "--max_steps", str(step + 2)],
                        cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from {saved / 'training_state'}: step {step}" in resumed.stdout


@pytest.mark.slow
def test_saves_single_file_ema_samples_pruning_and_logs(tiny_model, shapes_dir: Path, tmp_path: Path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text('{"samples": [{"prompt": "a red circle", "seed": 1, "steps": 2},'
                       ' {"prompt": "a blue square", "steps": 2, "cfg": 3}]}', encoding="utf-8")
    model = tiny_model("sd2-v")
    result = run_train(
        ["--resume_ckpt", str(model), "--data_root", str(shapes_dir), "--batch_size", "4", "--max_epochs", "3",
         "--save_every_n_epochs", "1", "--max_saves", "1", "--ema_decay_rate", "0.9", "--sample_prompts", str(prompts),
         "--sample_steps", "4", "--validation_split", "0.25", "--logdir", "logs", "--run_name", "r", *FAST],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpts = tmp_path / "logs" / "r" / "ckpts"
    names = sorted(p.name for p in ckpts.iterdir())
    # epoch 1's periodic save was pruned (max_saves 1), epoch 2's kept, the last save never pruned
    assert names == sorted(
        f"{base}{ema}{ext}" for base in ("myproj-ep02-gs00006", "last-myproj-ep03-gs00009")
        for ema in ("", "-ema") for ext in ("", ".safetensors", ".yaml")
    )
    last = ckpts / "last-myproj-ep03-gs00009"
    assert load_file(last / "unet" / "diffusion_pytorch_model.safetensors")["conv_in.weight"].dtype == torch.float16
    sidecar = (ckpts / "last-myproj-ep03-gs00009.yaml").read_text()
    assert 'parameterization: "v"' in sidecar or "parameterization: v" in sidecar
    # the single file loads in diffusers to the same weights
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(
        str(ckpts / "last-myproj-ep03-gs00009.safetensors"), config=str(last),
        original_config=str(ckpts / "last-myproj-ep03-gs00009.yaml"), torch_dtype=torch.float16,
    )
    folder = unet_weights(last)
    for key, value in pipe.unet.state_dict().items():
        assert torch.equal(value, folder[key]), key
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    # EMA differs from the raw weights
    assert not torch.equal(unet_weights(last)["conv_in.weight"], unet_weights(ckpts / "last-myproj-ep03-gs00009-ema")["conv_in.weight"])
    samples = tmp_path / "logs" / "r" / "samples"
    assert {p.name for p in samples.glob("*-grid.png")} == {"gs00004-grid.png", "gs00004-ema-grid.png",
                                                            "gs00008-grid.png", "gs00008-ema-grid.png",
                                                            "gs00009-grid.png", "gs00009-ema-grid.png"}
    log = (tmp_path / "logs" / "r" / "train.log").read_text()
    assert "Pruned old save myproj-ep01-gs00003" in log and "Samples at step 9" in log
    assert log.count("Validation loss at step") == 3  # after epochs 1 and 2, and at the end
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "logs" / "r" / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/train", "loss/validation", "lr/unet", "lr/text_encoder", "grad_norm", "perf/it_per_s",
            "perf/samples_per_s"} <= tags
    assert [e.step for e in events.Scalars("loss/train")] == [2, 4, 6, 8, 9]  # every 2 steps and the last
    assert [e.step for e in events.Scalars("loss/validation")] == [3, 6, 9]


@pytest.mark.slow
def test_nan_loss_stops_clearly_without_saving(tiny_model, shapes_dir: Path, tmp_path: Path):
    result = run_train(
        ["--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(shapes_dir), "--batch_size", "4",
         "--max_epochs", "5", "--lr", "1e30", "--logdir", "logs", *FAST],
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "train.py: training diverged at step 1: " in result.stderr
    assert "Traceback" not in result.stderr
    assert "Saved model" not in result.stdout
