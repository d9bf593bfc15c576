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
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, DistributedType, set_seed
from tqdm.auto import tqdm

from trainer.checkpoints import (
    TrainerState,
    continue_position,
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
from trainer.objective import (
    Generators,
    Objective,
    compute_loss,
    encode_prompts,
    row_generators,
    validation_loss,
    zero_terminal_snr_schedulers,
)
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
    data: TrainingData
    objective: Objective
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
    if cfg.wandb:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise UserError("wandb is true but the wandb package is not installed: pip install wandb (then "
                            "wandb login), or set wandb false; tensorboard logs are written either way.")
    trackers = ["tensorboard"] + (["wandb"] if cfg.wandb else [])
    return Accelerator(
        mixed_precision=pick_mixed_precision(cfg.mixed_precision),
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=trackers,
        project_dir=str(run_dir),
        # The sampler yields global batches (batch_size x processes, data/dataset.py) and split_batches gives
        # each process its slice, so N processes train exactly what one process with N x the batch would; it
        # also makes accelerate step the LR schedule once per optimizer step whatever the process count.
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True, data_seed=cfg.seed),
        # clip_skip >= 2 leaves the text encoder's last layers out of the graph; DDP must be told to expect that
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.clip_skip > 1)],
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
def encode_images(vae: torch.nn.Module, pixel_values: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Pixels in [-1, 1] -> latents sampled from the VAE's posterior, scaled to about unit variance."""
    latents = vae.encode(pixel_values.float()).latent_dist.sample(generator)
    return latents * vae.config.scaling_factor


def check_finite(run: Run, loss: torch.Tensor, state: TrainerState) -> None:
    """Stop before a nan/inf loss reaches the weights; every process sees the same verdict (or the others would
    wait forever in the next all-reduce). One process needs no all-reduce. The check reads the loss on the host,
    a sync that waits for the forward: kept, because a nan must never reach the weights."""
    total = loss.detach().float().reshape(1)
    if run.accelerator.num_processes > 1:
        total = run.accelerator.reduce(total, reduction="sum")
    if not torch.isfinite(total).all():
        raise UserError(
            f"the loss became {loss.item()} at step {state.global_step + 1} (epoch {state.epoch}); training stopped "
            "before the bad step touched the weights and nothing more was saved. Lower lr, set clip_grad_norm "
            "(e.g. 1.0), or use mixed_precision bf16 instead of fp16."
        )


def check_in_sync(run: Run, step: int) -> None:
    """Every DDP process must hold the same weights: DDP averages the gradients and each process takes the same
    step. A difference means a process trained on something else; stop before saving one process's weights.
    (Only plain DDP: under FSDP/DeepSpeed each process holds a shard, not a copy.)"""
    accelerator = run.accelerator
    if accelerator.distributed_type not in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        return
    params = [p.detach() for module in run.trained for p in module.parameters()]
    checksum = torch.stack([torch.stack([p.double().sum(), p.double().abs().sum()]) for p in params]).sum(0)
    every = accelerator.gather(checksum.reshape(1, 2))
    if not torch.equal(every, checksum.reshape(1, 2).expand_as(every)):
        raise UserError(f"at step {step} the {accelerator.num_processes} processes hold different weights "
                        f"(checksums {every.tolist()}); nothing was saved. This is a bug: please report it with "
                        "your accelerate config.")
    run.log(f"Weights agree on all {accelerator.num_processes} processes at step {step} "
            f"(checksum {checksum[0].item():.6f}).")


def save(run: Run, state: TrainerState, *, epoch: int | None = None, prefix: str = "", with_state: bool = False) -> Path:
    """A model save named after `epoch` (default: the state's), plus an EMA copy and, with save_optimizer or
    `with_state`, the training state `state` to resume from. One process writes, all wait."""
    cfg, accelerator = run.cfg, run.accelerator
    name = save_name(cfg, epoch or state.epoch, state.global_step, prefix)
    path = (save_dir(cfg, run.run_dir) / name).resolve()
    check_in_sync(run, state.global_step)
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
        save_training_state(accelerator, state, path)
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
    lr_scheduler = build_lr_scheduler(plan, optimizer, total_steps)
    to_prepare = [models.unet] + ([models.text_encoder] if train_text_encoder else [])
    *trained, optimizer, loader, lr_scheduler = accelerator.prepare(*to_prepare, optimizer, loader, lr_scheduler)
    run = Run(
        cfg, accelerator, models, unet=trained[0], text_encoder=trained[1] if train_text_encoder else models.text_encoder,
        trained=trained, optimizer=optimizer, lr_scheduler=lr_scheduler, loader=loader, data=data,
        objective=Objective.from_config(cfg), total_steps=total_steps, run_dir=run_dir,
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
    generators = row_generators(batch["seed"])  # each sample's own noise: the same in any batch, on any process
    with accelerator.accumulate(*run.trained):
        latents = batch["latents"] if "latents" in batch else encode_images(models.vae, batch["pixel_values"], generators)
        with torch.set_grad_enabled(not run.cfg.disable_textenc_training), accelerator.autocast():
            encoder_hidden_states = encode_prompts(run.text_encoder, batch["input_ids"], run.cfg.clip_skip)
        loss = compute_loss(run.unet, models.noise_scheduler, latents, encoder_hidden_states, generators,
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


def resume(run: Run) -> TrainerState:
    """Where training starts: at the beginning, or where the training state that resume_state names left off
    (its weights, optimizer, LR schedule and RNG loaded into the prepared objects)."""
    batch_samples = run.cfg.batch_size * run.accelerator.num_processes
    if not run.cfg.resume_state:
        return TrainerState(global_step=0, epoch=1, batches_in_epoch=0, batch_samples=batch_samples)
    state_dir = find_training_state(run.cfg.resume_state, Path(run.cfg.logdir), [save_dir(run.cfg, run.run_dir)])
    saved = load_training_state(run.accelerator, state_dir)
    state = continue_position(saved, batch_samples)
    run.log(f"Resumed from {state_dir}: step {state.global_step}, epoch {state.epoch}, "
            f"{state.batches_in_epoch} batches into it.")
    if state.batches_in_epoch != saved.batches_in_epoch:
        run.log(f"The global batch changed from {saved.batch_samples} to {batch_samples} samples (batch_size x "
                f"processes): epoch {state.epoch} is re-planned in the new batches and goes on after "
                f"{state.batches_in_epoch * batch_samples} of the {saved.batches_in_epoch * saved.batch_samples} "
                "samples already trained. Keep batch_size x processes the same for an exact resume.")
    return state


def start_epoch(run: Run, epoch: int, skip: int) -> torch.utils.data.DataLoader:
    """The loader for `epoch`, past its first `skip` batches. The epoch's order depends only on (seed, epoch):
    the sampler is told directly, since accelerate's set_epoch does not reach a batch sampler through its
    BatchSamplerShard wrapper; the loader is told too, or its own count would overwrite ours on one process."""
    run.data.sampler.set_epoch(epoch)
    run.loader.set_epoch(epoch)
    return run.accelerator.skip_first_batches(run.loader, skip) if skip else run.loader


def agreed_stop(run: Run, stop: StopRequest) -> bool:
    """Whether to stop now: a signal may reach the processes at different steps, and all must stop together
    (one process stopping early leaves the others waiting in an all-reduce)."""
    if run.accelerator.num_processes == 1:
        return stop.requested
    flag = torch.tensor([float(stop.requested)], device=run.accelerator.device)
    return bool(run.accelerator.reduce(flag, reduction="sum").item())


def train(
    cfg: TrainConfig, models: SDModels, data: TrainingData, run_dir: Path, started: float | None = None
) -> TrainResult:
    """Fine-tune `models` on `data`; returns where the final model was saved. `started` (time.monotonic() at
    the program's start) lets the log say how long the way to the first step took."""
    started = started or time.monotonic()
    run = prepare_run(cfg, models, data, run_dir)
    accelerator = run.accelerator
    state = resume(run)
    first_step = state.global_step + 1
    progress = tqdm(total=run.total_steps, initial=state.global_step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    window = LogWindow()
    last_timed_save = time.monotonic()
    stopping = False
    with StopRequest() as stop:
        while state.epoch <= cfg.max_epochs and state.global_step < run.total_steps and not stopping:
            for batch in start_epoch(run, state.epoch, state.batches_in_epoch):
                loss, grad_norm = micro_step(run, batch, state)
                state.batches_in_epoch += 1
                window.add(loss, len(batch["input_ids"]))
                if not accelerator.sync_gradients:
                    continue
                state.global_step += 1
                if state.global_step == first_step:
                    run.log(f"First step done {time.monotonic() - started:.1f} s after start.")
                if run.emas and state.global_step % cfg.ema_update_interval == 0:
                    for ema, module in run.emas:
                        ema.step(module.parameters())
                progress.update(1)
                if run.is_log_step(state.global_step):  # the only place the loss is read: no sync per step
                    progress.set_postfix(loss=f"{log_scalars(run, window, grad_norm, state.global_step):.4f}",
                                         epoch=state.epoch)
                    window = LogWindow()
                if state.global_step % cfg.sample_steps == 0:
                    sample(run, state.global_step)
                if cfg.ckpt_every_n_minutes and time.monotonic() - last_timed_save > 60 * cfg.ckpt_every_n_minutes:
                    save(run, state)
                    last_timed_save = time.monotonic()
                stopping = agreed_stop(run, stop)
                if state.global_step >= run.total_steps or stopping:
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
    prefix = "interrupted-" if stopping else "last-"
    final = save(run, state, epoch=named_epoch, prefix=prefix, with_state=stopping)
    if stopping:
        run.log(f"Interrupted at step {state.global_step}; saved {final}. Continue with --resume_state {final}")
    accelerator.end_training()
    return TrainResult(final, state.global_step, interrupted=stopping)


@dataclass
class LogWindow:
    """Loss and throughput since the last log line. The loss is summed on its device and read once per log
    line: reading it every step (`.item()`) would make the CPU wait for the GPU each step."""

    loss_sum: torch.Tensor | float = 0.0
    batches: int = 0
    samples: int = 0
    start: float = field(default_factory=time.perf_counter)

    def add(self, loss: torch.Tensor, batch_size: int) -> None:
        self.loss_sum, self.batches, self.samples = self.loss_sum + loss, self.batches + 1, self.samples + batch_size


def log_scalars(run: Run, window: LogWindow, grad_norm, step: int) -> float:
    """Write the window's scalars to the trackers; returns its mean loss (this process's)."""
    elapsed = max(time.perf_counter() - window.start, 1e-9)
    optimizer_steps = -(-window.batches // run.cfg.grad_accum)
    mean_loss = float(window.loss_sum) / max(window.batches, 1)
    scalars = {
        "loss/train": mean_loss,
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
    return mean_loss
