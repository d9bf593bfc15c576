"""The memory plan: the peak memory a run needs per device, predicted from the config before any weight loads, and
which settings to change when it does not fit (`--dry_run`, `--vram_gb`).

The peak is the largest of three moments of a step, each a sum of parts:
- static, held all run: the weights (trained ones as fp32 masters, frozen ones in the compute dtype), the optimizer
  state, the EMA copy on the device, the text-embedding cache, and the runtime (CUDA context, or the process);
- the end of the forward pass: static + every activation kept for backward + (mixed precision) the half copies
  autocast makes of the trained weights, which its cache holds until the forward returns;
- the backward pass, replayed op by op in reverse (`activations.py` records each saved tensor with the op that
  saved it): activations are freed as backward passes them and each trained weight's fp32 gradient appears
  at its last use; with gradient checkpointing a region's activations exist only while backward is inside it, and
  its inputs until then. The optimizer step is the replay's end: static + every gradient.
Activations come from the real architecture traced on the meta device at batch 1, and grow linearly with the
batch; everything else is parameter counts times bytes.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from convert.tokenizer import CLIP_MAX_LENGTH as CONTEXT_TOKENS  # the prompt's token count
from trainer.saves.footprint import optimizer_state_bytes

REPO_ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30
DTYPE_BYTES = {"no": 4, "fp16": 2, "bf16": 2}
RUNTIME_BYTES = {"gpu": int(0.6 * GIB), "cpu": int(1.0 * GIB)}  # CUDA context + kernels; the process's own RSS
ATTENTION_BACKWARD_MATRICES = 2  # the gradients of the probabilities and of the scores (PyTorch's math SDPA)
ALLOCATOR_SLACK = 1.05  # the caching allocator's fragmentation on a GPU, and malloc's on a CPU


@dataclass(frozen=True)
class ModelParams:
    """What the plan knows of the model: its configs (for the activation trace) and parameter counts."""

    unet_config: dict
    text_encoder_config: dict
    unet: int
    text_encoder: int
    vae: int

    @property
    def text_width(self) -> int:
        return self.text_encoder_config["hidden_size"]


@dataclass(frozen=True)
class Settings:
    """The config's settings that move memory, already resolved for the device."""

    batch: int
    resolution: int
    precision: str  # no, fp16, bf16
    optimizer: str  # a label such as adamw, or unet+text_encoder names (trainer/saves/footprint.py)
    gradient_checkpointing: bool
    train_text_encoder: bool
    ema_on_device: bool = False
    fused_backward: bool = False
    text_cache_entries: int = 0  # distinct captions whose embeddings the cache holds
    processes: int = 1
    gpu: bool = True
    save_bytes: int = 2  # per parameter of a save's weights (fp16; 4 with save_full_precision)
    lora_rank: int = 0  # LoRA mode: only adapters train; the base is held in the compute precision
    lora_targets: str = "attn_ff"
    lora_text_encoder: bool = False  # LoRA mode: the text encoder has adapters too
    lora_kind: str = "lora"  # lora, dora, loha, lokr (trainer/adapters/lora.py)
    lokr_factor: int = -1
    embedding_rows: int = 0  # embedding mode: the token rows that train (vectors x width each); the base is frozen
    plain_attention: bool = False  # deterministic on a GPU: the math kernel, which keeps each attention matrix

    @property
    def frozen_base(self) -> bool:
        return bool(self.lora_rank or self.embedding_rows)

    @classmethod
    def from_config(cls, cfg, optimizer_label: str, text_cache_entries: int = 0, processes: int = 1,
                    gpu: bool = True, embedding_vectors: int = 0) -> Settings:
        return cls(batch=cfg.batch_size, resolution=cfg.resolution, precision=cfg.mixed_precision,
                   optimizer=optimizer_label, gradient_checkpointing=bool(cfg.gradient_checkpointing),
                   train_text_encoder=not cfg.disable_textenc_training,
                   ema_on_device=cfg.ema_decay_rate is not None and cfg.ema_device == "gpu",
                   fused_backward=cfg.fused_backward, text_cache_entries=text_cache_entries, processes=processes,
                   gpu=gpu, save_bytes=4 if cfg.save_full_precision else 2, lora_rank=cfg.lora_rank,
                   lora_targets=cfg.lora_targets, lora_text_encoder=cfg.lora_text_encoder,
                   lora_kind=cfg.lora_kind, lokr_factor=cfg.lokr_factor,
                   embedding_rows=embedding_vectors, plain_attention=cfg.deterministic and gpu)


@dataclass(frozen=True)
class MemoryPlan:
    parts: dict[str, int]  # static parts, bytes
    forward_peak: int  # activations (and weight copies) at the end of the forward pass
    backward_peak: int  # activations + gradients at the worst point of backward (the optimizer step included)
    slack: float
    save_peak: int = 0  # a save's copy of the weights in their save dtype: in host memory, so on a CPU only

    @property
    def static(self) -> int:
        return sum(self.parts.values())

    @property
    def peak(self) -> int:
        return int((self.static + max(self.forward_peak, self.backward_peak, self.save_peak)) * self.slack)

    def describe(self) -> str:
        parts = ", ".join(f"{name} {gib(n)}" for name, n in self.parts.items() if n)
        save = f", the save's copy of the weights {gib(self.save_peak)}" if self.save_peak else ""
        return (f"{gib(self.peak)} GiB peak per device: {parts}; then activations {gib(self.forward_peak)} at the "
                f"forward's end, activations+gradients {gib(self.backward_peak)} at backward's worst{save}")


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def plan_memory(model: ModelParams, settings: Settings) -> MemoryPlan:
    from trainer.preflight.activations import trace

    profile = trace(model.unet_config, model.text_encoder_config if settings.train_text_encoder else None,
                    settings.resolution, settings.precision, settings.plain_attention)
    compute = DTYPE_BYTES[settings.precision]
    if settings.frozen_base:  # the whole base frozen in the compute dtype; adapters and embedding rows train
        trained = (adapter_params(model, settings) if settings.lora_rank else 0) + \
            settings.embedding_rows * model.text_width
        frozen_bytes = (model.unet + model.text_encoder + model.vae) * compute
    else:
        trained = model.unet + (model.text_encoder if settings.train_text_encoder else 0)
        frozen_bytes = (model.vae + (0 if settings.train_text_encoder else model.text_encoder)) * compute
    parts = {
        "weights": trained * 4 + frozen_bytes,
        "optimizer state": int(trained * optimizer_state_bytes(settings.optimizer)),
        "EMA": trained * 4 if settings.ema_on_device else 0,
        "DDP buckets": trained * 4 if settings.processes > 1 else 0,  # DDP's flat copy of the gradients
        "text cache": settings.text_cache_entries * CONTEXT_TOKENS * model.text_width * compute,
        "runtime": RUNTIME_BYTES["gpu" if settings.gpu else "cpu"],
    }
    if settings.lora_rank and settings.lora_kind in KIND_EXTRA:
        parts[KIND_EXTRA[settings.lora_kind]] = adapter_kind_bytes(model, settings, compute)
    forward, backward = replay(profile, settings.batch, settings.gradient_checkpointing, settings.fused_backward,
                               frozen_base=settings.frozen_base)
    # a save gathers the weights in their save dtype in host memory: a GPU's memory never holds that copy
    saved = trained if settings.frozen_base else model.unet + model.text_encoder + model.vae
    save = 0 if settings.gpu else saved * settings.save_bytes
    return MemoryPlan(parts, forward, backward, ALLOCATOR_SLACK, save)


def replay(profile, batch: int, checkpointing: bool, fused_backward: bool,
           frozen_base: bool = False) -> tuple[int, int]:
    """(bytes at the forward's end, worst bytes during backward) of activations and gradients, at `batch`.
    `frozen_base` (LoRA): the weights are held in the compute dtype already, so there are no half copies, and
    only the adapters get gradients (counted with the weights). Its activations are an upper bound: a frozen
    layer's backward needs its weight, not its input, so autograd keeps somewhat less than the trace saw."""
    def size(saved) -> int:
        return saved.nbytes * (batch if saved.per_sample else 1)

    kept = [s for s in profile.saved if (s.region is None or not checkpointing) and (s.per_sample or not frozen_base)]
    inputs = sum(nbytes for _, nbytes, _ in profile.region_inputs) * batch if checkpointing else 0
    activations = sum(size(s) for s in kept if s.per_sample) + inputs
    # autocast caches a half copy of every trained weight until the forward returns; backward keeps the copies
    # its ops saved (outside checkpointed regions: those recompute theirs)
    forward = activations + (0 if frozen_base else profile.weight_copies)
    held = activations + sum(s.nbytes for s in kept if not s.per_sample)

    # backward, op by op from the last: a gradient appears at its weight's last use, a saved tensor is freed once
    # backward has passed the first op that saved it
    frees: dict[int, int] = {}
    allocs: dict[int, int] = {}
    for saved in kept:
        frees[saved.first_op] = frees.get(saved.first_op, 0) + size(saved)
    if checkpointing:
        for region, nbytes, _ in profile.region_inputs:
            start, _ = profile.regions[region]
            frees[start] = frees.get(start, 0) + nbytes * batch
    if not fused_backward and not frozen_base:  # fused: each gradient is consumed and freed as soon as it is ready
        for op, numel in profile.params_last_use:
            allocs[op] = allocs.get(op, 0) + numel * 4
    # what lives for a moment while backward is at an op: the gradients of its output and inputs, and for the plain
    # attention kernel two more matrices beside the one it kept
    work = {op: ATTENTION_BACKWARD_MATRICES * nbytes * batch for op, nbytes in profile.attention_matrices}
    for op, nbytes in profile.gradient_work:
        work[op] = work.get(op, 0) + nbytes * batch
    worst = forward
    region_live = _region_live(profile, batch) if checkpointing else lambda op: 0
    stops = {*frees, *allocs, *work, *(end for _, end in profile.regions if checkpointing)}
    for op in sorted(stops, reverse=True):
        held += allocs.get(op, 0)
        worst = max(worst, held + region_live(op) + work.get(op, 0))
        held -= frees.get(op, 0)
    return forward, worst


def _region_live(profile, batch: int) -> Callable[[int], int]:
    """With checkpointing: op -> the recomputed activations of the region backward is in at that op, still held
    there (the bytes its region saved at or before the op)."""
    starts = [start for start, _ in profile.regions]
    saved_by_region: dict[int, list[tuple[int, int]]] = {}
    for s in sorted(profile.saved, key=lambda s: s.first_op):
        if s.region is not None:
            saved_by_region.setdefault(s.region, []).append((s.first_op, s.nbytes * (batch if s.per_sample else 1)))
    totals = {region: ([op for op, _ in saved], list(itertools.accumulate(n for _, n in saved)))
              for region, saved in saved_by_region.items()}

    def live(op: int) -> int:
        index = bisect.bisect_right(starts, op) - 1
        if index < 0 or op > profile.regions[index][1] or index not in totals:
            return 0
        ops, running = totals[index]
        count = bisect.bisect_right(ops, op)
        return running[count - 1] if count else 0

    return live


# ---------------------------------------------------------------- advice


CHANGES = [  # (setting, value, what it says), tried in this order: cheapest loss of speed or quality first
    ("gradient_checkpointing", True, "gradient_checkpointing true"),
    # faster too, but gives up what the user asked for (bit-for-bit repeats): after checkpointing, which keeps it
    ("plain_attention", False, "deterministic false"),
    ("optimizer", "adamw8bit", "optimizer adamw8bit"),
    ("fused_backward", True, "fused_backward true"),
    ("ema_on_device", False, "ema_device cpu"),
    ("train_text_encoder", False, "disable_textenc_training true"),
]


def advice(model: ModelParams, settings: Settings, budget: int) -> list[tuple[str, int]]:
    """Settings to change, in order, each with the plan's peak once it (and those before it) changed, until the
    plan fits `budget` bytes; then smaller batches. Empty when it fits already."""
    steps: list[tuple[str, int]] = []
    current = settings
    if plan_memory(model, current).peak <= budget:
        return []
    for attribute, value, words in CHANGES:
        if getattr(current, attribute) == value or not _allowed(current, attribute):
            continue
        current = dataclasses.replace(current, **{attribute: value})
        if attribute == "train_text_encoder" and current.lora_rank:
            current, words = dataclasses.replace(current, lora_text_encoder=False), "lora_text_encoder false"
        steps.append((words, plan_memory(model, current).peak))
        if steps[-1][1] <= budget:
            return steps
    while current.batch > 1:
        current = dataclasses.replace(current, batch=current.batch // 2)
        steps.append((f"batch_size {current.batch}", plan_memory(model, current).peak))
        if steps[-1][1] <= budget:
            return steps
    return steps


def adapter_params(model: ModelParams, settings: Settings) -> int:
    """The LoRA adapters' parameter count, from the model's layers built on the meta device."""
    from trainer.adapters.lora import adapter_count
    from trainer.preflight.activations import meta_models

    unet, text_encoder = meta_models(model.unet_config, model.text_encoder_config)
    modules = {"unet": unet, **({"text_encoder": text_encoder} if settings.lora_text_encoder else {})}
    return adapter_count(modules, settings.lora_rank, settings.lora_targets, settings.lora_kind, settings.lokr_factor)


KIND_EXTRA = {"dora": "DoRA's kept inputs", "loha": "LoHa's built updates", "lokr": "LoKr's built updates"}


def adapter_kind_bytes(model: ModelParams, settings: Settings, compute: int) -> int:
    """What an adapter kind keeps for backward beyond LoRA, per adapted layer: LoHa and LoKr build the layer's whole
    update (out x in) each forward and keep it; DoRA keeps each layer's input beside the scaled one, to train the
    magnitudes. With gradient checkpointing only the region being recomputed holds them (the largest is counted)."""
    from trainer.preflight.activations import adapted_layers

    layers = adapted_layers(model.unet_config, model.text_encoder_config if settings.lora_text_encoder else None,
                            settings.resolution, settings.lora_targets)
    if settings.lora_kind == "dora":
        # the layer's input is kept beside its scaled copy (which the layer keeps as LoRA keeps its input)
        sizes = [(layer.region, layer.input * settings.batch * compute) for layer in layers]
    else:
        sizes = [(layer.region, layer.weight * compute) for layer in layers]
    outside = sum(size for region, size in sizes if region is None or not settings.gradient_checkpointing)
    by_region: dict[int, int] = {}
    for region, size in sizes:
        if region is not None and settings.gradient_checkpointing:
            by_region[region] = by_region.get(region, 0) + size
    return outside + max(by_region.values(), default=0)


def _allowed(settings: Settings, attribute: str) -> bool:
    """fused_backward cannot combine with several processes or embeddings (trainer/config/checks.py has the full
    list); an embedding's rows are the text encoder's, so it keeps training."""
    if attribute == "fused_backward":
        return settings.processes == 1 and not settings.embedding_rows
    return not (attribute == "train_text_encoder" and settings.embedding_rows)


# ---------------------------------------------------------------- the model, and what a run says


def model_params_of(models) -> ModelParams:
    """The loaded models' configs and counts."""
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return ModelParams(dict(models.unet.config), models.text_encoder.config.to_dict(), count(models.unet),
                       count(models.text_encoder), count(models.vae))


def model_params_on_disk(resume_ckpt: str, ckpt_cache_dir: str | None = None) -> ModelParams | None:
    """The base model's configs and counts from its files, no weights read: a diffusers folder (or a name in the
    ckpt_cache folder, `ckpt_cache_dir` being the config's) by its config files and weight headers; an original
    .safetensors by its header, with its family's stock configs. None for what is not on disk yet (a Hub id) or
    cannot be read without loading (a .ckpt)."""
    from trainer.models.ckpt_cache import cache_entry, find_ckpt_cache
    from trainer.saves.footprint import component_numels_in_folder, component_numels_in_single_file

    given = Path(resume_ckpt).expanduser()
    try:
        for folder in (given, cache_entry(resume_ckpt, find_ckpt_cache(ckpt_cache_dir).path)):
            if folder.is_dir() and (folder / "unet" / "config.json").is_file():
                counts = component_numels_in_folder(folder)
                return counts and ModelParams(read_json(folder / "unet" / "config.json"),
                                              read_json(folder / "text_encoder" / "config.json"), **counts)
        if given.is_file():
            counts = component_numels_in_single_file(given)
            return counts and ModelParams(*_single_file_configs(given), **counts)
    except (OSError, ValueError, KeyError):  # unreadable: the model load names the damage
        return None
    return None


def _single_file_configs(path: Path) -> tuple[dict, dict]:
    """A single file's UNet and text-encoder configs as the converter would write them: its sidecar yaml, else
    its family's shipped yaml when the shapes fit it, else the shapes (read from the header: no weight loads)."""
    import torch

    from common.safetensors_header import read_header
    from convert.configs import fitting_original_config, text_encoder_config, unet_config_from_ldm
    from convert.read import load_original_config, sidecar_yaml_path
    from convert.shapes import block_indices
    from convert.tables import FAMILIES

    tensors = read_header(path).tensors
    state = {key: torch.empty(info.shape, device="meta") for key, info in tensors.items()}
    (family,) = [family for family, spec in FAMILIES.items() if spec.sentinel in state]
    spec = FAMILIES[family]
    sidecar = sidecar_yaml_path(path)
    stock = REPO_ROOT / ("v1-inference.yaml" if family == "sd1" else "v2-inference.yaml")
    original = load_original_config(sidecar) if sidecar.is_file() else fitting_original_config(state, stock)[0]
    width = state[spec.sentinel].shape[1]
    blocks = len(block_indices(state, spec.text_blocks))
    return (unet_config_from_ldm(original, 512, False, None), text_encoder_config(family, width, blocks))


def report(model: ModelParams | None, settings: Settings, budget: int | None) -> tuple[list[str], list[str]]:
    """(lines to say, warnings): the plan, and when it exceeds `budget` bytes, what to change."""
    if model is None:
        return ["Memory plan: the model's configs are not on this machine yet (a Hub id not downloaded, or a "
                ".ckpt); the run prints its plan once the model has loaded."], []
    plan = plan_memory(model, settings)
    where = f"{'GPU' if settings.gpu else 'CPU'}, {settings.precision if settings.precision != 'no' else 'fp32'}"
    where += ", deterministic's plain attention" if settings.plain_attention else ""
    lines = [f"Memory plan ({where}, batch {settings.batch} at {settings.resolution}px, gradient checkpointing "
             f"{'on' if settings.gradient_checkpointing else 'off'}): {plan.describe()}."]
    if budget is None or plan.peak <= budget:
        return lines + ([f"Memory plan: fits {gib(budget)} GiB."] if budget else []), []
    steps = advice(model, settings, budget)
    fixes = ", then ".join(f"{words} ({gib(peak)} GiB)" for words, peak in steps)
    fits = steps and steps[-1][1] <= budget
    return lines, [f"Memory plan: {gib(plan.peak)} GiB does not fit {gib(budget)} GiB per device. "
                   + (f"To fit: {fixes}." if fits else f"Even with {fixes} it would not fit: lower resolution, "
                      "or train on a device with more memory.")]


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def memory_report(cfg, preflight, device, model: ModelParams | None) -> tuple[list[str], list[str]]:
    """The plan of a resolved config on `device` (trainer/preflight/device.Device), checked against vram_gb or
    the GPU's own memory."""
    caches_text = cfg.disable_textenc_training and cfg.text_embedding_cache and not cfg.shuffle_tags
    captions = len({item.caption for item in preflight.scan.items}) + 1 if caches_text else 0  # + the empty one
    settings = Settings.from_config(cfg, preflight.optimizer.label, captions, device.processes, device.gpu,
                                    sum(token.vectors for token in preflight.embeddings))
    budget = int(cfg.vram_gb * GIB) if cfg.vram_gb else device.memory
    return report(model, settings, budget)


def predict_peak_gib(unet_config: dict, text_encoder_config: dict, *, batch: int, resolution: int, precision: str,
                     optimizer: str, gradient_checkpointing: bool, train_text_encoder: bool, cached_latents: bool,
                     vae_params: int = 83_653_863, fused_backward: bool = False) -> float:
    """The plan's peak for a bare configuration (bench/gpu/bench_gpu.py prints it beside each measured peak), without
    the runtime's CUDA context (torch's allocator statistics do not see it). `cached_latents` changes no part of
    the plan: the VAE is held either way, and its encode happens before the UNet's activations exist."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = sum(p.numel() for p in UNet2DConditionModel.from_config(unet_config).parameters())
        text_encoder = sum(p.numel() for p in CLIPTextModel(CLIPTextConfig(**text_encoder_config)).parameters())
    model = ModelParams(unet_config, text_encoder_config, unet, text_encoder, vae_params)
    settings = Settings(batch=batch, resolution=resolution, precision=precision, optimizer=optimizer,
                        gradient_checkpointing=gradient_checkpointing, train_text_encoder=train_text_encoder,
                        fused_backward=fused_backward, gpu=True)
    plan = plan_memory(model, settings)
    return (plan.peak / plan.slack - plan.parts["runtime"]) / GIB
