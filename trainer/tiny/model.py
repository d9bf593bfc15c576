"""Tiny random Stable Diffusion models with the real architectures' shapes, for the demo and tests.

Same component classes and layout as SD1.x / SD2.0 / SD2.1-v (CLIP text encoder with 64-wide heads and
the real 49408-token tokenizer, cross-attention UNet, 8x-downsampling VAE), only narrower and shallower,
so a full fine-tune runs in seconds on a CPU. Nothing is downloaded.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from convert.tokenizer import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, clip_tokenizer
from trainer.tiny.shapes import CONCEPTS, draw_shape
from trainer.tiny.vae import TINY_VAE_SIZE, load_trained_vae, tiny_vae

TinyFamily = Literal["sd1", "sd2", "sd2-v"]
TinyVae = Literal["random", "trained"]  # trained: trainer/tiny/vae.py's, which reconstructs the shapes
TINY_FAMILIES: tuple[TinyFamily, ...] = ("sd1", "sd2", "sd2-v")
TINY_RESOLUTION = TINY_VAE_SIZE  # pixels; latents are 8x8 as SD's are 64x64 at 512
TEXT_WIDTH = 64  # one attention head of 64, the head size of the real CLIP encoders
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def tiny_text_encoder(family: TinyFamily) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=TEXT_WIDTH // 64,
        max_position_embeddings=CLIP_MAX_LENGTH,
        # SD1 uses OpenAI CLIP ViT-L/14 (quick_gelu); SD2 uses OpenCLIP ViT-H (gelu)
        hidden_act="quick_gelu" if family == "sd1" else "gelu",
        projection_dim=TEXT_WIDTH,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1 if family == "sd1" else 0,
    )
    return CLIPTextModel(config)


def tiny_unet(family: TinyFamily) -> UNet2DConditionModel:
    is_sd2 = family != "sd1"
    return UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128),
        layers_per_block=1,
        norm_num_groups=32,
        cross_attention_dim=TEXT_WIDTH,
        # diffusers' "attention_head_dim" is really the number of heads: SD1 keeps one count for all
        # levels, SD2 lists one per level so every head is 64 wide
        attention_head_dim=[1, 2] if is_sd2 else 1,
        use_linear_projection=is_sd2,
        upcast_attention=family == "sd2-v",
    )


def tiny_scheduler(family: TinyFamily) -> PNDMScheduler | DDIMScheduler:
    if family == "sd1":  # what SD1.5 ships
        return PNDMScheduler(**SD_BETAS, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    prediction_type = "v_prediction" if family == "sd2-v" else "epsilon"
    return DDIMScheduler(
        **SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type
    )


@torch.no_grad()
def calibrated_scaling_factor(vae: AutoencoderKL, num_images: int = 16, seed: int = 0) -> float:
    """1 / std of the VAE's latents on shape images: what SD's 0.18215 is for the real VAE.

    A random tiny VAE's latents are far from unit variance; with SD's factor the image would barely reach
    the UNet under unit noise and nothing could be learned.
    """
    rng = random.Random(seed)
    concepts = list(CONCEPTS)
    images = [draw_shape(concepts[i % len(concepts)], TINY_RESOLUTION, rng) for i in range(num_images)]
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)
    pixels = pixels.float() / 127.5 - 1.0
    latents = vae.encode(pixels).latent_dist.mean
    return float(1.0 / latents.std())


def make_tiny_pipeline(family: TinyFamily = "sd1", seed: int = 0, vae: TinyVae = "random") -> StableDiffusionPipeline:
    """A random tiny SD pipeline of `family`, deterministic for a given seed; `vae="trained"` puts in the VAE that
    reconstructs the shapes (the demo's, so its samples are pictures) instead of a random one."""
    if family not in TINY_FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r}; expected one of {TINY_FAMILIES}")
    torch.manual_seed(seed)
    text_encoder, unet = tiny_text_encoder(family), tiny_unet(family)
    vae = load_trained_vae() if vae == "trained" else tiny_vae()
    vae.register_to_config(scaling_factor=calibrated_scaling_factor(vae, seed=seed))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(pad_token="<|endoftext|>" if family == "sd1" else "!"),
        unet=unet,
        scheduler=tiny_scheduler(family),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


STORED_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_tiny_model(out_dir: Path, family: TinyFamily = "sd1", seed: int = 0, dtype: str = "fp32",
                    vae: TinyVae = "random") -> Path:
    """Write a tiny random model of `family` (with `vae`) as a diffusers folder, every weight stored in `dtype`
    (fp32, or fp16/bf16 as most downloaded checkpoints are); returns the folder."""
    out_dir = Path(out_dir)
    pipeline = make_tiny_pipeline(family, seed, vae)
    for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        module.to(STORED_DTYPES[dtype])
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
