#!/usr/bin/env python
"""Fine-tune Stable Diffusion 1.x / 2.x: config -> preflight -> models -> data -> train.

    python train.py --config train.json --resume_ckpt my_model --data_root my_images
"""

from __future__ import annotations

import os

# OpenMP's idle threads sleep instead of spinning (libgomp and Intel's runtime read this once, when torch loads
# them, so it is set before any import that could load torch). Spinning threads fight every other process for the
# cores: on a 2-core machine shared with other work, steps were 6x slower at the median, up to 35x, in this trainer
# and in diffusers' example script alike, and with one other busy process ACTIVE steps took 3.4x PASSIVE's. On a
# machine kept idle for training spinning is faster (ACTIVE steps 1.4-1.8x quicker here), so a value the user set
# wins.
OMP_WAIT_POLICY_CHOSEN = "OMP_WAIT_POLICY" not in os.environ
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dataclasses  # noqa: E402  (after the environment above)
import gc  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

from common.console import configure as configure_console  # noqa: E402
from common.console import hold_for_log, outlive_the_console, quiet_library_noise, report, say, warn  # noqa: E402
from common.progress import configure as configure_progress  # noqa: E402
from data.errors import DataError  # noqa: E402
from trainer.config.docs import help_text  # noqa: E402
from trainer.config.load import ConfigError, load_config  # noqa: E402
from trainer.config.schema import TrainConfig  # noqa: E402
from trainer.errors import UserError  # noqa: E402

quiet_library_noise()


def pick_seed(cfg: TrainConfig, say: Callable[[str], None]) -> TrainConfig:
    """seed -1 asks for a random seed; it is said, so the run can be repeated (and saved in the run's train.json).
    A resumed run goes on with the seed its training state recorded."""
    from trainer.preflight.checks import resumed_seed

    if cfg.seed != -1:
        return cfg
    saved = resumed_seed(cfg)
    if saved is not None:
        say(f"Config: seed -1: going on with the resumed run's seed {saved}.")
        return dataclasses.replace(cfg, seed=saved)
    cfg = dataclasses.replace(cfg, seed=random.randrange(2**31))
    say(f"Config: seed -1 picked seed {cfg.seed}.")
    return cfg


def choose_gpu(cfg: TrainConfig) -> None:
    """gpuid (EveryDream2's key) as CUDA_VISIBLE_DEVICES, set before torch starts CUDA; never under accelerate
    launch (each process has its device) nor over a CUDA_VISIBLE_DEVICES the user set."""
    if cfg.gpuid is None:
        return
    if "CUDA_VISIBLE_DEVICES" in os.environ or "LOCAL_RANK" in os.environ:
        say(f"Config: gpuid {cfg.gpuid} is not used: the device comes from "
            f"{'CUDA_VISIBLE_DEVICES' if 'CUDA_VISIBLE_DEVICES' in os.environ else 'accelerate launch'}.")
        return
    os.environ["CUDA_VISIBLE_DEVICES"] = str(cfg.gpuid)
    say(f"Config: gpuid {cfg.gpuid}: training on that GPU (CUDA_VISIBLE_DEVICES={cfg.gpuid}).")


def fit_to_device(cfg: TrainConfig, device) -> TrainConfig:
    """The config's per-device `null`/`auto` settings made concrete for `device`, and said, with the threads' wait
    policy chosen at the top of this file."""
    from trainer.preflight.device import resolve

    cfg, lines = resolve(cfg, device)
    for line in [*lines, thread_wait_line()]:
        say(line)
    return cfg


def thread_wait_line() -> str:
    """What the top of this file chose for OpenMP's idle threads, and why."""
    policy = os.environ["OMP_WAIT_POLICY"]
    if not OMP_WAIT_POLICY_CHOSEN:
        return f"Threads: OMP_WAIT_POLICY {policy}, as set in the environment."
    return (f"Threads: OMP_WAIT_POLICY {policy}: idle OpenMP threads sleep rather than spin (spinning threads made "
            "steps up to 6x slower on a CPU shared with other work); on a machine kept idle for training, "
            "OMP_WAIT_POLICY=ACTIVE can be faster.")


def dry_run(cfg: TrainConfig) -> int:
    """The preflight, the data plan and the memory plan: no weight is loaded."""
    from trainer.preflight.checks import resolve_find_last, run_dir_path, run_preflight
    from trainer.preflight.device import Device
    from trainer.preflight.memory import memory_report, model_params_on_disk
    from trainer.preflight.report import plan_lines

    device = Device.here().planned(cfg.vram_gb)
    cfg = fit_to_device(resolve_find_last(pick_seed(cfg, say)), device)
    preflight = run_preflight(cfg, run_dir_path(cfg))
    for line in [*preflight.notices, *plan_lines(cfg, preflight)]:
        say(line)
    say_memory_plan(memory_report(cfg, preflight, device, model_params_on_disk(cfg.resume_ckpt, cfg.ckpt_cache_dir)))
    say("Preflight: every check passed.")
    return 0


def say_memory_plan(report: tuple[list[str], list[str]]) -> None:
    lines, too_big = report
    for line in lines:
        say(line)
    for line in too_big:
        warn(line)


def train_run(cfg: TrainConfig, started: float) -> int:
    # Heavy imports only once the config is known to be good, so --help and config errors answer at once.
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list, parse_flag_from_env

    from data.dataset import build_training_data
    from data.options import DataOptions
    from trainer.adapters.embeddings import add_embeddings
    from trainer.models.load import load_models
    from trainer.models.precision import component_dtypes, training_precision
    from trainer.preflight.checks import check_model_fits, resolve_find_last, run_dir_path, run_preflight
    from trainer.preflight.device import Device
    from trainer.preflight.findlast import load_base_model
    from trainer.preflight.memory import memory_report, model_params_of
    from trainer.run.loop import train
    from trainer.run.repeatable import use_deterministic_kernels
    from trainer.run.setup import refuse_sharding_without_accelerators
    from trainer.saves.checkpoints import open_run_folder

    # The libraries just imported made about half a million objects that live as long as the run: frozen out of the
    # collector's sight, its collections stop walking them over and over (loading the tokenizer took 2.5x as long
    # with them in sight).
    gc.collect()
    gc.freeze()
    # One process, or one per device under `accelerate launch` (docs/DISTRIBUTED.md). What a process would pick
    # alone (the seed for -1, the run folder's time stamp) all take from the main process; what goes into shared
    # folders (a model converted or downloaded into ckpt_cache/, the latent cache, the run folder) the main
    # process writes first, and the others then only read it.
    processes = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # read as Accelerator reads it
    configure_console(main=processes.is_main_process)
    refuse_sharding_without_accelerators()
    # every process resolves findlast (a missing save stops them all); the main process's answers count
    device = Device.here(processes.num_processes)
    cfg = fit_to_device(cfg, device)
    if cfg.deterministic:  # before any model is loaded (trainer/run/repeatable.py)
        say(use_deterministic_kernels(cuda=device.gpu))
    cfg, run_dir = broadcast_object_list([resolve_find_last(pick_seed(cfg, say)), run_dir_path(cfg)])
    preflight = run_preflight(cfg, run_dir, processes.num_processes)  # every file and place, before any model
    for notice in preflight.notices:
        say(notice)
    precision = training_precision(cfg.mixed_precision)
    with processes.main_process_first():
        # findlast's pick, or the next newest when another run's pruning removed it since (said)
        cfg, models = load_base_model(cfg, lambda source: load_models(
            source, hf_repo_subfolder=cfg.hf_repo_subfolder, prediction_type=cfg.prediction_type,
            dtypes=component_dtypes(cfg, precision), ckpt_cache_dir=cfg.ckpt_cache_dir))
        say(f"Model: {models.info.describe()}")
        check_model_fits(cfg, preflight, models)  # a resumed state's architecture, the room for a save
        if preflight.embeddings:  # new tokens, before any caption is tokenized
            say(add_embeddings(models.text_encoder, models.tokenizer, preflight.embeddings).describe())
        say_memory_plan(memory_report(cfg, preflight, device, model_params_of(models)))
        # fills the latent cache if on; batches of batch_size x processes, split between the processes
        data = build_training_data(DataOptions.from_config(cfg), models.tokenizer, models.vae, processes.num_processes,
                                   cache_dir=preflight.cache_dir, scan=preflight.scan, held_out=preflight.validation)
        if processes.is_main_process:
            run_dir = open_run_folder(cfg, models.info, run_dir, preflight.save_dir)
    (run_dir,) = broadcast_object_list([run_dir])
    result = train(cfg, models, data, run_dir, preflight, precision, started)
    if processes.num_processes > 1:
        KEPT_UNTIL_EXIT.append(result)  # see end_without_teardown
    return result.exit_code


def main(argv: list[str]) -> int:
    started = time.monotonic()
    outlive_the_console()  # before the libraries' loggers take the streams: a closed pipe or terminal stops nothing
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    hold_for_log()  # train.log opens minutes from now, with the run folder: what is said until then goes into it
    try:
        loaded = load_config(argv)  # every config problem at once; imports no torch
    except ConfigError as err:  # with what the preflight finds in the rest of the config: one round of fixes
        from trainer.preflight.checks import problems_beside

        report(f"train.py: {err}{problems_beside(err)}")
        return 2
    for notice in loaded.notices:
        say(f"Config: {notice}")
    for warning in loaded.warnings:
        warn(f"Config: {warning}")
    cfg = loaded.config
    configure_progress(every_s=cfg.progress_every_n_seconds)
    choose_gpu(cfg)
    try:
        return dry_run(cfg) if cfg.dry_run else train_run(cfg, started)
    except (UserError, DataError) as err:  # an input or environment problem, said in one message
        report(f"train.py: {err}")
        return getattr(err, "exit_code", 1)
    except KeyboardInterrupt:  # during training a Ctrl-C stops and saves; this is before training started
        report("train.py: stopped by Ctrl-C before training started; nothing was trained, so nothing needed saving.")
        return 130
    except Exception as err:
        from trainer.failures import describe_unexpected

        report(describe_unexpected(err))
        return 1
    finally:
        if "data.workers" in sys.modules:  # DataLoader workers ran: none may outlive the program
            sys.modules["data.workers"].end_worker_processes()


# A multi-process run's objects (DDP's reducers, gloo's process group) are never torn down: freeing the process group
# joins gloo's worker threads while holding the GIL, and a worker that is freeing a finished collective's tensors waits
# for the GIL, forever (3 of about 30 two-process runs never exited after their final save). Its run is kept here
# and the process ends without destructors once everything it writes is written.
KEPT_UNTIL_EXIT: list = []


def end_without_teardown(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_code = main(sys.argv[1:])
    if KEPT_UNTIL_EXIT:
        end_without_teardown(exit_code)
    sys.exit(exit_code)
