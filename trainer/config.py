"""The training configuration: one typed object, its defaults (= the shipped train.json), and its one merge path.

defaults -> json file (`--config`, else ./train.json) -> `--key value` on the command line, each value coerced to
the field's type, then validated once. Every problem is collected and reported together (exit status 2), so a
user fixes their config in one round trip. Field docs feed `--help`.

This module deliberately imports nothing heavy (no torch, no diffusers): `--help` and config errors answer fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from common.files import read_json_object
from trainer import everydream2 as ed2
from trainer.config_checks import validate
from trainer.config_values import (BadValue, cli_value, coerce_cli, coerce_json, expected_value, is_optional, shown,
                                    strip_optional)
from trainer.errors import bulleted

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_FILE = "train.json"

MixedPrecision = Literal["auto", "no", "fp16", "bf16"]
LossType = Literal["mse", "huber", "smooth_l1", "mse_huber", "huber_mse"]
AttnType = Literal["sdp", "xformers"]
EmaDevice = Literal["gpu", "cpu"]
OptimizerName = Literal[
    "adamw", "adamw8bit", "lion", "lion8bit", "prodigy", "adafactor",
    "dadapt_adam", "dadapt_lion", "dadapt_sgd", "dadapt_adan",
]
LoraTargets = Literal["attn", "attn_ff", "all"]
PredictionTypeOverride = Literal["epsilon", "v_prediction"]
LRScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]


def _key(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every setting of a run. Defaults must equal train.json (tests/test_config.py checks)."""

    resume_ckpt: str = _key(
        "panopstor/EveryDream",
        "Base model: a diffusers folder, a name in ckpt_cache/ ('my_model' means ckpt_cache/my_model), a "
        ".ckpt/.safetensors file (converted once into ckpt_cache/), a Hugging Face repo id owner/name[@revision] "
        "(hf://owner/name when a local folder has the owner's name), or findlast: the newest model saved under logdir.",
    )
    ckpt_cache_dir: str | None = _key(
        None, "Folder that holds single-file models converted to diffusers (and that cache names are looked up in); "
        "null: $CKPT_CACHE_DIR if set, else ckpt_cache/ in the current folder."
    )
    hf_repo_subfolder: str | None = _key(
        None, "Sub-folder of the Hugging Face repo in resume_ckpt that holds the diffusers model; null: its root."
    )
    prediction_type: PredictionTypeOverride | None = _key(
        None, "What the base model predicts, epsilon or v_prediction; null: detect it from the model."
    )
    data_root: str = _key("input", "Folder of training images (searched recursively) with .txt captions.")
    resolution: int = _key(512, "Training resolution in pixels; a multiple of 64 (SD1/SD2.0: 512, SD2.1-v: 768).")
    batch_size: int = _key(4, "Images per optimizer micro-step on each device.")
    grad_accum: int = _key(1, "Micro-steps accumulated into one optimizer step (effective batch = batch_size x this).")
    max_epochs: int = _key(30, "Passes over the data set.")
    max_steps: int = _key(0, "Stop after this many optimizer steps; 0 means no limit (max_epochs decides).")
    lr: float | None = _key(
        None, "Peak learning rate of the UNet (and of the text encoder unless optimizer_config sets its own); it wins "
        "over optimizer_config's base lr, as in EveryDream2. null: that base lr, else 1.5e-6."
    )
    optimizer: OptimizerName = _key(
        "adamw", "adamw, adamw8bit or lion8bit (bitsandbytes), lion, adafactor, or one that sets its own step size "
        "(lr about 1.0): prodigy, dadapt_adam, dadapt_lion, dadapt_sgd, dadapt_adan."
    )
    optimizer_config: str | None = _key(
        None, "EveryDream2's optimizer.json: each model's optimizer, lr, schedule, betas, weight decay; text-encoder "
        "layer freezing (docs/EVERYDREAM2.md)."
    )
    lr_scheduler: LRScheduler = _key("constant", "Learning-rate schedule over the run's optimizer steps.")
    lr_warmup_steps: int | None = _key(
        None, "Optimizer steps of linear warmup; null: none for constant, 2% of the run otherwise."
    )
    lr_decay_steps: int = _key(
        0, "Optimizer steps over which cosine/linear/polynomial schedules decay (then they stay); 0: the whole run."
    )
    clip_grad_norm: float | None = _key(None, "Clip the gradient norm of the trained models to this; null: no clip.")
    seed: int = _key(555, "Seed for weights noise, timesteps, shuffling and crops; -1 picks a random one (logged).")
    flip_p: float = _key(0.0, "Probability of flipping an image horizontally (0 to 1).")
    shuffle_tags: bool = _key(False, "Shuffle a caption's comma-separated tags each step, keeping the first chunk.")
    keep_tags: int = _key(0, "With shuffle_tags: also keep this many tags after the first chunk in place.")
    cond_dropout: float = _key(0.04, "Probability of training a step's image on the empty caption (for CFG).")
    num_workers: int | None = _key(
        None, "DataLoader worker processes preparing batches ahead; 0: load in the main process. null: chosen for the "
        "device: 0 on a CPU (the training step uses every core), else up to 8 per process, one core left free."
    )
    cache_latents: bool = _key(True, "Encode each image once with the frozen VAE and reuse the latents from disk.")
    latent_cache_dir: str | None = _key(None, "Folder of cached latents; null: <data_root>/.latent_cache.")
    dry_run: bool = _key(False, "Scan data_root, print buckets, skipped files and steps per epoch, and exit.")
    validation_split: float = _key(0.0, "Share of data_root held out to measure a validation loss (e.g. 0.1); 0: none.")
    validation_data_root: str | None = _key(None, "A separate folder of validation images (wins over validation_split).")
    validation_every_n_epochs: float = _key(
        1, "Compute the validation loss every this many epochs (0.5: twice an epoch), and at the end."
    )
    validation_config: str | None = _key(
        None, "EveryDream2's validation json (split, folders, extra sets, stabilized train loss); wins over the above."
    )
    disable_textenc_training: bool = _key(False, "Freeze the text encoder and train only the UNet.")
    gradient_checkpointing: bool | None = _key(
        None, "Recompute activations in backward: much less memory, ~20% slower. null: on for a GPU, off on a CPU "
        "(there memory is rarely the limit and the recomputation costs ~18% a step)."
    )
    attn_type: AttnType = _key("sdp", "Attention kernel: sdp (PyTorch SDPA) or xformers (needs the xformers package).")
    torch_compile: bool = _key(
        False, "torch.compile each of the UNet's blocks (regional compilation): faster steps after slower first ones."
    )
    channels_last: bool | None = _key(
        None, "Hold the UNet and its inputs in channels-last memory format (faster convolutions on tensor cores). "
        "null: on for a CUDA GPU, off on a CPU."
    )
    mixed_precision: MixedPrecision = _key(
        "auto", "Autocast precision: no, fp16 or bf16 (fp16 needs CUDA: elsewhere it falls back to no). auto: bf16 on "
        "GPUs that have it, else fp16; no (fp32) on a CPU."
    )
    text_embedding_cache: bool = _key(
        True, "With a frozen text encoder, encode each distinct caption once and reuse its embedding (kept on the "
        "device); off with shuffle_tags, whose captions rarely repeat."
    )
    fused_backward: bool = _key(
        False, "Step each parameter's optimizer as soon as its gradient is ready and free the gradient (OneTrainer's "
        "fused back pass): no memory for gradients. Not with grad_accum > 1, clip_grad_norm, fp16, several "
        "processes, or optimizers that look at all parameters at once (prodigy, dadapt_*)."
    )
    vram_gb: float | None = _key(
        None, "Memory per device to plan for, in GiB: the dry run's memory plan says which settings to change when "
        "the run would not fit. null: the GPU's own memory (no check on a CPU)."
    )
    # LoRA (trainer/lora.py, docs/LORA.md): small adapters on a frozen base, saved as one kohya-format file
    lora_rank: int = _key(
        0, "LoRA mode: train rank-r adapters on the frozen base model instead of the model itself, and save them as "
        "one .safetensors file for AUTOMATIC1111, ComfyUI and diffusers (e.g. 16). 0: full fine-tune."
    )
    lora_alpha: float | None = _key(
        None, "LoRA scale numerator: each update is up @ down x alpha / rank. null: the rank (scale 1)."
    )
    lora_dropout: float = _key(0.0, "Dropout on each adapter's input while training (0 to <1).")
    lora_targets: LoraTargets = _key(
        "attn_ff", "Layers that get adapters: attn (attention projections), attn_ff (also feed-forward and "
        "proj_in/out: kohya's default), all (also every resnet, down- and upsampler convolution: LoCon).")
    lora_text_encoder: bool = _key(
        False, "LoRA mode: also train adapters on the text encoder's attention and MLP layers; false: it is frozen."
    )
    lora_unet_lr: float | None = _key(None, "LoRA mode: the UNet adapters' learning rate (e.g. 1e-4); null: lr.")
    lora_text_encoder_lr: float | None = _key(None, "LoRA mode: the text-encoder adapters' learning rate (e.g. "
                                                    "5e-5); null: the text encoder's lr.")
    lora_init: str | None = _key(
        None, "LoRA mode: start the adapters from this kohya-format .safetensors file (its rank and alpha must "
        "match lora_rank and lora_alpha); null: fresh adapters (up weights zero: the base's outputs)."
    )
    # the objective (trainer/objective.py documents each formula and its paper)
    min_snr_gamma: float | None = _key(None, "Min-SNR-gamma loss weighting, e.g. 5.0; null: off.")
    zero_frequency_noise_ratio: float = _key(0.02, "Offset noise: share of per-channel constant noise (0: off).")
    pyramid_noise_discount: float | None = _key(None, "Multi-resolution (pyramid) noise discount, e.g. 0.8; null: off.")
    enable_zero_terminal_snr: bool = _key(False, "Rescale betas to zero terminal SNR (v-prediction models only).")
    timestep_start: int = _key(0, "Train on timesteps from this one (inclusive).")
    timestep_end: int = _key(1000, "Train on timesteps below this one (exclusive).")
    loss_type: LossType = _key(
        "mse", "Loss on the prediction error: mse, pseudo-Huber huber / smooth_l1, or EveryDream2's blends of mse "
        "and Huber by timestep: mse_huber (mse on noisy steps), huber_mse (the reverse)."
    )
    huber_c: float = _key(0.1, "The c of the pseudo-Huber losses: errors beyond about c count linearly.")
    clip_skip: int = _key(0, "Condition on the k-th text-encoder layer from the end (2 = penultimate); 0: last.")
    embedding_perturbation: float = _key(0.0, "Std of Gaussian noise added to text embeddings while training.")
    logdir: str = _key("logs", "Folder that holds one sub-folder per run (config, logs, saves).")
    project_name: str = _key("myproj", "Name used for run folders and saved models.")
    run_name: str | None = _key(None, "Run folder name under logdir; null: <project_name>_<date>-<time>.")
    log_step: int = _key(25, "Write loss and learning rate to tensorboard every this many optimizer steps.")
    save_every_n_epochs: int = _key(0, "Also save a model every this many epochs; 0: only at the end.")
    save_ckpt_dir: str | None = _key(None, "Folder for saved models; null: <run folder>/ckpts.")
    ckpt_every_n_minutes: float | None = _key(None, "Also save a model every this many minutes; null: off.")
    max_saves: int | None = _key(None, "Keep only the newest this many of the run's periodic saves (other runs' "
                                       "saves in a shared folder are never pruned); null: keep all.")
    save_full_precision: bool = _key(False, "Save weights in fp32 instead of fp16.")
    save_single_file: bool = _key(True, "Beside each diffusers folder, write an A1111/ComfyUI .safetensors file.")
    save_optimizer: bool = _key(False, "Save the full training state with each save, so resume_state can go on exactly.")
    resume_state: str | None = _key(
        None, "Continue a run exactly from a saved training state folder, or 'findlast' under logdir."
    )
    ema_decay_rate: float | None = _key(None, "Keep an EMA of the weights with this decay per update, e.g. 0.999.")
    ema_update_interval: int = _key(1, "Update the EMA every this many optimizer steps.")
    ema_device: EmaDevice = _key("gpu", "Where the EMA weights live: gpu (the training device) or cpu (saves VRAM).")
    sample_prompts: str | None = _key(
        None, "Prompts to sample during training: .txt (one per line; empty: random training captions) or .json "
        "(EveryDream2's: cfgs, scheduler, batch_size, samples with seed (-1 random), size, random_caption)."
    )
    sample_steps: int = _key(
        300, "Sample the prompts every this many optimizer steps (and at the end); the .json's "
        "generate_samples_every_n_steps wins."
    )
    wandb: bool = _key(False, "Also log to Weights & Biases (needs the wandb package and a login).")
    gpuid: int | None = _key(
        None, "The GPU to train on in a single-process run (sets CUDA_VISIBLE_DEVICES); null: the first, or what "
        "CUDA_VISIBLE_DEVICES or accelerate launch choose."
    )


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
FIELD_TYPES: dict[str, Any] = typing.get_type_hints(TrainConfig)

class ConfigError(Exception):
    """The configuration has problems; `problems` lists each one as a full sentence. `rest` is the config with
    every key that has a problem at its default (None when the json file itself could not be read), and
    `bad_keys` those keys: the preflight checks `rest` so that its problems come in the same round."""

    def __init__(self, problems: list[str], rest: TrainConfig | None = None, bad_keys: frozenset[str] = frozenset()):
        self.problems, self.rest, self.bad_keys = problems, rest, bad_keys
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        super().__init__(f"{count} in the configuration:\n" + bulleted(problems))


@dataclass
class LoadedConfig:
    config: TrainConfig
    sources: dict[str, str]  # key -> where its value came from ("default", a json path, "command line")
    notices: list[str]  # translations, to say before the run starts
    warnings: list[str] = field(default_factory=list)  # EveryDream2 keys read but not used


# ---------------------------------------------------------------- values


def _found_beside(value: Any, source: str) -> str:
    """For a relative path from a json file that is not found here but is beside that file (EveryDream2's
    train.json names its optimizer.json so): where relative paths start, and the two ways to go on."""
    if not isinstance(value, str) or source in ("default", "command line") or Path(value).is_absolute():
        return ""
    beside = Path(source).parent / value
    if not beside.exists():
        return ""
    return (f" Relative paths start at the current folder, {Path.cwd()}, and {value} is beside {source}: run "
            f"from {Path(source).parent.resolve()}, or give its full path {beside.resolve()}.")


# ---------------------------------------------------------------- sources


def _closest_key(key: str) -> str:
    known = [*FIELDS, *ed2.KNOWN_KEYS]  # a typo of an ED2 key is still a typo
    match = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else "; run 'python train.py --help' for the valid keys."


def parse_cli(argv: list[str]) -> tuple[dict[str, str | None], list[str]]:
    """`--key value`, `--key=value` and bare `--flag` into {key: text or None (bare flag)}, plus problems."""
    values: dict[str, str | None] = {}
    problems: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not token.startswith("--") or token == "--":
            problems.append(f"unexpected command-line argument {token!r}; options look like --key value.")
            continue
        key, has_equals, text = token[2:].partition("=")
        key = key.replace("-", "_")
        if has_equals:
            values[key] = text
        elif i < len(argv) and not argv[i].startswith("--"):
            values[key] = argv[i]
            i += 1
        else:
            values[key] = None
    return values, problems


def _read_json(path: Path) -> tuple[dict[str, Any], list[str]]:
    data, problem = read_json_object(path)
    if data is not None:
        return data, []
    fix = "Pass --config with the path of a json file of settings." if not path.exists() else \
        "Correct it, or pass --config with another json file of settings."
    return {}, [f"config: {problem} {fix}"]


def default_config_path() -> Path:
    """./train.json when there is one, else the train.json shipped beside train.py."""
    local = Path(DEFAULT_CONFIG_FILE)
    return local if local.is_file() else REPO_ROOT / DEFAULT_CONFIG_FILE


# ---------------------------------------------------------------- merge


@dataclass
class _Merge:
    """The values merged so far, where each came from, and what merging said."""

    values: dict[str, Any] = field(default_factory=lambda: {name: f.default for name, f in FIELDS.items()})
    sources: dict[str, str] = field(default_factory=lambda: {name: "default" for name in FIELDS})
    problems: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    not_honoured: set[str] = field(default_factory=set)
    bad_keys: set[str] = field(default_factory=set)  # keys of ours whose given value has a problem
    null_notices: dict[str, str] = field(default_factory=dict)  # said only if no later source sets the key

    def layer(self, raw: dict[str, Any], source: str, from_cli: bool) -> None:
        """Merge one source. EveryDream2's translated keys go first, so that a key of ours given in the same
        source wins over a translation (`attn_type` beside the old `disable_xformers`)."""
        for key, given in raw.items():
            if key in ed2.TRANSLATIONS:
                self._translate(key, given, source, from_cli)
        for key, given in raw.items():
            if from_cli and (key in ed2.REFUSED_WHEN_SET or key in ed2.NOT_HONOURED):
                given = cli_value(given)
            if key in ed2.REFUSED_WHEN_SET and ed2.is_set(key, given):
                self.problems.append(f"{key}: {shown(given)} (from {source}), an EveryDream2 key not supported here: "
                                     f"{ed2.REFUSED_WHEN_SET[key]}.")
            elif key in ed2.NOT_HONOURED and ed2.is_set(key, given):
                self.not_honoured.add(key)
            elif key in ed2.REFUSED_WHEN_SET or key in ed2.NOT_HONOURED:
                pass  # EveryDream2's default: it asks for nothing
            elif key not in FIELDS and key not in ed2.TRANSLATIONS:
                self.problems.append(f"{key}: unknown key (from {source}){_closest_key(key)}")
            elif key in FIELDS:
                self._set(key, given, source, from_cli)

    def _translate(self, key: str, given: Any, source: str, from_cli: bool) -> None:
        tp, translation = ed2.TRANSLATIONS[key]
        if given is None and not from_cli:
            self.notices.append(f"{key}: null in {source} (EveryDream2 key) changes nothing.")
            return
        try:
            value = True if given is None and tp is bool else (coerce_cli(tp, given) if from_cli else coerce_json(tp, given))
        except (BadValue, TypeError):
            self.problems.append(f"{key}: got {shown(given)} (from {source}); expected {expected_value(tp)}.")
            return
        for ours, translated in translation(value).items():
            self.values[ours], self.sources[ours] = translated, source
            self.notices.append(f"{key}: {shown(value)} (EveryDream2 key) is read as {ours}: {shown(translated)}.")

    def _set(self, key: str, given: Any, source: str, from_cli: bool) -> None:
        tp = FIELD_TYPES[key]
        if given is None and not from_cli and not is_optional(tp):
            # EveryDream2's files write null for "the default"
            self.null_notices[key] = f"{key}: null in {source} is read as the default, {shown(FIELDS[key].default)}."
            return
        if (key, given) in ed2.VALUE_TRANSLATIONS:
            translated = ed2.VALUE_TRANSLATIONS[(key, given)]
            self.notices.append(f"{key}: {shown(given)} (EveryDream2's value) is read as {shown(translated)}.")
            given = translated
        try:
            if from_cli and given is None:  # a bare --flag: true, for every boolean key, nullable or not
                if (strip_optional(tp) if is_optional(tp) else tp) is not bool:
                    raise BadValue
                value = True
            else:
                value = coerce_cli(tp, given) if from_cli else coerce_json(tp, given)
        except (BadValue, TypeError):
            what = "nothing" if given is None and from_cli else shown(given)
            self.bad_keys.add(key)
            self.problems.append(f"{key}: got {what} (from {source}); expected {expected_value(tp)}.")
            return
        self.values[key], self.sources[key] = value, source


def load_config(argv: list[str]) -> LoadedConfig:
    """Merge defaults, the json file and `argv`, then validate. Raises ConfigError listing every problem."""
    cli, problems = parse_cli(argv)
    given_config = "config" in cli
    config_text = cli.pop("config", None)
    if given_config and not config_text:
        problems.append("config: expected a path to a json file after --config.")
    config_path = Path(config_text) if config_text else default_config_path()

    merge = _Merge(problems=problems)
    raw_json, json_problems = _read_json(config_path)
    merge.problems += json_problems
    merge.layer(raw_json, str(config_path), from_cli=False)
    merge.layer(cli, "command line", from_cli=True)

    config = TrainConfig(**merge.values)
    # with the json file unread, its keys are at their defaults: what is wrong with those is not the user's doing
    invalid = [(key, expected) for key, expected in validate(config)
               if not (json_problems and merge.sources[key] == "default")]
    merge.problems += [f"{key}: got {shown(getattr(config, key))} (from {merge.sources[key]}); expected {expected}."
                       + _found_beside(getattr(config, key), merge.sources[key]) for key, expected in invalid]
    if merge.problems:
        bad = frozenset(merge.bad_keys | {key for key, _ in invalid})
        rest = None if json_problems else dataclasses.replace(config, **{key: FIELDS[key].default for key in bad})
        raise ConfigError(merge.problems, rest, bad)
    if config.lora_rank:  # in LoRA mode lora_text_encoder alone decides (config_checks refuses a contradiction)
        config = dataclasses.replace(config, disable_textenc_training=not config.lora_text_encoder)
    merge.notices += [notice for key, notice in merge.null_notices.items() if merge.sources[key] == "default"]
    warnings = [ed2.not_honoured_warning(merge.not_honoured)] if merge.not_honoured else []
    return LoadedConfig(config, merge.sources, merge.notices, warnings)


# ---------------------------------------------------------------- output


def lora_alpha(cfg: TrainConfig) -> float:
    """LoRA's alpha as trained: lora_alpha, or the rank when null (a scale of 1)."""
    return float(cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: Path) -> None:
    """Write the resolved config as json that `--config` loads back to the same config."""
    path.write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n", encoding="utf-8")
