"""LoRA mode (`lora_rank` > 0): peft adapters on a frozen base model, and training states that hold only the adapters
(the file a save writes is `lora_file.py`).

- **Adapters.** peft's layers of the `lora_kind` (the library diffusers' own `load_lora_weights` builds on) wrap the
  layers `lora_targets` names: LoRA (conv layers get conv adapters, kohya's LoCon), DoRA (peft's LoRA layers with a
  trained magnitude per input column: `dora.py`), LoHa and LoKr (peft's ports of LyCORIS's). The base stays frozen in the precision it was
  loaded in (the compute dtype on a GPU); the adapters are fp32 masters, the only trainable parameters.
- **Training states.** accelerate would store each prepared model's whole state dict, the frozen base included;
  its save/load hooks here keep and restore only what trains (and check that it all came back): the adapters,
  and an embedding's rows (trainer/adapters/embeddings.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer.adapters.dora import add_magnitudes
from trainer.config.schema import lora_alpha
from trainer.errors import UserError

ADAPTER = "default"  # peft's adapter name: one adapter per model
# What names a tensor of each kind's adapters in peft's modules (LoHa's and LoKr's are parameters without `.weight`)
FACTOR_MARKERS = (".lora_A.", ".lora_B.", ".dora_scale.", ".hada_w", ".lokr_w")
KIND_NAMES = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}
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


@dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float
    targets: str
    text_encoder: bool
    kind: str = "lora"
    factor: int = -1  # LoKr's Kronecker factor

    @classmethod
    def from_config(cls, cfg) -> LoraSettings | None:
        if not cfg.lora_rank:
            return None
        return cls(cfg.lora_rank, lora_alpha(cfg), cfg.lora_dropout, cfg.lora_targets, cfg.lora_text_encoder,
                   cfg.lora_kind, cfg.lokr_factor)

    def peft_config(self, paths: list[str]):
        """peft's config for adapters of this kind on the modules `paths`, initialised so that training starts from
        the base's outputs (LoRA's and DoRA's up, LoHa's w2_b, LoKr's w1 zero); DoRA's magnitudes are added after."""
        from peft import LoHaConfig, LoKrConfig, LoraConfig

        if self.kind == "loha":
            return LoHaConfig(r=self.rank, alpha=self.alpha, target_modules=paths, init_weights=True)
        if self.kind == "lokr":
            return LoKrConfig(r=self.rank, alpha=self.alpha, target_modules=paths, decompose_factor=self.factor,
                              init_weights=True)
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=paths,
                          init_lora_weights=True)


@dataclass
class Adapters:
    """The adapters a run trains: which module paths of each model carry one."""

    settings: LoraSettings
    targeted: dict[str, list[str]] = field(default_factory=dict)  # model -> module paths

    def count(self, modules: dict[str, torch.nn.Module]) -> int:
        return sum(p.numel() for name in self.targeted for p in adapter_parameters(modules[name]))

    def describe(self, modules: dict[str, torch.nn.Module]) -> str:
        where = ", ".join(f"{len(paths)} {name.replace('_', '-')} layers" for name, paths in self.targeted.items())
        return (f"{KIND_NAMES[self.settings.kind]} rank {self.settings.rank}, alpha {self.settings.alpha:g} "
                f"({self.settings.targets}): adapters on "
                f"{where}, {self.count(modules) / 1e6:.2f}M trainable parameters; the base is frozen.")


def target_paths(module: torch.nn.Module, model: str, targets: str) -> list[str]:
    """The module paths of `model` ('unet' or 'text_encoder') that `targets` adapts."""
    rule = re.compile(TARGET_RULES[model][targets])
    return [path for path, layer in module.named_modules()
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and rule.search(path)]


def adapter_count(modules: dict[str, torch.nn.Module], rank: int, targets: str, kind: str = "lora",
                  factor: int = -1) -> int:
    """Parameters of rank-`rank` adapters of `kind` on the `targets` layers of `modules` (which may be on the meta
    device), as peft shapes them."""
    total = 0
    for name, module in modules.items():
        layers = dict(module.named_modules())
        for path in target_paths(module, name, targets):
            weight = layers[path].weight
            total += layer_adapter_count(weight.shape[0], weight[0].numel(), weight.shape[2:].numel(), rank, kind,
                                         factor)
    return total


def layer_adapter_count(out: int, fan_in: int, kernel: int, rank: int, kind: str, factor: int) -> int:
    """One layer's adapter parameters: LoRA down (rank x fan_in) + up (out x rank); DoRA also a magnitude per
    input channel; LoHa two such pairs; LoKr a full w1 and a w2 full or of two rank-`rank` factors (peft's rule)."""
    if kind == "loha":
        return 2 * rank * (out + fan_in)
    if kind == "lokr":
        from peft.tuners.lokr.layer import factorization

        out_l, out_k = factorization(out, factor)
        in_m, in_n = factorization(fan_in // kernel, factor)
        w2_full = rank >= max(out_k, in_n) / 2
        return out_l * in_m + (out_k * in_n * kernel if w2_full else rank * (out_k + in_n * kernel))
    return rank * (fan_in + out) + (fan_in // kernel if kind == "dora" else 0)


def add_adapters(modules: dict[str, torch.nn.Module], settings: LoraSettings) -> Adapters:
    """Freeze each of `modules` (model name -> module) and give it adapters: fp32, trainable, their up factors zero
    (so training starts from the base's outputs), their down factors drawn from torch's seeded generator."""
    from peft import inject_adapter_in_model

    adapters = Adapters(settings)
    for name, module in modules.items():
        paths = target_paths(module, name, settings.targets)
        if not paths:
            raise UserError(f"lora_targets {settings.targets} found no layer to adapt in the {name}; this model's "
                            "layers are not named as in Stable Diffusion 1.x/2.x.")
        module.requires_grad_(False)
        inject_adapter_in_model(settings.peft_config(paths), module, adapter_name=ADAPTER)
        if settings.kind == "dora":
            add_magnitudes(module, paths)
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
    """The adapters' tensors, peft-named without the adapter name (`<module>.lora_A.weight`, `<module>.hada_w1_a`)."""
    return {without_adapter_name(key): value for key, value in module.state_dict().items() if is_adapter_key(key)}


def without_adapter_name(key: str) -> str:
    """`x.lora_A.weight` from peft's `x.lora_A.default.weight`, `x.hada_w1_a` from `x.hada_w1_a.default`."""
    return key.replace(f".{ADAPTER}.", ".").removesuffix(f".{ADAPTER}")


# ---------------------------------------------------------------- training states hold only what trains


def keep_states_to_trained(accelerator, is_trained: Callable[[str], bool] = is_adapter_key) -> None:
    """accelerate's save_state writes each prepared model's state dict: here, on a frozen base, only the tensors
    that train (`is_trained` by key: the adapters, an embedding's rows), MBs or KBs, not the base's GBs. load_state
    then finds only those, so they are loaded here, checked to be complete, and accelerate is left no model to
    load."""
    from accelerate.utils.constants import SAFE_MODEL_NAME
    from safetensors.torch import load_file

    def keep_trained(models, weights, output_dir) -> None:
        for index, state in enumerate(weights):
            weights[index] = {key: value for key, value in state.items() if is_trained(key)}

    def load_trained(models, input_dir) -> None:
        for index, model in enumerate(models):
            path = Path(input_dir) / f"{SAFE_MODEL_NAME}{'' if index == 0 else f'_{index}'}.safetensors"
            saved = load_file(str(path))
            expected = {key for key in model.state_dict() if is_trained(key)}
            if set(saved) != expected:
                raise ValueError(f"{path.name} holds {len(set(saved) & expected)} of this run's {len(expected)} "
                                 "trained tensors")
            model.load_state_dict(saved, strict=False)
        models.clear()  # loaded: accelerate would expect the base's tensors too

    accelerator.register_save_state_pre_hook(keep_trained)
    accelerator.register_load_state_pre_hook(load_trained)
