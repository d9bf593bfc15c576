"""Impossible config values, found before anything runs: each as (key, what is expected instead).

`trainer/config/load.py` calls `validate` once the defaults, the json file and the command line are merged, and
reports every problem together. Checks that need files or places beyond the config's own paths live in the
preflight.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.files import windows_path_hint

if TYPE_CHECKING:
    from trainer.config.schema import TrainConfig

Problems = list[tuple[str, str]]
_NAME_OK = re.compile(r"^[\w.\-]+$")


def validate(cfg: TrainConfig) -> Problems:
    """Impossible values as (key, what is expected instead); empty when the config can run."""
    return [*_model_and_data(cfg), *_schedule(cfg), *_objective(cfg), *_outputs(cfg), *_fused_backward(cfg),
            *_lora(cfg), *_embedding(cfg), *_masks(cfg)]


def _missing(cfg: TrainConfig, key: str, expected: str, folder: bool = False) -> Problems:
    """An optional file (or folder) the config names, when it is named and not there."""
    path = getattr(cfg, key)
    if path is None or (Path(path).is_dir() if folder else Path(path).is_file()):
        return []
    return [(key, expected + windows_path_hint(path))]


Rule = tuple[str, Callable[[Any], bool], str]  # (key, whether its value is sound, what is expected instead)


def _failing(cfg: TrainConfig, rules: list[Rule]) -> Problems:
    """The rules' keys whose value is not sound, each with what is expected instead, in the rules' order."""
    return [(key, expected) for key, sound, expected in rules if not sound(getattr(cfg, key))]


def _positive(value: float) -> bool:
    return value > 0  # written so that NaN fails too


def _probability(value: float) -> bool:
    return 0.0 <= value <= 1.0


def _at_least(least: int) -> Callable[[float], bool]:
    return lambda value: value >= least


def _or_null(sound: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """An optional key: null, or a value that is sound."""
    return lambda value: value is None or sound(value)


def _model_and_data(cfg: TrainConfig) -> Problems:
    bad: Problems = []
    if not cfg.resume_ckpt.strip():
        bad.append(("resume_ckpt", "a model folder, a name in ckpt_cache/, or a Hugging Face repo id"))
    subfolder = cfg.hf_repo_subfolder
    if subfolder is not None and (not subfolder.strip("/") or ".." in subfolder.split("/") or "\\" in subfolder):
        bad.append(("hf_repo_subfolder", "a folder path inside the repo such as 'diffusers' or 'models/v1', or null"))
    data_root = Path(cfg.data_root)
    if not data_root.exists():
        bad.append(("data_root", "an existing folder of training images (it does not exist)"
                    + windows_path_hint(cfg.data_root)))
    elif not data_root.is_dir():
        bad.append(("data_root", "a folder of training images (this is a file)"))
    if cfg.resolution < 64 or cfg.resolution % 64:
        bad.append(("resolution", "a multiple of 64 such as 512 or 768 (the UNet halves the latent size per level)"))
    bad += _failing(cfg, [
        ("flip_p", _probability, "a probability from 0 to 1"),
        ("cond_dropout", _probability, "a probability from 0 to 1 (0.04 is EveryDream2's default)"),
        ("keep_tags", _at_least(0), "an integer >= 0"),
        ("num_workers", _or_null(_at_least(0)), "an integer >= 0, or null (chosen for the device)"),
        ("validation_split", lambda split: 0 <= split < 1, "a fraction from 0 (none) to below 1, such as 0.1"),
    ])
    bad += _missing(cfg, "validation_data_root", "an existing folder of validation images, or null", folder=True)
    bad += _failing(cfg, [("validation_every_n_epochs", _positive,
                           "a number of epochs > 0, such as 1, 2 or 0.5 (twice an epoch)")])
    bad += _missing(cfg, "validation_config", "the path of an existing validation json (EveryDream2's), or null")
    return bad


def _schedule(cfg: TrainConfig) -> Problems:
    bad = _failing(cfg, [
        *[(key, _at_least(1), "an integer >= 1") for key in ("batch_size", "grad_accum", "max_epochs", "log_step")],
        *[(key, _at_least(0), "an integer >= 0 (0 disables it)") for key in ("max_steps", "save_every_n_epochs")],
        ("lr_decay_steps", _at_least(0), "an integer >= 0 (0: decay over the whole run)"),
        ("lr_warmup_steps", _or_null(_at_least(0)), "an integer >= 0, or null"),
        ("lr", _or_null(_positive), "a learning rate > 0, such as 1.5e-6, or null (optimizer_config's, else 1.5e-6)"),
        ("clip_grad_norm", _or_null(_positive), "a norm > 0, or null for no clipping"),
    ])
    bad += _missing(cfg, "optimizer_config", "the path of an existing optimizer.json, or null (it does not exist)")
    bad += _failing(cfg, [
        ("gpuid", _or_null(_at_least(0)), "a GPU index >= 0 (nvidia-smi lists them), or null"),
        ("vram_gb", _or_null(_positive), "GiB of memory per device > 0, such as 8 or 24, or null (the GPU's own)"),
        ("seed", _at_least(-1), "an integer >= 0, or -1 for a random seed"),
    ])
    return bad


def _objective(cfg: TrainConfig) -> Problems:
    bad = _failing(cfg, [
        ("min_snr_gamma", _or_null(_positive), "a gamma > 0 (5.0 is the paper's), or null"),
        ("zero_frequency_noise_ratio", _at_least(0), "a ratio >= 0 (about 0.02 to 0.1)"),
        ("pyramid_noise_discount", _or_null(lambda discount: 0 < discount < 1),
         "a discount between 0 and 1 (e.g. 0.8), or null"),
    ])
    if not 1 <= cfg.timestep_end <= 1000:
        bad.append(("timestep_end", "a timestep from 1 to 1000"))
    elif not 0 <= cfg.timestep_start < cfg.timestep_end:
        bad.append(("timestep_start", f"a timestep from 0 to below timestep_end ({cfg.timestep_end})"))
    bad += _failing(cfg, [
        ("huber_c", _positive, "a value > 0 such as 0.1"),
        ("clip_skip", lambda layers: 0 <= layers <= 4, "0 (last layer) or 1 to 4"),
        ("embedding_perturbation", _at_least(0), "a standard deviation >= 0"),
    ])
    return bad


def _outputs(cfg: TrainConfig) -> Problems:
    bad = _failing(cfg, [
        ("ckpt_every_n_minutes", _or_null(_positive), "minutes > 0, or null"),
        ("progress_every_n_seconds", _positive, "seconds > 0, such as 30"),
        ("max_saves", _or_null(_at_least(1)), "an integer >= 1, or null to keep every save"),
        ("ema_decay_rate", _or_null(lambda rate: 0 < rate < 1), "a decay between 0 and 1 such as 0.999, or null"),
        *[(key, _at_least(1), "an integer >= 1") for key in ("ema_update_interval", "sample_steps")],
    ])
    bad += _missing(cfg, "sample_prompts", "the path of an existing .txt or .json file of prompts, or null")
    if cfg.resume_state not in (None, "findlast") and not Path(cfg.resume_state).is_dir():
        bad.append(("resume_state", "a saved training state folder, 'findlast', or null"))
    for key in ("project_name", "run_name"):
        name = getattr(cfg, key)
        # one folder name: no separators, and never "." or "..", which would write into logdir or its parent
        if name is not None and (not _NAME_OK.match(name) or not name.strip(".")):
            bad.append((key, "a single folder name of letters, digits, '_', '-' and '.' (not '.' or '..')"))
    return bad


def _fused_backward(cfg: TrainConfig) -> Problems:
    """What a step inside backward cannot do (trainer/optim/fused_backward.py says why)."""
    if not cfg.fused_backward:
        return []
    bad: Problems = []
    if cfg.grad_accum > 1:
        bad.append(("grad_accum", "1 with fused_backward (each gradient is used and freed at once: nothing to "
                                  "accumulate), or turn fused_backward off"))
    if cfg.clip_grad_norm is not None:
        bad.append(("clip_grad_norm", "null with fused_backward (clipping needs every gradient before any step), or "
                                      "turn fused_backward off"))
    if cfg.mixed_precision == "fp16":
        bad.append(("mixed_precision", "bf16, no or auto with fused_backward (fp16's loss scaler must see every "
                                       "gradient before any step), or turn fused_backward off"))
    return bad


LORA_ONLY = ("lora_alpha", "lora_unet_lr", "lora_text_encoder_lr", "lora_init")  # meaningless without lora_rank
LORA_DEFAULTS = {"lora_kind": "lora", "lokr_factor": -1}


def _lora(cfg: TrainConfig) -> Problems:
    """LoRA mode's keys: sound values, and none set without lora_rank (a run that would silently train the whole
    model instead of adapters)."""
    bad: Problems = []
    if cfg.lora_rank < 0:
        bad.append(("lora_rank", "an adapter rank > 0 such as 8, 16 or 32, or 0 for a full fine-tune"))
    if not cfg.lora_rank:
        bad += [(key, "null without lora_rank (it only applies to LoRA mode), or set lora_rank such as 16")
                for key in LORA_ONLY if getattr(cfg, key) is not None]
        bad += [(key, f"{default!r} without lora_rank (it only applies to LoRA mode), or set lora_rank such as 16")
                for key, default in LORA_DEFAULTS.items() if getattr(cfg, key) != default]
        if cfg.lora_text_encoder:
            bad.append(("lora_text_encoder", "false without lora_rank, or set lora_rank such as 16"))
        return bad
    bad += _failing(cfg, [
        ("lora_alpha", _or_null(_positive), "a number > 0 (the rank, or 1 as kohya's default), or null for the rank"),
        ("lora_dropout", lambda dropout: 0.0 <= dropout < 1.0, "a probability from 0 to below 1"),
        ("lokr_factor", lambda factor: factor == -1 or factor >= 2, "a factor >= 2 such as 8, or -1 (as square as "
                                                                    "each layer allows)"),
        *[(key, _or_null(_positive), "a learning rate > 0 such as 1e-4, or null")
          for key in ("lora_unet_lr", "lora_text_encoder_lr")],
    ])
    if cfg.lora_kind in ("loha", "lokr") and cfg.lora_dropout:
        bad.append(("lora_dropout", f"0 with lora_kind {cfg.lora_kind} (peft's LoHa and LoKr have no dropout on their "
                                    "input), or lora_kind lora or dora"))
    if cfg.lokr_factor != -1 and cfg.lora_kind != "lokr":
        bad.append(("lokr_factor", "-1 unless lora_kind is lokr (only LoKr splits its layers by a factor)"))
    if cfg.lora_text_encoder and cfg.disable_textenc_training:
        bad.append(("disable_textenc_training", "false with lora_text_encoder true (in LoRA mode lora_text_encoder "
                                                "alone decides whether the text encoder trains)"))
    bad += _missing(cfg, "lora_init", "an existing kohya-format LoRA .safetensors file, or null")
    return bad


EMBEDDING_DEFAULTS = {"embedding_init": "*", "embedding_vectors": 1, "embedding_lr": 0.005, "embedding_steps": 0}


def _embedding(cfg: TrainConfig) -> Problems:
    """Embedding mode's keys: sound values, none set without a token to train, and what cannot go with it."""
    from trainer.config.schema import MAX_EMBEDDING_VECTORS, embedding_mode

    if not embedding_mode(cfg):
        return [(key, f"{default!r} without embedding_token or embedding_config (it only applies to embedding mode), "
                      "or set embedding_token such as 'sks-dog'")
                for key, default in EMBEDDING_DEFAULTS.items() if getattr(cfg, key) != default]
    bad = _failing(cfg, [
        ("embedding_token", lambda token: token is None or bool(token.strip()),
         "the word the captions use for the new concept, such as 'sks-dog', or null"),
        ("embedding_init", lambda words: bool(words.strip()), "one or more words, such as 'dog', or '*'"),
        ("embedding_vectors", lambda count: 1 <= count <= MAX_EMBEDDING_VECTORS,
         f"a vector count from 1 to {MAX_EMBEDDING_VECTORS}"),
        ("embedding_lr", lambda lr: _positive(lr) and lr < float("inf"), "a learning rate > 0 such as 5e-3"),
        ("cond_dropout", lambda p: p < 1.0, "below 1 in embedding mode (1 drops every caption, so the token would "
                                            "never train), such as the default 0.04"),
        ("embedding_steps", _at_least(0), "a number of optimizer steps >= 0 (0: the whole run)"),
    ])
    if cfg.embedding_steps and not cfg.lora_rank:
        bad.append(("embedding_steps", "0 without lora_rank (it stops the embedding while a LoRA goes on); to train "
                                       "an embedding alone for fewer steps, set max_steps"))
    if cfg.embedding_token is not None and cfg.embedding_config is not None:
        bad.append(("embedding_token", "null with embedding_config, whose tokens list names every token to train"))
    if not cfg.lora_rank and cfg.disable_textenc_training:
        bad.append(("disable_textenc_training", "false in embedding mode: the new vectors are rows of the text "
                                                "encoder's token table (every other weight stays frozen)"))
    if cfg.fused_backward:
        bad.append(("fused_backward", "false in embedding mode (a few KB of vectors have no gradient memory to save)"))
    bad += _missing(cfg, "embedding_config", "an existing json file with a tokens list (EveryDream2's "
                                             "textual_inversion.json, which its plugins key names: it is read from "
                                             "plugins/ in the folder EveryDream2 runs from), or null")
    return bad


MASK_DEFAULTS = {"mask_from_alpha": False, "unmasked_weight": 0.1, "normalize_masked_area_loss": False}


def _masks(cfg: TrainConfig) -> Problems:
    """Masked training's keys: a weight from 0 to 1, and none set without masked_training (masks that would silently
    not be used)."""
    if not cfg.masked_training:
        return [(key, f"{default!r} without masked_training (it only applies to masked training), or set "
                      "masked_training true") for key, default in MASK_DEFAULTS.items() if getattr(cfg, key) != default]
    return _failing(cfg, [("unmasked_weight", lambda weight: 0.0 <= weight <= 1.0,
                           "a weight from 0 (the background teaches nothing) to 1 (as without masks), such as 0.1")])
