"""Building the optimizer plan on real (tiny) modules: every optimizer takes a step, one optimizer or one per model,
each parameter group's LR schedule over the steps, the text encoder's frozen parts on a real tiny CLIP, the fp16
grad scaler with a chained optimizer, and the optimizer state saved and loaded through accelerate."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from trainer.config.schema import TrainConfig
from trainer.errors import UserError
from trainer.optim import build
from trainer.optim.chained import ChainedOptimizer
from trainer.optim.plan import OPTIMIZERS, SPECS, LRSchedule, TextEncoderFreezing, plan_optimizers
from trainer.tiny.model import tiny_text_encoder

CLASSES = {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "lion": "Lion", "lion8bit": "Lion8bit", "prodigy": "Prodigy",
           "adafactor": "Adafactor", "dadapt_adam": "DAdaptAdam", "dadapt_lion": "DAdaptLion",
           "dadapt_sgd": "DAdaptSGD", "dadapt_adan": "DAdaptAdan"}


def config(**changes) -> TrainConfig:
    return dataclasses.replace(TrainConfig(), **changes)


def with_file(tmp_path: Path, content: dict, **changes) -> TrainConfig:
    path = tmp_path / "optimizer.json"
    path.write_text(json.dumps(content), encoding="utf-8")
    return config(optimizer_config=str(path), **changes)


def two_modules() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    return torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)


def train_step(optimizer, unet, text_encoder, scheduler=None) -> None:
    loss = (unet(torch.randn(8, 64)) ** 2).mean() + (text_encoder(torch.randn(8, 64)) ** 2).mean()
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def test_every_name_has_a_spec_and_a_package_in_requirements():
    requirements = (Path(__file__).resolve().parents[1] / "requirements.txt").read_text()
    pinned = {line.split("==")[0].strip().lower() for line in requirements.splitlines() if "==" in line}
    assert set(SPECS) == set(OPTIMIZERS)
    assert {spec.package for spec in SPECS.values()} <= pinned


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_builds_and_steps(name: str):
    unet, text_encoder = two_modules()
    lr = 1.0 if SPECS[name].adaptive else 1e-2
    optimizer = build.build_optimizer(plan_optimizers(config(optimizer=name, lr=lr)), unet, text_encoder)
    assert type(optimizer).__name__ == CLASSES[name]
    assert [g["name"] for g in optimizer.param_groups] == ["unet", "text_encoder"]
    before = [unet.weight.detach().clone(), text_encoder.weight.detach().clone()]
    for _ in range(2):  # D-Adaptation moves nothing on its first step (its step size starts at d0)
        train_step(optimizer, unet, text_encoder)
    assert not torch.equal(before[0], unet.weight) and not torch.equal(before[1], text_encoder.weight)


def test_same_optimizer_differing_only_in_rates_is_one_optimizer(tmp_path: Path):
    cfg = with_file(tmp_path, {"base": {"optimizer": "adamw", "lr": 2e-6, "weight_decay": 0.02},
                               "text_encoder_overrides": {"lr": 1e-6, "betas": [0.8, 0.9], "epsilon": 1e-6,
                                                          "weight_decay": 0}})
    plan = plan_optimizers(cfg)
    assert not plan.separate and plan.label == "adamw"
    optimizer = build.build_optimizer(plan, *two_modules())
    assert type(optimizer) is torch.optim.AdamW
    unet_group, te_group = optimizer.param_groups
    assert (unet_group["lr"], unet_group["weight_decay"], unet_group["betas"]) == (2e-6, 0.02, (0.9, 0.999))
    assert (te_group["lr"], te_group["weight_decay"], te_group["betas"], te_group["eps"]) == (
        1e-6, 0.0, (0.8, 0.9), 1e-6)


def test_each_model_gets_its_own_optimizer_when_they_differ(tmp_path: Path):
    cfg = with_file(tmp_path, {"base": {"optimizer": "lion", "lr": 1e-4, "betas": [0.9, 0.99]},
                               "text_encoder_overrides": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0}})
    plan = plan_optimizers(cfg)
    assert plan.separate and plan.label == "lion+adamw"
    unet, text_encoder = two_modules()
    optimizer = build.build_optimizer(plan, unet, text_encoder)
    assert isinstance(optimizer, ChainedOptimizer) and isinstance(optimizer, torch.optim.Optimizer)
    assert [type(part).__name__ for part in optimizer.optimizers] == ["Lion", "AdamW"]
    assert [(g["name"], g["lr"]) for g in optimizer.param_groups] == [("unet", 1e-4), ("text_encoder", 1e-3)]
    for _ in range(2):
        train_step(optimizer, unet, text_encoder)
    saved = optimizer.state_dict()
    assert len(saved["optimizers"]) == 2 and len(optimizer.state) == 4  # each weight and bias has its state
    again = build.build_optimizer(plan, *two_modules())
    again.load_state_dict(saved)
    loaded = again.optimizers[1].state_dict()["state"][0]["exp_avg"]
    assert torch.equal(loaded, saved["optimizers"][1]["state"][0]["exp_avg"])
    with pytest.raises(ValueError, match="holds one optimizer; this run has 2"):
        again.load_state_dict(torch.optim.AdamW(two_modules()[0].parameters()).state_dict())


def test_adaptive_optimizers_split_when_the_rates_differ(tmp_path: Path):
    """Prodigy refuses two rates in one optimizer and D-Adaptation uses the first group's: one per model then."""
    same = plan_optimizers(with_file(tmp_path, {"base": {"optimizer": "prodigy", "lr": 1.0}}))
    assert not same.separate
    differ = plan_optimizers(with_file(tmp_path, {"base": {"optimizer": "prodigy", "lr": 1.0},
                                                  "text_encoder_lr_scale": 0.5}))
    assert differ.separate and differ.text_encoder.lr == 0.5
    unet, text_encoder = two_modules()
    optimizer = build.build_optimizer(differ, unet, text_encoder)
    for _ in range(2):
        train_step(optimizer, unet, text_encoder)  # one Prodigy with lrs 1.0 and 0.5 would raise here


def run_schedule(plan, total_steps: int, steps: int) -> list[list[float]]:
    optimizer = build.build_optimizer(plan, *two_modules())
    scheduler = build.build_lr_scheduler(plan, optimizer, total_steps)
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr())
        optimizer.step()
        scheduler.step()
    return rates


def test_two_schedules_over_the_steps_with_warmup_0_and_decay_clamp(tmp_path: Path):
    cfg = with_file(tmp_path, {
        "base": {"lr": 1.0, "lr_scheduler": "linear", "lr_warmup_steps": 0, "lr_decay_steps": 4},
        "text_encoder_overrides": {"lr": 0.5, "lr_scheduler": "cosine", "lr_warmup_steps": 2, "lr_decay_steps": 6}})
    plan = plan_optimizers(cfg)
    assert plan.separate and plan.unet_schedule == LRSchedule("linear", 0, 4)
    rates = run_schedule(plan, total_steps=10, steps=10)
    unet, te = [r[0] for r in rates], [r[1] for r in rates]
    assert unet == pytest.approx([1.0, 0.75, 0.5, 0.25, 0, 0, 0, 0, 0, 0])  # no warmup; held at 0 after step 4
    cosine = [0.5 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 4)) for s in range(2, 7)]
    assert te == pytest.approx([0.0, 0.25, *cosine, 0, 0, 0])  # warmup 2, decay to step 6, then no bounce
    assert te[6] == 0 and te[9] == 0


def test_default_schedule_is_diffusers_over_the_run():
    """No decay steps given: the run's length, and every rate equal (bit for bit) to diffusers' own schedule."""
    from diffusers.optimization import get_scheduler

    plan = plan_optimizers(config(lr=1e-4, lr_scheduler="cosine"))
    assert plan.unet_schedule.resolved(100) == (2, 100)  # 2% warmup by default
    ours = run_schedule(plan, total_steps=100, steps=100)
    optimizer = build.build_optimizer(plan, *two_modules())
    theirs = get_scheduler("cosine", optimizer, num_warmup_steps=2, num_training_steps=100)
    for step in range(100):
        assert ours[step] == theirs.get_last_lr()
        optimizer.step()
        theirs.step()


def test_freezing_a_real_tiny_clip_text_encoder(tmp_path: Path):
    def frozen_parts(freezing: TextEncoderFreezing) -> tuple[list[bool], bool, bool]:
        encoder = tiny_text_encoder("sd1")  # two layers
        build.freeze_text_encoder_parts(encoder, freezing)
        trains = lambda module: all(p.requires_grad for p in module.parameters())  # noqa: E731
        return [trains(layer) for layer in encoder.encoder.layers], trains(encoder.embeddings), trains(
            encoder.final_layer_norm)

    def planned(freezing: dict) -> TextEncoderFreezing:
        return plan_optimizers(with_file(tmp_path, {"text_encoder_freezing": freezing})).freezing

    # EveryDream2: the last n layers and the final layer norm train, the embeddings freeze with the layers
    assert frozen_parts(planned({"unfreeze_last_n_layers": 1})) == ([False, True], False, True)
    assert frozen_parts(planned({"unfreeze_last_n_layers": 1, "freeze_embeddings": False})) == (
        [False, True], True, True)
    assert frozen_parts(planned({"unfreeze_last_n_layers": 2})) == ([True, True], True, True)  # every layer: nothing
    assert frozen_parts(planned({"unfreeze_last_n_layers": 0})) == ([False, False], False, True)
    assert frozen_parts(planned({"freeze_embeddings": True, "freeze_final_layer_norm": True})) == (
        [True, True], False, False)
    assert frozen_parts(planned({"unfreeze_last_n_layers": None})) == ([True, True], True, True)
    # the deprecated key, as EveryDream2 reads it
    assert planned({"freeze_front_n_layers": -1}) == planned({"unfreeze_last_n_layers": 1})
    assert frozen_parts(planned({"freeze_front_n_layers": 1})) == ([False, True], False, True)
    with pytest.raises(UserError, match="freezes the whole text encoder"):
        build.freeze_text_encoder_parts(tiny_text_encoder("sd1"), TextEncoderFreezing(freeze_front_n_layers=5,
                                                                                freeze_final_layer_norm=True))


def test_a_chained_optimizer_under_the_fp16_grad_scaler_unscales_each_model_once():
    """accelerate's order: unscale every optimizer (the clip), then step through the scaler and update once. The
    text encoder's step must be what it is without a scaler (two prepared optimizers would unscale it twice)."""
    plan = dataclasses.replace(plan_optimizers(config(optimizer="adamw", lr=1e-2)),
                               text_encoder_schedule=LRSchedule("cosine"))  # forces one optimizer per model
    weights = []
    for scaled in (False, True):
        unet, text_encoder = two_modules()
        optimizer = build.build_optimizer(plan, unet, text_encoder)
        scaler = torch.amp.GradScaler("cpu", **build.GRAD_SCALER_START, enabled=scaled)
        torch.manual_seed(1)
        loss = (unet(torch.randn(8, 64)) ** 2).mean() + (text_encoder(torch.randn(8, 64)) ** 2).mean()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        weights.append([unet.weight.detach(), text_encoder.weight.detach()])
    for plain, scaled in zip(*weights):
        torch.testing.assert_close(plain, scaled)


def test_everydream2_grad_scaler_settings_over_the_steps():
    scaler = torch.amp.GradScaler("cpu", **build.GRAD_SCALER_START)
    assert (scaler.get_scale(), scaler.get_growth_factor(), scaler.get_growth_interval()) == (2**17.5, 2.0, 25)
    build.tweak_grad_scaler(scaler, 499)
    assert scaler.get_growth_factor() == 2.0
    build.tweak_grad_scaler(scaler, 500)
    assert (scaler.get_growth_factor(), scaler.get_backoff_factor(), scaler.get_growth_interval()) == (
        1.8, 1 / 1.8, 100)
    build.tweak_grad_scaler(scaler, 4100, catch_up=True)  # a run resumed past the last change
    assert (scaler.get_growth_factor(), scaler.get_growth_interval()) == (1.15, 2000)
    build.tweak_grad_scaler(None, 500)  # no scaler (bf16, fp32, a CPU): nothing to do


def test_a_chained_optimizer_and_its_schedules_resume_exactly_through_accelerate(tmp_path: Path):
    """accelerate's save_state / load_state with one optimizer per model: one optimizer.bin, one scheduler.bin,
    and the steps after loading are the steps of a run that never stopped."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cfg = with_file(tmp_path, {"base": {"optimizer": "lion", "lr": 1e-3},
                               "text_encoder_overrides": {"optimizer": "adamw", "lr": 1e-2, "lr_scheduler": "linear"}})
    plan = plan_optimizers(cfg)

    def prepared() -> tuple:
        accelerator = Accelerator(cpu=True)  # one per run, as each train.py has its own
        unet, text_encoder = two_modules()
        optimizer = build.build_optimizer(plan, unet, text_encoder)
        schedule = build.build_lr_scheduler(plan, optimizer, 6)
        return accelerator, *accelerator.prepare(unet, text_encoder, optimizer, schedule)

    def steps(run: tuple, count: int, seed: int) -> None:
        _, unet, text_encoder, optimizer, scheduler = run
        torch.manual_seed(seed)
        for _ in range(count):
            train_step(optimizer, unet, text_encoder, scheduler)

    try:
        straight = prepared()
        steps(straight, 3, 1)
        steps(straight, 3, 2)
        first = prepared()
        steps(first, 3, 1)
        first[0].save_state(str(tmp_path / "state"))
        written = sorted(p.name for p in (tmp_path / "state").iterdir())
        assert written == ["model.safetensors", "model_1.safetensors", "optimizer.bin", "random_states_0.pkl",
                           "scheduler.bin"]
        resumed = prepared()
        resumed[0].load_state(str(tmp_path / "state"))
        steps(resumed, 3, 2)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert resumed[4].get_last_lr() == straight[4].get_last_lr()
    for a, b in zip((*straight[1].parameters(), *straight[2].parameters()),
                    (*resumed[1].parameters(), *resumed[2].parameters())):
        assert torch.equal(a, b)
