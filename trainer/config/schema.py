"""The training configuration's one typed object: every setting with its type, default (= the shipped train.json)
and help text, which `--help` and docs/CONFIG.md are rendered from.

This module deliberately imports nothing heavy (no torch, no diffusers): `--help` and config errors answer fast.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from common.progress import DEFAULT_EVERY_S

DEFAULT_CONFIG_FILE = "train.json"

MixedPrecision = Literal["auto", "no", "fp16", "bf16"]
LossType = Literal["mse", "huber", "smooth_l1", "mse_huber", "huber_mse"]
AttnType = Literal["sdp", "xformers"]
EmaDevice = Literal["gpu", "cpu"]
OptimizerName = Literal[
    "adamw", "adamw8bit", "lion", "lion8bit", "prodigy", "adafactor",
    "dadapt_adam", "dadapt_lion", "dadapt_sgd", "dadapt_adan",
]
LoraTargets = Literal["attn", "attn_ff", "all"]
LoraKind = Literal["lora", "loha", "lokr", "dora"]
PredictionTypeOverride = Literal["epsilon", "v_prediction"]
MAX_EMBEDDING_VECTORS = 75  # CLIP's window holds 77 tokens, two of them its start and end markers
LRScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]


def _key(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every setting of a run. Defaults must equal train.json (tests/test_config.py checks)."""

    resume_ckpt: str = _key(
        "panopstor/EveryDream",
        "Base model: a diffusers folder, a name in ckpt_cache/ ('my_model' means ckpt_cache/my_model), a "
        ".ckpt/.safetensors file (converted once into ckpt_cache/), a Hugging Face repo id owner/name[@revision] "
        "(hf://owner/name when a local folder has the owner's name), or findlast: the newest model saved under logdir.",
    )
    ckpt_cache_dir: str | None = _key(
        None, "Folder that holds single-file models converted to diffusers (and that cache names are looked up in); "
        "null: $CKPT_CACHE_DIR if set, else ckpt_cache/ in the current folder."
    )
    hf_repo_subfolder: str | None = _key(
        None, "Sub-folder of the Hugging Face repo in resume_ckpt that holds the diffusers model; null: its root."
    )
    prediction_type: PredictionTypeOverride | None = _key(
        None, "What the base model predicts, epsilon or v_prediction; null: detect it from the model."
    )
    data_root: str = _key("input", "Folder of training images (searched recursively) with .txt captions.")
    resolution: int = _key(512, "Training resolution in pixels; a multiple of 64 (SD1/SD2.0: 512, SD2.1-v: 768).")
    batch_size: int = _key(4, "Images per optimizer micro-step on each device.")
    grad_accum: int = _key(1, "Micro-steps accumulated into one optimizer step (effective batch = batch_size x this).")
    max_epochs: int = _key(30, "Passes over the data set.")
    max_steps: int = _key(0, "Stop after this many optimizer steps; 0 means no limit (max_epochs decides).")
    lr: float | None = _key(
        None, "Peak learning rate of the UNet (and of the text encoder unless optimizer_config sets its own); it wins "
        "over optimizer_config's base lr, as in EveryDream2. null: that base lr, else 1.5e-6."
    )
    optimizer: OptimizerName = _key(
        "adamw", "adamw, adamw8bit or lion8bit (bitsandbytes), lion, adafactor, or one that sets its own step size "
        "(lr about 1.0): prodigy, dadapt_adam, dadapt_lion, dadapt_sgd, dadapt_adan."
    )
    optimizer_config: str | None = _key(
        None, "EveryDream2's optimizer.json: each model's optimizer, lr, schedule, betas, weight decay; text-encoder "
        "layer freezing (docs/EVERYDREAM2.md)."
    )
    lr_scheduler: LRScheduler = _key("constant", "Learning-rate schedule over the run's optimizer steps.")
    lr_warmup_steps: int | None = _key(
        None, "Optimizer steps of linear warmup; null: none for constant, 2% of the run otherwise."
    )
    lr_decay_steps: int = _key(
        0, "Optimizer steps over which cosine/linear/polynomial schedules decay (then they stay); 0: the whole run."
    )
    clip_grad_norm: float | None = _key(None, "Clip the gradient norm of the trained models to this; null: no clip.")
    seed: int = _key(555, "Seed for weights noise, timesteps, shuffling and crops; -1 picks a random one (logged).")
    flip_p: float = _key(0.0, "Probability of flipping an image horizontally (0 to 1).")
    shuffle_tags: bool = _key(False, "Shuffle a caption's comma-separated tags each step, keeping the first chunk.")
    keep_tags: int = _key(0, "With shuffle_tags: also keep this many tags after the first chunk in place.")
    cond_dropout: float = _key(0.04, "Probability of training a step's image on the empty caption (for CFG).")
    num_workers: int | None = _key(
        None, "DataLoader worker processes preparing batches ahead; 0: load in the main process. null: chosen for the "
        "device: 0 on a CPU (the training step uses every core), else up to 8 per process, one core left free."
    )
    cache_latents: bool = _key(True, "Encode each image once with the frozen VAE and reuse the latents from disk.")
    latent_cache_dir: str | None = _key(None, "Folder of cached latents; null: <data_root>/.latent_cache.")
    dry_run: bool = _key(False, "Scan data_root, print buckets, skipped files and steps per epoch, and exit.")
    validation_split: float = _key(0.0, "Share of data_root held out to measure a validation loss (e.g. 0.1); 0: none.")
    validation_data_root: str | None = _key(None, "A separate folder of validation images (wins over validation_split).")
    validation_every_n_epochs: float = _key(
        1, "Compute the validation loss every this many epochs (0.5: twice an epoch), and at the end."
    )
    validation_config: str | None = _key(
        None, "EveryDream2's validation json (split, folders, extra sets, stabilized train loss); wins over the above."
    )
    disable_textenc_training: bool = _key(False, "Freeze the text encoder and train only the UNet.")
    gradient_checkpointing: bool | None = _key(
        None, "Recompute activations in backward: much less memory, ~20% slower. null: on for a GPU, off on a CPU "
        "(there memory is rarely the limit and the recomputation costs ~18% a step)."
    )
    attn_type: AttnType = _key("sdp", "Attention kernel: sdp (PyTorch SDPA) or xformers (needs the xformers package).")
    torch_compile: bool = _key(
        False, "torch.compile each of the UNet's blocks (regional compilation): faster steps after slower first ones."
    )
    channels_last: bool | None = _key(
        None, "Hold the UNet and its inputs in channels-last memory format (faster convolutions on tensor cores). "
        "null: on for a CUDA GPU, off on a CPU."
    )
    mixed_precision: MixedPrecision = _key(
        "auto", "Autocast precision: no, fp16 or bf16 (fp16 needs CUDA: elsewhere it falls back to no). auto: bf16 on "
        "GPUs that have it, else fp16; no (fp32) on a CPU."
    )
    text_embedding_cache: bool = _key(
        True, "With a frozen text encoder, encode each distinct caption once and reuse its embedding (kept on the "
        "device); off with shuffle_tags, whose captions rarely repeat."
    )
    fused_backward: bool = _key(
        False, "Step each parameter's optimizer as soon as its gradient is ready and free the gradient (OneTrainer's "
        "fused back pass): no memory for gradients. Not with grad_accum > 1, clip_grad_norm, fp16, several "
        "processes, or optimizers that look at all parameters at once (prodigy, dadapt_*)."
    )
    deterministic: bool = _key(
        False, "Repeat a GPU run bit for bit (same seed, data and machine): deterministic kernels "
        "(torch.use_deterministic_algorithms), cudnn's autotuner off, a fixed cuBLAS workspace, plain attention; "
        "slower steps, and more memory for attention (the memory plan counts it). A CPU run repeats bit for bit "
        "either way."
    )
    vram_gb: float | None = _key(
        None, "Memory per device to plan for, in GiB: the dry run's memory plan says which settings to change when "
        "the run would not fit. null: the GPU's own memory (no check on a CPU)."
    )
    # LoRA (trainer/adapters/lora.py, docs/LORA.md): small adapters on a frozen base, saved as one kohya-format file
    lora_rank: int = _key(
        0, "LoRA mode: train rank-r adapters on the frozen base model instead of the model itself, and save them as "
        "one .safetensors file for AUTOMATIC1111, ComfyUI and diffusers (e.g. 16). 0: full fine-tune."
    )
    lora_kind: LoraKind = _key(
        "lora", "LoRA mode: the adapter kind, all built on peft: lora; loha and lokr (LyCORIS's Hadamard and "
        "Kronecker products, saved in LyCORIS's names); dora (LoRA with a trained magnitude per output, kohya's "
        "dora_scale)."
    )
    lokr_factor: int = _key(
        -1, "lora_kind lokr: the Kronecker factor each layer's sides are split by (e.g. 8 or 16); -1: as square as "
        "the layer allows (LyCORIS's default)."
    )
    lora_alpha: float | None = _key(
        None, "LoRA scale numerator: each update is up @ down x alpha / rank. null: the rank (scale 1)."
    )
    lora_dropout: float = _key(0.0, "Dropout on each adapter's input while training (0 to <1).")
    lora_targets: LoraTargets = _key(
        "attn_ff", "Layers that get adapters: attn (attention projections), attn_ff (also feed-forward and "
        "proj_in/out: kohya's default), all (also every resnet, down- and upsampler convolution: LoCon).")
    lora_text_encoder: bool = _key(
        False, "LoRA mode: also train adapters on the text encoder's attention and MLP layers; false: it is frozen."
    )
    lora_unet_lr: float | None = _key(None, "LoRA mode: the UNet adapters' learning rate (e.g. 1e-4); null: lr.")
    lora_text_encoder_lr: float | None = _key(None, "LoRA mode: the text-encoder adapters' learning rate (e.g. "
                                                    "5e-5); null: the text encoder's lr.")
    lora_init: str | None = _key(
        None, "LoRA mode: start the adapters from this kohya-format .safetensors file (its rank and alpha must "
        "match lora_rank and lora_alpha); null: fresh adapters (up weights zero: the base's outputs)."
    )
    # embeddings (trainer/adapters/embeddings.py, docs/EMBEDDINGS.md): new token vectors, saved as files of a few KB
    embedding_token: str | None = _key(
        None, "Embedding mode (textual inversion): train new vectors for this token, written in the captions as it is "
        "here (e.g. 'sks-dog'), on the frozen model (with lora_rank: beside a LoRA, pivotal tuning); saved as "
        "<token>.safetensors for AUTOMATIC1111, ComfyUI and diffusers. null: no embedding."
    )
    embedding_init: str = _key(
        "*", "Embedding mode: the words whose token vectors the new ones start from (e.g. 'dog'), cycled over the "
        "vectors; '*' is AUTOMATIC1111's default."
    )
    embedding_vectors: int = _key(1, "Embedding mode: vectors per token (1-16 usual; each takes a place of the "
                                     "prompt's 75).")
    embedding_lr: float = _key(0.005, "Embedding mode: the new vectors' learning rate (AUTOMATIC1111's default).")
    embedding_steps: int = _key(
        0, "Pivotal tuning (with lora_rank): train the embedding for only this many optimizer steps, then the LoRA "
        "alone; 0: the whole run."
    )
    embedding_config: str | None = _key(
        None, "Several embeddings at once: EveryDream2's textual_inversion.json (a tokens list of token, initializer, "
        "vector_length), instead of embedding_token (embedding_init and embedding_vectors are not read with it)."
    )
    # masked training (data/masking/masks.py, docs/DATA.md): a per-image mask weights the loss, in latent space
    masked_training: bool = _key(
        False, "Weight each image's loss by its mask: a grayscale <name>-masklabel.png beside the image (OneTrainer's "
        "name; white: learn, black: ignore), or its alpha channel with mask_from_alpha. Images without one train "
        "everywhere."
    )
    mask_from_alpha: bool = _key(
        False, "With masked_training: an image without a -masklabel.png file is masked by its own alpha channel "
        "(kohya's alpha_mask)."
    )
    unmasked_weight: float = _key(
        0.1, "With masked_training: the loss weight outside the mask, 0 to 1 (0: the background teaches nothing; 1: "
        "as without masks)."
    )
    normalize_masked_area_loss: bool = _key(
        False, "With masked_training: divide each image's loss by its mask's weighted area, so that a small subject "
        "weighs as much as a large one."
    )
    # the objective (trainer/objective/loss.py documents each formula and its paper)
    min_snr_gamma: float | None = _key(None, "Min-SNR-gamma loss weighting, e.g. 5.0; null: off.")
    zero_frequency_noise_ratio: float = _key(0.02, "Offset noise: share of per-channel constant noise (0: off).")
    pyramid_noise_discount: float | None = _key(None, "Multi-resolution (pyramid) noise discount, e.g. 0.8; null: off.")
    enable_zero_terminal_snr: bool = _key(False, "Rescale betas to zero terminal SNR (v-prediction models only).")
    timestep_start: int = _key(0, "Train on timesteps from this one (inclusive).")
    timestep_end: int = _key(1000, "Train on timesteps below this one (exclusive).")
    loss_type: LossType = _key(
        "mse", "Loss on the prediction error: mse, pseudo-Huber huber / smooth_l1, or EveryDream2's blends of mse "
        "and Huber by timestep: mse_huber (mse on noisy steps), huber_mse (the reverse)."
    )
    huber_c: float = _key(0.1, "The c of the pseudo-Huber losses: errors beyond about c count linearly.")
    clip_skip: int = _key(0, "Condition on the k-th text-encoder layer from the end (2 = penultimate); 0: last.")
    embedding_perturbation: float = _key(0.0, "Std of Gaussian noise added to text embeddings while training.")
    logdir: str = _key("logs", "Folder that holds one sub-folder per run (config, logs, saves).")
    project_name: str = _key("myproj", "Name used for run folders and saved models.")
    run_name: str | None = _key(None, "Run folder name under logdir; null: <project_name>_<date>-<time>.")
    log_step: int = _key(25, "Write loss and learning rate to tensorboard every this many optimizer steps.")
    progress_every_n_seconds: float = _key(
        DEFAULT_EVERY_S, "During a long wait (the scan, the latent-cache fill, a conversion, loading the model, "
        "sampling, validation), write a line of its progress (done/total, rate, time left) into train.log, and to "
        "stdout when that is no terminal, every this many seconds; a terminal shows a bar as well."
    )
    save_every_n_epochs: int = _key(0, "Also save a model every this many epochs; 0: only at the end.")
    save_ckpt_dir: str | None = _key(None, "Folder for saved models; null: <run folder>/ckpts.")
    ckpt_every_n_minutes: float | None = _key(None, "Also save a model every this many minutes; null: off.")
    max_saves: int | None = _key(None, "Keep only the newest this many of the run's periodic saves (other runs' "
                                       "saves in a shared folder are never pruned); null: keep all.")
    save_full_precision: bool = _key(False, "Save weights in fp32 instead of fp16.")
    save_single_file: bool = _key(True, "Beside each diffusers folder, write an A1111/ComfyUI .safetensors file.")
    save_optimizer: bool = _key(False, "Save the full training state with each save, so resume_state can go on exactly.")
    resume_state: str | None = _key(
        None, "Continue a run exactly from a saved training state folder, or 'findlast' under logdir."
    )
    ema_decay_rate: float | None = _key(None, "Keep an EMA of the weights with this decay per update, e.g. 0.999.")
    ema_update_interval: int = _key(1, "Update the EMA every this many optimizer steps.")
    ema_device: EmaDevice = _key("gpu", "Where the EMA weights live: gpu (the training device) or cpu (saves VRAM).")
    sample_prompts: str | None = _key(
        None, "Prompts to sample during training: .txt (one per line; empty: random training captions) or .json "
        "(EveryDream2's: cfgs, scheduler, batch_size, samples with seed (-1 random), size, random_caption)."
    )
    sample_steps: int = _key(
        300, "Sample the prompts every this many optimizer steps (and at the end); the .json's "
        "generate_samples_every_n_steps wins."
    )
    wandb: bool = _key(False, "Also log to Weights & Biases (needs the wandb package and a login).")
    gpuid: int | None = _key(
        None, "The GPU to train on in a single-process run (sets CUDA_VISIBLE_DEVICES); null: the first, or what "
        "CUDA_VISIBLE_DEVICES or accelerate launch choose."
    )


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
FIELD_TYPES: dict[str, Any] = typing.get_type_hints(TrainConfig)


def lora_alpha(cfg: TrainConfig) -> float:
    """LoRA's alpha as trained: lora_alpha, or the rank when null (a scale of 1)."""
    return float(cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank)


def embedding_mode(cfg: TrainConfig) -> bool:
    """Whether the run trains embeddings (alone: textual inversion; with lora_rank: pivotal tuning)."""
    return cfg.embedding_token is not None or cfg.embedding_config is not None


def frozen_base(cfg: TrainConfig) -> bool:
    """Whether the base model stays frozen (LoRA, embeddings): held in the compute precision, saved as small files."""
    return bool(cfg.lora_rank) or embedding_mode(cfg)


def trains_unet(cfg: TrainConfig) -> bool:
    """Whether anything of the UNet trains: all but textual inversion alone (an embedding without a LoRA)."""
    return not embedding_mode(cfg) or bool(cfg.lora_rank)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: Path) -> None:
    """Write the resolved config as json that `--config` loads back to the same config."""
    path.write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n", encoding="utf-8")
