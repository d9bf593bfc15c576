"""Damaged and foreign model files meet a real `python train.py`: one message, exit 1, nothing written; and models
stored in fp16/bf16 train.

The catalogue below builds each fault from the tiny real models (a file cut short, json that does not parse, a
real tiny SDXL-like, unconditional, inpainting or mismatched component saved by diffusers itself); the fast
tier (tests/test_models.py) loads the same faults in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, UNet2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from convert import export_single_file
from convert.read import sidecar_yaml_path
from convert.to_diffusers import convert_vae
from tests.conftest import TrainProcess, run_train
from trainer.tiny.model import STORED_DTYPES, tiny_unet, tiny_vae

SMALL_RUN = ["--resolution", "64", "--batch_size", "2", "--max_steps", "2", "--mixed_precision", "no",
             "--gradient_checkpointing", "false", "--num_workers", "0", "--logdir", "logs"]
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


# ------------------------------------------------------------------------------------------ the faults


def truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def bad_json(path: Path) -> Path:
    text = path.read_text()
    path.write_text(text[: len(text) // 2])  # as a copy cut short leaves it
    return path


def replace_unet(model: Path, unet: torch.nn.Module) -> Path:
    shutil.rmtree(model / "unet")
    unet.save_pretrained(model / "unet")
    return model / "unet" / "config.json"


def unet_like_tiny(**changes) -> UNet2DConditionModel:
    """The tiny SD1 UNet with `changes` to its config, built (random weights) by diffusers."""
    # without the private keys: `_use_default_values` would put the defaults back over `changes`
    config = {k: v for k, v in tiny_unet("sd1").config.items() if not k.startswith("_")}
    return UNet2DConditionModel.from_config({**config, **changes})


def sdxl_like_unet(model: Path) -> Path:
    # SDXL's signature: size-and-time embeddings, 2048-wide cross-attention, deeper transformer blocks
    return replace_unet(model, unet_like_tiny(
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
        cross_attention_dim=2048, transformer_layers_per_block=[1, 2], down_block_types=["DownBlock2D",
        "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[1, 2]))


def unconditional_unet(model: Path) -> Path:
    return replace_unet(model, UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                           layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                           up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=32))


def no_cross_attention_unet(model: Path) -> Path:
    return replace_unet(model, unet_like_tiny(down_block_types=["DownBlock2D", "DownBlock2D"], mid_block_type=
                                              "UNetMidBlock2D", up_block_types=["UpBlock2D", "UpBlock2D"]))


def vae_with_16_latent_channels(model: Path) -> Path:
    """An SD3-like VAE beside an SD1 UNet."""
    shutil.rmtree(model / "vae")
    config = {k: v for k, v in tiny_vae().config.items() if not k.startswith("_")}
    AutoencoderKL.from_config({**config, "latent_channels": 16}).save_pretrained(model / "vae")
    return model / "unet" / "config.json"


# case -> (break a copy of the tiny SD1 folder in place and return the file the message must name, words it says)
FOLDER_FAULTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "truncated unet weights": (lambda m: truncate(m / UNET_WEIGHTS), "is truncated"),
    "truncated text encoder weights": (lambda m: truncate(m / "text_encoder" / "model.safetensors", 0.9),
                                       "is truncated"),
    "bad unet config.json": (lambda m: bad_json(m / "unet" / "config.json"), "is not valid json"),
    "bad model_index.json": (lambda m: bad_json(m / "model_index.json"), "is not valid json"),
    "bad scheduler_config.json": (lambda m: bad_json(m / "scheduler" / "scheduler_config.json"), "is not valid json"),
    "sdxl unet": (sdxl_like_unet, "describes an SDXL UNet"),
    "cross-attention width": (lambda m: replace_unet(m, unet_like_tiny(cross_attention_dim=768)),
                              "has cross_attention_dim 768, but the text encoder"),
    "UNet2DModel": (unconditional_unet, "describes a UNet2DModel (blocks"),
    "no cross-attention blocks": (no_cross_attention_unet, "describes a UNet without cross-attention blocks"),
    "inpainting unet": (lambda m: replace_unet(m, unet_like_tiny(in_channels=9)),
                        "Training inpainting models is not supported"),
    "latent channels": (vae_with_16_latent_channels, "makes latents of latent_channels 16"),
}


def pickle_named_safetensors(single: Path, folder: Path) -> Path:
    target = folder / "model.safetensors"
    torch.save({"state_dict": load_file(str(single))}, target)
    return target


def truncated_single_file(single: Path, folder: Path) -> Path:
    target = folder / "model.safetensors"
    shutil.copyfile(single, target)
    return truncate(target)


def truncated_ckpt(single: Path, folder: Path) -> Path:
    target = folder / "model.ckpt"
    torch.save({"state_dict": load_file(str(single))}, target)
    return truncate(target)


# case -> (write a broken single file into a folder from a good tiny one; returns it, words the message says)
FILE_FAULTS: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "pickle named .safetensors": (pickle_named_safetensors, "is named .safetensors but is a torch pickle"),
    "truncated .safetensors": (truncated_single_file, "is truncated"),
    "truncated .ckpt": (truncated_ckpt, "is truncated or damaged"),
}


def broken_folder(case: str, tiny: Path, where: Path) -> tuple[Path, Path, str]:
    """A copy of `tiny` at `where` with the fault `case`: (the model folder, the file named, what is said)."""
    shutil.copytree(tiny, where)
    make, says = FOLDER_FAULTS[case]
    return where, make(where), says


def broken_file(case: str, single: Path, folder: Path) -> tuple[Path, str]:
    """The single-file fault `case` written into `folder` from the good file `single` (and its yaml)."""
    folder.mkdir(parents=True, exist_ok=True)
    make, says = FILE_FAULTS[case]
    target = make(single, folder)
    shutil.copyfile(sidecar_yaml_path(single), sidecar_yaml_path(target))
    return target, says


# ----------------------------------------------------------------------------------------- slow tier


@pytest.fixture(scope="module")
def tiny_single_file(tiny_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("single")
    return export_single_file(tiny_model("sd1"), folder / "tiny.safetensors").checkpoint_path


def own_data(shapes_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the image set, so a test sees what its own run wrote there."""
    return Path(shutil.copytree(shapes_dir, tmp_path / "data", ignore=shutil.ignore_patterns(".latent_cache")))


def assert_refused(result, named: Path, says: str, cwd: Path, data: Path) -> None:
    assert result.returncode == 1, (result.stdout[-2000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    messages = [line for line in result.stderr.splitlines() if line.startswith("train.py: ")]
    assert len(messages) == 1, result.stderr[-3000:]
    assert str(named) in messages[0] and says in messages[0], messages[0]
    assert not (cwd / "logs").exists() and not (data / ".latent_cache").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", list(FOLDER_FAULTS))
def test_train_refuses_a_broken_model_folder(case, tiny_model, shapes_dir, tmp_path):
    model, named, says = broken_folder(case, tiny_model("sd1"), tmp_path / "model")
    data, cwd = own_data(shapes_dir, tmp_path), tmp_path / "run"
    cwd.mkdir()

    result = run_train(["--resume_ckpt", str(model), "--data_root", str(data), *SMALL_RUN], cwd)

    assert_refused(result, named, says, cwd, data)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(FILE_FAULTS))
def test_train_refuses_a_broken_single_file(case, tiny_single_file, shapes_dir, tmp_path):
    checkpoint, says = broken_file(case, tiny_single_file, tmp_path / "models")
    data, cwd = own_data(shapes_dir, tmp_path), tmp_path / "run"
    cwd.mkdir()

    result = run_train(["--resume_ckpt", str(checkpoint), "--data_root", str(data), *SMALL_RUN], cwd)

    assert_refused(result, checkpoint, says, cwd, data)
    assert not (cwd / "ckpt_cache").exists()  # refused before a conversion began


# ------------------------------------------------------------------------------ any stored dtype trains


def saved_unet_differs(stdout: str, base: Path) -> bool:
    (saved,) = [Path(line.split("Saved model: ", 1)[1].strip()) for line in stdout.splitlines()
                if "Saved model: " in line]
    after, before = load_file(str(saved / UNET_WEIGHTS)), load_file(str(base / UNET_WEIGHTS))
    assert after.keys() == before.keys()
    return any(not torch.equal(after[k].float(), before[k].float()) for k in after)


TRAIN_FULL = [*SMALL_RUN, "--cache_latents", "false", "--save_single_file", "false", "--save_full_precision",
              "--lr", "1e-4"]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_a_half_precision_folder_trains(dtype, tiny_model, shapes_dir, tmp_path):
    base = tiny_model("sd1", dtype)
    assert load_file(str(base / UNET_WEIGHTS))["conv_in.weight"].dtype != torch.float32

    result = run_train(["--resume_ckpt", str(base), "--data_root", str(shapes_dir), *TRAIN_FULL], tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    assert saved_unet_differs(result.stdout, base)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_a_half_precision_single_file_trains(dtype, tiny_model, shapes_dir, tmp_path):
    base = tiny_model("sd1", dtype)
    checkpoint = export_single_file(base, tmp_path / "models" / f"tiny-{dtype}.safetensors").checkpoint_path
    run = tmp_path / "run"
    run.mkdir()

    result = run_train(["--resume_ckpt", str(checkpoint), "--data_root", str(shapes_dir), *TRAIN_FULL], run)

    assert result.returncode == 0, result.stderr[-3000:]
    converted = load_file(str(run / "ckpt_cache" / f"tiny-{dtype}" / UNET_WEIGHTS))
    assert converted["conv_in.weight"].dtype == STORED_DTYPES[dtype]  # the converter keeps the file's dtype
    assert saved_unet_differs(result.stdout, base)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_a_half_precision_hub_model_trains(dtype, hub_server, tiny_model, shapes_dir, tmp_path):
    hub = hub_server()
    base = tiny_model("sd1", dtype)
    hub.add_repo(f"owner/tiny-{dtype}", base)

    result = run_train(["--resume_ckpt", f"owner/tiny-{dtype}", "--data_root", str(shapes_dir), *TRAIN_FULL],
                       tmp_path, env=hub.client_env(tmp_path / "hf_home"))

    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Model source: Hugging Face repo owner/tiny-{dtype}" in result.stdout
    assert saved_unet_differs(result.stdout, base)


@pytest.mark.slow
def test_frozen_parts_held_in_bf16_train_sample_validate_and_save_as_stored(tiny_model, shapes_dir, tmp_path):
    """bf16 mixed precision holds the frozen VAE and text encoder in bf16 (on a CPU too): the loop encodes pixels
    with it (no latent cache), validation and samples run with it, and the save keeps the files' own fp32
    values for the frozen parts, not their bf16 copies."""
    base = tiny_model("sd1")
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    result = run_train(["--resume_ckpt", str(base), "--data_root", str(shapes_dir), *TRAIN_FULL,
                        "--mixed_precision", "bf16", "--disable_textenc_training", "--validation_split", "0.25",
                        "--sample_prompts", "prompts.txt"], tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    assert "precision bf16" in result.stdout and "Validation loss at step 2" in result.stdout
    assert "Samples at step 2" in result.stdout and "Warning" not in result.stdout
    (saved,) = [Path(line.split("Saved model: ", 1)[1].strip()) for line in result.stdout.splitlines()
                if "Saved model: " in line]
    for weights in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        stored, kept = load_file(str(base / weights)), load_file(str(saved / weights))
        assert kept.keys() == stored.keys() and all(torch.equal(kept[k], stored[k]) for k in stored), weights
    assert saved_unet_differs(result.stdout, base)


def same_size_other_vae(vae_file: Path, to: Path) -> None:
    """At `to`, another VAE of `vae_file`'s shapes, dtype and byte size: every value moved (as a VAE fine-tuned
    from it would be), the header the same."""
    with safe_open(str(vae_file), "pt") as stored:
        metadata = stored.metadata()
    save_file({k: v + 1 for k, v in load_file(str(vae_file)).items()}, str(to), metadata=metadata)
    assert to.stat().st_size == vae_file.stat().st_size


def renamed_over(vae_file: Path, other: Path) -> None:
    """As rsync -a replaces a file: a temporary beside it, given the old file's times, renamed over it."""
    stat = vae_file.stat()
    os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(other, vae_file)


def overwritten_in_place(vae_file: Path, other: Path) -> None:
    """As cp -p or rsync -a --inplace: the same file written over, its modification time put back."""
    stat = vae_file.stat()
    with open(vae_file, "r+b") as file:
        file.write(other.read_bytes())
    os.utime(vae_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.slow
@pytest.mark.parametrize("replace", [renamed_over, overwritten_in_place], ids=["renamed over", "overwritten in place"])
def test_a_vae_file_replaced_during_the_run_keeps_its_size_and_time_and_the_saves_hold_the_vae_the_run_used(
        replace, tiny_model, shapes_dir, tmp_path):
    """The base model's VAE file is replaced while the run trains by another of the same size, with its
    modification time put back (as rsync -a and cp -p do). The save and its single file hold the VAE the run
    loaded: renamed over, the file as loaded, bit for bit in its stored fp32 (the run held it open); overwritten
    in place, the VAE as the run held and used it, in bf16. Either is said in one line."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model("sd1"), model)
    vae_file = model / "vae" / "diffusion_pytorch_model.safetensors"
    loaded = {k: v.clone() for k, v in load_file(str(vae_file)).items()}  # not memory-mapped: the file will change
    same_size_other_vae(vae_file, model / "vae" / ".new.safetensors")
    run = TrainProcess(["--resume_ckpt", str(model), "--data_root", str(shapes_dir), *SMALL_RUN, "--max_steps",
                        "100000", "--mixed_precision", "bf16", "--save_full_precision"], cwd=tmp_path)
    run.wait_for("First step done")
    replace(vae_file, model / "vae" / ".new.safetensors")
    run.signal_group(signal.SIGTERM)
    code, out, err = run.finish()

    assert code == 143, err[-3000:]
    warnings = [line[line.index("Warning: "):] for line in err.splitlines() if "Warning: " in line]
    if replace is renamed_over:  # the file the run loaded is still open, whatever its path names now
        expected = loaded
        said = ("were replaced or deleted during the run; saves keep the vae files the run loaded, unchanged (held "
                "open since loading), not the new ones.")
    else:  # the file the run loaded is gone: what it used is its bf16 copy in memory
        expected = {k: v.bfloat16().float() for k, v in loaded.items()}
        said = ("changed on disk during the run; saves keep the vae the run loaded and used, from memory (bfloat16), "
                "instead of reading those files.")
    assert warnings == [f"Warning: the vae files of {model} {said}"]
    (saved,) = [Path(line.split("Saved model: ", 1)[1].strip()) for line in out.splitlines() if "Saved model: " in line]
    kept = load_file(str(saved / "vae" / "diffusion_pytorch_model.safetensors"))
    assert kept.keys() == expected.keys()
    assert all(torch.equal(kept[k], expected[k]) for k in expected)
    single = convert_vae(load_file(str(saved.with_name(saved.name + ".safetensors"))),
                         json.loads((saved / "vae" / "config.json").read_text()))
    assert single.keys() == expected.keys()
    assert all(torch.equal(single[k].reshape(expected[k].shape), expected[k]) for k in expected)


# ------------------------------------------------------------------------- where the base model is written


MOVE_CACHE = ("set ckpt_cache_dir (in train.json, or --ckpt_cache_dir DIR) or the environment variable CKPT_CACHE_DIR "
              "to a writable folder")


@pytest.mark.slow
def test_a_ckpt_cache_that_cannot_take_the_conversion_is_refused_before_any_model(tiny_single_file, shapes_dir,
                                                                                  small_disk, tmp_path):
    cwd = tmp_path / "run"
    cwd.mkdir()
    (cwd / "ckpt_cache").write_text("not a folder")
    read_only = small_disk("ro", "1m", read_only=True)
    args = ["--resume_ckpt", str(tiny_single_file), "--data_root", str(shapes_dir), *SMALL_RUN]

    for env, says in (({"CKPT_CACHE_DIR": ""}, "the ckpt_cache folder ckpt_cache is a file, not a folder"),
                      ({"CKPT_CACHE_DIR": str(read_only / "cache")},
                       f"the ckpt_cache folder {read_only / 'cache'} cannot be written: Read-only file system")):
        result = run_train(args, cwd, env=env)

        assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-3000:])
        assert "Traceback" not in result.stderr and "Model:" not in result.stdout  # nothing was loaded
        assert says in result.stderr and MOVE_CACHE in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
def test_ckpt_cache_dir_moves_the_conversion_and_the_names_looked_up(tiny_single_file, shapes_dir, tmp_path):
    cwd, converted = tmp_path / "run", tmp_path / "converted"
    cwd.mkdir()
    (cwd / "ckpt_cache").write_text("not a folder")  # the default place cannot be used
    env = {"CKPT_CACHE_DIR": str(converted)}

    first = run_train(["--resume_ckpt", str(tiny_single_file), "--data_root", str(shapes_dir), *TRAIN_FULL], cwd,
                      env=env)
    by_name = run_train(["--resume_ckpt", "tiny", "--data_root", str(shapes_dir), *TRAIN_FULL], cwd, env=env)

    assert first.returncode == 0, first.stderr[-3000:]
    assert f"Model: ckpt_cache is {converted} (set by CKPT_CACHE_DIR)" in first.stdout
    assert f"Model: converting {tiny_single_file} into {converted / 'tiny'} (first use)" in first.stdout
    assert by_name.returncode == 0, by_name.stderr[-3000:]
    assert f"Model source: ckpt_cache entry {converted / 'tiny'}" in by_name.stdout


@pytest.mark.slow
def test_a_mistyped_local_path_is_refused_before_any_model_and_asks_the_hub_nothing(hub_server, shapes_dir, tmp_path):
    hub = hub_server()
    cwd = tmp_path / "run"
    (cwd / "models" / "sd1").mkdir(parents=True)

    result = run_train(["--resume_ckpt", "models/sd1x", "--data_root", str(shapes_dir), *SMALL_RUN], cwd,
                       env=hub.client_env(tmp_path / "hf_home"))

    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr and hub.requests == []
    assert "There is no local folder or file models/sd1x. Near matches: models/sd1. If you meant the Hugging Face " \
           "repo models/sd1x, ask for the Hub explicitly: --resume_ckpt hf://models/models/sd1x." in result.stderr


@pytest.mark.slow
def test_with_no_network_a_run_fails_after_one_hub_request_and_says_so(hub_server, shapes_dir, tmp_path):
    env = {**hub_server().client_env(tmp_path / "hf_home"), "HF_ENDPOINT": "http://hub.invalid"}  # never resolves

    result = run_train(["--resume_ckpt", "owner/tiny", "--data_root", str(shapes_dir), *SMALL_RUN], tmp_path, env=env)

    assert result.returncode == 1, (result.stdout[-2000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr and "Retrying" not in result.stderr  # the client logs each retry
    (message,) = [line for line in result.stderr.splitlines() if line.startswith("train.py: ")]
    assert message.startswith("train.py: a request to the Hugging Face Hub for owner/tiny at http://hub.invalid could "
                              "not connect (ConnectError: "), message
