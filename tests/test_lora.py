"""LoRA mode: the adapter file against diffusers' own loader on the tiny SD1, SD2 and SD2-v models, the config's
rules, and real `python train.py` LoRA runs (exact resume, lora_init, learning, refusals)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from convert.lora_kohya import adapter_file_problems, from_kohya, to_kohya
from tests.conftest import REPO_ROOT, run_train
from tests.test_loop import FAST, saved_paths
from trainer.adapters.lora import LoraSettings, adapter_weights, add_adapters, target_paths
from trainer.adapters.lora_file import file_tensors
from trainer.config.load import ConfigError, load_config
from trainer.tiny.model import TINY_FAMILIES, make_tiny_pipeline

LORA = ["--lora_rank", "4", "--lora_unet_lr", "1e-2", "--save_full_precision"]


def lora_files(output: str) -> list[Path]:
    return saved_paths(output, "Saved LoRA: ")


def adapted_pipeline(family: str, targets: str = "all", text_encoder: bool = True, seed: int = 0):
    """A tiny pipeline with adapters whose up factors are random (fresh ones are zero: no change to compare)."""
    pipe = make_tiny_pipeline(family)
    modules = {"unet": pipe.unet, **({"text_encoder": pipe.text_encoder} if text_encoder else {})}
    adapters = add_adapters(modules, LoraSettings(rank=4, alpha=2.0, dropout=0.0, targets=targets,
                                                  text_encoder=text_encoder))
    generator = torch.Generator().manual_seed(seed)
    for module in modules.values():
        for key, param in module.named_parameters():
            if ".lora_B." in key:
                param.data = torch.randn(param.shape, generator=generator) * 0.1
    return pipe, modules, adapters


def outputs(pipe, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(text-encoder states, UNet prediction) for fixed token ids, latents and timestep."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49407, (2, 77), generator=generator)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    with torch.no_grad():
        states = pipe.text_encoder(ids)[0]
        return states, pipe.unet(latents, torch.tensor([10, 700]), states).sample


def diffusers_loaded(family: str, path: Path, caplog) -> object:
    """A fresh base pipeline with the file applied by diffusers' load_lora_weights; its log must not report keys
    it could not place."""
    pipe = make_tiny_pipeline(family)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(path))
    assert not [r for r in caplog.records if "key" in r.getMessage().lower()], caplog.text
    return pipe


def lora_layers(module: torch.nn.Module) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {name for name, layer in module.named_modules() if isinstance(layer, LoraLayer)}


@pytest.mark.parametrize("family", [TINY_FAMILIES[0],
                                    *(pytest.param(f, marks=pytest.mark.slow) for f in TINY_FAMILIES[1:])])
@pytest.mark.slow
def test_diffusers_loads_the_file_onto_every_targeted_layer_with_the_same_outputs(family: str, tmp_path: Path,
                                                                                  caplog):
    pipe, modules, adapters = adapted_pipeline(family)
    expected = outputs(pipe)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float16, 3e-3)):
        path = tmp_path / f"{dtype}.safetensors"
        save_file(file_tensors(modules, adapters.settings, dtype), str(path))
        loaded = diffusers_loaded(family, path, caplog)
        # every targeted layer got its adapter (none missing) and no other layer did (diffusers raises on keys
        # it cannot rename, so none is left over either)
        assert lora_layers(loaded.unet) == set(adapters.targeted["unet"])
        assert lora_layers(loaded.text_encoder) == set(adapters.targeted["text_encoder"])
        for got, want in zip(outputs(loaded), expected):
            scale = want.abs().max().item()
            assert (got - want).abs().max().item() <= tolerance * scale, (family, dtype)


def test_fresh_adapters_leave_the_base_unchanged_and_train_alone():
    pipe = make_tiny_pipeline("sd1")
    before = outputs(pipe)
    adapters = add_adapters({"unet": pipe.unet}, LoraSettings(rank=4, alpha=4.0, dropout=0.0, targets="attn",
                                                              text_encoder=False))
    for got, want in zip(outputs(pipe), before):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    trainable = {k for k, p in pipe.unet.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in k or ".lora_B." in k for k in trainable)
    assert all(p.dtype == torch.float32 for k, p in pipe.unet.named_parameters() if k in trainable)
    blocks = sum(name.endswith("transformer_blocks.0") for name, _ in pipe.unet.named_modules())
    assert len(adapters.targeted["unet"]) == 4 * 2 * blocks  # q, k, v, out of attn1 and attn2 in each block


def test_the_memory_plan_counts_the_adapters_the_run_trains():
    from trainer.adapters.lora import adapter_count
    from trainer.preflight.activations import meta_models

    pipe, modules, adapters = adapted_pipeline("sd2", targets="all")
    trained = sum(p.numel() for m in modules.values() for p in m.parameters() if p.requires_grad)
    on_meta = meta_models(dict(pipe.unet.config), pipe.text_encoder.config.to_dict())
    assert adapter_count(dict(zip(("unet", "text_encoder"), on_meta)), 4, "all") == trained


@pytest.mark.slow  # a bf16 forward and backward of both models: seconds on a CPU
def test_the_frozen_base_is_held_in_the_compute_dtype_and_only_fp32_adapters_get_gradients(tmp_path: Path):
    from trainer.models.precision import component_dtypes

    cfg = load_config(["--data_root", str(tmp_path), "--lora_rank", "4", "--lora_text_encoder", "true"]).config
    dtypes = component_dtypes(cfg, "bf16")
    assert dtypes.unet == dtypes.text_encoder == dtypes.vae == torch.bfloat16
    pipe = make_tiny_pipeline("sd1")
    pipe.unet.to(dtypes.unet), pipe.text_encoder.to(dtypes.text_encoder)
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    add_adapters(modules, LoraSettings(4, 4.0, 0.0, "all", True))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        states = pipe.text_encoder(torch.randint(0, 49407, (1, 77)))[0]
        pipe.unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), states).sample.float().square().mean().backward()
    for module in modules.values():
        for key, param in module.named_parameters():
            if param.requires_grad:
                assert param.dtype == torch.float32 and param.grad is not None and param.grad.dtype == torch.float32
            else:
                assert param.dtype == torch.bfloat16 and param.grad is None, key
    assert any(p.grad.abs().sum() > 0 for p in pipe.unet.parameters() if p.requires_grad)


def test_target_sets_grow_from_attention_to_every_block_layer():
    unet = make_tiny_pipeline("sd1").unet
    attn, attn_ff, every = (set(target_paths(unet, "unet", t)) for t in ("attn", "attn_ff", "all"))
    assert attn < attn_ff < every
    assert {p.rsplit(".", 1)[-1] for p in attn_ff - attn} == {"proj", "2", "proj_in", "proj_out"}
    assert any(p.endswith("resnets.0.conv1") for p in every) and any("downsamplers" in p for p in every)
    assert not any(p.startswith(("conv_in", "conv_out", "time_embedding")) for p in every)


def test_kohya_names_round_trip_onto_the_modules():
    pipe, modules, adapters = adapted_pipeline("sd2", targets="all")
    weights = {name: adapter_weights(module) for name, module in modules.items()}
    tensors = {**to_kohya("unet", weights["unet"], 2.0, 4, torch.tensor),
               **to_kohya("text_encoder", weights["text_encoder"], 2.0, 4, torch.tensor)}
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in tensors)
    assert "lora_unet_down_blocks_0_resnets_0_conv_shortcut.lora_down.weight" not in tensors  # no such layer
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in tensors
    found = from_kohya(tensors, adapters.targeted)
    assert not found.unknown
    for name in modules:
        assert found.weights[name].keys() == weights[name].keys()
    conv = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
    assert conv.shape[0] == 4 and conv.shape[2:] == (3, 3)  # kohya's LoCon: the layer's kernel, rank channels out


def test_an_init_file_is_checked_from_its_header():
    shapes = {"lora_unet_a.lora_down.weight": (8, 32), "lora_unet_a.lora_up.weight": (32, 8),
              "lora_te_b.lora_down.weight": (8, 32)}
    problems = adapter_file_problems(shapes, {"lora_unet_a.alpha": 4.0}, rank=16, alpha=16.0, text_encoder=False)
    assert any("set lora_rank 8" in p for p in problems)
    assert any("set lora_alpha 4" in p for p in problems)
    assert any("lora_text_encoder" in p for p in problems)
    assert adapter_file_problems(shapes, {}, rank=8, alpha=8.0, text_encoder=True) == []
    assert "no kohya-format" in adapter_file_problems({"x": (1,)}, {}, 8, 8.0, True)[0]


def test_lora_keys_need_lora_rank_and_the_text_encoder_follows_lora_text_encoder(tmp_path: Path):
    data = ["--data_root", str(tmp_path)]
    with pytest.raises(ConfigError) as err:
        load_config([*data, "--lora_text_encoder", "true", "--lora_unet_lr", "1e-4"])
    assert "lora_unet_lr: got 0.0001" in str(err.value) and "lora_text_encoder" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config([*data, "--lora_rank", "8", "--lora_text_encoder", "true", "--disable_textenc_training", "true"])
    assert "disable_textenc_training" in str(err.value)
    assert load_config([*data, "--lora_rank", "8"]).config.disable_textenc_training is True
    assert load_config([*data, "--lora_rank", "8", "--lora_text_encoder", "true"]).config.disable_textenc_training \
        is False


# ---------------------------------------------------------------- real runs


def lora_run(tiny_model, data: Path, cwd: Path, *extra: str, family: str = "sd1") -> tuple[str, list[Path]]:
    result = run_train(["--resume_ckpt", str(tiny_model(family)), "--data_root", str(data), "--batch_size", "2",
                        *FAST, *LORA, *extra], cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, lora_files(result.stdout)


def state_adapters(save: Path) -> dict[str, torch.Tensor]:
    """The fp32 adapters a training state holds: the trained model's weights at the save, as they were in memory."""
    return load_file(save / "training_state" / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_a_run_saves_a_file_that_diffusers_applies_as_trained(family: str, tiny_model, shapes_dir: Path,
                                                              tmp_path: Path, caplog):
    stdout, files = lora_run(tiny_model, shapes_dir, tmp_path, "--max_steps", "4", "--save_optimizer",
                             "--lora_targets", "all", family=family)
    (file,) = files
    assert "adapters on" in stdout and "the base is frozen" in stdout
    with safe_open(str(file), "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_steps"] == "4" and meta["ss_resolution"] == "(64, 64)"
    assert meta["ss_base_model_version"] == ("sd_v1" if family == "sd1" else "sd_v2")
    assert meta["modelspec.prediction_type"] == ("v" if family == "sd2-v" else "epsilon")
    assert len(meta["ss_new_sd_model_hash"]) == 64 and meta["ss_unet_lr"] == "0.01"
    # the trained in-memory model: the base (tiny_model saved this same seeded pipeline) with the state's fp32
    # adapters, exactly as they were in memory when the save was made
    pipe = make_tiny_pipeline(family)
    add_adapters({"unet": pipe.unet}, LoraSettings(4, 4.0, 0.0, "all", False))
    missing, unexpected = pipe.unet.load_state_dict(state_adapters(file.parent), strict=False)
    assert not unexpected and not [k for k in missing if ".lora_" in k]
    want = outputs(pipe)[1]
    loaded = diffusers_loaded(family, file, caplog)
    assert lora_layers(loaded.unet) == lora_layers(pipe.unet)
    got = outputs(loaded)[1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert (want - outputs(make_tiny_pipeline(family))[1]).abs().max() > 1e-4  # training moved it: a real check


@pytest.mark.slow
def test_exact_resume_of_a_lora_run_with_ema_text_encoder_8bit_and_checkpointing(tiny_model, shapes_dir: Path,
                                                                                 tmp_path: Path):
    common = ["--lora_targets", "all", "--lora_text_encoder", "true", "--lora_text_encoder_lr", "5e-3",
              "--ema_decay_rate", "0.9", "--save_optimizer", "--optimizer", "adamw8bit",
              "--gradient_checkpointing", "true"]  # the memory savers work on adapters too
    _, straight = lora_run(tiny_model, shapes_dir, tmp_path, *common, "--max_steps", "6", "--logdir", "straight")
    _, first = lora_run(tiny_model, shapes_dir, tmp_path, *common, "--max_steps", "3", "--logdir", "split")
    state = first[0].parent / "training_state"
    assert sum(f.stat().st_size for f in state.iterdir()) < 4 * 2**20  # adapters and their moments, not the base
    stdout, resumed = lora_run(tiny_model, shapes_dir, tmp_path, *common, "--max_steps", "6", "--logdir", "split",
                               "--resume_state", str(first[0].parent))
    assert "Resumed from" in stdout
    for a, b in zip(straight, resumed):  # the model, then its EMA twin
        wa, wb = load_file(a), load_file(b)
        assert wa.keys() == wb.keys() and any(k.startswith("lora_te_") for k in wa)
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "dora", "loha", "lokr"])
def test_a_stop_signal_saves_the_adapters_with_their_training_state(kind: str, tiny_model, shapes_dir: Path,
                                                                    tmp_path: Path):
    import signal

    from tests.conftest import TrainProcess

    process = TrainProcess(["--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(shapes_dir), "--batch_size",
                            "2", *FAST, *LORA, "--lora_kind", kind, "--max_epochs", "500"], cwd=tmp_path)
    process.wait_for("Training SD1")
    time.sleep(3)
    process.signal_group(signal.SIGTERM)
    code, out, err = process.finish()
    assert code == 128 + signal.SIGTERM, err[-3000:]
    (file,) = lora_files(out)
    assert file.parent.name.startswith("interrupted-") and file.name == f"{file.parent.name}.safetensors"
    assert (file.parent / "training_state" / "trainer_state.json").is_file()
    assert f"Continue with --resume_state {file.parent}" in out


@pytest.mark.slow
def test_resume_refuses_another_rank_kind_and_base(tiny_model, shapes_dir: Path, tmp_path: Path):
    _, (file,) = lora_run(tiny_model, shapes_dir, tmp_path, "--max_steps", "2", "--save_optimizer")
    base = ["--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(shapes_dir), "--batch_size", "2", *FAST]
    other_rank = run_train([*base, "--lora_rank", "8", "--lora_unet_lr", "1e-2", "--max_steps", "4", "--resume_state",
                            str(file.parent)], cwd=tmp_path)
    assert other_rank.returncode == 2 and "lora" in other_rank.stderr and "Traceback" not in other_rank.stderr
    other_kind = run_train([*base, *LORA, "--lora_kind", "loha", "--max_steps", "4", "--resume_state",
                            str(file.parent), "--dry_run"], cwd=tmp_path)
    assert other_kind.returncode == 2 and '"kind": "loha"} now' in other_kind.stderr, other_kind.stderr[-2000:]
    other_base = run_train([*base, *LORA, "--max_steps", "4", "--resume_state", str(file.parent),
                            "--resume_ckpt", str(tiny_model("sd1", dtype="fp16"))], cwd=tmp_path)
    assert other_base.returncode != 0 and "base model" in other_base.stderr, other_base.stderr[-2000:]
    assert "Traceback" not in other_base.stderr


@pytest.mark.slow
def test_lora_init_starts_from_a_file_and_refuses_one_that_does_not_fit(tiny_model, shapes_dir: Path,
                                                                       tmp_path: Path):
    _, (file,) = lora_run(tiny_model, shapes_dir, tmp_path, "--max_steps", "3", "--logdir", "first")
    stdout, (again,) = lora_run(tiny_model, shapes_dir, tmp_path, "--max_steps", "1", "--lora_init", str(file),
                                "--lora_unet_lr", "1e-12", "--logdir", "second")
    assert "adapters of 48 layers loaded from lora_init" in stdout
    before, after = load_file(file), load_file(again)
    assert before.keys() == after.keys()
    for key in before:  # one step at lr 1e-12 leaves them where the file had them
        torch.testing.assert_close(after[key], before[key], rtol=1e-6, atol=1e-8, msg=key)
    wrong = run_train(["--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(shapes_dir), *FAST,
                       "--lora_rank", "8", "--lora_init", str(file), "--dry_run"], cwd=tmp_path)
    assert wrong.returncode == 2 and "set lora_rank 4" in wrong.stderr and "Traceback" not in wrong.stderr


@pytest.mark.slow
def test_a_lora_learns_to_tell_captions_apart(tiny_model, tmp_path: Path):
    """The full-mode learning test's measure (trainer/tiny/shapes.py caption_losses), on the base with the saved
    adapter file applied by diffusers."""
    from trainer.tiny.shapes import caption_losses, make_shapes_dataset

    start = tiny_model("sd1")
    own_before, other_before = caption_losses(start)
    data = make_shapes_dataset(tmp_path / "shapes", images_per_concept=16, size=64, seed=1)
    result = run_train(
        ["--resume_ckpt", str(start), "--data_root", str(data), "--resolution", "64", "--batch_size", "8",
         "--max_epochs", "80", "--lora_rank", "16", "--lora_targets", "all", "--lora_unet_lr", "3e-3",
         "--gradient_checkpointing", "false", "--mixed_precision", "no", "--zero_frequency_noise_ratio", "0",
         "--cond_dropout", "0", "--save_full_precision", "--num_workers", "0", "--logdir", "logs"],
        cwd=tmp_path, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    own, other = caption_losses(start, lora=lora_files(result.stdout)[-1])
    assert own < 0.5 * own_before, (own, own_before)
    assert other / own > 1.05, (own, other)


@pytest.mark.slow
def test_samples_and_validation_run_with_the_adapters_applied(tiny_model, shapes_dir: Path, tmp_path: Path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n", encoding="utf-8")
    stdout, _ = lora_run(tiny_model, shapes_dir, tmp_path, "--max_steps", "2", "--validation_split", "0.25",
                         "--sample_prompts", str(prompts), "--sample_steps", "1", "--ema_decay_rate", "0.9")
    assert "Validation loss at step 2" in stdout
    assert "Samples at step 1" in stdout and "Samples at step 2" in stdout
    assert len(list(tmp_path.rglob("samples/*gs00002*-ema*.png"))) >= 1  # the EMA adapters sampled too


def test_a_lora_save_given_as_the_base_model_says_how_to_use_it(tmp_path: Path):
    from trainer.models.ckpt_cache import cache_entry, not_found_message

    save = tmp_path / "last-myproj-ep01-gs00006"
    save.mkdir()
    (save / f"{save.name}.safetensors").write_bytes(b"")
    message = not_found_message(str(save), save, cache_entry(str(save)))
    assert "is a LoRA save" in message and f"--lora_init {save / save.name}.safetensors" in message
    assert "a name in" not in message  # an absolute path is never a ckpt_cache/ name


def test_the_shipped_defaults_train_in_full_mode():
    defaults = json.loads((REPO_ROOT / "train.json").read_text(encoding="utf-8"))
    assert defaults["lora_rank"] == 0 and defaults["lora_targets"] == "attn_ff"
