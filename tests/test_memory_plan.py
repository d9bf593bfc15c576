"""The memory plan (trainer/preflight/memory.py, trainer/preflight/activations.py): its arithmetic by hand, its trace against a
real forward pass, the model read from files without loading it, its advice, and the dry run that prints it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import run_train
from trainer.preflight.activations import ActivationProfile, SavedTensor, trace
from trainer.preflight.memory import (
    CONTEXT_TOKENS,
    GIB,
    RUNTIME_BYTES,
    ModelParams,
    Settings,
    advice,
    model_params_of,
    model_params_on_disk,
    plan_memory,
    replay,
)


def hand_profile() -> ActivationProfile:
    """Five ops; op 2 to 4 a checkpointed region whose input (40 bytes) enters at op 2."""
    return ActivationProfile(
        saved=[SavedTensor(100, 1, None, True), SavedTensor(1000, 2, 0, True), SavedTensor(50, 3, 0, False),
               SavedTensor(300, 5, None, True)],
        regions=[(2, 4)], region_inputs=[(0, 40, 2)], params_last_use=[(1, 10), (3, 20), (5, 5)], ops=5,
        weight_copies=50,
    )


def test_replay_without_checkpointing_by_hand():
    # batch 2: per-sample tensors double, the weight copy (50) does not: 200 + 2000 + 50 + 600 at the forward's end
    # (autocast's cache, 50 in all, holds no more than backward keeps);
    # backward's first op (5) adds its gradient (5 x 4 bytes) before freeing what op 5 saved
    assert replay(hand_profile(), batch=2, checkpointing=False, fused_backward=False) == (2850, 2870)
    # fused: no gradient is ever held
    assert replay(hand_profile(), batch=2, checkpointing=False, fused_backward=True) == (2850, 2850)


def test_replay_adds_backwards_transients_by_hand():
    # op 5's gradients of its output and input (30 bytes a sample) live for a moment beside what op 5 kept: the
    # 2870 at op 5 (above) + 2 x 30; a plain attention matrix of 100 bytes a sample at op 3 adds two more there:
    # 2850 - 600 + 20 x 4 (op 3's gradient) = 2350 held, + 2 x 2 x 100
    transients = dataclasses.replace(hand_profile(), gradient_work=[(5, 30)], attention_matrices=[(3, 100)])
    assert replay(transients, batch=2, checkpointing=False, fused_backward=False) == (2850, 2930)
    bigger = dataclasses.replace(transients, attention_matrices=[(3, 200)])
    assert replay(bigger, batch=2, checkpointing=False, fused_backward=False) == (2850, 2350 + 800)


def test_replay_with_checkpointing_by_hand():
    # forward: outside tensors 200 + 600, region input 2 x 40, and autocast's cached weight copy 50 = 930;
    # backward at op 3: outside 200 + input 80 + gradients 20 + 80, and the region recomputed: 2000 + 50 = 2430
    assert replay(hand_profile(), batch=2, checkpointing=True, fused_backward=False) == (930, 2430)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["fused", "plain"])
def test_trace_counts_what_a_real_forward_keeps(tiny_model, attention: str):
    """The meta-device trace equals the bytes autograd really keeps in a real fp32 forward on the CPU: with the
    CPU's fused attention kernel (which keeps what a GPU's flash kernel keeps), and with the plain kernel that
    `deterministic` runs on a GPU, whose attention matrices the trace must count."""
    from bench.bench_memory_plan import sdpa_kernels
    from trainer.models.load import load_models

    models = load_models(str(tiny_model("sd1")))
    unet, text_encoder = models.unet.train(), models.text_encoder.train()
    weights = {p.untyped_storage()._cdata for m in (unet, text_encoder) for p in m.parameters()}
    kept: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage()._cdata not in weights:
            kept.setdefault(tensor.untyped_storage()._cdata, tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), sdpa_kernels(attention):
        states = text_encoder(torch.zeros(1, CONTEXT_TOKENS, dtype=torch.long))[0]
        prediction = unet(torch.randn(1, 4, 16, 16), torch.tensor([10]), states).sample
        F.mse_loss(prediction, torch.randn_like(prediction))
    real = sum(t.untyped_storage().nbytes() for t in kept.values())
    profile = trace(dict(unet.config), text_encoder.config.to_dict(), resolution=128, precision="no",
                    plain_attention=attention == "plain")
    assert sum(s.nbytes for s in profile.saved) == real
    assert len(profile.params_last_use) == sum(1 for m in (unet, text_encoder) for _ in m.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("attention", ["fused", "plain"])
def test_plan_matches_the_allocation_timeline_of_a_real_step(tiny_model, attention: str, checkpointing: bool):
    """The plan's activations and gradients against the exact allocation timeline (torch's memory profiler) of one
    real forward and backward of the tiny UNet at 512 px, with the CPU's fused attention kernel and with the plain
    kernel `deterministic` runs on a GPU, whose 64 MiB attention matrices dominate here. Measured plan/peak, fused:
    0.988 without checkpointing, 0.945 with; plain: 1.005, 1.002. Before the backward's transients were replayed
    (each op's gradients, the plain kernel's two extra matrices) fused with checkpointing was 0.82, plain 0.78 and
    0.52."""
    from bench.bench_memory_plan import step_peak
    from trainer.models.load import load_models

    unet = load_models(str(tiny_model("sd1"))).unet.train().requires_grad_(True)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    peak = step_peak(unet, 512, attention)
    profile_ = trace(dict(unet.config), None, resolution=512, precision="no",
                     plain_attention=attention == "plain")
    _, planned = replay(profile_, batch=1, checkpointing=checkpointing, fused_backward=False)
    assert 0.9 < planned / peak < 1.1, (planned, peak)


def test_half_precision_keeps_half_copies_of_trained_weights(tiny_model):
    model = model_params_on_disk(str(tiny_model("sd1")))
    profile = trace(model.unet_config, None, resolution=64, precision="bf16")
    # autocast's cache: a half copy of every weight and bias a matmul or convolution reads, once; not of the
    # norms' (norms run in fp32, as under CUDA's autocast)
    in_norms = sum(p.numel() for name, p in _meta_unet(model).named_parameters() if "norm" in name)
    assert profile.weight_copies == 2 * (model.unet - in_norms)
    # backward keeps fewer: no bias copy, nor the weights of ops whose input needs no gradient (conv_in's)
    saved_copies = sum(s.nbytes for s in profile.saved if not s.per_sample)
    assert 0.9 * profile.weight_copies < saved_copies < profile.weight_copies


def _meta_unet(model: ModelParams):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(model.unet_config)


def test_plan_parts_are_counts_times_bytes(tiny_model):
    model = model_params_on_disk(str(tiny_model("sd1")))
    settings = Settings(batch=2, resolution=64, precision="bf16", optimizer="adamw8bit", gradient_checkpointing=True,
                        train_text_encoder=False, ema_on_device=True, text_cache_entries=3, gpu=True)
    plan = plan_memory(model, settings)
    assert plan.parts == {
        "weights": model.unet * 4 + (model.vae + model.text_encoder) * 2,
        "optimizer state": model.unet * 2,
        "EMA": model.unet * 4,
        "DDP buckets": 0,
        "text cache": 3 * CONTEXT_TOKENS * model.text_width * 2,
        "runtime": RUNTIME_BYTES["gpu"],
    }
    assert plan.peak == int((plan.static + max(plan.forward_peak, plan.backward_peak)) * plan.slack)
    assert plan.save_peak == 0  # a save gathers its copy in host memory, not the GPU's
    on_cpu = plan_memory(model, dataclasses.replace(settings, gpu=False, save_bytes=4))
    assert on_cpu.save_peak == (model.unet + model.text_encoder + model.vae) * 4
    assert on_cpu.parts["runtime"] == RUNTIME_BYTES["cpu"]
    bigger = plan_memory(model, dataclasses.replace(settings, batch=4))
    assert bigger.forward_peak > plan.forward_peak and bigger.static == plan.static


def test_advice_changes_settings_in_order_until_the_plan_fits(tiny_model):
    model = model_params_on_disk(str(tiny_model("sd1")))
    settings = Settings(batch=8, resolution=128, precision="bf16", optimizer="adamw", gradient_checkpointing=False,
                        train_text_encoder=True)
    peak = plan_memory(model, settings).peak
    assert advice(model, settings, budget=peak) == []
    steps = advice(model, settings, budget=peak - 1)
    assert [words for words, _ in steps] == ["gradient_checkpointing true"]
    fits_after_two = plan_memory(model, dataclasses.replace(settings, gradient_checkpointing=True,
                                                            optimizer="adamw8bit")).peak
    steps = advice(model, settings, budget=fits_after_two)
    assert [words for words, _ in steps] == ["gradient_checkpointing true", "optimizer adamw8bit"]
    assert steps[-1][1] == fits_after_two and all(a > b for (_, a), (_, b) in zip(steps, steps[1:]))


def test_deterministic_on_a_gpu_is_planned_with_the_plain_attention_kernel_and_given_up_after_checkpointing(
        tiny_model):
    from trainer.config.schema import TrainConfig

    model = model_params_on_disk(str(tiny_model("sd1")))
    on_gpu = Settings.from_config(TrainConfig(deterministic=True, resolution=512, mixed_precision="bf16"), "adamw",
                                    gpu=True)
    assert on_gpu.plain_attention
    assert not Settings.from_config(TrainConfig(deterministic=True), "adamw", gpu=False).plain_attention
    fused = dataclasses.replace(on_gpu, plain_attention=False)
    # the tiny UNet's largest attention at 512 px: 4096 x 4096 fp32, kept, and two more in its backward
    assert plan_memory(model, on_gpu).backward_peak - plan_memory(model, fused).backward_peak > 3 * 4096**2 * 4
    checkpointed = dataclasses.replace(on_gpu, gradient_checkpointing=True)
    assert advice(model, on_gpu, budget=plan_memory(model, checkpointed).peak)[0][0] == "gradient_checkpointing true"
    steps = advice(model, on_gpu, budget=plan_memory(model, checkpointed).peak - 1)
    fused_checkpointed = dataclasses.replace(checkpointed, plain_attention=False)
    assert steps[:2] == [("gradient_checkpointing true", plan_memory(model, checkpointed).peak),
                         ("deterministic false", plan_memory(model, fused_checkpointed).peak)]


def test_model_read_from_files_equals_the_loaded_model(tiny_model, tmp_path: Path):
    """A diffusers folder and an original single file are read from their configs and headers (no weights)."""
    from convert import export_single_file
    from trainer.models.load import load_models

    folder = tiny_model("sd2-v")
    export_single_file(folder, tmp_path / "tiny.safetensors")
    loaded = model_params_of(load_models(str(folder)))
    for model in (model_params_on_disk(str(folder)), model_params_on_disk(str(tmp_path / "tiny.safetensors"))):
        assert (model.unet, model.text_encoder, model.vae) == (loaded.unet, loaded.text_encoder, loaded.vae)
        for key in ("block_out_channels", "attention_head_dim", "cross_attention_dim", "layers_per_block"):
            assert list(_tuple(model.unet_config[key])) == list(_tuple(loaded.unet_config[key])), key
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act"):
            assert model.text_encoder_config[key] == loaded.text_encoder_config[key], key
    assert model_params_on_disk("someone/not-downloaded") is None


def _tuple(value):
    return value if isinstance(value, (list, tuple)) else (value,)


@pytest.mark.slow
def test_dry_run_prints_the_plan_and_what_to_change(tiny_model, shapes_dir: Path, tmp_path: Path):
    result = run_train(["--dry_run", "--resume_ckpt", str(tiny_model("sd1")), "--data_root", str(shapes_dir),
                        "--resolution", "64", "--batch_size", "8", "--vram_gb", "0.6"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    plan = next(line for line in result.stdout.splitlines() if line.startswith("Memory plan (GPU, bf16"))
    assert "batch 8 at 64px, gradient checkpointing on" in plan  # planned for a GPU: the GPU's defaults
    warning = next(line for line in result.stderr.splitlines() if "Memory plan:" in line)
    assert "does not fit 0.60 GiB per device" in warning and "optimizer adamw8bit" in warning
    assert 0.6 * GIB < float(plan.split(" GiB peak")[0].split()[-1]) * GIB
