"""The adapter kinds beside LoRA (`lora_kind` dora, loha, lokr: peft's layers), on tiny real models: each kind's file
in LyCORIS's names, read back exactly (lora_init) and fused by peft's layers (utils/merge_lora.py, utils/generate.py)
into the weights the trained model has; real `python train.py` runs of each kind (EMA, the text encoder, exact
resume, the merge and generate tools on what they saved); the memory plan's count of their parameters.
diffusers' loader takes LoRA files only (tests/test_lora.py holds it to the trained outputs); for the others, what it
does is checked here too, so that docs/LORA.md's word on it stays true."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.conftest import NAMED_TOKEN, run_train
from tests.test_loop import FAST, saved_paths
from tests.test_lora import LORA, lora_files, outputs
from trainer.adapters.embedding_file import TENSOR
from trainer.adapters.lora import LoraSettings, adapter_count, adapter_parameters, add_adapters, target_paths
from trainer.adapters.lora_file import file_tensors, fuse_adapter_file, load_found, read_adapter_file
from trainer.tiny.model import make_tiny_pipeline

KINDS = ("dora", "loha", "lokr")
# what each kind's file holds per module, in LyCORIS's names (a LoKr's w2 is full or two factors, by layer size)
FILE_PARTS = {"dora": {"lora_down.weight", "lora_up.weight", "dora_scale", "alpha"},
              "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
              "lokr": {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}}


def trained_like(family: str, kind: str, rank: int = 4, alpha: float = 2.0, factor: int = -1):
    """A tiny pipeline with `kind` adapters on every layer lora_targets `all` names, UNet and text encoder, moved off
    their start (which is the base's outputs) by random steps. Returns (pipe, modules, adapters)."""
    pipe = make_tiny_pipeline(family)
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    adapters = add_adapters(modules, LoraSettings(rank, alpha, 0.0, "all", True, kind, factor))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in modules.values():
            for param in adapter_parameters(module):
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return pipe, modules, adapters


def assert_outputs_equal(got, want, base) -> None:
    for g, w, b in zip(got, want, base):
        assert (w - b).abs().max() > 1e-3  # the adapters change the outputs: the comparison has teeth
        torch.testing.assert_close(g, w, rtol=0, atol=2e-5 * w.abs().max().item())


@pytest.mark.parametrize("family", ["sd1", pytest.param("sd2", marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", KINDS)
def test_a_file_of_each_kind_reads_back_exactly_and_fuses_into_the_trained_weights(kind: str, family: str,
                                                                                    tmp_path: Path):
    pipe, modules, adapters = trained_like(family, kind, rank=4, alpha=2.0)
    settings = adapters.settings
    want, base = outputs(pipe), outputs(make_tiny_pipeline(family))
    path = tmp_path / f"{kind}.safetensors"
    save_file(file_tensors(modules, settings, torch.float32), str(path))
    tensors = load_file(str(path))
    modules_in_file = {key.partition(".")[0] for key in tensors}
    assert len(modules_in_file) == sum(len(paths) for paths in adapters.targeted.values())
    for name in modules_in_file:  # LyCORIS's names, as ComfyUI, AUTOMATIC1111 and LyCORIS read them
        parts = {key.partition(".")[2] for key in tensors if key.startswith(name + ".")}
        assert parts <= FILE_PARTS[kind] and "alpha" in parts, (name, parts)
    if kind == "dora":  # each input column's magnitude, (1, in[, 1, 1]): the layout the UIs merge by that norm
        down = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"]
        assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.dora_scale"].shape == (1, down.shape[1], 1, 1)
        q = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
        assert tensors[f"{q}.dora_scale"].shape == (1, tensors[f"{q}.lora_down.weight"].shape[1])

    # lora_init: a run's fresh adapters of the same settings take the file's values exactly
    again = make_tiny_pipeline(family)
    fresh = {"unet": again.unet, "text_encoder": again.text_encoder}
    adapters = add_adapters(fresh, settings)
    load_found(read_adapter_file(path, adapters.targeted), fresh, settings)
    for name in modules:
        trained, loaded = modules[name].state_dict(), fresh[name].state_dict()
        for key in trained:
            assert torch.equal(trained[key], loaded[key]), key

    # utils/merge_lora.py's and generate.py's way: fused into a plain model by peft's layers of the kind
    plain = make_tiny_pipeline(family)
    assert fuse_adapter_file(tensors, {"unet": plain.unet, "text_encoder": plain.text_encoder}, 1.0) == \
        len(modules_in_file)
    assert not any(type(layer).__module__.startswith("peft") for layer in plain.unet.modules())
    assert_outputs_equal(outputs(plain), want, base)


def test_dora_starts_at_the_base_and_trains_its_magnitudes_as_the_readers_merge_them():
    """Fresh DoRA adapters leave every output exactly the base's; the magnitudes get gradients; a layer's output is
    that of the weight AUTOMATIC1111 and ComfyUI merge from its file: (W + dW) * m / ||W + dW|| per input column."""
    pipe = make_tiny_pipeline("sd1")
    base = outputs(make_tiny_pipeline("sd1"))
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    add_adapters(modules, LoraSettings(4, 2.0, 0.0, "all", True, "dora"))
    assert all(torch.equal(a, b) for a, b in zip(outputs(pipe), base))
    layer = pipe.unet.get_submodule("down_blocks.0.resnets.0.conv1")
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.1)
        layer.dora_scale["default"].mul_(1.5)
    x = torch.randn(1, layer.get_base_layer().in_channels, 8, 8)
    layer(x).square().sum().backward()
    assert layer.dora_scale["default"].grad.abs().min() > 0
    w, dw = layer.get_base_layer().weight, layer.get_delta_weight("default")
    norms = (w + dw).transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(1, -1, 1, 1)  # AUTOMATIC1111's
    merged = (w + dw) * layer.dora_scale["default"] / norms
    expected = torch.nn.functional.conv2d(x, merged, layer.get_base_layer().bias, padding=1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_lokr_of_full_factors_carries_its_scale_and_another_factor_splits_otherwise(tmp_path: Path):
    """Where both LoKr factors are full (a rank at least half their sizes), readers apply no alpha / rank: the file's
    w2 carries it. lokr_factor chooses the split, which a file records in its shapes."""
    pipe, modules, adapters = trained_like("sd1", "lokr", rank=64, alpha=16.0)
    tensors = file_tensors(modules, adapters.settings, torch.float32)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{name}.lokr_w1", f"{name}.lokr_w2"} <= tensors.keys() and f"{name}.lokr_w2_a" not in tensors
    layer = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    torch.testing.assert_close(tensors[f"{name}.lokr_w2"], layer.lokr_w2["default"] * 16 / 64)
    plain = make_tiny_pipeline("sd1")
    fuse_adapter_file(tensors, {"unet": plain.unet, "text_encoder": plain.text_encoder}, 1.0)
    assert_outputs_equal(outputs(plain), outputs(pipe), outputs(make_tiny_pipeline("sd1")))
    _, split, _ = trained_like("sd1", "lokr", factor=4)
    w1 = split["unet"].get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q").lokr_w1["default"]
    assert w1.shape == (4, 4)  # 32 = 4 x 8 on each side


@pytest.mark.parametrize("kind", ["lora", *KINDS])
def test_the_memory_plan_counts_each_kinds_parameters_as_peft_makes_them(kind: str):
    for factor in (-1, 4) if kind == "lokr" else (-1,):
        pipe = make_tiny_pipeline("sd1")
        modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
        counted = adapter_count(modules, 4, "all", kind, factor)
        add_adapters(modules, LoraSettings(4, 4.0, 0.0, "all", True, kind, factor))
        assert counted == sum(p.numel() for m in modules.values() for p in adapter_parameters(m)), (kind, factor)


def test_the_memory_plan_holds_what_each_kind_keeps_for_backward(tiny_model):
    """LoHa and LoKr keep each adapted layer's built update (weight-sized), DoRA the layers' outputs (growing with the
    batch); checkpointing keeps one region's at a time. LoRA adds nothing of its own."""
    from trainer.preflight.memory import KIND_EXTRA, Settings, model_params_on_disk, plan_memory

    model = model_params_on_disk(str(tiny_model("sd1")))
    base = Settings(batch=2, resolution=64, precision="no", optimizer="adamw", gradient_checkpointing=False,
                    train_text_encoder=False, lora_rank=4, lora_targets="all", lora_text_encoder=True, gpu=False)
    pipe = make_tiny_pipeline("sd1")
    weights = sum(layer.weight.numel() for name, module in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder))
                  for path in target_paths(module, name, "all") for layer in [module.get_submodule(path)])
    assert not set(KIND_EXTRA.values()) & set(plan_memory(model, base).parts)
    for kind in ("loha", "lokr"):
        assert plan_memory(model, dataclasses.replace(base, lora_kind=kind)).parts[KIND_EXTRA[kind]] == weights * 4
    dora = dataclasses.replace(base, lora_kind="dora")
    kept = plan_memory(model, dora).parts[KIND_EXTRA["dora"]]
    assert plan_memory(model, dataclasses.replace(dora, batch=4)).parts[KIND_EXTRA["dora"]] == 2 * kept
    checkpointed = dataclasses.replace(dora, gradient_checkpointing=True)
    assert 0 < plan_memory(model, checkpointed).parts[KIND_EXTRA["dora"]] < kept


def test_diffusers_loads_none_of_the_other_kinds_as_trained(tmp_path: Path):
    """docs/LORA.md sends DoRA, LoHa and LoKr files to the merge tool: diffusers' SD loader drops a DoRA file's
    magnitudes (what it loads is another model) and cannot place LyCORIS's tensors."""
    for kind in KINDS:
        trained, modules, adapters = trained_like("sd1", kind)
        path = tmp_path / f"{kind}.safetensors"
        save_file(file_tensors(modules, adapters.settings, torch.float32), str(path))
        pipe = make_tiny_pipeline("sd1")
        if kind == "dora":
            pipe.load_lora_weights(str(path))
            got, want = outputs(pipe)[1], outputs(trained)[1]
            assert (got - want).abs().max() > 1e-2 * want.abs().max()
        else:
            with pytest.raises(Exception):  # noqa: B017  (its own errors differ by version; any refusal will do)
                pipe.load_lora_weights(str(path))


# ---------------------------------------------------------------- real runs


def kind_run(tiny_model, data: Path, cwd: Path, kind: str, *extra: str) -> tuple[str, list[Path]]:
    result = run_train(["--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(data), "--batch_size", "2",
                        *FAST, *LORA, "--lora_kind", kind, "--lora_targets", "all", "--lora_text_encoder", "true",
                        "--lora_text_encoder_lr", "5e-3", "--ema_decay_rate", "0.9", "--save_optimizer", *extra],
                       cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, lora_files(result.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_a_run_of_each_kind_resumes_exactly_and_its_file_merges_and_generates_as_trained(
        kind: str, tiny_model, shapes_dir: Path, tmp_path: Path):
    from PIL import Image

    from trainer.models.load import load_models
    from utils import generate, merge_lora

    stdout, straight = kind_run(tiny_model, shapes_dir, tmp_path, kind, "--max_steps", "4", "--logdir", "straight")
    assert f"{ {'dora': 'DoRA', 'loha': 'LoHa', 'lokr': 'LoKr'}[kind]} rank 4" in stdout
    _, first = kind_run(tiny_model, shapes_dir, tmp_path, kind, "--max_steps", "2", "--logdir", "split")
    _, resumed = kind_run(tiny_model, shapes_dir, tmp_path, kind, "--max_steps", "4", "--logdir", "split",
                          "--resume_state", str(first[0].parent))
    for a, b in zip(straight, resumed, strict=True):  # the adapters, then their EMA twin
        wa, wb = load_file(a), load_file(b)
        assert wa.keys() == wb.keys() and any(k.startswith("lora_te_") for k in wa)
        assert all(torch.equal(wa[key], wb[key]) for key in wa), a
    file = straight[0]
    with safe_open(str(file), "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_network_dim"] == "4"
    assert ('"algo": "lora"' if kind == "dora" else f'"algo": "{kind}"') in meta["ss_network_args"]

    # the trained model: the base with the run's fp32 adapters (save_full_precision: the file holds them exactly),
    # against the merge tool's folder
    pipe = make_tiny_pipeline("sd1")
    modules = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    adapters = add_adapters(modules, LoraSettings(4, 4.0, 0.0, "all", True, kind))
    load_found(read_adapter_file(file, adapters.targeted), modules, adapters.settings)
    assert merge_lora.main(["--base", str(tiny_model("sd1")), "--lora", str(file), "--out", str(tmp_path / "m"),
                            "--full_precision"]) == 0
    merged, plain = load_models(str(tmp_path / "m")), load_models(str(tiny_model("sd1")))
    assert_outputs_equal(outputs(merged), outputs(pipe), outputs(plain))

    common = ["--model", str(tiny_model("sd1")), "--prompt", "a red circle", "--steps", "2", "--seed", "3"]
    images = {}
    for name, lora in (("plain", []), ("zero", ["--lora", f"{file}:0"]), ("full", ["--lora", str(file)])):
        assert generate.main([*common, *lora, "--out", str(tmp_path / f"{name}.png")]) == 0
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png")).astype(int)
    assert np.array_equal(images["zero"], images["plain"])
    assert np.abs(images["full"] - images["plain"]).max() > 0


@pytest.mark.slow
def test_lora_init_of_another_kind_is_refused_before_the_model_loads(tiny_model, shapes_dir: Path, tmp_path: Path):
    _, modules, adapters = trained_like("sd1", "loha")
    path = tmp_path / "loha.safetensors"
    save_file(file_tensors(modules, adapters.settings, torch.float16), str(path))
    result = run_train(["--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(shapes_dir), *FAST,
                        "--lora_rank", "4", "--lora_alpha", "2", "--lora_init", str(path), "--dry_run"], cwd=tmp_path)
    assert result.returncode == 2 and "it holds loha adapters and lora_kind is lora: set lora_kind loha" in \
        result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", *KINDS])
def test_two_processes_train_each_kind_as_one_process_at_twice_the_batch(kind: str, tiny_model, named_shapes: Path,
                                                                          tmp_path: Path):
    """accelerate launch with two CPU processes at batch 2 against one at batch 4: the same adapters (and, in the
    LoRA case, pivotal tuning's embedding rows beside them), to fp32 rounding."""
    from tests.test_distributed import LINEAR_ADAM, launch_two

    optimizer = tmp_path / "optimizer.json"  # Adam with a large epsilon: fp32 rounding is not magnified
    optimizer.write_text(json.dumps(LINEAR_ADAM), encoding="utf-8")
    pivotal = ["--embedding_token", NAMED_TOKEN, "--embedding_vectors", "2", "--embedding_lr", "5"] if kind == "lora" else []
    common = ["--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(named_shapes), *FAST, *LORA,
              "--lora_kind", kind, "--lora_text_encoder", "true", "--lora_targets", "all", "--cond_dropout", "0",
              "--flip_p", "0", "--optimizer_config", str(optimizer), "--max_steps", "3", *pivotal]
    one = run_train([*common, "--batch_size", "4", "--logdir", "one"], cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch_two([*common, "--batch_size", "2", "--logdir", "two"], cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "Weights agree on all 2 processes at step 3" in two.stdout
    (a,), (b,) = lora_files(one.stdout), lora_files(two.stdout)
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    zero_at_start = [v for k, v in wa.items() if k.endswith((".lora_up.weight", ".hada_w2_b", ".lokr_w1"))]
    assert max(v.abs().max().item() for v in zero_at_start) > 1e-5  # they trained (LoHa 5e-5): agreeing means something
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-5, atol=1e-7, msg=key)
    if pivotal:
        (ea,), (eb,) = saved_paths(one.stdout, "Saved embedding: "), saved_paths(two.stdout, "Saved embedding: ")
        rows = load_file(str(ea))[TENSOR]
        pipe = make_tiny_pipeline("sd1")
        (circle,) = pipe.tokenizer("circle", add_special_tokens=False).input_ids
        assert (rows - pipe.text_encoder.get_input_embeddings().weight[circle].detach()).abs().min() > 1e-4
        torch.testing.assert_close(rows, load_file(str(eb))[TENSOR], rtol=1e-5, atol=1e-7)
