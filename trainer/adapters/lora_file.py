"""The adapter file: one kohya-format `.safetensors` (convert/lora_kohya.py; LyCORIS's names for LoHa, LoKr and
DoRA) with kohya's `ss_*` and the modelspec metadata, which AUTOMATIC1111, ComfyUI, kohya's tools and diffusers
(LoRA) read; `lora_init`, a run that starts from such a file; and `fuse_adapter_file`, such a file fused into a
model by peft's own layers (utils/merge_lora.py and utils/generate.py, for the kinds diffusers cannot load).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import torch

from convert.lora_kohya import KohyaAdapters, by_module, from_kohya, part_ranks, parts_kind, to_kohya
from trainer.adapters.dora import add_magnitudes, merge_magnitudes
from trainer.adapters.lora import ADAPTER, KIND_NAMES, Adapters, LoraSettings, adapter_weights
from trainer.errors import UserError

BASE_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2"}  # kohya's ss_base_model_version
# kohya's ss_network_args for LyCORIS's network module, as LyCORIS writes them for each kind
LYCORIS_ARGS = {"loha": {"algo": "loha"}, "lokr": {"algo": "lokr"}, "dora": {"algo": "lora", "dora_wd": "True"}}


def file_tensors(modules: dict[str, torch.nn.Module], settings: LoraSettings, dtype: torch.dtype) -> dict:
    """The kohya-format tensors of every adapted model, on the CPU in `dtype`."""
    tensors = {}
    for name, module in modules.items():
        weights = {k: v.detach().to("cpu", dtype).contiguous() for k, v in adapter_weights(module).items()}
        tensors.update(to_kohya(name, weights, settings.alpha, settings.rank, lambda a: torch.tensor(a, dtype=dtype)))
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
    network_args.update(LYCORIS_ARGS.get(settings.kind, {}))
    if settings.kind == "lokr":
        network_args["factor"] = str(settings.factor)
    return {
        "ss_network_module": "networks.lora" if settings.kind == "lora" else "lycoris.kohya",
        "ss_network_dim": str(settings.rank),
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
        "ss_output_name": name,
        "ss_training_comment": f"lora_kind {settings.kind}, lora_targets {settings.targets}",
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
    """lora_init: the file's adapters into the run's (same kind, rank, alpha and targets, or a UserError naming what
    differs). Returns what was loaded, for the log."""
    found = read_adapter_file(path, adapters.targeted)
    problems = init_problems(found, adapters, modules)
    if problems:
        raise UserError(f"lora_init {path} does not fit this run's adapters: {'; '.join(problems)}.")
    load_found(found, modules, adapters.settings)
    loaded = sum(len(found.modules(name)) for name in found.weights)
    total = sum(len(paths) for paths in adapters.targeted.values())
    fresh = f"; the other {total - loaded} targeted layers start fresh" if loaded < total else ""
    return f"{KIND_NAMES[adapters.settings.kind]}: adapters of {loaded} layers loaded from lora_init {path}{fresh}."


def load_found(found: KohyaAdapters, modules: dict[str, torch.nn.Module], settings: LoraSettings) -> None:
    """A file's adapters into the peft layers of `modules`, each in its parameter's dtype and shape."""
    for name in found.weights:
        module = modules[name]
        current = module.state_dict()
        state = {}
        for key, value in found.peft_weights(name, settings.alpha, settings.rank).items():
            target = peft_key(key)
            state[target] = value.reshape(current[target].shape).to(current[target].dtype)
        module.load_state_dict(state, strict=False)


def peft_key(key: str) -> str:
    """peft's key in a module's state dict for `<module>.<part>`: the adapter name before `.weight`, or last."""
    return f"{key.removesuffix('.weight')}.{ADAPTER}.weight" if key.endswith(".weight") else f"{key}.{ADAPTER}"


def init_problems(found: KohyaAdapters, adapters: Adapters, modules: dict[str, torch.nn.Module]) -> list[str]:
    """What keeps a file's adapters from loading into this run's: unknown layers, another kind, rank or alpha, or
    tensors of other shapes."""
    settings = adapters.settings
    problems = []
    if found.unknown:
        shown = ", ".join(found.unknown[:3]) + (f" and {len(found.unknown) - 3} more" if len(found.unknown) > 3 else "")
        problems.append(f"{len(found.unknown)} of its tensors belong to no layer lora_targets "
                        f"{settings.targets} adapts here ({shown}); a wider lora_targets "
                        f"(all), lora_text_encoder true, or another base model may fit it")
    parts = [(part, tuple(value.shape)) for weights in found.weights.values()
             for module_parts in by_module(weights).values() for part, value in module_parts.items()]
    kind = parts_kind(part for part, _ in parts)
    if kind and kind != settings.kind:
        return [*problems, f"it holds {KIND_NAMES[kind]} adapters and lora_kind is {settings.kind}: set lora_kind {kind}"]
    ranks = part_ranks(parts)
    if ranks and ranks != {settings.rank}:
        problems.append(f"its rank is {'/'.join(map(str, sorted(ranks)))}, lora_rank is {settings.rank}")
    alphas = {round(float(v), 6) for v in found.alphas.values()}
    if alphas and alphas != {round(settings.alpha, 6)}:
        problems.append(f"its alpha is {'/'.join(f'{a:g}' for a in sorted(alphas))}, lora_alpha is "
                        f"{settings.alpha:g}")
    if not problems:
        problems += shape_problems(found, modules)
    return problems


def shape_problems(found: KohyaAdapters, modules: dict[str, torch.nn.Module]) -> list[str]:
    """Tensors whose sizes differ from the run's (a LoKr of another lokr_factor, a layer of another width)."""
    wrong = []
    for name, weights in found.weights.items():
        current = modules[name].state_dict()
        for key, value in weights.items():
            expected = current.get(peft_key(key))
            if expected is None or value.numel() != expected.numel():
                here = "nothing" if expected is None else tuple(expected.shape)
                wrong.append(f"{key} {tuple(value.shape)} where this run has {here}")
    if not wrong:
        return []
    return [f"{len(wrong)} of its tensors have other sizes than this run's ({wrong[0]}); a LoKr file needs the "
            "lokr_factor it was trained with"]


# ---------------------------------------------------------------- fusing a file into a model (merge, generate)


def fuse_adapter_file(tensors: dict[str, torch.Tensor], modules: dict[str, torch.nn.Module], strength: float) -> int:
    """Fuse a kohya/LyCORIS file's adapters (any kind, each module with its own rank and alpha) into the weights of
    `modules` (model name -> module) at `strength`, through peft's layers of that kind, which are then removed:
    W + strength * (W' - W), where W' is the weight peft's merge gives (for DoRA, with the magnitudes applied: the
    meaning ComfyUI and AUTOMATIC1111 give a strength).
    Returns the number of layers fused; raises UserError for tensors that name no layer of these models."""
    candidates = {name: [path for path, layer in module.named_modules()
                         if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d))] for name, module in modules.items()}
    found = from_kohya(tensors, candidates)
    if found.unknown:
        raise UserError(f"{len(found.unknown)} of its tensors name no layer of this base model (e.g. "
                        f"{found.unknown[0]}); expected adapters made for this model's family")
    fused = 0
    for name, weights in found.weights.items():
        for path, parts in by_module(weights).items():
            alpha = found.alphas.get((name, path))
            fuse_layer(modules[name], path, parts, None if alpha is None else float(alpha), strength)
            fused += 1
    return fused


def fuse_layer(module: torch.nn.Module, path: str, parts: dict[str, torch.Tensor], alpha: float | None,
               strength: float) -> None:
    """One layer's adapter (peft-named `parts`, the file's layout) fused into its weight, the peft layer removed."""
    from peft import inject_adapter_in_model

    kind = parts_kind(parts)
    ranks = part_ranks((part, tuple(value.shape)) for part, value in parts.items())
    if ranks:
        rank = ranks.pop()
        alpha = rank_or(alpha, rank)
    else:  # a LoKr of full factors: readers apply a scale of 1, as peft does with an alpha equal to the rank
        rank = alpha = max(module.get_submodule(path).weight.shape[:2])
    held = module.__dict__.pop("peft_config", None)  # peft's record of a model's adapters: this one is gone after
    inject_adapter_in_model(LoraSettings(rank, alpha, 0.0, "all", True, kind).peft_config([path]), module,
                            adapter_name=ADAPTER)
    module.__dict__.pop("peft_config", None)
    if held is not None:
        module.peft_config = held
    if kind == "dora":
        add_magnitudes(module, [path])
    layer = module.get_submodule(path)
    set_parts(layer, parts)
    base = layer.get_base_layer()
    before = base.weight.detach().float().clone()
    layer.merge(adapter_names=[ADAPTER])
    if kind == "dora":
        merge_magnitudes(layer)
    base.weight.data = (before + strength * (base.weight.detach().float() - before)).to(base.weight.dtype)
    parent, _, child = path.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, child, base)


def rank_or(alpha: float | None, rank: int) -> float:
    return float(rank) if alpha is None else alpha  # kohya: a file without alphas means alpha = rank


def set_parts(layer: torch.nn.Module, parts: dict[str, torch.Tensor]) -> None:
    """The file's tensors into a fresh peft layer. LoHa's and LoKr's are set as they are, and parts peft made that
    the file lacks are dropped: the file decides which LoKr factors are full and how each side is split (another
    factor than peft would choose gives other shapes, which its Kronecker product does not mind)."""
    for attr in getattr(layer, "adapter_layer_names", ()):
        held = getattr(layer, attr)
        if ADAPTER in held and not any(part.split(".")[0] == attr for part in parts):
            del held[ADAPTER]
    for part, value in parts.items():
        attr, _, rest = part.partition(".")
        held = getattr(layer, attr)
        if rest:  # LoRA's factors are modules with a weight
            param = getattr(held[ADAPTER], rest)
            param.data = value.reshape(param.shape).to(param.device, param.dtype)
        else:
            dtype = layer.get_base_layer().weight.dtype
            held[ADAPTER] = torch.nn.Parameter(value.to(dtype), requires_grad=False)
