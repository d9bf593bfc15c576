"""`findlast` (EveryDream2's "continue from my newest save"): the newest complete save under logdir (and
save_ckpt_dir), picked at the start, and picked again when the one picked is gone before this run has read it.

A save goes away whole: `max_saves` pruning (trainer/saves/checkpoints.py `prune_saves`) renames it to a hidden
partial, then deletes it (common/files.py `remove_whole`). So when a run that shares logdir with this one prunes
the save this run picked, between the pick and the load, the save's folder is simply not there any more: that is
said as what it is (never as a damaged save), and the newest complete save that still exists is taken instead.
`resume_ckpt` findlast is picked again here, at the model load; `resume_state` findlast where its state is read
(trainer/preflight/resuming.py) and loaded (trainer/saves/resume.py `load_agreed`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from common.console import warn
from common.files import modified_ns
from trainer.config.schema import TrainConfig
from trainer.errors import UserError

Loaded = TypeVar("Loaded")
REMOVED = "was removed before this run had read it (by another run's max_saves pruning, most likely)"


class FoundLast(str):
    """A saved model's path that findlast picked for resume_ckpt: a str like any path the config holds, which
    remembers that it was picked, so that `load_base_model` may pick again if it goes. It travels with the config,
    through dataclasses.replace and the pickling that hands the main process's config to the others."""


def save_search(cfg: TrainConfig) -> list[Path]:
    """Where findlast looks: logdir, and save_ckpt_dir when set."""
    return [Path(cfg.logdir)] + ([Path(cfg.save_ckpt_dir)] if cfg.save_ckpt_dir else [])


def searched(cfg: TrainConfig) -> str:
    """The folders findlast looks in, as words for a message."""
    return " or ".join(dict.fromkeys(str(d) for d in save_search(cfg)))


def find_last_model(search: list[Path]) -> Path | None:
    """The newest complete saved model under the `search` folders: a diffusers folder (its model_index.json),
    not an EMA twin, not a partial save (hidden; saves appear whole, trainer/saves/checkpoints.py)."""
    found = [index.parent for folder in search if folder.is_dir() for index in folder.rglob("model_index.json")
             if not any(part.startswith(".") for part in index.relative_to(folder).parts)
             and not index.parent.name.endswith("-ema")]
    stamped = [(stamp, folder) for folder in found if (stamp := modified_ns(folder / "model_index.json")) is not None]
    return max(stamped, key=lambda pair: pair[0])[1] if stamped else None


def no_saved_model(cfg: TrainConfig) -> str:
    return (f"resume_ckpt findlast: there is no saved model under {searched(cfg)} yet. Train from a base model first "
            "(resume_ckpt: a model folder, a .safetensors/.ckpt file or a Hub id), with the same logdir, then "
            "findlast continues from its newest save.")


def is_gone(path: str | Path) -> bool:
    """Whether a save picked by findlast has left its name (a pruned save is renamed away before it is deleted)."""
    return not os.path.lexists(path)


def load_base_model(cfg: TrainConfig, load: Callable[[str], Loaded]) -> tuple[TrainConfig, Loaded]:
    """`load(cfg.resume_ckpt)`; when findlast picked a save that went before or while it was read, the newest
    complete save that still exists instead, said in one line. Returns the config naming what loaded, and it."""
    while True:
        try:
            return cfg, load(cfg.resume_ckpt)
        except (UserError, OSError):  # the loader's words for a folder that went: "lacks", "does not exist"
            picked = cfg.resume_ckpt
            if not (isinstance(picked, FoundLast) and is_gone(picked)):
                raise
            found = find_last_model(save_search(cfg))
            if found is None:
                raise UserError(f"resume_ckpt findlast: {picked} {REMOVED}, and no other saved model is left "
                                f"under {searched(cfg)}. Train from a base model (resume_ckpt: a model folder, a "
                                ".safetensors/.ckpt file or a Hub id), or resume from a save kept elsewhere.") from None
            warn(picked_again("resume_ckpt", picked, found, "saved model"))
            cfg = replace(cfg, resume_ckpt=FoundLast(found))


def picked_again(key: str, gone: str | Path, found: Path, what: str) -> str:
    """The one line said when findlast's pick is gone and the next newest is taken."""
    return f"{key} findlast: {gone} {REMOVED}; continuing from {found}, the newest {what} that still exists."
