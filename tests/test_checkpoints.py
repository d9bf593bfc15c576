"""What a run writes, on real folders and file systems: run folders that never collide, saves that never replace
one another, pruning that never touches a partial or final save, write failures told apart from bugs."""

from __future__ import annotations

import dataclasses
import errno
import math
from pathlib import Path

import pytest
import torch

from common.files import atomic_folder, partial_path
from trainer.config.schema import TrainConfig
from trainer.errors import UserError
from trainer.evaluation.sampling import sd_pipeline
from trainer.models.load import load_models
from trainer.saves.checkpoints import (
    component_weights,
    create_run_dir,
    free_save_path,
    io_failure,
    prune_saves,
    weight_problems,
    write_model_folder,
)


@pytest.mark.slow
def test_two_runs_planned_in_the_same_second_get_two_folders(tmp_path, tiny_model):
    info = load_models(str(tiny_model("sd1"))).info
    cfg = dataclasses.replace(TrainConfig(), logdir=str(tmp_path))
    planned = tmp_path / "myproj_20260101-120000"  # what run_dir_path gives two runs started in one second
    first, second = create_run_dir(cfg, info, planned), create_run_dir(cfg, info, planned)
    assert (first, second) == (planned, tmp_path / "myproj_20260101-120000-2")
    assert (second / "train.json").is_file() and (second / "model_info.json").is_file()

    named = dataclasses.replace(cfg, run_name="mine")
    create_run_dir(named, info, tmp_path / "mine")
    with pytest.raises(UserError, match="run folder .*mine already exists"):
        create_run_dir(named, info, tmp_path / "mine")


def test_a_save_name_in_use_gets_a_suffix(tmp_path):
    assert free_save_path(tmp_path, "last-p-ep01-gs00001") == tmp_path / "last-p-ep01-gs00001"
    (tmp_path / "last-p-ep01-gs00001.safetensors").write_text("a single file of an earlier run")
    assert free_save_path(tmp_path, "last-p-ep01-gs00001") == tmp_path / "last-p-ep01-gs00001-2"
    (tmp_path / "last-p-ep01-gs00001-2-ema").mkdir()
    assert free_save_path(tmp_path, "last-p-ep01-gs00001") == tmp_path / "last-p-ep01-gs00001-3"


def test_pruning_deletes_only_the_saves_it_is_given_with_their_twins_and_files(tmp_path):
    def save(name: str) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text("{}")
        (tmp_path / f"{name}.safetensors").write_text("w")
        return tmp_path / name

    own = [save("p-ep01-gs00001"), save("p-ep02-gs00002")]
    save("p-ep01-gs00001-ema")
    others = ["other-ep01-gs00001", "last-p-ep03-gs00003", partial_path(tmp_path / "p-ep04-gs00005").name]
    for name in others:  # another run's save in a shared folder, a final save, a save being written
        save(name)
    deleted = prune_saves(own, keep=1)
    assert deleted == own[:1]
    assert not (tmp_path / "p-ep01-gs00001.safetensors").exists() and not (tmp_path / "p-ep01-gs00001-ema").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted(["p-ep02-gs00002", *others])


def test_write_failures_are_told_apart_from_bugs():
    assert io_failure(OSError(errno.ENOSPC, "No space left on device", "/x/unet.safetensors")) == \
        "No space left on device (/x/unet.safetensors)"
    try:  # torch.save's way: its zip writer fails again while closing, on top of the iostream error
        try:
            raise RuntimeError("basic_ios::clear: iostream error")
        except RuntimeError:  # raised while handling the first, chained to it implicitly as torch's is
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 25357056")  # noqa: B904
    except RuntimeError as err:
        assert io_failure(err) == "a write failed (basic_ios::clear: iostream error)"
    assert io_failure(TypeError("save() got an unexpected keyword")) is None
    assert io_failure(RuntimeError("shape mismatch")) is None


def test_what_a_save_would_write_is_checked_in_its_dtype(tiny_model):
    models = load_models(str(tiny_model("sd1")))
    with torch.no_grad():
        models.unet.conv_in.weight[0, 0, 0, 0] = 70_000.0  # fine in fp32, inf in an fp16 save
    modules = {"unet": models.unet, "vae": models.vae, "text_encoder": models.text_encoder}
    folder, trained = tiny_model("sd1"), {"unet", "text_encoder"}
    assert weight_problems(component_weights(folder, modules, trained, torch.float32)) == []
    (problem,) = weight_problems(component_weights(folder, modules, trained, torch.float16))
    assert problem == "unet: 1 non-finite values in 1 tensors (e.g. conv_in.weight)"
    with torch.no_grad():
        models.vae.encoder.conv_in.weight.fill_(math.nan)  # a frozen part is saved from the model's own files
    assert weight_problems(component_weights(folder, {"vae": models.vae}, set(), torch.float16)) == []


def test_frozen_parts_are_saved_as_stored_whatever_precision_they_are_held_in(tiny_model, tmp_path):
    from trainer.models.load import ComponentDtypes

    models = load_models(str(tiny_model("sd1")), dtypes=ComponentDtypes(vae=torch.bfloat16))
    weights = component_weights(tiny_model("sd1"), {"vae": models.vae}, set(), torch.float32)
    from safetensors.torch import load_file

    stored = load_file(tiny_model("sd1") / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(weights["vae"][k], stored[k]) for k in stored)  # not the bf16-rounded copy


def test_a_model_folder_written_to_a_full_disk_leaves_nothing(tiny_model, small_disk):
    models = load_models(str(tiny_model("sd1")))
    pipeline = sd_pipeline(models.unet, models.text_encoder, models.vae, models.tokenizer, models.sample_scheduler)
    modules = {"unet": models.unet, "vae": models.vae, "text_encoder": models.text_encoder}
    weights = component_weights(tiny_model("sd1"), modules, {"unet", "text_encoder"}, torch.float16)
    disk = small_disk("disk", "4m")  # a tiny model's fp16 folder takes ~15 MB
    with pytest.raises(Exception) as caught:
        with atomic_folder(disk / "save") as partial:
            write_model_folder(partial, pipeline, weights)
    assert "No space left on device" in io_failure(caught.value)
    assert list(disk.iterdir()) == []


@pytest.mark.slow
def test_two_optimizers_train_save_their_state_and_resume_exactly(tiny_model, shapes_dir, tmp_path):
    """AdamW on the UNet, Lion on the last text-encoder layer with a cosine decaying over 4 of the 6 steps (then
    held at 0), no gradient norm logged: 6 steps straight == 3 steps, a saved training state, and 3 more after
    resuming from it, bit for bit."""
    import json

    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.conftest import run_train
    from tests.test_loop import FAST, saved_paths

    optimizer_json = tmp_path / "optimizer.json"
    optimizer_json.write_text(json.dumps({
        "base": {"optimizer": "adamw", "lr": 1e-4},
        "text_encoder_overrides": {"optimizer": "lion", "lr": 1e-5, "lr_scheduler": "cosine", "lr_warmup_steps": 0,
                                   "lr_decay_steps": 4},
        "text_encoder_freezing": {"unfreeze_last_n_layers": 1},
        "log_grad_norm": False, "apply_grad_scaler_step_tweaks": True,  # no fp16 scaler on a CPU: nothing to tweak
    }))
    common = ["--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(shapes_dir), "--batch_size", "2",
              "--optimizer_config", str(optimizer_json), "--save_full_precision", "--save_single_file", "false",
              *FAST, "--log_step", "1"]
    straight = run_train([*common, "--max_steps", "6", "--logdir", "straight", "--run_name", "s"], cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "optimizer adamw (UNet) + lion (text encoder), each its own" in straight.stdout
    assert "Text encoder: layer 1 of 2, the embeddings frozen." in straight.stdout
    events = EventAccumulator(str(tmp_path / "straight" / "s" / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert [e.value for e in events.Scalars("lr/unet")] == pytest.approx([1e-4] * 6)
    cosine = [1e-5 * 0.5 * (1 + math.cos(math.pi * step / 4)) for step in range(1, 5)]
    assert [e.value for e in events.Scalars("lr/text_encoder")] == pytest.approx([*cosine, 0, 0], abs=1e-12)
    assert "grad_norm" not in events.Tags()["scalars"]

    first = run_train([*common, "--max_steps", "3", "--logdir", "split", "--save_optimizer"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (half,) = saved_paths(first.stdout)
    state = half / "training_state"
    assert {"optimizer.bin", "scheduler.bin"} <= {p.name for p in state.iterdir()}
    setup = json.loads((state / "trainer_state.json").read_text())["setup"]
    assert setup["optimizer"] == "adamw+lion" and setup["freezing"]["unfreeze_last_n_layers"] == 1
    assert setup["schedules"]["text_encoder"] == {"lr_scheduler": "cosine", "lr_warmup_steps": 0, "lr_decay_steps": 4}
    resumed = run_train([*common, "--max_steps", "6", "--logdir", "split", "--resume_state", "findlast"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stdout
    (end_straight,), (end_resumed,) = saved_paths(straight.stdout), saved_paths(resumed.stdout)
    for component, weights in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        a, b = load_file(end_straight / component / weights), load_file(end_resumed / component / weights)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), component
    base = load_file(tiny_model("sd1") / "text_encoder" / "model.safetensors")
    trained = load_file(end_straight / "text_encoder" / "model.safetensors")
    frozen, last = "encoder.layers.0.mlp.fc1.weight", "encoder.layers.1.mlp.fc1.weight"
    assert torch.equal(base[frozen], trained[frozen]) and not torch.equal(base[last], trained[last])


def test_a_training_state_records_each_models_schedule_and_older_states_still_read():
    from trainer.saves.resume import TrainerState, TrainingSetup, fixed_differences, honoured_changes

    older = TrainingSetup("sd1", "x", ("unet", "text_encoder"),
                          {"freeze_embeddings": False, "freeze_front_n_layers": -2, "freeze_final_layer_norm": False},
                          "adamw", False, {"unet": 1e-6, "text_encoder": 1e-6}, "constant", None, 100, 1)
    saved = TrainerState.from_json(TrainerState(5, 1, 5, 2, setup=older).to_json()).setup
    assert saved.freezing == {"unfreeze_last_n_layers": 2, "freeze_front_n_layers": None, "freeze_embeddings": False,
                              "freeze_final_layer_norm": False}  # as this version plans it, embeddings explicit
    unchanged = {"lr_scheduler": "constant", "lr_warmup_steps": None, "lr_decay_steps": None}
    now = dataclasses.replace(saved, optimizer="adamw+lion", schedules={
        "unet": unchanged, "text_encoder": {"lr_scheduler": "cosine", "lr_warmup_steps": 0, "lr_decay_steps": 50}})
    assert honoured_changes(saved, now, 2, 2) == ["lr_scheduler (text_encoder) constant -> cosine",
                                                  "lr_warmup_steps (text_encoder) default -> 0",
                                                  "lr_decay_steps (text_encoder) default -> 50"]
    assert fixed_differences(saved, {key: getattr(now, key) for key in TrainingSetup.FIXED}) == [
        "optimizer: adamw then, adamw+lion now"]
    both = dataclasses.replace(now, optimizer="adamw", schedules={"unet": {**unchanged, "lr_decay_steps": 80},
                                                                  "text_encoder": {**unchanged, "lr_decay_steps": 80}})
    assert honoured_changes(saved, both, 2, 2) == ["lr_decay_steps default -> 80"]


@pytest.mark.slow
def test_an_fp16_save_loads_and_generates_with_a_plain_from_pretrained(tiny_model, tmp_path):
    """`StableDiffusionPipeline.from_pretrained(save)`, no dtype: diffusers loads the UNet and VAE in fp32 whatever
    the files store, and transformers follows the text encoder's config, so the config must say fp32 for the two to
    meet; an explicit dtype still gives it everywhere. The weights stay fp16 on disk."""
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    models = load_models(str(tiny_model("sd1")))
    pipeline = sd_pipeline(models.unet, models.text_encoder, models.vae, models.tokenizer, models.sample_scheduler)
    modules = {"unet": models.unet, "vae": models.vae, "text_encoder": models.text_encoder}
    weights = component_weights(tiny_model("sd1"), modules, {"unet", "text_encoder"}, torch.float16)
    (save := tmp_path / "save").mkdir()
    write_model_folder(save, pipeline, weights)  # what a default (fp16) save writes
    with safe_open(save / "text_encoder" / "model.safetensors", "pt") as stored:
        assert stored.get_tensor(next(iter(stored.keys()))).dtype == torch.float16

    loaded = StableDiffusionPipeline.from_pretrained(save)
    loaded.set_progress_bar_config(disable=True)
    images = loaded("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np").images  # failed here: "mat1 and mat2 must have the same dtype"
    assert images.shape[0] == 1 and torch.isfinite(torch.from_numpy(images)).all()
    assert {loaded.unet.dtype, loaded.vae.dtype, loaded.text_encoder.dtype} == {torch.float32}

    half = StableDiffusionPipeline.from_pretrained(save, dtype=torch.float16)
    assert {half.unet.dtype, half.vae.dtype, half.text_encoder.dtype} == {torch.float16}


# ---------------------------------------------------------------- EMA across a resume


def test_place_emas_puts_each_ema_where_ema_device_says():
    from diffusers.training_utils import EMAModel

    from trainer.run.setup import place_emas

    params = [torch.nn.Parameter(torch.ones(3))]
    emas = [(EMAModel(params, decay=0.9), params)]
    place_emas(emas, TrainConfig(ema_device="cpu"), torch.device("meta"))  # "meta": a device that is not the CPU's
    assert emas[0][0].shadow_params[0].device.type == "cpu"
    place_emas(emas, TrainConfig(ema_device="gpu"), torch.device("meta"))
    assert emas[0][0].shadow_params[0].device.type == "meta"


@pytest.mark.slow
def test_a_resumed_run_puts_its_emas_back_on_their_device_after_the_state_loads(tiny_model, shapes_dir, tmp_path,
                                                                               monkeypatch):
    """accelerate loads the saved EMA onto the CPU, and EMAModel keeps what it is given: an EMA on a GPU must be put
    back there after loading, or its first update mixes devices (on a CPU both are the CPU: the order is checked)."""
    import trainer.run.setup as setup
    from tests.test_speed_paths import run_steps

    first = run_steps(tiny_model("sd1"), shapes_dir, tmp_path / "first", monkeypatch, steps=2, record=False,
                      ema_decay_rate=0.9, save_optimizer=True)
    events: list[str] = []
    real_load, real_place = setup.load_agreed, setup.place_emas

    def load(*args, **kwargs):
        events.append("state loaded")
        return real_load(*args, **kwargs)

    def place(emas, cfg, device):
        events.append(f"{len(emas)} EMA placed")
        real_place(emas, cfg, device)

    monkeypatch.setattr(setup, "load_agreed", load)
    monkeypatch.setattr(setup, "place_emas", place)
    run_steps(tiny_model("sd1"), shapes_dir, tmp_path / "second", monkeypatch, steps=4, record=False,
              ema_decay_rate=0.9, resume_state=str(first.saved))
    assert events == ["2 EMA placed", "state loaded", "2 EMA placed"], events  # the UNet's and the text encoder's
