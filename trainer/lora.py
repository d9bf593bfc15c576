"""LoRA mode (`lora_rank` > 0): peft adapters on a frozen base model, the adapter file a save writes, and training
states that hold only the adapters.

- **Adapters.** peft's LoRA layers (the library diffusers' own `load_lora_weights` builds on) wrap the layers
  `lora_targets` names; conv layers get conv adapters (kohya's LoCon). The base stays frozen in the precision it
  was loaded in (the compute dtype on a GPU); the adapters are fp32 masters, the only trainable parameters.
- **The file.** One kohya-format `.safetensors` (convert/lora_kohya.py), with kohya's `ss_*` and the modelspec
  metadata, which AUTOMATIC1111, ComfyUI, kohya's tools and diffusers read.
- **Training states.** accelerate would store each prepared model's whole state dict, the frozen base included;
  its save/load hooks here keep and restore only the adapters (and check that they all came back).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from convert.lora_kohya import KohyaAdapters, from_kohya, to_kohya
from trainer.config import lora_alpha
from trainer.errors import UserError

ADAPTER = "default"  # peft's adapter name: one adapter per model
FACTOR_MARKERS = (".lora_A.", ".lora_B.")
# Which layers each lora_targets setting adapts, by module path (Linear and Conv2d layers only). The UNet's
# conv_in, conv_out and time embedding stay out of `all`, as in kohya's LoCon: AUTOMATIC1111 maps no adapter there.
_ATTENTION = r"\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
_FEED_FORWARD = r"\.transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)$|\.attentions\.\d+\.(proj_in|proj_out)$"
_TE_ATTENTION = r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$"
_TE_MLP = r"\.mlp\.(fc1|fc2)$"
TARGET_RULES = {
    "unet": {"attn": _ATTENTION, "attn_ff": f"{_ATTENTION}|{_FEED_FORWARD}",
             "all": r"^(down_blocks|mid_block|up_blocks)\."},
    "text_encoder": {"attn": _TE_ATTENTION, "attn_ff": f"{_TE_ATTENTION}|{_TE_MLP}",
                     "all": f"{_TE_ATTENTION}|{_TE_MLP}"},  # CLIP has no other Linear layers in its blocks
}
BASE_VERSIONS = {"sd1": "sd_v1", "sd2": "sd_v2"}  # kohya's ss_base_model_version


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float
    targets: str
    text_encoder: bool

    @classmethod
    def from_config(cls, cfg) -> LoraSettings | None:
        if not cfg.lora_rank:
            return None
        return cls(cfg.lora_rank, lora_alpha(cfg), cfg.lora_dropout, cfg.lora_targets, cfg.lora_text_encoder)


@dataclass
class Adapters:
    """The adapters a run trains: which module paths of each model carry one."""

    settings: LoraSettings
    targeted: dict[str, list[str]] = field(default_factory=dict)  # model -> module paths

    def count(self, modules: dict[str, torch.nn.Module]) -> int:
        return sum(p.numel() for name in self.targeted for p in adapter_parameters(modules[name]))

    def describe(self, modules: dict[str, torch.nn.Module]) -> str:
        where = ", ".join(f"{len(paths)} {name.replace('_', '-')} layers" for name, paths in self.targeted.items())
        return (f"LoRA rank {self.settings.rank}, alpha {self.settings.alpha:g} ({self.settings.targets}): adapters on "
                f"{where}, {self.count(modules) / 1e6:.2f}M trainable parameters; the base is frozen.")


def target_paths(module: torch.nn.Module, model: str, targets: str) -> list[str]:
    """The module paths of `model` ('unet' or 'text_encoder') that `targets` adapts."""
    rule = re.compile(TARGET_RULES[model][targets])
    return [path for path, layer in module.named_modules()
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and rule.search(path)]


def adapter_count(modules: dict[str, torch.nn.Module], rank: int, targets: str) -> int:
    """Parameters of rank-`rank` adapters on the `targets` layers of `modules` (which may be on the meta device):
    down (rank x in x kernel) plus up (out x rank) for each layer."""
    total = 0
    for name, module in modules.items():
        layers = dict(module.named_modules())
        for path in target_paths(module, name, targets):
            weight = layers[path].weight
            total += rank * (weight[0].numel() + weight.shape[0])
    return total


def add_adapters(modules: dict[str, torch.nn.Module], settings: LoraSettings) -> Adapters:
    """Freeze each of `modules` (model name -> module) and give it adapters: fp32, trainable, their up factors zero
    (so training starts from the base's outputs), their down factors drawn from torch's seeded generator."""
    from peft import LoraConfig, inject_adapter_in_model

    adapters = Adapters(settings)
    for name, module in modules.items():
        paths = target_paths(module, name, settings.targets)
        if not paths:
            raise UserError(f"lora_targets {settings.targets} found no layer to adapt in the {name}; this model's "
                            "layers are not named as in Stable Diffusion 1.x/2.x.")
        module.requires_grad_(False)
        config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                            target_modules=paths, init_lora_weights=True)
        inject_adapter_in_model(config, module, adapter_name=ADAPTER)
        for param in adapter_parameters(module):
            param.data = param.data.float()  # fp32 masters, whatever the frozen base is held in
            param.requires_grad_(True)
        adapters.targeted[name] = paths
    return adapters


def is_adapter_key(key: str) -> bool:
    return any(marker in key for marker in FACTOR_MARKERS)


def adapter_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for key, p in module.named_parameters() if is_adapter_key(key)]


def adapter_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors, peft-named without the adapter name (`<module>.lora_A.weight`)."""
    return {key.replace(f".{ADAPTER}.", "."): value for key, value in module.state_dict().items()
            if is_adapter_key(key)}


# ---------------------------------------------------------------- the adapter file


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


# ---------------------------------------------------------------- training states hold only the adapters


def keep_states_to_adapters(accelerator) -> None:
    """accelerate's save_state writes each prepared model's state dict: here only its adapters (MBs, not the base's
    GBs). load_state then finds only those, so they are loaded here, checked to be complete, and accelerate is left
    no model to load."""
    from accelerate.utils.constants import SAFE_MODEL_NAME
    from safetensors.torch import load_file

    def keep_adapters(models, weights, output_dir) -> None:
        for index, state in enumerate(weights):
            weights[index] = {key: value for key, value in state.items() if is_adapter_key(key)}

    def load_adapters(models, input_dir) -> None:
        for index, model in enumerate(models):
            path = Path(input_dir) / f"{SAFE_MODEL_NAME}{'' if index == 0 else f'_{index}'}.safetensors"
            saved = load_file(str(path))
            expected = {key for key in model.state_dict() if is_adapter_key(key)}
            if set(saved) != expected:
                raise ValueError(f"{path.name} holds {len(set(saved) & expected)} of this run's {len(expected)} "
                                 "adapter tensors")
            model.load_state_dict(saved, strict=False)
        models.clear()  # loaded: accelerate would expect the base's tensors too

    accelerator.register_save_state_pre_hook(keep_adapters)
    accelerator.register_load_state_pre_hook(load_adapters)
