"""Real `python train.py` processes on tiny models: they train, save a loadable pipeline, and change weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import run_train
from trainer.config.load import load_config


def saved_paths(output: str) -> list[Path]:
    return [Path(line.split("Saved model: ", 1)[1].strip()) for line in output.splitlines() if "Saved model: " in line]


def weights(model_dir: Path, component: str) -> dict[str, torch.Tensor]:
    name = "model.safetensors" if component == "text_encoder" else "diffusion_pytorch_model.safetensors"
    return load_file(model_dir / component / name)


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    assert a.keys() == b.keys()
    return any(not torch.equal(a[k], b[k]) for k in a)


def generate(model_dir: Path, prompt: str = "a red circle") -> Image.Image:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    return pipe(prompt, num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)).images[0]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sd2", "sd2-v"])
def test_train_saves_changed_loadable_model(family: str, tiny_model, shapes_dir: Path, tmp_path: Path):
    start = tiny_model(family)
    result = run_train(
        ["--resume_ckpt", str(start), "--data_root", str(shapes_dir), "--resolution", "64", "--batch_size", "2",
         "--max_epochs", "2", "--logdir", str(tmp_path / "logs"), "--save_full_precision"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (saved,) = saved_paths(result.stdout)
    assert saved.is_absolute() and saved.name == "last-myproj-ep02-gs00016"
    assert changed(weights(start, "unet"), weights(saved, "unet"))
    assert changed(weights(start, "text_encoder"), weights(saved, "text_encoder"))
    assert not changed(weights(start, "vae"), weights(saved, "vae"))  # frozen, saved bit-exact
    expected_prediction = "v_prediction" if family == "sd2-v" else "epsilon"
    assert f"prediction type {expected_prediction}" in result.stdout
    assert generate(saved).size == (64, 64)

    (run_dir,) = (tmp_path / "logs").iterdir()
    reloaded = load_config(["--config", str(run_dir / "train.json")]).config
    assert reloaded.resolution == 64 and reloaded.batch_size == 2 and reloaded.resume_ckpt == str(start)
    info = json.loads((run_dir / "model_info.json").read_text())
    assert info["family"] == ("sd1" if family == "sd1" else "sd2")
    assert info["prediction_type"] == expected_prediction
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_cache_name_frozen_text_encoder_epoch_saves_and_same_seed_same_weights(tiny_model, shapes_dir: Path, tmp_path: Path):
    shutil.copytree(tiny_model("sd1"), tmp_path / "ckpt_cache" / "my_sd15_model")
    args = ["--resume_ckpt", "my_sd15_model", "--data_root", str(shapes_dir), "--resolution", "64",
            "--batch_size", "4", "--max_epochs", "3", "--save_every_n_epochs", "1", "--disable_textenc_training",
            "--gradient_checkpointing", "false", "--lr", "1e-4", "--save_full_precision"]
    first = run_train([*args, "--logdir", "a", "--run_name", "r"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    saves = saved_paths(first.stdout)
    assert [p.name for p in saves] == ["myproj-ep01-gs00004", "myproj-ep02-gs00008", "last-myproj-ep03-gs00012"]
    start = tiny_model("sd1")
    assert not changed(weights(start, "text_encoder"), weights(saves[-1], "text_encoder"))
    assert changed(weights(start, "unet"), weights(saves[-1], "unet"))

    second = run_train([*args, "--logdir", "b", "--run_name", "r", "--max_steps", "12"], cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert not changed(weights(saves[-1], "unet"), weights(saved_paths(second.stdout)[-1], "unet"))


@pytest.mark.slow
def test_max_steps_and_grad_accum(tiny_model, shapes_dir: Path, tmp_path: Path):
    result = run_train(
        ["--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(shapes_dir), "--resolution", "64",
         "--batch_size", "2", "--grad_accum", "2", "--max_epochs", "5", "--max_steps", "3", "--logdir", "l"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 steps/epoch, 3 steps" in result.stdout
    assert saved_paths(result.stdout)[-1].name == "last-myproj-ep01-gs00003"


@pytest.mark.slow
def test_unknown_model_is_one_clear_message_and_writes_nothing(shapes_dir: Path, tmp_path: Path):
    result = run_train(["--resume_ckpt", "no_such_model", "--data_root", str(shapes_dir), "--logdir", "logs"], cwd=tmp_path)
    assert result.returncode == 2  # found by the preflight, before torch loads
    assert "Traceback" not in result.stderr
    assert "resume_ckpt 'no_such_model' was not found" in result.stderr
    assert "ckpt_cache" in result.stderr
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_empty_data_root_is_an_error(tiny_model, tmp_path: Path):
    (tmp_path / "empty").mkdir()
    result = run_train(["--resume_ckpt", str(tiny_model("sd1")), "--data_root", "empty", "--logdir", "logs"], cwd=tmp_path)
    assert result.returncode == 2 and "holds no images" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "logs").exists()
