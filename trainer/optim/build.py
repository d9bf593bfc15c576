"""Building what trainer/optim/plan.py plans: the optimizers (one, or one per model chained into one), the learning-rate
schedule of each parameter group, the text encoder's frozen parts, and EveryDream2's fp16 grad-scaler settings.

Why one chained optimizer rather than two prepared ones: see `chained.py`.

AdamW runs torch's fused kernel wherever torch has one for the parameters' device (CPU and CUDA since torch 2.4):
one kernel over all parameters instead of a dozen elementwise passes; the same maths to ~1e-7, and on a CPU a 4x
faster optimizer step. Under fp16 the GradScaler hands its scale and found-inf flag to the fused kernel, which
unscales and skips an overflowed step itself, without reading the flag back to the host (torch.amp.GradScaler.step,
`_step_supports_amp_scaling`; accelerate's AcceleratedOptimizer.step calls scaler.step as usual). The one
difference: accelerate then cannot tell a skipped step, so the LR schedule also advances on the (rare, early)
overflowed steps.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LambdaLR

from common.console import warn
from trainer.errors import UserError
from trainer.optim.chained import ChainedOptimizer
from trainer.optim.plan import LRSchedule, OptimizerPlan, OptimizerSettings, TextEncoderFreezing

# EveryDream2's GradScaler (optimizer/optimizers.py): a higher start and a short growth interval, then at these
# optimizer steps a gentler growth (and matching backoff) checked less often. Only fp16 on a GPU has a scaler.
GRAD_SCALER_START = {"init_scale": 2**17.5, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 25}
GRAD_SCALER_STEPS = {500: (1.8, 100), 1000: (1.6, 200), 2000: (1.3, 500), 4000: (1.15, 2000)}


def build_optimizer(plan: OptimizerPlan, unet: torch.nn.Module | None, text_encoder: torch.nn.Module | None,
                    device: torch.device | None = None, fused_backward: bool = False) -> torch.optim.Optimizer:
    """The optimizer over the trainable parameters: a UNet group (None: the UNet is frozen, as in textual
    inversion), a text-encoder group when it trains, and an embedding's rows in a group of their own, in one
    optimizer, or chained from one optimizer per model when the plan separates them; with `fused_backward`, one
    per parameter, stepped inside backward (trainer/optim/fused_backward.py). `device`: where the parameters will
    train (accelerate's prepare moves them there after this); None: where they are."""
    device = device or next((unet or text_encoder).parameters()).device
    unet_groups = [_group(_trainable(unet), plan.unet, "unet")] if unet is not None else []
    te_groups = _text_encoder_groups(plan, text_encoder) if text_encoder is not None else []
    if fused_backward:
        from trainer.optim.fused_backward import FusedBackwardOptimizer

        settings = {"unet": plan.unet, "text_encoder": plan.text_encoder}
        return FusedBackwardOptimizer(unet_groups + te_groups,
                                      lambda one: _optimizer(settings[one[0]["name"]], one, device))
    if not te_groups or not unet_groups or not plan.separate:
        return _optimizer(plan.unet if unet_groups else plan.text_encoder, unet_groups + te_groups, device)
    return ChainedOptimizer([_optimizer(plan.unet, unet_groups, device),
                             _optimizer(plan.text_encoder, te_groups, device)])


def _text_encoder_groups(plan: OptimizerPlan, text_encoder: torch.nn.Module) -> list[dict]:
    """The text encoder's trained parameters (if any besides an embedding's rows), then the rows, at their rate."""
    from trainer.adapters.embeddings import is_rows_key

    trained = [(key, p) for key, p in text_encoder.named_parameters() if p.requires_grad]
    rest = [p for key, p in trained if not is_rows_key(key)]
    rows = [p for key, p in trained if is_rows_key(key)]
    groups = [_group(rest, plan.text_encoder, "text_encoder")] if rest or not rows else []
    return groups + ([_group(rows, plan.embedding, "embedding")] if rows else [])


def _trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _group(params: list[torch.nn.Parameter], settings: OptimizerSettings, name: str) -> dict:
    group = {"params": params, "lr": settings.lr, "weight_decay": settings.weight_decay, "name": name}
    if "betas" in settings.spec.group_keys:
        group["betas"] = settings.resolved_betas()
    if "eps" in settings.spec.group_keys:
        group["eps"] = settings.epsilon
    return group


def _optimizer(settings: OptimizerSettings, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    name, options = settings.optimizer, {k: v for k, v in settings.resolved_options().items() if v is not None}
    if name in ("adamw8bit", "lion8bit"):
        eight_bit = _bitsandbytes_class(name)
        if eight_bit is not None:
            return eight_bit(groups)
        name = name.removesuffix("8bit")
    if name == "adamw":
        return torch.optim.AdamW(groups, fused=fused_kernels_fit(groups, device) or None)  # None: torch's default
    if name == "lion":
        from lion_pytorch import Lion

        return Lion(groups)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # a fixed lr, like the other optimizers here; Adafactor's own relative-step schedule would ignore ours
        return Adafactor(groups, scale_parameter=False, relative_step=False, warmup_init=False)
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, **options)
    return _d_adaptation(name, groups, options)


def fused_kernels_fit(groups: list[dict], device: torch.device) -> bool:
    """Whether torch has fused optimizer kernels for these parameters on `device`: torch's own list of the device
    types its fused kernels run on (the one its optimizers check), and floating-point parameters."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    params = [p for group in groups for p in group["params"]]
    return device.type in _get_fused_kernels_supported_devices() and all(p.is_floating_point() for p in params)


def _d_adaptation(name: str, groups: list[dict], options: dict) -> torch.optim.Optimizer:
    """pytorch-optimizer's D-Adaptation family, with the weight decay of the facebookresearch package EveryDream2
    used: decoupled for dadapt_adam when `decouple` (its default) and always for dadapt_lion, coupled (L2) for
    dadapt_sgd, and for dadapt_adan proximal unless `no_prox`."""
    import pytorch_optimizer as po

    if name == "dadapt_adam":
        return po.DAdaptAdam(groups, d0=options["d0"], growth_rate=options["growth_rate"],
                             weight_decouple=options["decouple"])
    if name == "dadapt_lion":
        return po.DAdaptLion(groups, d0=options["d0"], weight_decouple=True)
    if name == "dadapt_sgd":
        return po.DAdaptSGD(groups, d0=options["d0"], growth_rate=options["growth_rate"],
                            momentum=options["momentum"], weight_decouple=False)
    if name == "dadapt_adan":
        return po.DAdaptAdan(groups, d0=options["d0"], growth_rate=options["growth_rate"],
                             weight_decouple=options["no_prox"])
    raise AssertionError(name)


def _bitsandbytes_class(name: str):
    """bitsandbytes' 8-bit AdamW or Lion, or None with the reason when it cannot run here."""
    try:
        import bitsandbytes as bnb

        optimizer_class = {"adamw8bit": bnb.optim.AdamW8bit, "lion8bit": bnb.optim.Lion8bit}[name]
        probe = torch.nn.Parameter(torch.zeros(256, device="cuda" if torch.cuda.is_available() else "cpu"))
        probe.grad = torch.zeros_like(probe)
        optimizer_class([probe]).step()
        return optimizer_class
    except Exception as err:  # any failure of an optional native library means: fall back, and say why
        fallback = name.removesuffix("8bit")
        warn(f"{name} needs bitsandbytes, which cannot run here ({type(err).__name__}: {err}); using 32-bit "
             f"{fallback} instead (more optimizer memory, same maths).")
        return None


# ---------------------------------------------------------------- schedules


def build_lr_scheduler(plan: OptimizerPlan, optimizer: torch.optim.Optimizer, total_steps: int) -> LambdaLR:
    """One LambdaLR with each parameter group's own schedule (diffusers' schedules, held at their end value after
    their decay steps), stepped once per optimizer step: the loop prepares it with split_batches, so accelerate
    steps it once per step whatever the process count."""
    schedules = {"unet": plan.unet_schedule, "text_encoder": plan.text_encoder_schedule,
                 "embedding": plan.text_encoder_schedule}
    parts = optimizer.optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    rules = [schedule_rule(schedules[group["name"]], part, total_steps,
                           stop=plan.embedding_steps if group["name"] == "embedding" else 0)
             for part in parts for group in part.param_groups]
    return LambdaLR(optimizer, rules)


def schedule_rule(schedule: LRSchedule, optimizer: torch.optim.Optimizer, total_steps: int, stop: int = 0):
    """The factor on the peak lr at each step. diffusers' cosine comes back up past its decay steps (the bounce
    EveryDream2 has); here the factor stays where the decay ended. The rule is taken from a stand-in optimizer
    with the real one's default lr (diffusers' polynomial schedule reads it), so the real one is left untouched.
    `stop` > 0: the factor is 0 from that step on (an embedding's rows in pivotal tuning: at lr 0 an optimizer's
    step leaves them as they are, weight decay included)."""
    from diffusers.optimization import get_scheduler

    warmup, decay = schedule.resolved(total_steps)
    stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=float(optimizer.defaults.get("lr") or 1.0))
    rule = get_scheduler(schedule.name, stand_in, num_warmup_steps=warmup, num_training_steps=decay).lr_lambdas[0]

    def held(step: int) -> float:
        return 0.0 if stop and step >= stop else rule(min(step, decay))

    return held


# ---------------------------------------------------------------- the text encoder's frozen parts


def freeze_text_encoder_parts(text_encoder: torch.nn.Module, freezing: TextEncoderFreezing,
                              kept: tuple[torch.nn.Parameter, ...] = ()) -> str | None:
    """requires_grad=False on the parts of a CLIP text encoder that the plan freezes, but `kept` (an embedding's
    rows, which live among its embeddings); says what, or None."""
    layers = text_encoder.encoder.layers
    count = len(layers)
    trained = freezing.trained_layers(count)
    frozen = []
    if trained < count:
        for layer in layers[: count - trained]:
            layer.requires_grad_(False)
        front = count - trained
        frozen.append(f"all {count} layers" if not trained else f"layer 1 of {count}" if front == 1
                      else f"layers 1-{front} of {count}")
    if freezing.embeddings_frozen(count):
        text_encoder.embeddings.requires_grad_(False)
        frozen.append("the embeddings" + (" (not the new tokens' rows)" if kept else ""))
    if freezing.freeze_final_layer_norm:
        text_encoder.final_layer_norm.requires_grad_(False)
        frozen.append("the final layer norm")
    for param in kept:
        param.requires_grad_(True)
    if not any(p.requires_grad for p in text_encoder.parameters()):
        raise UserError(f"text_encoder_freezing freezes the whole text encoder ({', '.join(frozen)}); set "
                        "disable_textenc_training true instead, or unfreeze something.")
    return f"Text encoder: {', '.join(frozen)} frozen." if frozen else None


# ---------------------------------------------------------------- the fp16 grad scaler


def grad_scaler_settings(step: int) -> tuple[float, int] | None:
    """EveryDream2's (growth factor, growth interval) from `step` on, or None before its first change."""
    reached = [at for at in GRAD_SCALER_STEPS if at <= step]
    return GRAD_SCALER_STEPS[max(reached)] if reached else None


def tweak_grad_scaler(scaler, step: int, catch_up: bool = False) -> None:
    """At EveryDream2's steps, its gentler growth (and backoff 1/growth) checked less often. `catch_up`: set what
    applies at `step` whether or not it is one of them (a run resumed past them)."""
    if scaler is None or (step not in GRAD_SCALER_STEPS and not catch_up):
        return
    settings = grad_scaler_settings(step)
    if settings is None:
        return
    factor, interval = settings
    scaler.set_growth_factor(factor)
    scaler.set_backoff_factor(1 / factor)
    scaler.set_growth_interval(interval)
