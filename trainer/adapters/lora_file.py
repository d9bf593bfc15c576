"""The LoRA adapter file: one kohya-format `.safetensors` (convert/lora_kohya.py) with kohya's `ss_*` and the
modelspec metadata, which AUTOMATIC1111, ComfyUI, kohya's tools and diffusers read; and `lora_init`, a run that
starts from such a file.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import torch

from convert.lora_kohya import KohyaAdapters, from_kohya, to_kohya
from trainer.adapters.lora import ADAPTER, Adapters, LoraSettings, adapter_weights
from trainer.errors import UserError

BASE_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2"}  # kohya's ss_base_model_version


def file_tensors(modules: dict[str, torch.nn.Module], settings: LoraSettings, dtype: torch.dtype) -> dict:
    """The kohya-format tensors of every adapted model, on the CPU in `dtype`."""
    tensors = {}
    for name, module in modules.items():
        weights = {k: v.detach().to("cpu", dtype).contiguous() for k, v in adapter_weights(module).items()}
        tensors.update(to_kohya(name, weights, settings.alpha, lambda a: torch.tensor(a, dtype=dtype)))
    return tensors


def file_metadata(cfg, info, settings: LoraSettings, *, step: int, epoch: int, images: int,
                  base_hash: str, name: str, rates: tuple[float, float]) -> dict[str, str]:
    """kohya's `ss_*` keys (what AUTOMATIC1111's and ComfyUI's LoRA info panels show) and Stability's modelspec.
    `rates`: the UNet adapters' and the text encoder's planned learning rates."""
    v_prediction = info.prediction_type == "v_prediction"
    architecture = ("stable-diffusion-v1" if info.family == "sd1" else
                    "stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512")
    network_args = {"conv_dim": str(settings.rank), "conv_alpha": f"{settings.alpha:g}"} if settings.targets == "all" \
        else {}
    return {
        "ss_network_module": "networks.lora", "ss_network_dim": str(settings.rank),
        "ss_network_alpha": f"{settings.alpha:g}", "ss_network_args": json.dumps(network_args),
        "ss_network_dropout": f"{settings.dropout:g}", "ss_base_model_version": BASE_VERSIONS[info.family],
        "ss_v2": str(info.family == "sd2"), "ss_v_parameterization": str(v_prediction),
        "ss_sd_model_name": Path(cfg.resume_ckpt).name, "ss_new_sd_model_hash": base_hash,
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})", "ss_steps": str(step), "ss_epoch": str(epoch),
        "ss_num_train_images": str(images), "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_gradient_accumulation_steps": str(cfg.grad_accum), "ss_seed": str(cfg.seed),
        "ss_clip_skip": str(cfg.clip_skip or 1), "ss_optimizer": cfg.optimizer, "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_learning_rate": f"{rates[0]:g}", "ss_unet_lr": f"{rates[0]:g}",
        "ss_text_encoder_lr": f"{rates[1]:g}" if settings.text_encoder else "0",
        "ss_network_train_unet_only": str(not settings.text_encoder), "ss_mixed_precision": cfg.mixed_precision,
        "ss_output_name": name, "ss_training_comment": f"lora_targets {settings.targets}",
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": "diffusers", "modelspec.title": name,
        "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "format": "pt",
    }


def base_hash(model_dir: Path) -> str:
    """sha256 of the base model's UNet and text-encoder weight files (what the adapters were trained against),
    the `ss_new_sd_model_hash` of the file; resuming checks it."""
    digest = hashlib.sha256()
    files = sorted(p for part in ("unet", "text_encoder") for p in (model_dir / part).glob("*.safetensors"))
    for path in files:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- starting from a file (lora_init)


def read_adapter_file(path: Path, modules: dict[str, list[str]]) -> KohyaAdapters:
    from safetensors.torch import load_file

    return from_kohya(load_file(str(path)), modules)


def load_adapter_file(path: Path, modules: dict[str, torch.nn.Module], adapters: Adapters) -> str:
    """lora_init: the file's adapters into the run's (same rank, alpha and targets, or a UserError naming what
    differs). Returns what was loaded, for the log."""
    found = read_adapter_file(path, adapters.targeted)
    problems = init_problems(found, adapters, path)
    if problems:
        raise UserError(f"lora_init {path} does not fit this run's adapters: {'; '.join(problems)}.")
    for name, weights in found.weights.items():
        state = {key.replace(".lora_A.", f".lora_A.{ADAPTER}.").replace(".lora_B.", f".lora_B.{ADAPTER}."): value
                 for key, value in weights.items()}
        module = modules[name]
        current = module.state_dict()
        module.load_state_dict({k: v.to(current[k].dtype) for k, v in state.items()}, strict=False)
    loaded = sum(len(found.modules(name)) for name in found.weights)
    total = sum(len(paths) for paths in adapters.targeted.values())
    fresh = f"; the other {total - loaded} targeted layers start fresh" if loaded < total else ""
    return f"LoRA: adapters of {loaded} layers loaded from lora_init {path}{fresh}."


def init_problems(found: KohyaAdapters, adapters: Adapters, path: Path) -> list[str]:
    """What keeps a kohya file's adapters from loading into this run's: unknown layers, another rank or alpha."""
    problems = []
    if found.unknown:
        shown = ", ".join(found.unknown[:3]) + (f" and {len(found.unknown) - 3} more" if len(found.unknown) > 3 else "")
        problems.append(f"{len(found.unknown)} of its tensors belong to no layer lora_targets "
                        f"{adapters.settings.targets} adapts here ({shown}); a wider lora_targets "
                        f"(all), lora_text_encoder true, or another base model may fit it")
    ranks = {int(v.shape[0]) for weights in found.weights.values() for k, v in weights.items() if ".lora_A." in k}
    if ranks and ranks != {adapters.settings.rank}:
        problems.append(f"its rank is {'/'.join(map(str, sorted(ranks)))}, lora_rank is {adapters.settings.rank}")
    alphas = {round(float(v), 6) for v in found.alphas.values()}
    if alphas and alphas != {round(adapters.settings.alpha, 6)}:
        problems.append(f"its alpha is {'/'.join(f'{a:g}' for a in sorted(alphas))}, lora_alpha is "
                        f"{adapters.settings.alpha:g}")
    return problems
