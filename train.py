#!/usr/bin/env python
"""Fine-tune Stable Diffusion 1.x / 2.x: config -> models -> data -> train.

    python train.py --config train.json --resume_ckpt my_model --data_root my_images
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from collections.abc import Callable

from trainer.config import TrainConfig, load_config_or_exit


def pick_seed(cfg: TrainConfig, say: Callable[[str], None]) -> TrainConfig:
    """seed -1 asks for a random seed; it is said, so the run can be repeated (and saved in the run's train.json)."""
    if cfg.seed != -1:
        return cfg
    cfg = dataclasses.replace(cfg, seed=random.randrange(2**31))
    say(f"Config: seed -1 picked seed {cfg.seed}.")
    return cfg


def main(argv: list[str]) -> int:
    started = time.monotonic()
    cfg = load_config_or_exit(argv).config  # every config problem at once, exit 2; imports no torch

    if cfg.dry_run:  # the data plan only: no model is loaded and diffusers is never imported
        from data.dry_run import print_plan
        from trainer.errors import UserError

        try:
            print_plan(pick_seed(cfg, print))
        except UserError as err:
            print(f"train.py: {err}", file=sys.stderr)
            return 1
        return 0

    # Heavy imports only once the config is known to be good, so --help and config errors answer at once.
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, parse_flag_from_env

    from data.dataset import build_training_data
    from trainer.checkpoints import create_run_dir, run_dir_path
    from trainer.errors import UserError
    from trainer.loop import train
    from trainer.models import load_models

    # One process, or one per device under `accelerate launch` (docs/DISTRIBUTED.md). What a process would pick
    # alone (the seed for -1, the run folder's time stamp) all take from the main process; what goes into shared
    # folders (a model converted or downloaded into ckpt_cache/, the latent cache, the run folder) the main
    # process writes first, and the others then only read it.
    processes = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # read as Accelerator reads it
    cfg, run_dir = broadcast_object_list([pick_seed(cfg, processes.print), run_dir_path(cfg)])
    try:
        with processes.main_process_first():
            models = load_models(
                cfg.resume_ckpt, hf_repo_subfolder=cfg.hf_repo_subfolder, prediction_type=cfg.prediction_type
            )
            processes.print(f"Model: {models.info.describe()}")
            # fills the latent cache if on; batches of batch_size x processes, split between the processes
            data = build_training_data(cfg, models.tokenizer, models.vae, processes.num_processes)
            if processes.is_main_process:
                create_run_dir(cfg, models.info, run_dir)
                print(f"Run folder: {run_dir.resolve()}")
        result = train(cfg, models, data, run_dir, started)
    except UserError as err:
        print(f"train.py: {err}", file=sys.stderr)
        return 1
    return 130 if result.interrupted else 0  # 130: the shell's code for "stopped by Ctrl-C"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
