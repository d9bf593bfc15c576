"""Resolve `resume_ckpt` to a diffusers model folder and load it as one typed bundle.

Resolution follows explicit rules, in order, each with its own error; nothing is tried and swallowed (which rule
applies is read from paths alone by trainer/models/ckpt_cache.py `source_kind`, which the preflight asks too):
  0. `hf://owner/name[@revision]` -> that Hugging Face repo, whatever is on disk (huggingface_hub's URI grammar;
     an owner named like a repo type needs the type in front: hf://models/models/name);
  1. an existing local diffusers folder (model_index.json, or unet/, vae/ and text_encoder/);
  2. a name in the ckpt_cache folder ("my_model" -> ckpt_cache/my_model; "ckpt_cache/my_model" works too);
  3. an existing .ckpt/.safetensors file -> converted once into ckpt_cache/<file stem>, reused while the file is
     unchanged (trainer/models/ckpt_cache.py, the one writer of the cache, over the converter in convert/);
  4. a Hugging Face repo id, owner/name[@revision], that is no local path -> the files training needs, via
     trainer/models/hub.py. A relative path whose first part is a local folder (`models/sd1x` where models/ exists) is a
     local path, so it goes on to rule 5 with the near matches; hf:// asks for such a repo;
  5. otherwise one error listing what was looked for, and the local paths near the one given.
The ckpt_cache folder is the config's ckpt_cache_dir, else $CKPT_CACHE_DIR, else ckpt_cache/ in the current folder
(`find_ckpt_cache`); it is said in the log when a cache name or a single file uses it.
Loading refuses a damaged or foreign folder before any weight is read (trainer/models/checks.py), then loads each
component straight in the dtype asked for (fp32 by default, whatever the files store). The training loop only
ever sees `SDModels`, never a file format.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from safetensors import SafetensorError
from transformers import CLIPTextModel, CLIPTokenizer

from common.console import first_line, say
from common.progress import progress
from convert import ConversionError
from convert.tables import Family, PredictionType, family_of_hidden_act, original_config_name
from trainer.errors import UserError
from trainer.models.checks import ModelConfigs, check_model_folder
from trainer.models.ckpt_cache import (
    CacheEntry,
    SourceKind,
    cache_entry,
    find_ckpt_cache,
    intact_cache_entry,
    near_matches_text,
    not_found_message,
    prepare_single_file,
    source_kind,
)
from trainer.models.hub import download_model, parse_repo_id, pick_weights
from trainer.models.pinned import PinnedPart, pinned_while_loading


@dataclass(frozen=True)
class ModelInfo:
    """What the model is, read from its configs; logged at start and saved with the run."""

    path: str
    family: Family
    prediction_type: PredictionType
    upcast_attention: bool
    native_resolution: int
    original_config: str
    source_kind: SourceKind = "folder"
    source: str = ""  # what resume_ckpt named, resolved: a folder, a file, a repo at a commit
    evidence: tuple[str, ...] = ()  # how the model was found and, for a converted file, what was detected

    def describe(self) -> str:
        return (
            f"{self.family.upper()} model at {self.path}: prediction type {self.prediction_type}, "
            f"native resolution {self.native_resolution}, upcast attention {'on' if self.upcast_attention else 'off'}, "
            f"original config {self.original_config}"
        )


@dataclass(frozen=True)
class ComponentDtypes:
    """The dtype each model component is loaded in. fp32 by default, so trained weights are fp32 masters
    whatever the files store; frozen parts may take the compute dtype. `copied_by_saves`: the frozen parts whose
    saves copy their files, which are pinned as loaded (trainer/models/pinned.py)."""

    unet: torch.dtype = torch.float32
    text_encoder: torch.dtype = torch.float32
    vae: torch.dtype = torch.float32
    copied_by_saves: frozenset[str] = frozenset()


@dataclass
class SDModels:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler  # training: adds noise, defines the target
    sample_scheduler: SchedulerMixin  # the model's own inference scheduler, saved with it unchanged
    info: ModelInfo
    pinned: dict[str, PinnedPart] = field(default_factory=dict)  # ComponentDtypes.copied_by_saves' files as loaded


@dataclass(frozen=True)
class ModelSource:
    """Where `resume_ckpt` led: the diffusers folder to load, by which rule, and the evidence."""

    kind: SourceKind
    model_dir: Path
    description: str
    evidence: tuple[str, ...] = ()


def resolve_model_source(
    resume_ckpt: str,
    *,
    hf_repo_subfolder: str | None = None,
    prediction_type: PredictionType | None = None,
    ckpt_cache_dir: str | None = None,
) -> ModelSource:
    """The diffusers folder that `resume_ckpt` names, by the rules in this module's docstring; `ckpt_cache_dir` is
    the config's (None: $CKPT_CACHE_DIR, else ckpt_cache/)."""
    cache = find_ckpt_cache(ckpt_cache_dir)
    given = Path(resume_ckpt).expanduser()
    cached = cache_entry(resume_ckpt, cache.path)
    kind = source_kind(resume_ckpt, cache.path)
    if hf_repo_subfolder and kind not in ("hub", None):
        raise UserError(
            f"hf_repo_subfolder {hf_repo_subfolder!r} is set, but resume_ckpt {resume_ckpt!r} is not a Hugging Face "
            "repo id (it names a local folder, file or ckpt_cache/ entry). Set hf_repo_subfolder to null, or pass "
            "the sub-folder's own path as resume_ckpt."
        )
    if kind in ("cache", "single_file"):
        say(f"Model: ckpt_cache is {cache.describe()}")
    if kind == "folder":  # rule 1
        if _is_inside(given, cache.path):
            return _from_cache("cache", intact_cache_entry(given, f"diffusers folder {given.resolve()}"))
        return ModelSource("folder", given, f"diffusers folder {given.resolve()}")
    if kind == "cache":  # rule 2
        return _from_cache("cache", intact_cache_entry(cached, f"ckpt_cache entry {cached.resolve()}"))
    if kind == "single_file":  # rule 3
        return _from_cache("single_file", prepare_single_file(given, cache.path, prediction_type))
    if kind == "hub":  # rules 0 and 4
        repo = parse_repo_id(resume_ckpt)
        near = "" if repo.explicit else near_matches_text(given)
        local_hint = f" If you meant a local path: there is no {given}; near matches: {near}." if near else ""
        hub_model = download_model(repo, hf_repo_subfolder, local_hint=local_hint)
        return ModelSource("hub", hub_model.path, hub_model.describe(),
                           (f"files: {', '.join(hub_model.files)}", f"cache: {hub_model.cache_dir}"))
    raise UserError(not_found_message(resume_ckpt, given, cached))  # rule 5


def _from_cache(kind: SourceKind, entry: CacheEntry) -> ModelSource:
    return ModelSource(kind, entry.path, entry.description, entry.evidence)


def _is_inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


# ------------------------------------------------------------------------------------------- loading


def _sample_scheduler(configs: ModelConfigs, prediction_type: PredictionType | None) -> SchedulerMixin:
    """The scheduler class model_index.json names (DDIM, PNDM, ...) with the folder's settings; the config's
    `prediction_type`, when set, replaces the folder's (some published SD2 fine-tunes ship a wrong one)."""
    scheduler_class = getattr(diffusers, configs.scheduler_class, None)
    if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, SchedulerMixin)):
        raise UserError(f"{configs.folder / 'model_index.json'} names the scheduler class {configs.scheduler_class!r}"
                        f", which diffusers {diffusers.__version__} lacks; expected one such as DDIMScheduler.")
    try:
        scheduler = scheduler_class.from_config(configs.scheduler)
    except (ValueError, NotImplementedError) as err:  # e.g. an unknown beta_schedule
        raise UserError(f"{configs.file('scheduler')} has settings {configs.scheduler_class} cannot use "
                        f"({first_line(err)}); expected an SD1.x/2.x scheduler config. Fix or replace it.") from None
    folder_says = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type is not None and prediction_type != folder_says:
        say(f"Model: prediction_type {prediction_type} from the config replaces {folder_says} of "
            f"{configs.folder}/scheduler")
        scheduler = scheduler_class.from_config(scheduler.config, prediction_type=prediction_type)
    return scheduler


def _load_component(from_pretrained: Callable[..., Any], model_dir: Path, component: str, **kwargs: Any) -> Any:
    """One component's from_pretrained. What it raises on a file the checks before could not judge (weights
    that do not fit their config, a missing shard) becomes one message."""
    try:
        return _in_own_memory(from_pretrained(model_dir, subfolder=component, **kwargs))
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise UserError(
            f"could not load {model_dir / component}: {type(err).__name__}: {first_line(err)}. Expected files "
            "that fit its config; the folder is damaged or mixes files of different models: copy, download or "
            "convert the model again."
        ) from None


def _in_own_memory(part: Any) -> Any:
    """`part` with its weights copied out of the model's files. On the CPU, weights that load without a dtype
    change stay memory-mapped from the safetensors files: a file replaced in place during the run would change
    them, and one cut short would kill the run (SIGBUS) at the next read. On a GPU the move to it copies them."""
    if isinstance(part, torch.nn.Module) and not torch.cuda.is_available():
        with torch.no_grad():
            for tensor in [*part.parameters(), *part.buffers()]:
                tensor.data = tensor.data.clone()
    return part


def weights_mib(folder: Path) -> int:
    """The MiB of weights a loader reads from a component's `folder` (the one format it picks), at least 1."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    return max(1, round(sum((folder / name).stat().st_size for name in pick_weights(names)) / 2**20))


def describe_model(model_dir: Path, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                   scheduler: SchedulerMixin) -> ModelInfo:
    # the text encoder tells the family (convert/tables.py): OpenAI CLIP for SD1, OpenCLIP for SD2
    try:
        family = family_of_hidden_act(text_encoder.config.hidden_act)
    except ConversionError as err:
        raise UserError(f"{model_dir / 'text_encoder' / 'config.json'}: {err}; expected an SD1.x/2.x text "
                        "encoder. Use a Stable Diffusion 1.x/2.x model.") from None
    prediction_type = scheduler.config.get("prediction_type", "epsilon")  # checked before loading
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return ModelInfo(
        path=str(model_dir.resolve()),
        family=family,
        prediction_type=prediction_type,
        upcast_attention=bool(unet.config.upcast_attention),
        native_resolution=int(unet.config.sample_size) * vae_scale,
        original_config=original_config_name(family, prediction_type),
    )


def load_model_dir(
    model_dir: Path, prediction_type: PredictionType | None = None, *, dtypes: ComponentDtypes | None = None
) -> SDModels:
    """Check a diffusers SD folder (trainer/models/checks.py: refused before any weight is read), then load each
    component straight in its dtype of `dtypes`, fp32 by default, whatever dtype the files store; the files of
    `dtypes.copied_by_saves` stay pinned as loaded.

    `prediction_type` overrides what the folder's scheduler says; the model is then trained and saved with it.
    """
    dtypes = dtypes or ComponentDtypes()
    configs = check_model_folder(model_dir, prediction_type)
    sample_scheduler = _sample_scheduler(configs, prediction_type)
    sizes = {name: weights_mib(model_dir / name) for name in ("unet", "vae", "text_encoder")}
    # read, cast and copied out of the files: 8.5 s for SD1.5 on 2 CPU cores from a warm disk cache, more from a cold
    # one; diffusers shows no bar for a UNet or VAE in one file (transformers' own bar for the text encoder stays)
    with (pinned_while_loading(model_dir, dtypes.copied_by_saves) as pinned,
          progress("Model: loading", total=sum(sizes.values()), unit="MiB") as bar):
        unet = _load_component(UNet2DConditionModel.from_pretrained, model_dir, "unet", torch_dtype=dtypes.unet)
        bar.update(sizes["unet"])
        vae = _load_component(AutoencoderKL.from_pretrained, model_dir, "vae", torch_dtype=dtypes.vae)
        bar.update(sizes["vae"])
        # transformers 5 calls it `dtype`; its default, "auto", would keep the dtype the file stores
        text_encoder = _load_component(CLIPTextModel.from_pretrained, model_dir, "text_encoder",
                                       dtype=dtypes.text_encoder)
        bar.update(sizes["text_encoder"])
    tokenizer = _load_component(CLIPTokenizer.from_pretrained, model_dir, "tokenizer")
    # Training always uses DDPM's forward process with the model's own betas and prediction type.
    noise_scheduler = DDPMScheduler.from_config(sample_scheduler.config)
    info = describe_model(model_dir, unet, vae, text_encoder, sample_scheduler)
    return SDModels(unet, vae, text_encoder, tokenizer, noise_scheduler, sample_scheduler, info, pinned)


def load_models(
    resume_ckpt: str,
    *,
    hf_repo_subfolder: str | None = None,
    prediction_type: PredictionType | None = None,
    dtypes: ComponentDtypes | None = None,
    ckpt_cache_dir: str | None = None,
) -> SDModels:
    """Resolve `resume_ckpt` (see the module docstring; `ckpt_cache_dir` is the config's), load it in `dtypes` (fp32
    by default), and record where it came from."""
    source = resolve_model_source(resume_ckpt, hf_repo_subfolder=hf_repo_subfolder, prediction_type=prediction_type,
                                  ckpt_cache_dir=ckpt_cache_dir)
    say(f"Model source: {source.description}")
    models = load_model_dir(source.model_dir, prediction_type, dtypes=dtypes)
    models.info = dataclasses.replace(
        models.info, source_kind=source.kind, source=source.description, evidence=source.evidence)
    return models
