#!/usr/bin/env python
"""Fine-tune Stable Diffusion 1.x / 2.x: config -> models -> data -> train.

    python train.py --config train.json --resume_ckpt my_model --data_root my_images
"""

from __future__ import annotations

import dataclasses
import random
import sys

from trainer.config import load_config_or_exit


def main(argv: list[str]) -> int:
    cfg = load_config_or_exit(argv).config  # every config problem at once, exit 2; imports no torch
    if cfg.seed == -1:
        cfg = dataclasses.replace(cfg, seed=random.randrange(2**31))
        print(f"Config: seed -1 picked seed {cfg.seed}.")

    if cfg.dry_run:  # the data plan only: no model is loaded and diffusers is never imported
        from data.dry_run import print_plan
        from trainer.errors import UserError

        try:
            print_plan(cfg)
        except UserError as err:
            print(f"train.py: {err}", file=sys.stderr)
            return 1
        return 0

    # Heavy imports only once the config is known to be good, so --help and config errors answer at once.
    from data.dataset import build_training_data
    from trainer.checkpoints import create_run_dir
    from trainer.errors import UserError
    from trainer.loop import train
    from trainer.models import load_models

    try:
        models = load_models(
            cfg.resume_ckpt, hf_repo_subfolder=cfg.hf_repo_subfolder, prediction_type=cfg.prediction_type
        )
        print(f"Model: {models.info.describe()}")
        data = build_training_data(cfg, models.tokenizer, models.vae)  # fills the latent cache if on
        run_dir = create_run_dir(cfg, models.info)
        print(f"Run folder: {run_dir.resolve()}")
        result = train(cfg, models, data, run_dir)
    except UserError as err:
        print(f"train.py: {err}", file=sys.stderr)
        return 1
    return 130 if result.interrupted else 0  # 130: the shell's code for "stopped by Ctrl-C"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
