"""The preflight, on real folders, files and file systems: every problem found before any model loads, together."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from convert import export_single_file
from trainer.config.schema import TrainConfig
from trainer.errors import ProblemsError
from trainer.models.ckpt_cache import prepare_single_file
from trainer.preflight.checks import run_preflight
from trainer.saves.resume import STATE_DIR, STATE_FILE, TrainerState, TrainingSetup

MOVE_CACHE = ("To convert it elsewhere, set ckpt_cache_dir (in train.json, or --ckpt_cache_dir DIR) or the environment "
              "variable CKPT_CACHE_DIR to a writable folder with room")


@pytest.fixture(scope="module")
def single_file(tiny_model, tmp_path_factory) -> Path:
    """A tiny SD1 .safetensors in the original layout (~30 MB), with its yaml beside it."""
    return export_single_file(tiny_model("sd1"), tmp_path_factory.mktemp("single") / "tiny.safetensors").checkpoint_path


def config(tmp_path: Path, shapes_dir: Path, model: Path | str, **changes) -> TrainConfig:
    settings = dict(resume_ckpt=str(model), data_root=str(shapes_dir), resolution=64, batch_size=2,
                    logdir=str(tmp_path / "logs"))
    return dataclasses.replace(TrainConfig(), **{**settings, **changes})


def problems(cfg: TrainConfig, run_name: str = "run") -> list[str]:
    with pytest.raises(ProblemsError) as caught:
        run_preflight(cfg, Path(cfg.logdir) / (cfg.run_name or run_name))
    return caught.value.problems


def test_a_sound_config_passes_and_plans_the_run(tmp_path, shapes_dir, tiny_model):
    cfg = config(tmp_path, shapes_dir, tiny_model("sd1"), validation_split=0.25, max_epochs=3)
    found = run_preflight(cfg, tmp_path / "logs" / "run")
    assert len(found.scan.items) == 12 and {k: len(v) for k, v in found.validation.items()} == {"validation": 4}
    assert (found.steps_per_epoch, found.total_steps) == (6, 18)
    assert found.save_dir == tmp_path / "logs" / "run" / "ckpts"
    assert found.cache_dir == shapes_dir / ".latent_cache"
    assert not (tmp_path / "logs").exists()  # nothing was written


def test_every_problem_together_before_any_model(tmp_path, shapes_dir):
    (tmp_path / "logs" / "taken").mkdir(parents=True)
    (tmp_path / "a_file").write_text("x")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": "x", "size": [100, 100]}]))
    optimizer = tmp_path / "optimizer.json"
    optimizer.write_text(json.dumps({"base": {"optimizer": "sgd"}}))
    cfg = config(tmp_path, shapes_dir, tmp_path / "no_model_needed", run_name="taken",
                 save_ckpt_dir=str(tmp_path / "a_file"), sample_prompts=str(prompts),
                 optimizer_config=str(optimizer), wandb=True, attn_type="xformers")
    found = problems(cfg)
    assert len(found) == 7, found
    text = "\n".join(found)
    for expected in ("resume_ckpt", "no_model_needed' was not found", "run_name 'taken'", "a new run never writes into another run's folder",
                     "save_ckpt_dir", "is a file, not a folder", "sample 1 size: got [100, 100]",
                     "optimizer 'sgd' is unknown", "wandb", "xformers"):
        assert expected in text


def test_read_only_and_full_disks(tmp_path, shapes_dir, tiny_model, small_disk):
    read_only = small_disk("ro", "1m", read_only=True)
    cfg = config(tmp_path, shapes_dir, tiny_model("sd1"), save_ckpt_dir=str(read_only / "ckpts"))
    (problem,) = problems(cfg)
    assert "save_ckpt_dir" in problem and "Read-only file system" in problem

    full = small_disk("full", "2m")
    cfg = config(tmp_path, shapes_dir, tiny_model("sd1"), save_ckpt_dir=str(full / "ckpts"))
    (problem,) = problems(cfg)
    assert problem.startswith(f"not enough free space for one save in {full / 'ckpts'}")
    assert "needs about" in problem and "MiB, and 2.0 MiB is free" in problem


def test_read_only_data_root_caches_latents_in_a_writable_place(tmp_path, shapes_dir, tiny_model, small_disk):
    data = small_disk("data", "4m", read_only=True, fill=lambda d: shutil.copytree(shapes_dir, d, dirs_exist_ok=True))
    cfg = config(tmp_path, data, tiny_model("sd1"))
    found = run_preflight(cfg, tmp_path / "logs" / "run")
    assert found.cache_dir.parent == tmp_path / "logs" / "latent_cache"
    (notice,) = found.notices
    assert str(found.cache_dir) in notice and "Read-only file system" in notice


def test_a_ckpt_cache_that_cannot_take_the_conversion_is_found_before_any_model(tmp_path, shapes_dir, single_file,
                                                                                small_disk, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CKPT_CACHE_DIR", raising=False)
    cfg = config(tmp_path, shapes_dir, single_file)
    (tmp_path / "ckpt_cache").write_text("not a folder")
    (problem,) = problems(cfg)
    assert problem == (f"resume_ckpt {single_file} is a single file to convert into ckpt_cache/tiny (first use), but the "
                       "ckpt_cache folder ckpt_cache is a file, not a folder; remove it or choose another path. "
                       f"{MOVE_CACHE}; the folder now is {tmp_path / 'ckpt_cache'}, the default: ckpt_cache/ in the "
                       "current folder.")

    read_only = small_disk("ro", "1m", read_only=True)
    monkeypatch.setenv("CKPT_CACHE_DIR", str(read_only / "cache"))
    (problem,) = problems(cfg)
    assert "cannot be written: Read-only file system" in problem and MOVE_CACHE in problem
    assert problem.endswith(f"; the folder now is {read_only / 'cache'}, set by CKPT_CACHE_DIR.")

    full = small_disk("full", "8m")
    (problem,) = problems(dataclasses.replace(cfg, ckpt_cache_dir=str(full / "cache")))  # before CKPT_CACHE_DIR
    assert re.search(r"but there is not enough free space there: the conversion needs about \d+\.\d MiB, and 8\.0 MiB "
                     "is free", problem) and MOVE_CACHE in problem and problem.endswith(", set by ckpt_cache_dir.")

    run_preflight(dataclasses.replace(cfg, ckpt_cache_dir=str(tmp_path / "converted")), tmp_path / "logs" / "run")


def test_an_earlier_conversion_to_reuse_needs_no_writable_ckpt_cache(tmp_path, shapes_dir, single_file, small_disk):
    cache = small_disk("cache", "64m", read_only=True, fill=lambda d: prepare_single_file(single_file, d, None))
    cfg = config(tmp_path, shapes_dir, single_file, ckpt_cache_dir=str(cache))
    run_preflight(cfg, tmp_path / "logs" / "run")  # reused as it is: nothing is written there

    (problem,) = problems(dataclasses.replace(cfg, prediction_type="v_prediction"))  # a changed override converts
    assert "cannot be written: Read-only file system" in problem and MOVE_CACHE in problem
    assert "(prediction_type was None then, v_prediction now)" in problem  # why it must be converted again


def test_a_hub_cache_that_cannot_take_a_download_is_found_before_any_model(tmp_path, shapes_dir, small_disk,
                                                                           monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    read_only = small_disk("ro", "1m", read_only=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(read_only / "hub"))
    cfg = config(tmp_path, shapes_dir, "owner/tiny")
    (problem,) = problems(cfg)
    assert problem == (f"resume_ckpt owner/tiny is a Hugging Face repo, downloaded into the hub cache, but the Hugging "
                       f"Face hub cache {read_only / 'hub'} cannot be written: Read-only file system (tested in "
                       f"{read_only}, the part that exists); choose a writable place or fix its permissions. Point "
                       "HF_HUB_CACHE at a writable folder (this one is set by HF_HUB_CACHE).")

    (tmp_path / "a_file").write_text("x")
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "a_file"))  # the legacy name wins, and is named
    (problem,) = problems(cfg)
    assert "is a file, not a folder" in problem and "Point HUGGINGFACE_HUB_CACHE at a writable folder" in problem

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # offline, the cache is only read
    run_preflight(cfg, tmp_path / "logs" / "run")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "hub"))  # the advice works
    run_preflight(cfg, tmp_path / "logs" / "run")


def test_a_mistyped_local_path_and_a_malformed_hub_address_are_found_before_any_model(tmp_path, shapes_dir,
                                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "sd1").mkdir(parents=True)

    (problem,) = problems(config(tmp_path, shapes_dir, "models/sd1x"))
    assert "Near matches: models/sd1. If you meant the Hugging Face repo models/sd1x, ask for the Hub explicitly: " \
           "--resume_ckpt hf://models/models/sd1x." in problem
    (problem,) = problems(config(tmp_path, shapes_dir, "hf://models/sd1x"))
    assert problem.startswith("resume_ckpt 'hf://models/sd1x' is not a Hugging Face model address: ")
    assert "an owner named like a repo type, such as models, takes it twice: hf://models/models/name" in problem


def test_paths_through_a_file_and_cache_names_of_a_moved_cache_are_never_hub_ids(tmp_path, shapes_dir, tiny_model,
                                                                                 monkeypatch):
    """`notes.txt/model` and `files/m.safetensors/x` go through a file: local paths, the file named (not a near
    name of another model); `ckpt_cache/name` is a cache name wherever ckpt_cache_dir put the cache."""
    from trainer.models.ckpt_cache import source_kind

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "files").mkdir()
    for name in ("m1.safetensors", "m2.safetensors"):
        (tmp_path / "files" / name).write_bytes(b"x")
    (problem,) = problems(config(tmp_path, shapes_dir, "notes.txt/model"))
    assert "not a Hugging Face repo id: notes.txt is a local file, so notes.txt/model is a local path" in problem
    (problem,) = problems(config(tmp_path, shapes_dir, "files/m1.safetensors/x"))
    assert "Near matches: files/m1.safetensors." in problem

    moved = tmp_path / "elsewhere"
    shutil.copytree(tiny_model("sd1"), moved / "tiny")
    assert source_kind("ckpt_cache/tiny", moved) == "cache"
    run_preflight(config(tmp_path, shapes_dir, "ckpt_cache/tiny", ckpt_cache_dir=str(moved)), tmp_path / "r")
    (problem,) = problems(config(tmp_path, shapes_dir, "ckpt_cache/tiny2", ckpt_cache_dir=str(moved)))
    assert problem.startswith("resume_ckpt 'ckpt_cache/tiny2' was not found") and "Near matches" in problem


def write_state(save: Path, **setup_changes) -> Path:
    """A training state's trainer_state.json and the files accelerate writes, as a save of
    test_config's settings would hold them."""
    state_dir = save / STATE_DIR
    state_dir.mkdir(parents=True)
    setup = TrainingSetup(family="sd1", architecture="x", trained=("unet", "text_encoder"),
                          freezing={"freeze_embeddings": False, "freeze_front_n_layers": None,
                                    "freeze_final_layer_norm": False},
                          optimizer="adamw", ema=False, lr={"unet": 1.5e-6, "text_encoder": 1.5e-6},
                          lr_scheduler="constant", lr_warmup_steps=None, total_steps=180, grad_accum=1)
    setup = dataclasses.replace(setup, **setup_changes)
    state = TrainerState(global_step=6, epoch=2, batches_in_epoch=0, batch_samples=2, setup=setup)
    (state_dir / STATE_FILE).write_text(state.to_json())
    for name in ("model.safetensors", "model_1.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
        (state_dir / name).write_bytes(b"x")
    return state_dir


def test_resume_state_must_be_complete_and_fit(tmp_path, shapes_dir, tiny_model):
    model = tiny_model("sd1")
    state_dir = write_state(tmp_path / "logs" / "old" / "ckpts" / "save", optimizer="lion")
    (state_dir / "optimizer.bin").unlink()
    cfg = config(tmp_path, shapes_dir, model, resume_state="findlast")
    (problem,) = problems(cfg)
    assert f"resume_state {state_dir} is incomplete: it lacks optimizer.bin" in problem

    (state_dir / "optimizer.bin").write_bytes(b"x")
    (problem,) = problems(cfg)
    assert "cannot continue this run: optimizer: lion then, adamw now" in problem
    assert f"--resume_ckpt {state_dir.parent}" in problem

    (problem,) = problems(dataclasses.replace(cfg, optimizer="lion", disable_textenc_training=True))
    assert "trained: unet+text_encoder then, unet now" in problem

    (problem,) = problems(dataclasses.replace(cfg, optimizer="lion", max_steps=6))
    assert "is at step 6, and this config's run ends at step 6" in problem and "nothing is left to train" in problem


def test_honoured_changes_are_said_in_one_line(tmp_path, shapes_dir, tiny_model):
    write_state(tmp_path / "logs" / "old" / "ckpts" / "save")
    cfg = config(tmp_path, shapes_dir, tiny_model("sd1"), resume_state="findlast", lr=3e-6,
                 lr_scheduler="cosine", batch_size=4)
    found = run_preflight(cfg, tmp_path / "logs" / "run")
    (notice,) = [n for n in found.notices if n.startswith("resuming")]
    # step 6 at the start of epoch 2, then 29 whole epochs of 4 steps at the new batch: the run ends at step 122
    for expected in ("lr (unet) 1.5e-06 -> 3e-06", "lr (text_encoder) 1.5e-06 -> 3e-06",
                     "lr_scheduler constant -> cosine", "total_steps 180 -> 122", "global batch 2 -> 4"):
        assert expected in notice
    assert found.resume.saved.global_step == 6


def test_validation_folders_are_checked_in_the_same_round_as_a_data_root_with_no_images(tmp_path, tiny_model):
    """data_root and validation_data_root both with their images only in hidden folders: both are said at once."""
    from PIL import Image

    for folder in ("data/.photos", "val/sub/.val"):
        (tmp_path / folder).mkdir(parents=True)
        Image.new("RGB", (64, 64)).save(tmp_path / folder / "a red circle.png")
    found = "\n".join(problems(config(tmp_path, tmp_path / "data", tiny_model("sd1"),
                                      validation_data_root=str(tmp_path / "val"))))
    assert f"data_root '{tmp_path / 'data'}' holds no images outside hidden folders" in found
    assert f"validation_data_root '{tmp_path / 'val'}' holds no images outside hidden folders" in found
    assert "sub/.val/ (1). To use them" in found and "or pass it as validation_data_root itself" in found


def test_a_broken_yaml_beside_a_single_file_is_found_before_any_model_and_says_why_it_counts(tmp_path, shapes_dir,
                                                                                            single_file):
    copy = tmp_path / "files" / "m.safetensors"
    copy.parent.mkdir()
    shutil.copyfile(single_file, copy)
    copy.with_suffix(".yaml").write_text("model: [unclosed\n")
    (problem,) = problems(config(tmp_path, shapes_dir, copy, ckpt_cache_dir=str(tmp_path / "cache")))
    assert problem.startswith(f"resume_ckpt {copy}: {copy.with_suffix('.yaml')} is not valid yaml (expected ',' or "
                              "']', but got '<stream end>' at line 2, column 1); correct it (it is read because it "
                              "sits beside the file with the same name, AUTOMATIC1111's convention; to have the "
                              "model's configuration detected from the file itself instead, move it away).")
    copy.with_suffix(".yaml").rename(tmp_path / "moved.yaml")  # the advice: the config is then read from the file
    run_preflight(config(tmp_path, shapes_dir, copy, ckpt_cache_dir=str(tmp_path / "cache")), tmp_path / "r")
