"""The preflight: every file and place the config names is checked right after the config loads, before any
model loads, and every problem is reported together (exit 2), as config errors are. `--dry_run` runs it too.

It checks that
- data_root (and validation_data_root) hold usable images, and a validation split leaves images to train on;
  with masked_training each image's mask can be used (data/masking/masks.py; one that cannot is said, and its image trains
  without it);
- the run folder, the save folder and the latent-cache folder can be created and written, and none is a file;
  a run_name already in use is refused (a new run never writes into another run's folder); a read-only
  data_root gets its latent cache in a writable place, said in a notice;
- resume_ckpt names something (trainer/models/load.py's rules), and where it goes can take it: the ckpt_cache folder
  (writable, with room) for a single file to convert, the hub cache (writable) for a download;
- the save folder's disk has room for one save, when the model's size can be read from its files; the latent
  cache's disk has room for the entries not yet cached (data/latent_cache.py sizes them from the buckets);
- sample_prompts and optimizer_config are valid, and wandb/xformers are installed when asked for;
- resume_state exists, is complete, fits this run, and has steps left to train.

What it learned (the scan, the places, the step counts, the training state to resume) is handed on, so nothing
is scanned or resolved twice.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from common.console import first_line, say
from common.files import free_bytes, human_bytes, place_problem
from convert.lora_kohya import adapter_file_problems
from data.errors import DataError
from data.latent_cache import choose_cache_dir, room_problem_before_load
from data.masking.masks import checked_masks
from data.scan import ImageItem, Scan, scan_data_root
from data.schedule import batches_per_epoch
from data.validation import validation_sets
from trainer.adapters.embedding_tokens import EmbeddingToken, checked_tokens
from trainer.config.everydream2 import FIND_LAST
from trainer.config.load import ConfigError
from trainer.config.schema import TrainConfig, embedding_mode, frozen_base, lora_alpha
from trainer.errors import ProblemsError, UserError, bulleted
from trainer.evaluation.prompts import SampleSettings, read_sample_prompts
from trainer.evaluation.validation import MAIN_SET, ValidationPlan, plan_validation
from trainer.models import hub
from trainer.models.ckpt_cache import cache_entry, conversion_problems, find_ckpt_cache, not_found_message, source_kind
from trainer.optim.plan import OptimizerPlan, plan_optimizers
from trainer.preflight.findlast import FoundLast, find_last_model, is_gone, no_saved_model, save_search
from trainer.preflight.resuming import ResumePlan, check_resume_fits_model, count_steps, plan_resume
from trainer.saves import footprint
from trainer.saves.resume import architecture_hash, find_training_state, read_trainer_state

OPTIONAL_PACKAGES = {  # config key -> (package, how to get it)
    "wandb": ("wandb", "pip install wandb (then wandb login), or set wandb false; tensorboard logs either way"),
    "attn_type": ("xformers", "pip install xformers matching your torch build, or set attn_type sdp (as fast on "
                              "torch 2)"),
}


@dataclass
class Preflight:
    """What the preflight found, for the run to use."""

    scan: Scan  # the training images (validation images held out)
    validation: dict[str, list[ImageItem]]  # set name -> images (trainer/evaluation/validation.py)
    run_dir: Path  # planned; made once the model has loaded
    save_dir: Path
    cache_dir: Path | None  # None: cache_latents is off
    steps_per_epoch: int
    total_steps: int  # the step the run ends at (a resumed one: resuming.steps_in_run)
    optimizer: OptimizerPlan
    prompts: SampleSettings | None  # None: no sample_prompts
    resume: ResumePlan | None
    validation_plan: ValidationPlan = field(default_factory=ValidationPlan)
    notices: list[str] = field(default_factory=list)
    embeddings: tuple[EmbeddingToken, ...] = ()  # embedding mode: the tokens to train



def resolve_find_last(cfg: TrainConfig) -> TrainConfig:
    """resume_ckpt "findlast" (EveryDream2's "continue from my newest save") as the newest complete saved model
    under logdir (and save_ckpt_dir), said; any other resume_ckpt as it is. With no saved model it stays findlast,
    which the preflight reports beside every other problem. In a multi-process run only the main process's answer
    counts (train.py passes its config to the others)."""
    if cfg.resume_ckpt != FIND_LAST:
        return cfg
    found = find_last_model(save_search(cfg))
    if found is None:
        return cfg
    say(f"resume_ckpt findlast: continuing from {found}, the newest saved model under {cfg.logdir}.")
    return replace(cfg, resume_ckpt=FoundLast(found))  # picked again if it goes before it loads (findlast.py)


def resumed_seed(cfg: TrainConfig) -> int | None:
    """The seed of the training state that resume_state names, when it recorded one: a resumed run with seed -1
    goes on with it, so the rest of its epoch keeps its order. None when there is none (the preflight then says
    what is wrong with resume_state, if anything)."""
    if not cfg.resume_state:
        return None
    search = save_search(cfg)
    try:
        setup = read_trainer_state(find_training_state(cfg.resume_state, search)).setup
    except (UserError, OSError, ValueError, TypeError):
        return None
    return setup.seed if setup else None


def run_dir_path(cfg: TrainConfig) -> Path:
    """`<logdir>/<run_name>`, by default named after the project and the time now. In a multi-process run only
    the main process's answer counts (train.py passes it to the others): the clocks may straddle a second."""
    return Path(cfg.logdir) / (cfg.run_name or f"{cfg.project_name}_{datetime.now():%Y%m%d-%H%M%S}")


def save_folder(cfg: TrainConfig, run_dir: Path) -> Path:
    """Where the run's saves go: save_ckpt_dir, else the run folder's ckpts/ (of the folder the run made, which
    has a -2 suffix when another run took the planned name in the same second)."""
    return Path(cfg.save_ckpt_dir) if cfg.save_ckpt_dir else run_dir / "ckpts"


def run_preflight(cfg: TrainConfig, run_dir: Path, num_processes: int = 1) -> Preflight:
    """Every check of this module's docstring; raises ProblemsError listing every problem found."""
    problems: list[str] = []
    notices: list[str] = []

    def attempt(check, *args):
        try:
            return check(*args)
        except (UserError, DataError) as err:  # a file's several problems are listed one by one
            problems.extend(err.problems if isinstance(err, ProblemsError) else [str(err)])
            return None

    scan = attempt(scan_data_root, Path(cfg.data_root), cfg.resolution)
    validation_plan = attempt(plan_validation, cfg, notices)
    split = attempt(held_out_sets, cfg, validation_plan, scan) if scan and validation_plan else None
    if validation_plan and not scan:  # the validation sets' own folders are still checked, in this same round
        for name, folder in own_validation_folders(validation_plan).items():
            attempt(scan_data_root, Path(folder), cfg.resolution, None, validation_plan.folder_role(name))
    train_scan, validation = split or (scan, {})
    if train_scan:  # the masks checked (said in the scan's report), or the mask files found said not to be used
        train_scan, validation, mask_lines = checked_masks(train_scan, cfg, validation)
        notices += mask_lines
    save_dir = save_folder(cfg, run_dir)
    unplaceable = place_problems(cfg, run_dir, save_dir)
    problems += unplaceable
    cache_dir = None
    if cfg.cache_latents:
        cache_dir, notice = choose_cache_dir(Path(cfg.data_root), cfg.latent_cache_dir, Path(cfg.logdir) / "latent_cache")
        notices += [notice] if notice else []
        problem = place_problem(cache_dir, "latent_cache_dir") if cfg.latent_cache_dir else None
        if problem is None and train_scan:  # validation sets are encoded in memory, never cached
            problem = room_problem_before_load(cache_dir, train_scan.items, cfg.flip_p)
        problems += [problem] if problem else []
    problems += model_source_problems(cfg)
    plan = attempt(plan_optimizers, cfg, notices)
    prompts = attempt(read_sample_prompts, Path(cfg.sample_prompts)) if cfg.sample_prompts else None
    problems += missing_packages(cfg)
    problems += lora_init_problems(cfg) if cfg.lora_init else []
    tokens = attempt(checked_tokens, cfg, train_scan, validation, notices) if embedding_mode(cfg) else ()
    if cfg.fused_backward and plan is not None:
        from trainer.optim.fused_backward import problems as fused_backward_problems

        problems += fused_backward_problems([plan.unet.optimizer, plan.text_encoder.optimizer], num_processes,
                                            cfg.mixed_precision)
    steps_per_epoch, total_steps = (count_steps(batches_per_epoch(train_scan.items, cfg.batch_size * num_processes),
                                                cfg) if train_scan else (0, 0))
    if train_scan and not total_steps:
        problems.append(f"data_root {cfg.data_root}: no image would be trained, since every image has multiply 0 in "
                        "its folder or image settings; give some images a multiply > 0.")
    if plan is not None and not unplaceable:
        problems += room_problems(cfg, save_dir, plan)
    resume = attempt(plan_resume, cfg, plan, train_scan.items, cfg.batch_size * num_processes, notices) \
        if cfg.resume_state and plan and train_scan else None
    if problems:
        raise ProblemsError(problems)
    total_steps = resume.total_steps if resume else total_steps
    return Preflight(train_scan, validation, run_dir, save_dir, cache_dir, steps_per_epoch, total_steps, plan,
                     prompts, resume, validation_plan, notices, tokens or ())


def problems_beside(error: ConfigError) -> str:
    """What the preflight finds in the rest of a config that has problems (each key with a problem at its
    default), as text to print after them, so that one round reports both; "" when nothing more. A problem about
    a key with a problem of its own (it starts with the key's name) is left to that one: a data_root that does not
    exist is said once."""
    if error.rest is None:  # the json file itself could not be read: the rest is not what the user wrote
        return ""
    try:
        cfg = resolve_find_last(error.rest)
        run_preflight(cfg, run_dir_path(cfg))
        return ""
    except ProblemsError as err:
        found = err.problems
    except (UserError, DataError) as err:
        found = [str(err)]
    keys = re.compile(r"(" + "|".join(map(re.escape, sorted(error.bad_keys))) + r")\b") if error.bad_keys else None
    found = [problem for problem in found if keys is None or not keys.match(problem)]
    if not found:
        return ""
    count = f"{len(found)} more problem{'s' if len(found) > 1 else ''}"
    return f"\n{count} found by the preflight:\n" + bulleted(found)


def own_validation_folders(plan: ValidationPlan) -> dict[str, str]:
    """The validation sets that have a folder of their own (not held out of data_root): set name -> folder."""
    return {**({MAIN_SET: plan.data_root} if plan.data_root else {}), **plan.extra}


def held_out_sets(cfg: TrainConfig, plan: ValidationPlan, scan: Scan) -> tuple[Scan, dict[str, list[ImageItem]]]:
    """The training images, and each validation set of the plan, scanned (and the main one held out)."""
    seed = cfg.seed if plan.seed is None else plan.seed
    return validation_sets(scan, cfg.resolution, seed, plan.split, plan.data_root, plan.extra, plan.stabilize,
                           names=plan.folder_role, split_key=plan.split_key)


def place_problems(cfg: TrainConfig, run_dir: Path, save_dir: Path) -> list[str]:
    problems = []
    if cfg.run_name and run_dir.exists():
        problems.append(f"run_name {cfg.run_name!r}: {run_dir} already exists, and a new run never writes into "
                        "another run's folder. Choose another run_name, or leave it null for a time-stamped one "
                        "(to continue that run, add --resume_state findlast).")
    for folder, role in ((run_dir, "the run folder (logdir/run_name)"), (save_dir, "save_ckpt_dir")):
        if role == "save_ckpt_dir" and not cfg.save_ckpt_dir:
            continue
        problem = place_problem(folder, role)
        problems += [problem] if problem else []
    return problems


def model_source_problems(cfg: TrainConfig) -> list[str]:
    """resume_ckpt, said now, not after the wait for torch and the model load: when it can be nothing (no folder or
    file here, no name in the ckpt_cache folder, no Hub repo id: one with no '/' cannot be, nor a relative path
    whose first folder exists here), and when where it goes cannot take it (the ckpt_cache folder for a single
    file to convert, the hub cache for a download)."""
    if cfg.resume_ckpt == FIND_LAST:  # resolve_find_last found no save
        return [no_saved_model(cfg)]
    if isinstance(cfg.resume_ckpt, FoundLast) and is_gone(cfg.resume_ckpt):  # pruned since: the load picks again
        return []
    cache = find_ckpt_cache(cfg.ckpt_cache_dir)
    given = Path(cfg.resume_ckpt).expanduser()
    try:
        kind = source_kind(cfg.resume_ckpt, cache.path)
        if kind == "single_file":
            return conversion_problems(given, cache, cfg.prediction_type)
    except UserError as err:  # a malformed hf:// address, a cache entry of that name that is not this file's
        return [str(err)]
    if kind == "hub":
        problem = hub.cache_problem(cfg.resume_ckpt)
        return [problem] if problem else []
    cached = cache_entry(cfg.resume_ckpt, cache.path)
    if kind is None and not (given.exists() or cached.exists()):  # what exists is judged at load, in one message
        return [not_found_message(cfg.resume_ckpt, given, cached)]
    return []


def lora_init_problems(cfg: TrainConfig) -> list[str]:
    """lora_init's file against lora_rank, lora_alpha and lora_text_encoder, from its tensors' shapes and alphas."""
    from safetensors import safe_open

    path = Path(cfg.lora_init)
    try:
        with safe_open(str(path), framework="pt") as handle:  # pt: kohya files may hold bf16, numpy has none
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
            alphas = {key: float(handle.get_tensor(key)) for key in shapes if key.endswith(".alpha")}
    except (OSError, ValueError, TypeError) as err:  # safetensors raises its own error types on damage
        return [f"lora_init {path}: not a readable .safetensors file ({first_line(err)})."]
    problems = adapter_file_problems(shapes, alphas, cfg.lora_rank, lora_alpha(cfg), cfg.lora_text_encoder,
                                     cfg.lora_kind)
    return [f"lora_init {path}: {problem}." for problem in problems]


def missing_packages(cfg: TrainConfig) -> list[str]:
    asked = {"wandb": cfg.wandb, "attn_type": cfg.attn_type == "xformers"}
    return [f"{key}: asks for the {package} package, which is not installed; {fix}."
            for key, (package, fix) in OPTIONAL_PACKAGES.items()
            if asked[key] and importlib.util.find_spec(package) is None]


# ---------------------------------------------------------------- free space


def known_model_size(cfg: TrainConfig) -> footprint.ModelSize | None:
    """The base model's parameter counts, read from its files' headers when it is on disk; None otherwise (a Hub
    id, a .ckpt, a damaged file): the room is then checked once the model has loaded (or refused)."""
    given = Path(cfg.resume_ckpt).expanduser()
    cached = cache_entry(cfg.resume_ckpt, find_ckpt_cache(cfg.ckpt_cache_dir).path)
    try:
        counts = next((footprint.component_numels_in_folder(folder) for folder in (given, cached)
                       if folder.is_dir() and (folder / "unet").is_dir()), None)
        if counts is None and given.is_file():
            counts = footprint.component_numels_in_single_file(given)
        return footprint.model_size(counts, not cfg.disable_textenc_training) if counts else None
    except (OSError, ValueError, KeyError):  # unreadable headers: the model load names the damage
        return None


def room_problems(cfg: TrainConfig, save_dir: Path, plan: OptimizerPlan,
                  size: footprint.ModelSize | None = None) -> list[str]:
    """Whether the disk where saves go has room for one save of the model (of `size`, or as read from its files).
    A LoRA or embedding save holds only adapters or vectors (MBs, KBs) whose size is known once they exist: each
    save checks its room then."""
    if frozen_base(cfg):
        return []
    size = size or known_model_size(cfg)
    if size is None:
        return []
    needed = footprint.save_bytes(size, half=not cfg.save_full_precision, single_file=cfg.save_single_file,
                                  ema=cfg.ema_decay_rate is not None, training_state=cfg.save_optimizer,
                                  optimizer=plan.label)
    free = free_bytes(save_dir)
    if free >= needed:
        return []
    return [f"not enough free space for one save in {save_dir}: a save of this model ({size.total / 1e6:.1f}M "
            f"parameters{', fp16' if not cfg.save_full_precision else ', fp32'}"
            f"{', plus its single file' if cfg.save_single_file else ''}{', EMA copy' if cfg.ema_decay_rate else ''}"
            f"{', training state' if cfg.save_optimizer else ''}) needs about {human_bytes(needed)}, and "
            f"{human_bytes(free)} is free. Free some space, or set save_ckpt_dir to a disk with room."]


# ---------------------------------------------------------------- resume


def check_model_fits(cfg: TrainConfig, preflight: Preflight, models) -> None:
    """What could only be checked once the model has loaded, checked before the latent cache or the run folder
    is made: the training state to resume fits its architecture, and one save of it fits on the disk."""
    check_resume_fits_model(preflight.resume, models.info.family, architecture_hash(models.unet, models.text_encoder))
    if known_model_size(cfg) is None:
        counts = {name: sum(p.numel() for p in getattr(models, name).parameters())
                  for name in ("unet", "text_encoder", "vae")}
        problems = room_problems(cfg, preflight.save_dir, preflight.optimizer,
                                 footprint.model_size(counts, not cfg.disable_textenc_training))
        if problems:
            raise ProblemsError(problems, heading="once the model had loaded")
