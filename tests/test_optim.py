"""Optimizer choices, optimizer.json (ED2 format), text-encoder freezing and LR schedules."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from trainer.config import TrainConfig
from trainer.errors import UserError
from trainer.optim import (
    OPTIMIZERS,
    build_lr_scheduler,
    build_optimizer,
    freeze_text_encoder_parts,
    plan_optimizers,
    warmup_steps,
)
from trainer.tiny import tiny_text_encoder


def config(**changes) -> TrainConfig:
    return dataclasses.replace(TrainConfig(), **changes)


def two_modules() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    return torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_builds_and_steps(name: str):
    unet, text_encoder = two_modules()
    lr = 1.0 if name == "prodigy" else 1e-2
    optimizer = build_optimizer(plan_optimizers(config(optimizer=name, lr=lr)), unet, text_encoder)
    assert [g["name"] for g in optimizer.param_groups] == ["unet", "text_encoder"]
    before = unet.weight.detach().clone()
    loss = (unet(torch.randn(8, 64)) ** 2).mean() + (text_encoder(torch.randn(8, 64)) ** 2).mean()
    loss.backward()
    optimizer.step()
    assert not torch.equal(before, unet.weight)
    expected_class = {"adamw": "AdamW", "adamw8bit": "AdamW8bit", "lion": "Lion", "prodigy": "Prodigy",
                      "adafactor": "Adafactor"}[name]
    assert type(optimizer).__name__ == expected_class


def test_optimizer_json_everydream2_format(tmp_path: Path):
    path = tmp_path / "optimizer.json"
    path.write_text(json.dumps({
        "doc": {"base": "ignored"},
        "base": {"optimizer": "adamw", "lr": 2e-6, "lr_scheduler": "cosine", "lr_decay_steps": None,
                 "lr_warmup_steps": 10, "betas": [0.9, 0.99], "epsilon": 1e-7, "weight_decay": 0.02},
        "text_encoder_overrides": {"optimizer": None, "lr": None, "lr_scheduler": None, "betas": None,
                                   "epsilon": None, "weight_decay": 0.0},
        "text_encoder_lr_scale": 0.5,
        "text_encoder_freezing": {"freeze_embeddings": True, "freeze_front_n_layers": -1, "freeze_final_layer_norm": False},
        "apply_grad_scaler_step_tweaks": True,
    }))
    notices: list[str] = []
    plan = plan_optimizers(config(optimizer_config=str(path)), notices)
    assert (plan.unet.lr, plan.unet.betas, plan.unet.epsilon, plan.unet.weight_decay) == (2e-6, (0.9, 0.99), 1e-7, 0.02)
    assert (plan.text_encoder.lr, plan.text_encoder.weight_decay) == (1e-6, 0.0)
    assert (plan.lr_scheduler, plan.lr_warmup_steps) == ("cosine", 10)
    assert any("lr 2e-06 from" in n for n in notices)
    unet, _ = two_modules()
    text_encoder = tiny_text_encoder("sd1")
    freeze_text_encoder_parts(text_encoder, plan.freezing)
    assert not any(p.requires_grad for p in text_encoder.embeddings.parameters())
    assert not any(p.requires_grad for p in text_encoder.encoder.layers[0].parameters())  # -1: all but the last
    assert all(p.requires_grad for p in text_encoder.encoder.layers[1].parameters())
    optimizer = build_optimizer(plan, unet, text_encoder)
    te_group = optimizer.param_groups[1]
    assert te_group["lr"] == 1e-6 and te_group["weight_decay"] == 0.0
    assert sum(p.numel() for p in te_group["params"]) == sum(p.numel() for p in text_encoder.parameters() if p.requires_grad)


@pytest.mark.parametrize("content, message", [
    ({"base": {"optimizer": "sgd"}}, "optimizer 'sgd' is unknown"),
    ({"base": {"lr": 1e-6, "momentum": 0.9}}, "unknown key(s) ['momentum']"),
    ({"bases": {}}, "unknown key(s) ['bases']"),
    ({"base": {"optimizer": "adamw"}, "text_encoder_overrides": {"optimizer": "lion"}}, "one optimizer with two parameter groups"),
])
def test_optimizer_json_errors(tmp_path: Path, content: dict, message: str):
    path = tmp_path / "optimizer.json"
    path.write_text(json.dumps(content))
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        plan_optimizers(config(optimizer_config=str(path)))


def test_lr_schedule_warmup_and_decay_per_optimizer_step():
    unet, text_encoder = two_modules()
    plan = plan_optimizers(config(lr=1.0, lr_scheduler="cosine", lr_warmup_steps=2))
    optimizer = build_optimizer(plan, unet, text_encoder)
    scheduler = build_lr_scheduler(plan, optimizer, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[1] == 0.5 and lrs[2] == pytest.approx(1.0)
    assert lrs[-1] < 0.05 and all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert warmup_steps(plan_optimizers(config(lr_scheduler="cosine")), 1000) == 20  # 2% by default
    assert warmup_steps(plan_optimizers(config()), 1000) == 0  # constant
