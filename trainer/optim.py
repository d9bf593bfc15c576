"""Optimizers and learning-rate schedules, configured by train.json and an EveryDream2-style optimizer.json.

optimizer.json (`optimizer_config`) has a `base` section for the UNet (and the text encoder), optional
`text_encoder_overrides` and `text_encoder_lr_scale`, and `text_encoder_freezing`. A non-null value there wins
over train.json's `optimizer`/`lr`/`lr_scheduler`/`lr_warmup_steps`, and each such win is printed.
The UNet and the text encoder are two parameter groups of one optimizer, so one LR schedule scales both.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.console import warn
from trainer.config import OptimizerName
from trainer.errors import UserError

if TYPE_CHECKING:  # torch is imported where optimizers are built: the preflight reads plans without it
    import torch

OPTIMIZERS: tuple[str, ...] = typing.get_args(OptimizerName)
_SETTING_KEYS = ("optimizer", "lr", "lr_scheduler", "lr_decay_steps", "lr_warmup_steps", "betas", "epsilon", "weight_decay")
_FREEZING_KEYS = ("freeze_embeddings", "freeze_front_n_layers", "freeze_final_layer_norm")
_TOP_KEYS = {"doc", "base", "text_encoder_overrides", "text_encoder_lr_scale", "text_encoder_freezing",
             "apply_grad_scaler_step_tweaks", "use_grad_scaler"}


@dataclass(frozen=True)
class OptimizerSettings:
    optimizer: str = "adamw"
    lr: float = 1.5e-6
    betas: tuple[float, float] = (0.9, 0.999)
    epsilon: float = 1e-8
    weight_decay: float = 0.01


@dataclass(frozen=True)
class TextEncoderFreezing:
    freeze_embeddings: bool = False
    freeze_front_n_layers: int | None = None  # negative: all but the last -n layers
    freeze_final_layer_norm: bool = False


@dataclass(frozen=True)
class OptimizerPlan:
    unet: OptimizerSettings
    text_encoder: OptimizerSettings
    lr_scheduler: str
    lr_warmup_steps: int | None
    freezing: TextEncoderFreezing


def _settings_from(section: dict[str, Any], base: OptimizerSettings, where: str) -> OptimizerSettings:
    unknown = set(section) - set(_SETTING_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {sorted(unknown)}; expected some of {list(_SETTING_KEYS)}.")
    values = {k: section[k] for k in ("optimizer", "lr", "epsilon", "weight_decay") if section.get(k) is not None}
    if section.get("betas") is not None:
        values["betas"] = tuple(section["betas"])
    return replace(base, **values)


def plan_optimizers(cfg, notices: list[str] | None = None) -> OptimizerPlan:
    """What to build, from train.json's keys and the optional optimizer.json."""
    notices = notices if notices is not None else []
    base = OptimizerSettings(optimizer=cfg.optimizer, lr=cfg.lr)
    plan = OptimizerPlan(base, base, cfg.lr_scheduler, cfg.lr_warmup_steps, TextEncoderFreezing())
    if cfg.optimizer_config:
        plan = _apply_optimizer_json(Path(cfg.optimizer_config), plan, notices)
    for settings, who in ((plan.unet, "UNet"), (plan.text_encoder, "text encoder")):
        if settings.optimizer not in OPTIMIZERS:
            raise UserError(f"{who} optimizer {settings.optimizer!r} is unknown; expected one of {', '.join(OPTIMIZERS)}.")
    if plan.unet.optimizer != plan.text_encoder.optimizer:
        raise UserError(
            f"optimizer.json asks for {plan.unet.optimizer} on the UNet and {plan.text_encoder.optimizer} on the text "
            "encoder; this trainer uses one optimizer with two parameter groups. Set text_encoder_overrides.optimizer "
            "to null (lr, betas, epsilon and weight_decay may still differ)."
        )
    return plan


def _apply_optimizer_json(path: Path, plan: OptimizerPlan, notices: list[str]) -> OptimizerPlan:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise UserError(f"optimizer_config {str(path)!r} does not exist; give the path of an optimizer.json or null.")
    except json.JSONDecodeError as err:
        raise UserError(f"optimizer_config {str(path)!r} is not valid json ({err.msg} at line {err.lineno}).")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise UserError(f"{path}: unknown key(s) {sorted(unknown)}; expected some of {sorted(_TOP_KEYS)}.")
    base_section = data.get("base") or {}
    unet = _settings_from(base_section, plan.unet, f"{path} base")
    for key in ("optimizer", "lr"):
        if base_section.get(key) is not None and base_section[key] != getattr(plan.unet, key):
            notices.append(f"{key} {base_section[key]} from {path} (train.json's {getattr(plan.unet, key)} is not used).")
    text_encoder = unet
    lr_scale = data.get("text_encoder_lr_scale")
    if lr_scale is not None:
        text_encoder = replace(text_encoder, lr=unet.lr * float(lr_scale))
    text_encoder = _settings_from(data.get("text_encoder_overrides") or {}, text_encoder, f"{path} text_encoder_overrides")
    overrides = data.get("text_encoder_overrides") or {}
    if overrides.get("lr_scheduler") not in (None, base_section.get("lr_scheduler"), plan.lr_scheduler):
        raise UserError(f"{path}: text_encoder_overrides.lr_scheduler must be null; one schedule drives both models.")
    freezing_section = data.get("text_encoder_freezing") or {}
    unknown = set(freezing_section) - set(_FREEZING_KEYS)
    if unknown:
        raise UserError(f"{path} text_encoder_freezing: unknown key(s) {sorted(unknown)}; expected {list(_FREEZING_KEYS)}.")
    freezing = TextEncoderFreezing(**{k: v for k, v in freezing_section.items() if v is not None})
    return OptimizerPlan(
        unet=unet,
        text_encoder=text_encoder,
        lr_scheduler=base_section.get("lr_scheduler") or plan.lr_scheduler,
        lr_warmup_steps=base_section.get("lr_warmup_steps", plan.lr_warmup_steps),
        freezing=freezing,
    )


def freeze_text_encoder_parts(text_encoder: torch.nn.Module, freezing: TextEncoderFreezing) -> None:
    """requires_grad=False on the parts of a CLIP text encoder that optimizer.json freezes."""
    if freezing.freeze_embeddings:
        text_encoder.embeddings.requires_grad_(False)
    if freezing.freeze_final_layer_norm:
        text_encoder.final_layer_norm.requires_grad_(False)
    if freezing.freeze_front_n_layers is not None:
        layers = text_encoder.encoder.layers
        n = freezing.freeze_front_n_layers
        count = n if n >= 0 else max(0, len(layers) + n)
        for layer in layers[:count]:
            layer.requires_grad_(False)


def _group(params: list[torch.nn.Parameter], settings: OptimizerSettings, name: str) -> dict[str, Any]:
    group: dict[str, Any] = {"params": params, "lr": settings.lr, "weight_decay": settings.weight_decay, "name": name}
    if settings.optimizer != "adafactor":
        group["betas"] = settings.betas
    if settings.optimizer in ("adamw", "adamw8bit", "prodigy"):
        group["eps"] = settings.epsilon
    return group


def _adamw8bit_class():
    """bitsandbytes' 8-bit AdamW, or None with the reason when it cannot run here."""
    import torch

    try:
        import bitsandbytes as bnb

        probe = torch.nn.Parameter(torch.zeros(256, device="cuda" if torch.cuda.is_available() else "cpu"))
        probe.grad = torch.zeros_like(probe)
        bnb.optim.AdamW8bit([probe]).step()
        return bnb.optim.AdamW8bit
    except Exception as err:  # any failure of an optional native library means: fall back, and say why
        warn(f"adamw8bit needs bitsandbytes, which cannot run here ({type(err).__name__}: {err}); "
              "using 32-bit AdamW instead (more optimizer memory, same maths).")
        return None


def build_optimizer(
    plan: OptimizerPlan, unet: torch.nn.Module, text_encoder: torch.nn.Module | None
) -> torch.optim.Optimizer:
    """One optimizer over the trainable parameters: a UNet group and, when trained, a text-encoder group."""
    groups = [_group([p for p in unet.parameters() if p.requires_grad], plan.unet, "unet")]
    if text_encoder is not None:
        groups.append(_group([p for p in text_encoder.parameters() if p.requires_grad], plan.text_encoder, "text_encoder"))
    import torch

    name = plan.unet.optimizer
    if name == "adamw8bit":
        optimizer_class = _adamw8bit_class()
        if optimizer_class is not None:
            return optimizer_class(groups)
        name = "adamw"
    if name == "adamw":
        return torch.optim.AdamW(groups)
    if name == "lion":
        from lion_pytorch import Lion

        return Lion(groups)
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # a fixed lr, like the other optimizers here; Adafactor's own relative-step schedule would ignore ours
        return Adafactor(groups, scale_parameter=False, relative_step=False, warmup_init=False)
    raise AssertionError(name)


def warmup_steps(plan: OptimizerPlan, total_steps: int) -> int:
    if plan.lr_warmup_steps is not None:
        return plan.lr_warmup_steps
    return 0 if plan.lr_scheduler == "constant" else math.ceil(0.02 * total_steps)


def build_lr_scheduler(plan: OptimizerPlan, optimizer: torch.optim.Optimizer, total_steps: int):
    """diffusers' schedules, stepped once per optimizer step: the loop prepares it with split_batches, so
    accelerate steps it once per step whatever the process count (not once per process)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        plan.lr_scheduler,
        optimizer,
        num_warmup_steps=warmup_steps(plan, total_steps),
        num_training_steps=total_steps,
    )
