#!/usr/bin/env python
"""Fine-tune Stable Diffusion 1.x / 2.x: config -> preflight -> models -> data -> train.

    python train.py --config train.json --resume_ckpt my_model --data_root my_images
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

from trainer.config import TrainConfig, load_config_or_exit
from trainer.errors import UserError


def pick_seed(cfg: TrainConfig, say: Callable[[str], None]) -> TrainConfig:
    """seed -1 asks for a random seed; it is said, so the run can be repeated (and saved in the run's train.json)."""
    if cfg.seed != -1:
        return cfg
    cfg = dataclasses.replace(cfg, seed=random.randrange(2**31))
    say(f"Config: seed -1 picked seed {cfg.seed}.")
    return cfg


def dry_run(cfg: TrainConfig) -> int:
    """The preflight and the data plan only: no model is loaded and diffusers is never imported."""
    from trainer.preflight import plan_lines, run_dir_path, run_preflight

    cfg = pick_seed(cfg, print)
    preflight = run_preflight(cfg, run_dir_path(cfg))
    for line in [*preflight.notices, *plan_lines(cfg, preflight)]:
        print(line)
    print("Preflight: every check passed.")
    return 0


def train_run(cfg: TrainConfig, started: float) -> int:
    # Heavy imports only once the config is known to be good, so --help and config errors answer at once.
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, parse_flag_from_env

    from data.dataset import build_training_data
    from trainer.checkpoints import create_run_dir, remove_stale_saves
    from trainer.loop import train
    from trainer.models import ComponentDtypes, load_models
    from trainer.precision import frozen_dtype, training_precision
    from trainer.preflight import check_model_fits, run_dir_path, run_preflight

    # One process, or one per device under `accelerate launch` (docs/DISTRIBUTED.md). What a process would pick
    # alone (the seed for -1, the run folder's time stamp) all take from the main process; what goes into shared
    # folders (a model converted or downloaded into ckpt_cache/, the latent cache, the run folder) the main
    # process writes first, and the others then only read it.
    processes = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # read as Accelerator reads it
    cfg, run_dir = broadcast_object_list([pick_seed(cfg, processes.print), run_dir_path(cfg)])
    preflight = run_preflight(cfg, run_dir, processes.num_processes)  # every file and place, before any model
    precision, warning = training_precision(cfg.mixed_precision, torch.cuda.is_available())
    for line in preflight.notices + ([f"Warning: {warning}"] if warning else []):
        processes.print(line)
    frozen = frozen_dtype(precision)  # trained weights are fp32 masters; frozen parts compute in this dtype
    dtypes = ComponentDtypes(unet=torch.float32, vae=frozen,
                             text_encoder=frozen if cfg.disable_textenc_training else torch.float32)
    with processes.main_process_first():
        models = load_models(cfg.resume_ckpt, hf_repo_subfolder=cfg.hf_repo_subfolder,
                             prediction_type=cfg.prediction_type, dtypes=dtypes)
        processes.print(f"Model: {models.info.describe()}")
        check_model_fits(cfg, preflight, models)  # a resumed state's architecture, the room for a save
        # fills the latent cache if on; batches of batch_size x processes, split between the processes
        data = build_training_data(cfg, models.tokenizer, models.vae, processes.num_processes,
                                   cache_dir=preflight.cache_dir, scan=preflight.scan, held_out=preflight.validation)
        if processes.is_main_process:
            run_dir = create_run_dir(cfg, models.info, run_dir)
            for stale in remove_stale_saves(Path(cfg.logdir), preflight.save_dir):
                print(f"Removed {stale}, a partial save a killed run left behind.")
            print(f"Run folder: {run_dir.resolve()}")
    (run_dir,) = broadcast_object_list([run_dir])
    return train(cfg, models, data, run_dir, preflight, precision, started).exit_code


def main(argv: list[str]) -> int:
    started = time.monotonic()
    cfg = load_config_or_exit(argv).config  # every config problem at once, exit 2; imports no torch
    try:
        return dry_run(cfg) if cfg.dry_run else train_run(cfg, started)
    except UserError as err:  # an input or environment problem, said in one message
        print(f"train.py: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # during training a Ctrl-C stops and saves; this is before training started
        print("train.py: stopped by Ctrl-C before training started; nothing was trained, so nothing needed saving.",
              file=sys.stderr)
        return 130
    except Exception as err:
        from trainer.failures import report_unexpected

        return report_unexpected(err)
    finally:
        if "data.workers" in sys.modules:  # DataLoader workers ran: none may outlive the program
            sys.modules["data.workers"].end_worker_processes()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
