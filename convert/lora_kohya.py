"""Adapter weights between peft's layout and kohya's/LyCORIS's, the one AUTOMATIC1111, ComfyUI, kohya sd-scripts and
diffusers' `load_lora_weights` read. Pure functions over state dicts: no model, no file.

peft names an adapter by its module path and part (`down_blocks.0.attentions.0.proj_in.lora_A.weight`); kohya
names it by the same diffusers module path with `_` for `.`, a prefix for the model, and its own part names:

    lora_unet_<module>.lora_down.weight   (rank, in[, kh, kw])     LoRA and DoRA: the update is
    lora_unet_<module>.lora_up.weight     (out, rank[, 1, 1])      up @ down * alpha / rank
    lora_unet_<module>.dora_scale         (1, in[, 1, 1])          DoRA: each input column's magnitude (the layout
                                                                   AUTOMATIC1111 and ComfyUI merge by that norm)
    lora_unet_<module>.hada_w1_a ...      LoHa (LyCORIS's names): (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank
    lora_unet_<module>.lokr_w1 ...        LoKr: kron(w1, w2) * alpha / rank, w2 full or w2_a @ w2_b
    lora_unet_<module>.alpha              ()

Conv adapters keep their convolution shapes (LoRA down: the layer's kernel, up: 1x1), as kohya's LoCon and LyCORIS
write them; LoHa and LoKr hold conv layers flattened to (out, in * kh * kw), as peft and LyCORIS do without Tucker.
One difference between the readers is absorbed here: where both LoKr factors are full matrices (peft's choice for a
rank at least half the factor sizes), AUTOMATIC1111, ComfyUI and LyCORIS apply a scale of 1 whatever the alpha, so
the file's w2 carries peft's alpha / rank itself (`file_scales`).
The way back cannot split a kohya name at `_` (module names hold underscores), so it matches names against the
modules a model really has.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
# peft's part name (adapter name removed) -> the file's
PARTS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
         **{name: name for name in ("dora_scale", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
                                    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")}}
FILE_PARTS = {file: peft for peft, file in PARTS.items()}
# the part that tells each kind, in the order they are told apart (a DoRA module holds LoRA's parts too)
KIND_OF_PART = {"dora_scale": "dora", "hada_w1_a": "loha", "lokr_w1": "lokr", "lokr_w1_a": "lokr",
                "lora_A.weight": "lora"}
RANK_ROWS = ("lora_A.weight", "hada_w1_b", "lokr_w1_b", "lokr_w2_b")  # parts whose first dimension is the rank


def kohya_module_name(model: str, module_path: str) -> str:
    """`lora_unet_down_blocks_0_...` for the UNet module `down_blocks.0....`. The text encoder's modules are named
    as in CLIP's checkpoints (`text_model.encoder.layers...`), which every reader expects; transformers 5's
    CLIPTextModel has dropped the `text_model` level from its module tree."""
    if model == "text_encoder" and not module_path.startswith("text_model."):
        module_path = "text_model." + module_path
    return PREFIXES[model] + module_path.replace(".", "_")


def split_peft_key(key: str) -> tuple[str, str]:
    """('down_blocks.0.proj_in', 'lora_A.weight') from 'down_blocks.0.proj_in.lora_A.weight' (peft's adapter name
    already removed)."""
    for part in PARTS:
        if key.endswith("." + part):
            return key[: -len(part) - 1], part
    raise ValueError(f"{key!r} is not an adapter weight (no LoRA, DoRA, LoHa or LoKr part)")


def by_module(weights: Mapping[str, object]) -> dict[str, dict[str, object]]:
    """peft-named weights grouped as module path -> part -> tensor."""
    grouped: dict[str, dict[str, object]] = {}
    for key, tensor in weights.items():
        path, part = split_peft_key(key)
        grouped.setdefault(path, {})[part] = tensor
    return grouped


def file_scales(parts: Mapping[str, object], alpha: float, rank: int) -> float:
    """What the file's lokr_w2 holds times peft's: alpha / rank where both LoKr factors are full (readers then apply
    no scale of their own), else 1."""
    return alpha / rank if "lokr_w1" in parts and "lokr_w2" in parts else 1.0


def to_kohya(model: str, adapter_weights: Mapping[str, object], alpha: float, rank: int,
             make_scalar) -> dict[str, object]:
    """peft's adapter weights of one model in kohya's/LyCORIS's names, with each module's `.alpha` made by
    `make_scalar(alpha)` (the caller's tensor type and dtype)."""
    out: dict[str, object] = {}
    for path, parts in by_module(adapter_weights).items():
        name = kohya_module_name(model, path)
        for part, tensor in parts.items():
            if part == "lokr_w2":
                tensor = tensor * file_scales(parts, alpha, rank)
            out[f"{name}.{PARTS[part]}"] = tensor
        out[f"{name}.alpha"] = make_scalar(alpha)
    return out


def from_kohya(tensors: Mapping[str, object], modules: Mapping[str, Iterable[str]]) -> KohyaAdapters:
    """A kohya/LyCORIS file's tensors sorted onto the module paths each model really has (`modules`: model ->
    paths), in peft's part names and the file's layout (`KohyaAdapters.peft_weights` undoes the layout)."""
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
        elif part in FILE_PARTS:
            adapters.weights.setdefault(model, {})[f"{path}.{FILE_PARTS[part]}"] = tensor
        else:
            adapters.unknown.append(key)
    return adapters


@dataclass
class KohyaAdapters:
    """What `from_kohya` found: peft-named weights per model (the file's layout), each module's alpha, and keys it
    could not place."""

    weights: dict[str, dict[str, object]] = field(default_factory=dict)  # model -> peft key -> tensor
    alphas: dict[tuple[str, str], object] = field(default_factory=dict)  # (model, module path) -> alpha
    unknown: list[str] = field(default_factory=list)

    def modules(self, model: str) -> set[str]:
        return set(by_module(self.weights.get(model, {})))

    def peft_weights(self, model: str, alpha: float, rank: int) -> dict[str, object]:
        """One model's weights in peft's layout (a full LoKr w2 without the alpha / rank the file carries)."""
        out = {}
        for path, parts in by_module(self.weights.get(model, {})).items():
            for part, tensor in parts.items():
                out[f"{path}.{part}"] = tensor / file_scales(parts, alpha, rank) if part == "lokr_w2" else tensor
        return out


def parts_kind(parts: Iterable[str]) -> str | None:
    """The adapter kind (lora, dora, loha, lokr) that peft-named parts say, or None."""
    present = set(parts)
    return next((kind for part, kind in KIND_OF_PART.items() if part in present), None)


def part_ranks(shapes: Iterable[tuple[str, tuple[int, ...]]]) -> set[int]:
    """The ranks that peft-named parts' shapes ((part, shape) pairs) show: a LoRA/DoRA down factor's rows, a LoHa
    w1_b's, a decomposed LoKr factor's (a LoKr of full factors shows none)."""
    return {shape[0] for part, shape in shapes if part in RANK_ROWS}


def file_parts(keys: Iterable[str]) -> Iterable[tuple[str, str]]:
    """(key, peft part) of each file tensor name that is an adapter part."""
    return ((key, FILE_PARTS[part]) for key in keys if (part := key.partition(".")[2]) in FILE_PARTS)


def file_kind(keys: Iterable[str]) -> str | None:
    """The adapter kind a file's tensor names say, or None when none is there."""
    return parts_kind(part for _, part in file_parts(keys))


def adapter_file_problems(shapes: Mapping[str, tuple[int, ...]], alphas: Mapping[str, float], rank: int, alpha: float,
                          text_encoder: bool, kind: str = "lora") -> list[str]:
    """What keeps a kohya/LyCORIS file (its tensors' shapes and `.alpha` values) from starting adapters of `kind`,
    `rank` and `alpha` on the UNet (and the text encoder when `text_encoder`): read before any model loads."""
    found = file_kind(shapes)
    if found is None:
        return ["it holds no kohya-format adapter tensors (LoRA's <module>.lora_down.weight / .lora_up.weight / .alpha, "
                "or LyCORIS's LoHa hada_* and LoKr lokr_* tensors)"]
    problems = []
    if found != kind:
        problems.append(f"it holds {found} adapters and lora_kind is {kind}: set lora_kind {found}")
    ranks = sorted(part_ranks((part, shapes[key]) for key, part in file_parts(shapes)))
    if ranks and ranks != [rank]:
        problems.append(f"its rank is {'/'.join(map(str, ranks))} and lora_rank is {rank}: set lora_rank {ranks[0]}")
    found_alphas = sorted({round(value, 6) for value in alphas.values()})
    if found_alphas and found_alphas != [round(alpha, 6)]:
        problems.append(f"its alpha is {'/'.join(f'{a:g}' for a in found_alphas)} and lora_alpha is {alpha:g}: set "
                        f"lora_alpha {found_alphas[0]:g}")
    names = {key.partition(".")[0] for key in shapes if not key.endswith(".alpha")}
    if not text_encoder and any(name.startswith(PREFIXES["text_encoder"]) for name in names):
        problems.append("it has text-encoder adapters (lora_te_...) and lora_text_encoder is false: set it true")
    if not any(name.startswith(PREFIXES["unet"]) for name in names):
        problems.append("it has no UNet adapters (lora_unet_...)")
    return problems
