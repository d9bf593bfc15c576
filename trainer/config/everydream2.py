"""What each key of EveryDream2's train.json (and of its command line) means here: one table, read by the config.

EveryDream2 users bring their train.json files as they are. Each key of theirs is one of:
- a key of ours with the same name and meaning (most of them: `TrainConfig` keeps EveryDream2's names);
- translated: it says the same thing in other words (`amp` -> `mixed_precision`), and the notice says how;
- known but not honoured: named together in one warning, with the reason in docs/EVERYDREAM2.md;
- or a value of theirs spelled differently (`ema_device: "cuda"`), translated with a notice.
A key in none of these is unknown, and a typo of any of them still gets "did you mean".

Imports nothing heavy: the config reads this table before anything runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Translation = Callable[[Any], dict[str, Any]]

# key -> (the type its value must have, what it becomes in our keys)
TRANSLATIONS: dict[str, tuple[type, Translation]] = {
    "amp": (bool, lambda on: {"mixed_precision": "fp16" if on else "no"}),
    "disable_amp": (bool, lambda off: {"mixed_precision": "no" if off else "fp16"}),
    "useadam8bit": (bool, lambda on: {"optimizer": "adamw8bit" if on else "adamw"}),
    # EveryDream2 replaced this key with attn_type, whose default is SDP: false never meant "require xformers"
    "disable_xformers": (bool, lambda _: {"attn_type": "sdp"}),
    "no_save_ckpt": (bool, lambda on: {"save_single_file": not on}),
    # the names of the EMA keys before EveryDream2 renamed them (its files of 2023-09)
    "ema_decay_interval": (int, lambda steps: {"ema_update_interval": steps}),
    "ema_decay_device": (str, lambda device: {"ema_device": EMA_DEVICES.get(device, device)}),
    # its textual-inversion plugin reads its tokens from plugins/textual_inversion.json, beside the plugin's code
    "plugins": (list, lambda names: {"embedding_config": TEXTUAL_INVERSION_JSON}
                if TEXTUAL_INVERSION_PLUGIN in names else {}),
}

TEXTUAL_INVERSION_PLUGIN = "plugins.textual_inversion.TextualInversionPlugin"
TEXTUAL_INVERSION_JSON = "plugins/textual_inversion.json"

EMA_DEVICES = {"cuda": "gpu", "gpu": "gpu", "cpu": "cpu"}

# (key, EveryDream2's value) -> our value, for keys we share whose values EveryDream2 spells differently
VALUE_TRANSLATIONS: dict[tuple[str, Any], Any] = {
    ("ema_device", "cuda"): "gpu",
    ("attn_type", "slice"): "sdp",  # sliced attention saves memory on old torch; SDPA does that and is faster
}

# key -> why it is not honoured (docs/EVERYDREAM2.md gives the same reasons at more length). Named in the warning
# only when set to something other than EveryDream2's default (null, false, 0 and the values in ED2_DEFAULTS).
NOT_HONOURED: dict[str, str] = {
    "notebook": "console output works in notebooks as it is",
    "lowvram": "an old preset; set gradient_checkpointing true, batch_size 1 and optimizer adamw8bit",
    "ed1_mode": "an EveryDream1 compatibility key that EveryDream2 itself ignores",
    "write_schedule": "--dry_run prints the batches per bucket and the steps",
    "load_settings_every_epoch": "a run's settings stay fixed so that it can be resumed exactly",
    "rated_dataset_target_dropout_percent": "only read with rated_dataset",
    "rated_dataset_target_dropout_rate": "only read with rated_dataset",
    "train_sampler": "training noises with the model's own DDPM forward process",
    "scale_lr": "EveryDream2 no longer reads it; set lr to the rate you want",
    "save_ckpts_from_n_epochs": "every save_every_n_epochs save is kept (max_saves limits them)",
    "no_prepend_last": "the final save is always named last-...",
    "ema_resume_model": "resume_state restores the EMA with the rest of the training state",
    "ema_decay_resume_model": "resume_state restores the EMA with the rest of the training state",
    "ema_sample_nonema_model": "samples are drawn from the trained and the EMA weights both",
    "ema_sample_ema_model": "samples are drawn from the trained and the EMA weights both",
    "ema_decay_sample_ema_model": "samples are drawn from the trained and the EMA weights both",
    "ema_decay_sample_raw_training": "samples are drawn from the trained and the EMA weights both",
    "ema_sample_raw_training": "samples are drawn from the trained and the EMA weights both",
    "latents_perturbation": "use zero_frequency_noise_ratio or pyramid_noise_discount",
}
ED2_DEFAULTS: dict[str, object] = {"rated_dataset_target_dropout_percent": 50, "train_sampler": "ddpm"}

# key -> what to do instead: keys that would change what is trained, refused when set (a run doing something
# other than what its file asks would be worse than no run)
REFUSED_WHEN_SET: dict[str, str] = {
    "disable_unet_training": "the UNet trains here unless only embeddings train (embedding_token or "
                             "embedding_config, or EveryDream2's textual-inversion plugin in plugins): set one of "
                             "those, or remove the key",
    "rated_dataset": "rated data sets are not supported; weigh folders with multiply.txt or loss_scale.txt",
    "ema_strength_target": "set ema_decay_rate instead: EveryDream2's rate is ema_strength_target ^ "
                           "(ema_update_interval / total steps), and --dry_run prints the total steps",
    "ema_decay_target": "set ema_decay_rate instead (ema_decay_target is ema_strength_target's older name)",
}


# disable_unet_training true is what EveryDream2's textual-inversion plugin asks for (its notes): there, and only
# there, it states what the run does here anyway
UNET_FROZEN = "disable_unet_training"


def other_plugins(names: list) -> list:
    """The plugins named besides the textual-inversion one: none of them runs here."""
    return [name for name in names if name != TEXTUAL_INVERSION_PLUGIN]


def is_set(key: str, value: object) -> bool:
    """Whether an EveryDream2 value asks for something: not null, false, 0, or its default."""
    return value not in (None, False, 0, "") and value != ED2_DEFAULTS.get(key)


KNOWN_KEYS: frozenset[str] = frozenset(TRANSLATIONS) | frozenset(NOT_HONOURED) | frozenset(REFUSED_WHEN_SET)

# resume_ckpt "findlast": EveryDream2's "continue from my newest save" (trainer/preflight/checks.py resolves it)
FIND_LAST = "findlast"


def not_honoured_warning(keys: set[str]) -> str:
    """The one warning that names every EveryDream2 key of a config that is read but not used."""
    return ("EveryDream2 keys not used here, ignored (docs/EVERYDREAM2.md says why and what to use): "
            + ", ".join(sorted(keys)) + ".")
