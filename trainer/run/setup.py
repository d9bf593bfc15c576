"""Setting a run up: the accelerator, which parts train, the optimizer and its LR schedule, EMA, the divergence
guard, and where a resumed run starts. Everything the loop and its helpers share is in one `Run`.

Also the speed paths a config turns on (each is said in the log, and each trains what the plain path trains):
channels_last, regional torch.compile of the UNet's repeated blocks, cudnn's autotuner and TF32 on CUDA,
pinned batches copied without blocking, fused AdamW (optim/build.py), and the text-embedding cache
(text_cache.py) when the text encoder is frozen.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    GradScalerKwargs,
    broadcast_object_list,
    set_seed,
)
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from common.console import say
from common.files import owner_tag
from data.dataset import TrainingData
from data.schedule import plan_record
from trainer.adapters.embeddings import TrainedRows, is_rows_key, trained_rows
from trainer.adapters.lora import Adapters, LoraSettings, add_adapters, is_adapter_key, keep_states_to_trained
from trainer.adapters.lora_file import base_hash
from trainer.config.schema import TrainConfig, embedding_mode, frozen_base, trains_unet
from trainer.errors import UserError
from trainer.evaluation.prompts import SampleSettings
from trainer.evaluation.sampling import sd_pipeline
from trainer.evaluation.validation import ValidationPlan
from trainer.models.load import ModelInfo, SDModels
from trainer.models.pinned import PinnedPart
from trainer.objective.loss import Objective
from trainer.objective.noise import zero_terminal_snr_schedulers
from trainer.objective.text_cache import TextEmbeddingCache
from trainer.optim.build import (
    GRAD_SCALER_START,
    build_lr_scheduler,
    build_optimizer,
    freeze_text_encoder_parts,
    tweak_grad_scaler,
)
from trainer.optim.chained import ChainedOptimizer
from trainer.optim.plan import OptimizerPlan
from trainer.preflight.checks import Preflight, save_folder
from trainer.preflight.device import require_resolved
from trainer.preflight.resuming import current_setup, resume_elsewhere, steps_in_run
from trainer.run.guard import WeightGuard
from trainer.run.logs import watch_logs
from trainer.run.peers import roster
from trainer.run.stops import StopRequest
from trainer.saves.resume import (
    TrainerState,
    TrainingSetup,
    architecture_hash,
    configured_hyperparameters,
    continue_position,
    load_agreed,
    refusal,
    restore_configured_hyperparameters,
)


@dataclass
class Run:
    """What the loop and its helpers share: config, accelerator, the prepared model parts, optimizer, places. The
    model bundle the run started from is left as it was loaded; what the run changes lives here."""

    cfg: TrainConfig
    accelerator: Accelerator
    unet: torch.nn.Module  # prepared when trained (its repeated blocks compiled in place when asked)
    text_encoder: torch.nn.Module  # prepared when trained
    vae: torch.nn.Module
    tokenizer: object
    noise_scheduler: DDPMScheduler  # the forward process the loss is computed with
    sample_scheduler: SchedulerMixin  # the model's own inference scheduler, saved with it
    info: ModelInfo
    trained: list[torch.nn.Module]
    optimizer: torch.optim.Optimizer  # one, or one per model chained into one (optim/chained.ChainedOptimizer)
    lr_scheduler: object  # each parameter group's own schedule
    plan: OptimizerPlan
    loader: torch.utils.data.DataLoader
    data: TrainingData
    objective: Objective
    total_steps: int
    run_dir: Path
    save_dir: Path
    guard: WeightGuard
    setup: TrainingSetup  # recorded with every training state, checked on resume
    owner: str  # the main process's owner tag: every process writes a save's parts into one partial folder
    prompts: SampleSettings | None = None  # None: no sample_prompts
    validation: dict = field(default_factory=dict)  # set name -> fixed validation batches
    validation_plan: ValidationPlan = field(default_factory=ValidationPlan)  # when validation runs
    steps_per_epoch: int = 1
    emas: list = field(default_factory=list)  # (EMAModel, module) pairs
    stop: StopRequest = field(default_factory=StopRequest)
    last_save: Path | None = None  # the newest complete model save of this run (or the one it resumed from)
    last_state: Path | None = None  # the newest complete training state
    periodic_saves: list[Path] = field(default_factory=list)  # this run's, oldest first: what max_saves prunes
    pinned: dict[str, PinnedPart] = field(default_factory=dict)  # the files saves copy, as loaded (saving.py)
    text_cache: TextEmbeddingCache | None = None  # None: the text encoder runs every step
    adapters: Adapters | None = None  # LoRA mode: the adapters trained on the frozen base (trainer/adapters/lora.py)
    embeddings: TrainedRows | None = None  # embedding mode: the trained token rows (trainer/adapters/embeddings.py)
    base_hash: str = ""  # LoRA mode: the base's weight files' sha256, written into each adapter file
    processes: list[tuple[str, int]] = field(default_factory=list)  # (host, pid) by rank: who was lost, if one is
    logs_stopped: bool = False  # train.log and tensorboard could not be written (trainer/run/logs.py)
    tensorboard_lost: Path | None = None  # its folder, found gone during this step: said after it (logs.py)

    def unwrapped(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        unwrap = self.accelerator.unwrap_model
        return unwrap(self.unet, keep_torch_compile=False), unwrap(self.text_encoder, keep_torch_compile=False)

    def pipeline(self):
        """The diffusers pipeline of the current weights: what samples are drawn with and a save describes."""
        unet, text_encoder = self.unwrapped()
        return sd_pipeline(unet, text_encoder, self.vae, self.tokenizer, self.sample_scheduler)

    def is_log_step(self, step: int) -> bool:
        return step % self.cfg.log_step == 0 or step == self.total_steps


def refuse_sharding_without_accelerators() -> None:
    """An FSDP launch (docs/accelerate/fsdp.yaml) on a machine without GPUs: accelerate cannot build its FSDP
    plugin there. Said in one line with accelerate's reason, before any model loads."""
    from accelerate.utils import FullyShardedDataParallelPlugin, parse_flag_from_env

    if not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return
    try:
        FullyShardedDataParallelPlugin()
    except RuntimeError as err:
        raise UserError(f"FSDP needs GPUs (or other accelerators); accelerate says: {err} On CPUs, launch with "
                        "--multi_gpu (DDP; ACCELERATE_USE_CPU=1), which trains the same (docs/DISTRIBUTED.md).") from None


def make_accelerator(cfg: TrainConfig, precision: str, run_dir: Path,
                     grad_scaler_tweaks: bool = False) -> Accelerator:
    """`grad_scaler_tweaks`: start fp16's grad scaler as EveryDream2 does (optim/build.GRAD_SCALER_START); the
    other precisions have no scaler."""
    trackers = ["tensorboard"] + (["wandb"] if cfg.wandb else [])
    scaler = [GradScalerKwargs(**GRAD_SCALER_START)] if grad_scaler_tweaks and precision == "fp16" else []
    return Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with=trackers,
        project_dir=str(run_dir),
        # The sampler yields global batches (batch_size x processes, data/dataset.py) and split_batches gives
        # each process its slice, so N processes train exactly what one process with N x the batch would; it
        # also makes accelerate step the LR schedule once per optimizer step whatever the process count.
        # non_blocking: batches come pinned on a GPU machine (data/dataset.py), and their copy to the GPU is then
        # queued without the host waiting for the previous step to finish.
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True, data_seed=cfg.seed,
                                                  non_blocking=True),
        # clip_skip >= 2 leaves the text encoder's last layers out of the graph; DDP must be told to expect that
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.clip_skip > 1), *scaler],
    )


def freeze(module: torch.nn.Module) -> None:
    module.requires_grad_(False)
    module.eval()


def set_up_modules(cfg: TrainConfig, models: SDModels, device: torch.device,
                   freezing) -> tuple[list[str], Adapters | None]:
    """Frozen parts without gradients on the device (in the dtype they were loaded in: the compute precision),
    trained parts in train mode (accelerate's prepare moves them), LoRA adapters in LoRA mode, kernels,
    checkpointing and the speed paths as configured. Returns the speed paths taken, for the log, and the adapters."""
    freeze(models.vae)
    models.vae.to(device)
    if trains_unet(cfg):
        models.unet.train()
    else:  # textual inversion: gradients pass through the frozen UNet to the text encoder's rows
        freeze(models.unet)
        models.unet.to(device)
    if cfg.disable_textenc_training:
        freeze(models.text_encoder)
        models.text_encoder.to(device)
    else:
        models.text_encoder.train()
    adapters = set_up_adapters(cfg, models)
    rows = trained_rows(models.text_encoder)
    kept = (rows.trained_rows,) if rows is not None else ()  # they train whatever freezes the embeddings they sit in
    if rows is not None and not cfg.lora_text_encoder:
        models.text_encoder.requires_grad_(False)  # of the text encoder, only the embedding rows train
    elif not cfg.disable_textenc_training:  # in LoRA mode this freezes the adapters of the layers it names
        frozen = freeze_text_encoder_parts(models.text_encoder, freezing, kept)
        if frozen:
            say(frozen)
    for param in kept:
        param.requires_grad_(True)
    if cfg.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if not cfg.disable_textenc_training:
            models.text_encoder.activation_checkpointing_enable()
    if cfg.attn_type == "xformers":
        try:
            models.unet.enable_xformers_memory_efficient_attention()
        except (ImportError, ValueError, RuntimeError, NotImplementedError) as err:  # installed, but cannot run here
            raise UserError(f"attn_type xformers could not be enabled ({err}); use attn_type sdp.") from None
    return speed_paths(cfg, models.unet, device), adapters


def set_up_adapters(cfg: TrainConfig, models: SDModels) -> Adapters | None:
    """LoRA mode: adapters on the UNet (and the text encoder when it trains), from lora_init's file when given."""
    settings = LoraSettings.from_config(cfg)
    if settings is None:
        return None
    modules = adapted_modules(models.unet, models.text_encoder, cfg)
    adapters = add_adapters(modules, settings)
    say(adapters.describe(modules))
    if cfg.lora_init:
        from trainer.adapters.lora_file import load_adapter_file

        say(load_adapter_file(Path(cfg.lora_init), modules, adapters))
    return adapters


def adapted_modules(unet: torch.nn.Module, text_encoder: torch.nn.Module, cfg: TrainConfig) -> dict:
    """The models that carry LoRA adapters: the UNet, and the text encoder with lora_text_encoder."""
    return {"unet": unet, **({"text_encoder": text_encoder} if cfg.lora_text_encoder else {})}


def speed_paths(cfg: TrainConfig, unet: torch.nn.Module, device: torch.device) -> list[str]:
    """The UNet's memory format and compilation, and CUDA's kernel choices; returns what was turned on."""
    taken = []
    if device.type == "cuda":
        # TF32 matmuls: ~free speed on Ampere+, precision well within fp16's. cudnn's autotuner times each
        # convolution's algorithms once per input shape: bucketing keeps the shapes few, so it pays off at once.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = not cfg.deterministic  # its choice may differ from run to run
        taken.append("TF32 matmuls" if cfg.deterministic else
                     "TF32 matmuls, cudnn benchmark (a few bucket shapes, each tuned once)")
    if cfg.channels_last:
        unet.to(memory_format=torch.channels_last)  # its inputs follow (objective.compute_loss)
        taken.append("channels_last UNet")
    if cfg.torch_compile:
        taken.append(compile_regions(unet))
    return taken


def compile_regions(unet: torch.nn.Module) -> str:
    """torch.compile of the UNet's repeated blocks, each in place (regional compilation: PyTorch's recipe "Reducing
    torch.compile cold start compilation time with regional compilation"), through diffusers' own
    `compile_repeated_blocks`: its transformer blocks, whose few shapes (one per UNet level, bucket sizes as
    dynamic dimensions) compile into a handful of graphs. In place, parameter names, saving and unwrapping stay
    those of the plain UNet. Not the resnets, nor whole down/up blocks: with torch 2.13 the resnets' dozen channel
    layouts pass dynamo's recompile limit (8) and fall back to eager, and a whole down block with dynamic sizes
    fails in inductor ("cannot determine truth value of Relational")."""
    unet.compile_repeated_blocks()
    blocks = sum(getattr(module, "_compiled_call_impl", None) is not None for module in unet.modules())
    return f"torch.compile of the UNet's {blocks} repeated transformer blocks (the first steps compile)"


def schedulers(cfg: TrainConfig, models: SDModels) -> tuple[DDPMScheduler, SchedulerMixin]:
    """(the training forward process, the inference scheduler saved with the model): the model's own, or both
    rescaled to zero terminal SNR."""
    if not cfg.enable_zero_terminal_snr:
        return models.noise_scheduler, models.sample_scheduler
    if models.info.prediction_type != "v_prediction":
        raise UserError("enable_zero_terminal_snr needs a v-prediction model (like SD2.1-768); at zero SNR an "
                        "epsilon model's target equals its input. Use a v-prediction base model or turn it off.")
    return zero_terminal_snr_schedulers(models.noise_scheduler, models.sample_scheduler)


def make_emas(cfg: TrainConfig, run: Run, device: torch.device) -> list:
    """diffusers' EMAModel for each trained module (on a frozen base: of what trains), as (EMA, the parameters it
    averages) pairs; decay per update (with diffusers' built-in warmup)."""
    if cfg.ema_decay_rate is None:
        return []
    from diffusers.training_utils import EMAModel

    emas = []
    for module in trained_modules(cfg, *run.unwrapped()):
        # on a frozen base only its adapters and embedding rows, else the whole model
        params = ([p for key, p in module.named_parameters() if is_adapter_key(key) or is_rows_key(key)]
                  if frozen_base(cfg) else list(module.parameters()))
        ema = EMAModel(params, decay=cfg.ema_decay_rate)
        run.accelerator.register_for_checkpointing(ema)
        emas.append((ema, params))
    place_emas(emas, cfg, device)
    return emas


def place_emas(emas: list, cfg: TrainConfig, device: torch.device) -> None:
    """Each EMA's weights where ema_device says: made there, and put back there after a resume, whose state
    accelerate loads onto the CPU (EMAModel takes the loaded tensors as they come)."""
    for ema, _ in emas:
        ema.to(device if cfg.ema_device == "gpu" else torch.device("cpu"))


@contextlib.contextmanager
def ema_weights(run: Run):
    """Temporarily swap the EMA weights into the modules (to save or sample them)."""
    for ema, params in run.emas:
        ema.store(params)
        ema.copy_to(params)
    try:
        yield
    finally:
        for ema, params in run.emas:
            ema.restore(params)


def prepare_run(cfg: TrainConfig, models: SDModels, data: TrainingData, run_dir: Path, preflight: Preflight,
                precision: str) -> Run:
    """Accelerator, frozen/trained modules, optimizer, LR schedule, EMA and the guard, all prepared."""
    require_resolved(cfg)
    plan = preflight.optimizer
    accelerator = make_accelerator(cfg, precision, run_dir, plan.grad_scaler_tweaks)
    set_seed(cfg.seed)
    architecture = architecture_hash(models.unet, models.text_encoder)  # the base's, as check_model_fits saw it
    taken, adapters = set_up_modules(cfg, models, accelerator.device, plan.freezing)
    base = ""
    if frozen_base(cfg):
        keep_states_to_trained(accelerator, lambda key: is_adapter_key(key) or is_rows_key(key))
        (base,) = broadcast_object_list([base_hash(Path(models.info.path)) if accelerator.is_main_process else ""])
    unet = models.unet  # the UNet the run trains (modules are set up in place)
    noise_scheduler, sample_scheduler = schedulers(cfg, models)
    train_text_encoder = not cfg.disable_textenc_training
    optimizer = build_optimizer(plan, unet if trains_unet(cfg) else None,
                                models.text_encoder if train_text_encoder else None, accelerator.device,
                                fused_backward=cfg.fused_backward)
    taken += fused_kernels(optimizer)
    batch_samples = cfg.batch_size * accelerator.num_processes
    resumed = preflight.resume.saved if preflight.resume else None
    total_steps = steps_in_run(cfg, len(data.loader), batch_samples, resumed)  # where its last epoch ends
    lr_scheduler = build_lr_scheduler(plan, optimizer, total_steps)
    to_prepare = trained_modules(cfg, unet, models.text_encoder)
    *trained, optimizer, loader, lr_scheduler = accelerator.prepare(*to_prepare, optimizer, data.loader, lr_scheduler)
    prepared = dict(zip([id(m) for m in to_prepare], trained))
    (owner,) = broadcast_object_list([owner_tag()])  # the main process's, on every process
    run = Run(
        cfg, accelerator, unet=prepared.get(id(unet), unet),
        text_encoder=prepared.get(id(models.text_encoder), models.text_encoder),
        vae=models.vae, tokenizer=models.tokenizer, noise_scheduler=noise_scheduler,
        sample_scheduler=sample_scheduler, info=models.info, trained=trained, optimizer=optimizer,
        lr_scheduler=lr_scheduler, plan=plan, loader=loader, data=data, objective=Objective.from_config(cfg),
        total_steps=total_steps, run_dir=run_dir, save_dir=save_folder(cfg, run_dir),
        guard=WeightGuard([p for m in to_prepare for p in m.parameters() if p.requires_grad],
                          half_saves=not cfg.save_full_precision, device=accelerator.device),
        setup=current_setup(cfg, plan, total_steps, models.info.family, architecture, base,
                            plan_record(data.sampler.items, Path(cfg.data_root))),
        owner=owner, prompts=preflight.prompts, validation=data.validation,
        validation_plan=preflight.validation_plan, steps_per_epoch=math.ceil(len(loader) / cfg.grad_accum),
        text_cache=text_embedding_cache(cfg, models.text_encoder), adapters=adapters, base_hash=base,
        embeddings=trained_rows(models.text_encoder),
        processes=roster(accelerator),
        pinned=models.pinned,
    )
    run.emas = make_emas(cfg, run, accelerator.device)
    accelerator.init_trackers("tensorboard")
    watch_logs(run)
    say(f"Training {models.info.family.upper()} ({models.info.prediction_type}) on {len(loader.dataset)} images at "
        f"{cfg.resolution}px: batch {cfg.batch_size} x accum {cfg.grad_accum} x {accelerator.num_processes} "
        f"process(es), {math.ceil(len(loader) / cfg.grad_accum)} steps/epoch, {total_steps} steps, device "
        f"{accelerator.device}, precision {accelerator.mixed_precision}, optimizer {plan.describe()}{' (fused backward)' if cfg.fused_backward else ''}, "
        f"text encoder {text_encoder_role(cfg)}{', EMA' if run.emas else ''}.")
    say_speed_paths(run, taken)
    return run


def trained_modules(cfg: TrainConfig, unet: torch.nn.Module, text_encoder: torch.nn.Module) -> list[torch.nn.Module]:
    """The models with something to train, in the order they are prepared: the UNet unless only embeddings train,
    the text encoder unless it is frozen."""
    return ([unet] if trains_unet(cfg) else []) + ([] if cfg.disable_textenc_training else [text_encoder])


def text_encoder_role(cfg: TrainConfig) -> str:
    if cfg.disable_textenc_training:
        return "frozen"
    if embedding_mode(cfg) and not cfg.lora_text_encoder:
        return "frozen but for the embedding rows"
    return "trained"


def say_speed_paths(run: Run, taken: list[str]) -> None:
    """One log line naming the speed paths the run takes (`taken`: those set up with the modules and optimizer)."""
    if run.accelerator.device.type == "cuda" and run.data.loader.pin_memory:
        taken = [*taken, "pinned batches copied to the GPU without blocking"]
    if run.text_cache is not None:
        taken = [*taken, "text-embedding cache (frozen text encoder: each distinct caption encoded once)"]
    if taken:
        say(f"Speed paths: {'; '.join(taken)}.")


def text_embedding_cache(cfg: TrainConfig, text_encoder: torch.nn.Module) -> TextEmbeddingCache | None:
    """The cache when it can only save work: a frozen encoder, and captions that repeat (shuffled tags rarely do)."""
    if cfg.text_embedding_cache and cfg.disable_textenc_training and not cfg.shuffle_tags:
        return TextEmbeddingCache(text_encoder, cfg.clip_skip)
    return None


def fused_kernels(optimizer: torch.optim.Optimizer) -> list[str]:
    """'fused AdamW' (optim/build.py) when the run's optimizers step in torch's fused kernels."""
    parts = optimizer.optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]
    fused = dict.fromkeys(type(part).__name__ for part in parts if part.defaults.get("fused"))  # once per class
    return [f"fused {' + '.join(fused)} step"] if fused else []


def start_state(run: Run, preflight: Preflight) -> TrainerState:
    """Where training starts: at the beginning, or where the training state the preflight chose left off (its
    weights, optimizer, LR schedule and RNG loaded into the prepared objects, with this run's learning rates
    and schedule, which the preflight said it honours)."""
    batch_samples = run.cfg.batch_size * run.accelerator.num_processes
    if preflight.resume is None:
        return TrainerState(global_step=0, epoch=1, batches_in_epoch=0, batch_samples=batch_samples)
    resume, saved = preflight.resume, None
    configured = configured_hyperparameters(run.optimizer)
    while saved is None:  # None: the state went before it loaded (another run's max_saves pruning)
        check_same_base(resume.saved.setup, run.setup, resume.state_dir)
        saved = load_agreed(run.accelerator, resume.state_dir)
        if saved is None:
            resume = resume_elsewhere(run.cfg, resume, run.plan, run.data.sampler.items, batch_samples,
                                      (run.setup.family, run.setup.architecture), run.accelerator)
    state_dir = resume.state_dir
    place_emas(run.emas, run.cfg, run.accelerator.device)
    restore_configured_hyperparameters(run.optimizer, run.lr_scheduler, configured)
    if run.plan.grad_scaler_tweaks:  # a state saved without them has the scaler's plain settings
        tweak_grad_scaler(run.accelerator.scaler, saved.global_step, catch_up=True)
    state = continue_position(saved, batch_samples, len(run.data.loader))
    run.last_save, run.last_state = state_dir.parent, state_dir
    say(f"Resumed from {state_dir}: step {state.global_step}, epoch {state.epoch}, "
        f"{state.batches_in_epoch} batches into it.")
    return state


def check_same_base(saved: TrainingSetup | None, current: TrainingSetup, state_dir: Path) -> None:
    """LoRA adapters continue only on the base they were trained on: the same weights, not only the same layers."""
    if saved is None or not saved.base or saved.base == current.base:
        return
    raise refusal(state_dir, [f"its adapters were trained on a base model whose weights hash to {saved.base[:12]}..., "
                              f"and this run's base ({current.base[:12]}...) differs"],
                  " Resume with resume_ckpt set to the base model it was trained from.", saved)
