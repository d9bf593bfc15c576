"""The training loop on accelerate: devices, mixed precision, gradient accumulation and multi-process.

Reads top to bottom: set up -> for each batch: encode, loss, backward, clip, step -> EMA, log, sample, save.
Features (EMA, samples, timed saves, resume, Ctrl-C) are helpers called from the loop, not branches inside it.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from tqdm.auto import tqdm

from trainer.checkpoints import (
    TrainerState,
    find_training_state,
    load_training_state,
    prune_saves,
    save_dir,
    save_model,
    save_name,
    save_training_state,
)
from data.dataset import TrainingData
from trainer.config import TrainConfig
from trainer.errors import UserError
from trainer.models import SDModels
from trainer.objective import Objective, compute_loss, encode_prompts, validation_loss, zero_terminal_snr_schedulers
from trainer.optim import build_lr_scheduler, build_optimizer, freeze_text_encoder_parts, plan_optimizers
from trainer.sampling import generate_samples, read_sample_prompts, write_samples


@dataclass
class TrainResult:
    final_save: Path | None
    global_step: int
    interrupted: bool = False


class StopRequest:
    """SIGINT/SIGTERM ask the loop to stop at the next optimizer step and save; a second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving an 'interrupted' model "
              "(press Ctrl-C again to abort without saving).", file=sys.stderr, flush=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Run:
    """What the loop and its helpers share: config, accelerator, prepared modules and optimizer, places."""

    cfg: TrainConfig
    accelerator: Accelerator
    models: SDModels
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    trained: list[torch.nn.Module]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    loader: torch.utils.data.DataLoader
    objective: Objective
    generator: torch.Generator  # every random draw of the objective: saved with the training state
    total_steps: int
    run_dir: Path
    emas: list = field(default_factory=list)  # (EMAModel, module) pairs
    prompts: list = field(default_factory=list)
    validation: list = field(default_factory=list)  # fixed validation batches

    def log(self, message: str) -> None:
        """Print on the main process and append to <run>/train.log."""
        if self.accelerator.is_main_process:
            tqdm.write(message)
            with open(self.run_dir / "train.log", "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    def unwrapped(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        unwrap = self.accelerator.unwrap_model
        return unwrap(self.unet, keep_torch_compile=False), unwrap(self.text_encoder, keep_torch_compile=False)

    def is_log_step(self, step: int) -> bool:
        return step % self.cfg.log_step == 0 or step == self.total_steps


# ---------------------------------------------------------------- set-up helpers


def pick_mixed_precision(requested: str) -> str:
    """fp16 autocast needs CUDA; on a CPU-only machine train in fp32 rather than fail (bf16 works on CPUs)."""
    if requested == "fp16" and not torch.cuda.is_available():
        print("Warning: mixed_precision fp16 needs a CUDA GPU; none found, so this run trains in fp32.", file=sys.stderr)
        return "no"
    return requested


def make_accelerator(cfg: TrainConfig, run_dir: Path) -> Accelerator:
    trackers = ["tensorboard"] + (["wandb"] if cfg.wandb else [])
    return Accelerator(
        mixed_precision=pick_mixed_precision(cfg.mixed_precision),
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=trackers,
        project_dir=str(run_dir),
        # the shuffle order of epoch e depends only on (seed, e): what exact resume needs
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )


def freeze(module: torch.nn.Module) -> None:
    module.requires_grad_(False)
    module.eval()


def set_up_modules(cfg: TrainConfig, models: SDModels, device: torch.device, freezing) -> None:
    """Frozen parts without gradients, trained parts in train mode, kernels and checkpointing as configured."""
    # The VAE is frozen and stays fp32: SD's VAE overflows in fp16 at high resolution, and its saved weights
    # must come out exactly as they went in.
    freeze(models.vae)
    models.vae.to(device)
    models.unet.train()
    if cfg.disable_textenc_training:
        freeze(models.text_encoder)
        models.text_encoder.to(device)
    else:
        models.text_encoder.train()
        freeze_text_encoder_parts(models.text_encoder, freezing)
    if cfg.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if not cfg.disable_textenc_training:
            models.text_encoder.activation_checkpointing_enable()
    if cfg.attn_type == "xformers":
        try:
            models.unet.enable_xformers_memory_efficient_attention()
        except Exception as err:  # diffusers raises ModuleNotFoundError/ValueError variants
            raise UserError(f"attn_type xformers could not be enabled ({err}); install xformers or use attn_type sdp.")
    if torch.cuda.is_available():  # TF32 matmuls: ~free speed on Ampere+, precision well within fp16's
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.torch_compile:
        models.unet = torch.compile(models.unet)


def make_emas(cfg: TrainConfig, run: Run, device: torch.device) -> list:
    """diffusers' EMAModel for each trained module; decay per update (with diffusers' built-in warmup)."""
    if cfg.ema_decay_rate is None:
        return []
    from diffusers.training_utils import EMAModel

    unet, text_encoder = run.unwrapped()
    modules = [unet] + ([] if cfg.disable_textenc_training else [text_encoder])
    emas = []
    for module in modules:
        ema = EMAModel(module.parameters(), decay=cfg.ema_decay_rate)
        ema.to(device if cfg.ema_device == "gpu" else torch.device("cpu"))
        run.accelerator.register_for_checkpointing(ema)
        emas.append((ema, module))
    return emas


@contextlib.contextmanager
def ema_weights(run: Run):
    """Temporarily swap the EMA weights into the modules (to save or sample them)."""
    for ema, module in run.emas:
        ema.store(module.parameters())
        ema.copy_to(module.parameters())
    try:
        yield
    finally:
        for ema, module in run.emas:
            ema.restore(module.parameters())


# ---------------------------------------------------------------- the loop's helpers


@torch.no_grad()
def encode_images(vae: torch.nn.Module, pixel_values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Pixels in [-1, 1] -> latents sampled from the VAE's posterior, scaled to about unit variance."""
    latents = vae.encode(pixel_values.float()).latent_dist.sample(generator)
    return latents * vae.config.scaling_factor


def check_finite(run: Run, loss: torch.Tensor, state: TrainerState) -> None:
    """Stop before a nan/inf loss reaches the weights; every process sees the same verdict."""
    total = run.accelerator.reduce(loss.detach().float().reshape(1), reduction="sum")
    if not torch.isfinite(total).all():
        raise UserError(
            f"the loss became {loss.item()} at step {state.global_step + 1} (epoch {state.epoch}); training stopped "
            "before the bad step touched the weights and nothing more was saved. Lower lr, set clip_grad_norm "
            "(e.g. 1.0), or use mixed_precision bf16 instead of fp16."
        )


def save(run: Run, state: TrainerState, *, epoch: int | None = None, prefix: str = "", with_state: bool = False) -> Path:
    """A model save named after `epoch` (default: the state's), plus an EMA copy and, with save_optimizer or
    `with_state`, the training state `state` to resume from. One process writes, all wait."""
    cfg, accelerator = run.cfg, run.accelerator
    name = save_name(cfg, epoch or state.epoch, state.global_step, prefix)
    path = (save_dir(cfg, run.run_dir) / name).resolve()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unet, text_encoder = run.unwrapped()
        options = dict(half=not cfg.save_full_precision, single_file=cfg.save_single_file)
        save_model(run.models, unet, text_encoder, path, **options)
        if run.emas:
            with ema_weights(run):
                save_model(run.models, unet, text_encoder, path.with_name(path.name + "-ema"), **options)
        if cfg.max_saves and not prefix:
            for old in prune_saves(path.parent, cfg.max_saves):
                run.log(f"Pruned old save {old.name} (max_saves {cfg.max_saves}).")
    accelerator.wait_for_everyone()
    if with_state or cfg.save_optimizer:
        save_training_state(accelerator, state, run.generator, path)
    return path


def validate(run: Run, step: int) -> None:
    """The validation loss (fixed noise and timesteps) of the current weights, logged and printed."""
    if not run.validation:
        return
    unet, text_encoder = run.unwrapped()
    modes = [unet.training, text_encoder.training]
    unet.eval(), text_encoder.eval()
    with run.accelerator.autocast():
        loss = validation_loss(unet, text_encoder, run.models.noise_scheduler, run.validation, run.accelerator.device)
    unet.train(modes[0]), text_encoder.train(modes[1])
    run.accelerator.log({"loss/validation": loss}, step=step)
    run.log(f"Validation loss at step {step}: {loss:.5f}")


def sample(run: Run, step: int) -> None:
    prompts = run.prompts
    if not prompts or not run.accelerator.is_main_process:
        return
    unet, text_encoder = run.unwrapped()
    variants = [("", contextlib.nullcontext)] + ([("-ema", lambda: ema_weights(run))] if run.emas else [])
    tracker = run.accelerator.get_tracker("tensorboard", unwrap=True)
    for suffix, weights in variants:
        with weights():
            images = generate_samples(run.models, unet, text_encoder, prompts, run.cfg.resolution, run.accelerator.device)
        grid = write_samples(images, prompts, run.run_dir / "samples", f"gs{step:05d}{suffix}")
        for index, image in enumerate(images):
            tracker.add_image(f"samples{suffix}/{index:02d}", np.asarray(image), step, dataformats="HWC")
        run.log(f"Samples at step {step}: {grid}")


def prepare_run(cfg: TrainConfig, models: SDModels, data: TrainingData, run_dir: Path) -> Run:
    """Accelerator, frozen/trained modules, optimizer, LR schedule, EMA and prompts, all prepared."""
    accelerator = make_accelerator(cfg, run_dir)
    set_seed(cfg.seed)
    notices: list[str] = []
    plan = plan_optimizers(cfg, notices)
    set_up_modules(cfg, models, accelerator.device, plan.freezing)
    if cfg.enable_zero_terminal_snr:
        if models.info.prediction_type != "v_prediction":
            raise UserError("enable_zero_terminal_snr needs a v-prediction model (like SD2.1-768); at zero SNR an "
                            "epsilon model's target equals its input. Use a v-prediction base model or turn it off.")
        models.noise_scheduler, models.sample_scheduler = zero_terminal_snr_schedulers(
            models.noise_scheduler, models.sample_scheduler)
    train_text_encoder = not cfg.disable_textenc_training
    optimizer = build_optimizer(plan, models.unet, models.text_encoder if train_text_encoder else None)
    loader = data.loader
    total_steps = math.ceil(len(loader) / cfg.grad_accum) * cfg.max_epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    lr_scheduler = build_lr_scheduler(plan, optimizer, total_steps, accelerator.num_processes)
    to_prepare = [models.unet] + ([models.text_encoder] if train_text_encoder else [])
    *trained, optimizer, loader, lr_scheduler = accelerator.prepare(*to_prepare, optimizer, loader, lr_scheduler)
    run = Run(
        cfg, accelerator, models, unet=trained[0], text_encoder=trained[1] if train_text_encoder else models.text_encoder,
        trained=trained, optimizer=optimizer, lr_scheduler=lr_scheduler, loader=loader,
        objective=Objective.from_config(cfg), generator=torch.Generator().manual_seed(cfg.seed + accelerator.process_index),
        total_steps=total_steps, run_dir=run_dir,
        prompts=read_sample_prompts(Path(cfg.sample_prompts)) if cfg.sample_prompts else [],
        validation=data.validation,
    )
    run.emas = make_emas(cfg, run, accelerator.device)
    accelerator.init_trackers("tensorboard")
    for notice in notices:
        run.log(f"Optimizer: {notice}")
    run.log(
        f"Training {models.info.family.upper()} ({models.info.prediction_type}) on {len(loader.dataset)} images at "
        f"{cfg.resolution}px: batch {cfg.batch_size} x accum {cfg.grad_accum} x {accelerator.num_processes} "
        f"process(es), {math.ceil(len(loader) / cfg.grad_accum)} steps/epoch, {total_steps} steps, device {accelerator.device}, "
        f"precision {accelerator.mixed_precision}, optimizer {plan.unet.optimizer}, "
        f"text encoder {'trained' if train_text_encoder else 'frozen'}{', EMA' if run.emas else ''}."
    )
    return run


# ---------------------------------------------------------------- the loop


def micro_step(run: Run, batch: dict, state: TrainerState) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One batch forward and backward; on the accumulation's last batch also clip and step. Returns
    (loss, gradient norm when measured)."""
    accelerator, models = run.accelerator, run.models
    with accelerator.accumulate(*run.trained):
        latents = batch["latents"] if "latents" in batch else encode_images(models.vae, batch["pixel_values"], run.generator)
        with torch.set_grad_enabled(not run.cfg.disable_textenc_training), accelerator.autocast():
            encoder_hidden_states = encode_prompts(run.text_encoder, batch["input_ids"], run.cfg.clip_skip)
        loss = compute_loss(run.unet, models.noise_scheduler, latents, encoder_hidden_states, run.generator,
                            run.objective, batch.get("loss_weight"))
        check_finite(run, loss, state)
        accelerator.backward(loss)  # divides by grad_accum: accumulated gradients average, not sum
        grad_norm = None
        if accelerator.sync_gradients and (run.cfg.clip_grad_norm or run.is_log_step(state.global_step + 1)):
            # with no clip asked, max_norm=inf only measures the norm (for the log)
            params = [p for module in run.trained for p in module.parameters()]
            grad_norm = accelerator.clip_grad_norm_(params, run.cfg.clip_grad_norm or math.inf)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss.detach(), grad_norm


def train(cfg: TrainConfig, models: SDModels, data: TrainingData, run_dir: Path) -> TrainResult:
    """Fine-tune `models` on `data`; returns where the final model was saved."""
    run = prepare_run(cfg, models, data, run_dir)
    accelerator, loader = run.accelerator, run.loader
    state = TrainerState(global_step=0, epoch=1, batches_in_epoch=0)
    if cfg.resume_state:
        state_dir = find_training_state(cfg.resume_state, Path(cfg.logdir), [save_dir(cfg, run_dir)])
        state = load_training_state(accelerator, state_dir, run.generator)
        run.log(f"Resumed from {state_dir}: step {state.global_step}, epoch {state.epoch}, "
                f"{state.batches_in_epoch} batches into it.")
    progress = tqdm(total=run.total_steps, initial=state.global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    window = LogWindow()
    last_timed_save = time.monotonic()
    with StopRequest() as stop:
        while state.epoch <= cfg.max_epochs and state.global_step < run.total_steps and not stop.requested:
            loader.set_epoch(state.epoch)  # the epoch's order depends only on (seed, epoch)
            batches = accelerator.skip_first_batches(loader, state.batches_in_epoch) if state.batches_in_epoch else loader
            for batch in batches:
                loss, grad_norm = micro_step(run, batch, state)
                state.batches_in_epoch += 1
                window.add(loss.item(), len(batch["input_ids"]))
                if not accelerator.sync_gradients:
                    continue
                state.global_step += 1
                if run.emas and state.global_step % cfg.ema_update_interval == 0:
                    for ema, module in run.emas:
                        ema.step(module.parameters())
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.4f}", epoch=state.epoch)
                if run.is_log_step(state.global_step):
                    log_scalars(run, window, grad_norm, state.global_step)
                    window = LogWindow()
                if state.global_step % cfg.sample_steps == 0:
                    sample(run, state.global_step)
                if cfg.ckpt_every_n_minutes and time.monotonic() - last_timed_save > 60 * cfg.ckpt_every_n_minutes:
                    save(run, state)
                    last_timed_save = time.monotonic()
                if state.global_step >= run.total_steps or stop.requested:
                    break
            else:  # the epoch ran to its end; a save now resumes at the next epoch's start
                finished = state.epoch
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
                if finished % cfg.validation_every_n_epochs == 0 and finished < cfg.max_epochs:
                    validate(run, state.global_step)
                if cfg.save_every_n_epochs and finished % cfg.save_every_n_epochs == 0 and finished < cfg.max_epochs:
                    save(run, state, epoch=finished)
    progress.close()
    validate(run, state.global_step)
    if state.global_step % cfg.sample_steps:  # not sampled at this very step already
        sample(run, state.global_step)
    # named after the epoch of the last step: at an epoch boundary the state already points at the next one
    named_epoch = state.epoch if state.batches_in_epoch else max(1, state.epoch - 1)
    prefix = "interrupted-" if stop.requested else "last-"
    final = save(run, state, epoch=named_epoch, prefix=prefix, with_state=stop.requested)
    if stop.requested:
        run.log(f"Interrupted at step {state.global_step}; saved {final}. Continue with --resume_state {final}")
    accelerator.end_training()
    return TrainResult(final, state.global_step, interrupted=stop.requested)


@dataclass
class LogWindow:
    """Loss and throughput since the last log line."""

    loss_sum: float = 0.0
    batches: int = 0
    samples: int = 0
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, batch_size: int) -> None:
        self.loss_sum, self.batches, self.samples = self.loss_sum + loss, self.batches + 1, self.samples + batch_size


def log_scalars(run: Run, window: LogWindow, grad_norm, step: int) -> None:
    elapsed = max(time.perf_counter() - window.start, 1e-9)
    optimizer_steps = -(-window.batches // run.cfg.grad_accum)
    scalars = {
        "loss/train": window.loss_sum / max(window.batches, 1),
        "perf/it_per_s": optimizer_steps / elapsed,
        "perf/samples_per_s": window.samples * run.accelerator.num_processes / elapsed,
    }
    param_groups = run.lr_scheduler.scheduler.optimizer.param_groups
    for group, lr in zip(param_groups, run.lr_scheduler.get_last_lr()):
        scalars[f"lr/{group.get('name', 'group')}"] = lr
    if grad_norm is not None:
        scalars["grad_norm"] = float(grad_norm)
    if torch.cuda.is_available():
        scalars["perf/gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    run.accelerator.log(scalars, step=step)
