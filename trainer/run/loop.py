"""The training loop on accelerate: devices, mixed precision, gradient accumulation and multi-process.

Reads top to bottom: for each batch: encode, loss, backward, clip, step, guard -> EMA, log, sample, save. At the
end the final model is saved first; validation and samples come after it, so nothing they do can cost the
trained model. A stop signal ends the loop after the current step with an interrupted save and its training
state; an unexpected error still saves what was trained (trainer/saves/saving.py `rescue`) before it is reported.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from common.console import first_line, say, warn
from common.progress import progress
from data.dataset import TrainingData
from trainer.config.schema import TrainConfig
from trainer.errors import UserError
from trainer.evaluation.sampling import generate_samples, write_samples
from trainer.evaluation.validation import MAIN_SET, STABILIZED_SET
from trainer.models.load import SDModels
from trainer.objective.loss import compute_loss, encode_images, encode_prompts, validation_loss
from trainer.objective.noise import row_generators
from trainer.optim.build import tweak_grad_scaler
from trainer.preflight.checks import Preflight
from trainer.run.logs import add_image, end_trackers, log_to_trackers, watch_run_folder
from trainer.run.metrics import LogWindow, log_scalars
from trainer.run.peers import lost_process
from trainer.run.setup import Run, ema_weights, prepare_run, start_state
from trainer.run.stops import Aborted, StopRequest
from trainer.saves.checkpoints import discard_run_folder
from trainer.saves.resume import TrainerState
from trainer.saves.saving import check_weights, how_to_go_on, rescue, save


@dataclass
class TrainResult:
    final_save: Path | None
    global_step: int
    exit_code: int = 0  # 128 + the signal when a stop signal ended the run
    # the run's objects, for a multi-process run to keep until it exits (train.py, end_without_teardown)
    run: Run | None = field(default=None, repr=False, compare=False)


def train(cfg: TrainConfig, models: SDModels, data: TrainingData, run_dir: Path, preflight: Preflight,
          precision: str, started: float | None = None) -> TrainResult:
    """Fine-tune `models` on `data`; returns where the final model was saved. `started` (time.monotonic() at
    the program's start) lets the log say how long the way to the first step took."""
    run = state = None
    start_step = -1
    try:
        run = prepare_run(cfg, models, data, run_dir, preflight, precision)
        state = start_state(run, preflight)
        start_step = state.global_step
        return _train(run, state, started)
    except BaseException:
        if (state is None or state.global_step == start_step) and PartialState().is_main_process:
            discard_run_folder(run_dir, run.accelerator.trackers if run else [])  # trained nothing: keep nothing
        raise


def _train(run: Run, state: TrainerState, started: float | None) -> TrainResult:
    """The loop under stop signals, then the final save; an unexpected error first saves what was trained."""
    start_step = state.global_step
    with StopRequest() as stop:
        run.stop = stop
        try:
            train_steps(run, state, started or time.monotonic())
            if run.text_cache is not None:
                say(run.text_cache.describe())
            final = finish(run, state)
        except KeyboardInterrupt:
            raise Aborted(f"aborted by a second Ctrl-C at step {state.global_step}: nothing more was saved. "
                          + (f"The last complete save is {run.last_save}." if run.last_save else
                             "This run has no save.")) from None
        except UserError:
            raise
        except Exception as err:
            go_on = how_to_go_on(run)  # a sentence: its first letter up, the paths in it as they are
            lost = lost_process(err, run.processes, state.global_step, go_on[:1].upper() + go_on[1:])
            if lost is not None:  # no save is possible without every process; say whom and where to go on from
                raise lost from None
            rescue(run, state, start_step)
            raise
    end_trackers(run)
    return TrainResult(final, state.global_step, stop.exit_code if stop.requested else 0, run)


def train_steps(run: Run, state: TrainerState, started: float) -> None:
    """The loop proper: until the last step, or a stop request (saved by `finish`)."""
    with tqdm(total=run.total_steps, initial=state.global_step, desc="steps",
              disable=not run.accelerator.is_local_main_process) as progress:  # closed on errors too
        _train_steps(run, state, started, progress)


def _train_steps(run: Run, state: TrainerState, started: float, progress: tqdm) -> None:
    cfg, accelerator = run.cfg, run.accelerator
    first_step = state.global_step + 1
    window = LogWindow()
    last_timed_save = time.monotonic()
    while state.epoch <= cfg.max_epochs and state.global_step < run.total_steps:
        for batch in start_epoch(run, state.epoch, state.batches_in_epoch):
            loss, grad_norm = micro_step(run, batch, state.global_step + 1)
            state.batches_in_epoch += 1
            window.add(loss, len(batch["input_ids"]))
            if not accelerator.sync_gradients:
                continue
            state.global_step += 1
            run.guard.after_step(state.global_step)
            watch_run_folder(run)
            if state.global_step == first_step:
                say(f"First step done {time.monotonic() - started:.1f} s after start.")
            if run.emas and state.global_step % cfg.ema_update_interval == 0:
                for ema, params in run.emas:
                    ema.step(params)
            progress.update(1)
            if run.is_log_step(state.global_step):  # the loss is read here only: no host sync per step
                check_weights(run)
                progress.set_postfix(loss=f"{log_scalars(run, window, grad_norm, state.global_step):.4f}",
                                     epoch=state.epoch)
                window = LogWindow()
            if (run.prompts and state.global_step % run.prompts.every(cfg.sample_steps) == 0
                    and state.global_step < run.total_steps):
                sample(run, state.global_step)  # the last step's samples come after the final save
            if validation_due(run, state) and state.global_step < run.total_steps:
                validate(run, state.global_step)  # the last step's validation comes after the final save
            if cfg.ckpt_every_n_minutes and time.monotonic() - last_timed_save > 60 * cfg.ckpt_every_n_minutes:
                save(run, state)
                last_timed_save = time.monotonic()
            if agreed_stop(run) or state.global_step >= run.total_steps:
                return
        # the epoch ran to its end; a save now resumes at the next epoch's start
        finished = state.epoch
        state.epoch, state.batches_in_epoch = state.epoch + 1, 0
        if cfg.save_every_n_epochs and finished % cfg.save_every_n_epochs == 0 and finished < cfg.max_epochs:
            save(run, state, epoch=finished)
        if agreed_stop(run):  # a stop that came during the epoch's validation or save
            return


def finish(run: Run, state: TrainerState) -> Path:
    """The final save first (interrupted, with its training state, after a stop), then the end's validation
    and samples, which can no longer cost the model."""
    stopping = run.stop.requested
    # named after the epoch of the last step: at an epoch boundary the state already points at the next one
    named_epoch = state.epoch if state.batches_in_epoch else max(1, state.epoch - 1)
    run.stop.saving_final = not stopping  # a stop from here on cannot make the final save an interrupted one
    final = save(run, state, epoch=named_epoch, prefix="interrupted-" if stopping else "last-", with_state=stopping)
    if stopping:
        say(f"Interrupted at step {state.global_step}; saved {final}. Continue with --resume_state {final}")
        return final
    run.stop.final_save = str(final)
    validate(run, state.global_step)
    sample(run, state.global_step)
    if run.stop.requested:
        say(f"Stopped during the final save or the validation and samples after it; the trained model is {final}.")
    return final


# ---------------------------------------------------------------- the loop's helpers


def micro_step(run: Run, batch: dict, step: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One batch forward and backward for optimizer step `step`; on the accumulation's last batch also clip and
    step. Returns (loss, gradient norm when measured)."""
    accelerator = run.accelerator
    generators = row_generators(batch["seed"])  # each sample's own noise: the same in any batch, on any process
    with accelerator.accumulate(*run.trained):
        latents = batch["latents"] if "latents" in batch else encode_images(run.vae, batch["pixel_values"], generators)
        encoder_hidden_states = text_states(run, batch)
        # a prepared UNet runs under autocast already; a frozen one (textual inversion) is not prepared
        with contextlib.nullcontext() if run.unet in run.trained else accelerator.autocast():
            loss = compute_loss(run.unet, run.noise_scheduler, latents, encoder_hidden_states, generators,
                                run.objective, batch.get("loss_weight"), batch.get("mask_weights"))
        run.guard.add_loss(loss)
        accelerator.backward(loss)  # divides by grad_accum: accumulated gradients average, not sum
        grad_norm = None
        # fused_backward steps and frees each gradient inside backward: there is no norm left to measure
        logged = run.plan.log_grad_norm and run.is_log_step(step) and not run.cfg.fused_backward
        if accelerator.sync_gradients and (run.cfg.clip_grad_norm or logged):
            # one clip over every trained parameter, both models together (also when each has its own
            # optimizer); with no clip asked, max_norm=inf only measures the norm (for the log)
            params = [p for module in run.trained for p in module.parameters()]
            grad_norm = accelerator.clip_grad_norm_(params, run.cfg.clip_grad_norm or math.inf)
        run.optimizer.step()  # one step of every model's optimizer (optim/chained.ChainedOptimizer when split)
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        if accelerator.sync_gradients and run.plan.grad_scaler_tweaks:
            tweak_grad_scaler(accelerator.scaler, step)  # fp16 only: otherwise there is no scaler
    return loss.detach(), grad_norm if logged else None


def text_states(run: Run, batch: dict) -> torch.Tensor:
    """The text encoder's states for the batch's captions: from the cache when the encoder is frozen and the run
    keeps one (trainer/objective/text_cache.py), else encoded now (with gradients when the encoder trains)."""
    with torch.set_grad_enabled(not run.cfg.disable_textenc_training), run.accelerator.autocast():
        if run.text_cache is not None:
            return run.text_cache(batch["input_ids"], batch["caption_ids"])
        return encode_prompts(run.text_encoder, batch["input_ids"], run.cfg.clip_skip)


def start_epoch(run: Run, epoch: int, skip: int) -> torch.utils.data.DataLoader:
    """The loader for `epoch`, past its first `skip` batches. The epoch's order depends only on (seed, epoch):
    the sampler is told directly, since accelerate's set_epoch does not reach a batch sampler through its
    BatchSamplerShard wrapper; the loader is told too, or its own count would overwrite ours on one process."""
    run.data.sampler.set_epoch(epoch)
    run.loader.set_epoch(epoch)
    return run.accelerator.skip_first_batches(run.loader, skip) if skip else run.loader


def agreed_stop(run: Run) -> bool:
    """Whether to stop now: a signal may reach the processes at different steps, and all must stop together
    (one process stopping early leaves the others waiting in an all-reduce)."""
    if run.accelerator.num_processes == 1:
        return run.stop.requested
    flag = torch.tensor([float(run.stop.requested)], device=run.accelerator.device)
    return bool(run.accelerator.reduce(flag, reduction="sum").item())


def validation_due(run: Run, state: TrainerState) -> bool:
    """Whether the optimizer step just taken is one after which the plan validates (EveryDream2's placing)."""
    step_in_epoch = math.ceil(state.batches_in_epoch / run.cfg.grad_accum)
    return bool(run.validation) and step_in_epoch in run.validation_plan.steps_in_epoch(state.epoch,
                                                                                          run.steps_per_epoch)


def validate(run: Run, step: int) -> None:
    """The loss of each validation set (fixed noise and timesteps) with the current weights, logged and said. A
    failure here is reported and the run goes on: validation must never cost a trained model."""
    if not run.validation:
        return
    unet, text_encoder = run.unwrapped()
    modes = [unet.training, text_encoder.training]
    unet.eval(), text_encoder.eval()
    losses = {}
    try:
        with progress("Validating", total=sum(map(len, run.validation.values())), unit="batches") as bar:
            for name, batches in run.validation.items():
                with run.accelerator.autocast():
                    losses[name] = validation_loss(unet, text_encoder, run.noise_scheduler, batches,
                                                   run.accelerator.device, stop_requested=lambda: run.stop.requested,
                                                   batch_done=bar.update)
    except (RuntimeError, OSError, ValueError) as err:  # out of memory, a full disk: said, and training goes on
        warn(f"validation at step {step} failed ({type(err).__name__}: {first_line(err)}); skipped.")
        return
    finally:
        unet.train(modes[0]), text_encoder.train(modes[1])
    if any(loss is None for loss in losses.values()):  # stopped part way: no loss worth logging
        return
    log_to_trackers(run, {validation_tag(name): loss for name, loss in losses.items()}, step)
    say(f"Validation loss at step {step}: " + ", ".join(
        f"{loss:.5f}" if name == MAIN_SET else f"{name} {loss:.5f}" for name, loss in losses.items()))


def validation_tag(name: str) -> str:
    """The tensorboard tag of a validation set's loss: loss/validation, loss/train-stabilized, loss/validation-<set>."""
    return f"loss/{name}" if name in (MAIN_SET, STABILIZED_SET) else f"loss/validation-{name}"


def sample(run: Run, step: int) -> None:
    """Sample images from the current weights (and the EMA's). A failure is reported and the run goes on."""
    if not run.prompts:
        return
    check_weights(run)  # on every process: with several, it is a collective
    if not run.accelerator.is_main_process:
        return
    try:
        _sample(run, step)
    except (RuntimeError, OSError, ValueError, ImportError) as err:  # out of memory, a full disk: said, run goes on
        warn(f"sampling at step {step} failed ({type(err).__name__}: {first_line(err)}); skipped.")


def _sample(run: Run, step: int) -> None:
    settings, cfg = run.prompts, run.cfg
    # one draw (captions, -1 seeds) for the model and its EMA, so the two compare image for image
    drawn = settings.draw(cfg.resolution, cfg.batch_size, [item.caption for item in run.data.loader.dataset.items])
    for suffix, weights in [("", contextlib.nullcontext)] + ([("-ema", lambda: ema_weights(run))] if run.emas else []):
        if run.stop.requested:
            return
        with weights():
            images = generate_samples(run.pipeline(), drawn, run.accelerator.device, settings.batch(cfg.batch_size),
                                      settings.scheduler, stop_requested=lambda: run.stop.requested,
                                      clip_skip=cfg.clip_skip, progress=settings.show_progress_bars)
        if not images:
            return
        grid = write_samples(images, drawn, run.run_dir / "samples", f"gs{step:05d}{suffix}", settings.scheduler)
        for index, row in sorted(images.items()):  # a sample's cfgs side by side (one size: one height)
            add_image(run, f"samples{suffix}/{index:02d}", np.hstack([np.asarray(i) for i in row]), step)
        say(f"Samples at step {step}: {grid}")
