"""LoRA adapter weights between peft's layout and kohya's, the one AUTOMATIC1111, ComfyUI, kohya sd-scripts and
diffusers' `load_lora_weights` all read. Pure functions over state dicts: no model, no file.

peft names an adapter by its module path and factor (`down_blocks.0.attentions.0.proj_in.lora_A.weight`); kohya
names it by the same diffusers module path with `_` for `.`, a prefix for the model, and down/up for A/B:

    lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight   (rank, in[, kh, kw])
    lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight     (out, rank[, 1, 1])
    lora_unet_down_blocks_0_attentions_0_proj_in.alpha              ()  the update is up @ down * alpha / rank

Conv adapters keep their convolution shapes (down: the layer's kernel, up: 1x1), as kohya's LoCon and LyCORIS
write them. The way back cannot split a kohya name at `_` (module names hold underscores), so it matches names
against the modules a model really has.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
FACTORS = {"lora_A": "lora_down", "lora_B": "lora_up"}


def kohya_module_name(model: str, module_path: str) -> str:
    """`lora_unet_down_blocks_0_...` for the UNet module `down_blocks.0....`. The text encoder's modules are named
    as in CLIP's checkpoints (`text_model.encoder.layers...`), which every reader expects; transformers 5's
    CLIPTextModel has dropped the `text_model` level from its module tree."""
    if model == "text_encoder" and not module_path.startswith("text_model."):
        module_path = "text_model." + module_path
    return PREFIXES[model] + module_path.replace(".", "_")


def to_kohya(model: str, adapter_weights: Mapping[str, object], alpha: float, make_scalar) -> dict[str, object]:
    """peft's adapter weights of one model (`<module>.lora_A.weight`, `<module>.lora_B.weight`) in kohya's names,
    with each module's `.alpha` made by `make_scalar(alpha)` (the caller's tensor type and dtype)."""
    out: dict[str, object] = {}
    for key, tensor in adapter_weights.items():
        module_path, factor, suffix = split_peft_key(key)
        name = kohya_module_name(model, module_path)
        out[f"{name}.{FACTORS[factor]}.{suffix}"] = tensor
        out.setdefault(f"{name}.alpha", make_scalar(alpha))
    return out


def split_peft_key(key: str) -> tuple[str, str, str]:
    """('down_blocks.0.proj_in', 'lora_A', 'weight') from 'down_blocks.0.proj_in.lora_A.weight' (or with peft's
    adapter name, 'lora_A.default.weight')."""
    for factor in FACTORS:
        marker = f".{factor}."
        if marker in key:
            module_path, rest = key.split(marker, 1)
            return module_path, factor, rest.rsplit(".", 1)[-1]
    raise ValueError(f"{key!r} is not a LoRA adapter weight (no .lora_A. or .lora_B.)")


def from_kohya(tensors: Mapping[str, object], modules: Mapping[str, Iterable[str]]) -> KohyaAdapters:
    """A kohya file's tensors sorted onto the module paths each model really has (`modules`: model -> paths)."""
    by_name = {kohya_module_name(model, path): (model, path) for model, paths in modules.items() for path in paths}
    adapters = KohyaAdapters()
    for key, tensor in tensors.items():
        name, _, part = key.partition(".")
        if name not in by_name:
            adapters.unknown.append(key)
            continue
        model, path = by_name[name]
        if part == "alpha":
            adapters.alphas[(model, path)] = tensor
        elif part in ("lora_down.weight", "lora_up.weight"):
            factor = "lora_A" if part.startswith("lora_down") else "lora_B"
            adapters.weights.setdefault(model, {})[f"{path}.{factor}.weight"] = tensor
        else:
            adapters.unknown.append(key)
    return adapters


@dataclass
class KohyaAdapters:
    """What `from_kohya` found: peft-named weights per model, each module's alpha, and keys it could not place."""

    weights: dict[str, dict[str, object]] = field(default_factory=dict)  # model -> peft key -> tensor
    alphas: dict[tuple[str, str], object] = field(default_factory=dict)  # (model, module path) -> alpha
    unknown: list[str] = field(default_factory=list)

    def modules(self, model: str) -> set[str]:
        return {split_peft_key(key)[0] for key in self.weights.get(model, {})}


def adapter_file_problems(shapes: Mapping[str, tuple[int, ...]], alphas: Mapping[str, float], rank: int, alpha: float,
                          text_encoder: bool) -> list[str]:
    """What keeps a kohya file (its tensors' shapes and `.alpha` values) from starting adapters of `rank` and `alpha`
    on the UNet (and the text encoder when `text_encoder`): read before any model loads."""
    downs = {key: shape for key, shape in shapes.items() if key.endswith(".lora_down.weight")}
    if not downs:
        return ["it holds no kohya-format LoRA tensors (<module>.lora_down.weight / .lora_up.weight / .alpha)"]
    problems = []
    ranks = sorted({shape[0] for shape in downs.values()})
    if ranks != [rank]:
        problems.append(f"its rank is {'/'.join(map(str, ranks))} and lora_rank is {rank}: set lora_rank {ranks[0]}")
    found_alphas = sorted({round(value, 6) for value in alphas.values()})
    if found_alphas and found_alphas != [round(alpha, 6)]:
        problems.append(f"its alpha is {'/'.join(f'{a:g}' for a in found_alphas)} and lora_alpha is {alpha:g}: set "
                        f"lora_alpha {found_alphas[0]:g}")
    if not text_encoder and any(key.startswith(PREFIXES["text_encoder"]) for key in downs):
        problems.append("it has text-encoder adapters (lora_te_...) and lora_text_encoder is false: set it true")
    if not any(key.startswith(PREFIXES["unet"]) for key in downs):
        problems.append("it has no UNet adapters (lora_unet_...)")
    return problems
