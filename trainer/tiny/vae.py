"""The tiny models' trained VAE: an SD-shaped AutoencoderKL (8x downsampling, 4 latent channels) that reconstructs
flat coloured shapes, so that a tiny model's samples are pictures a person can read. A random VAE decodes anything
to a grey blur, and mixes the whole image into every latent.

It is the project's own: `python utils/make_tiny_vae.py` trains it from a seed on generated scenes (a few minutes
on 2 CPU cores) and writes `trainer/tiny/assets/tiny_vae.safetensors`, which the repository ships (fp16, 1.5 MB)
so the demo and tests do not train it again.

Two choices make it learn colour in minutes. GroupNorm over 4 groups rather than SD's 32: with this few channels,
32 groups would normalise each channel on its own, and an image's colour with it. And the loss weighs the
chroma (each pixel less its grey) beside the plain error: the plain error alone is met first by the grey image,
and from there colour came slowly.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image, ImageDraw

TRAINED_VAE_FILE = Path(__file__).resolve().parent / "assets" / "tiny_vae.safetensors"
TINY_VAE_SIZE = SCENE_SIZE = 64  # the tiny models' resolution (trainer/tiny/model.py); latents 8x8
# the shapes set's red and blue (trainer/tiny/shapes.py), and other saturated colours, so that a concept's colour
# is something the VAE can say apart from its neighbours'
PALETTE = ((220, 30, 30), (30, 60, 220), (40, 170, 60), (230, 200, 30), (150, 40, 180), (240, 130, 20),
           (30, 30, 30), (40, 190, 200))
CHROMA_WEIGHT = 5.0
NOISE_SCENES = 0.15  # share of scenes on a noise background: masked training's test images have them


def tiny_vae(block_out_channels: tuple[int, ...] = (32, 32, 64, 64), norm_num_groups: int = 32) -> AutoencoderKL:
    """A random SD-shaped VAE (8x downsampling, 4 latent channels) of these widths: the tiny models' default; the
    trained one is narrower, with fewer norm groups (tiny_vae_architecture)."""
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=norm_num_groups,
        sample_size=TINY_VAE_SIZE,
    )
    deterministic_posterior(vae)
    return vae


def deterministic_posterior(vae: AutoencoderKL) -> None:
    """A trained SD VAE is nearly deterministic (posterior std ~1e-3 of the latents' spread). A random one has
    log-variance ~0, so a sampled latent would be mostly the VAE's own noise and there would be nothing to
    learn. Fix the log-variance half of quant_conv's output at -18 (std ~1e-4), like a trained encoder."""
    with torch.no_grad():
        vae.quant_conv.weight[vae.config.latent_channels :] = 0.0
        vae.quant_conv.bias[vae.config.latent_channels :] = -18.0


def tiny_vae_architecture() -> AutoencoderKL:
    """The trained VAE's shape, with random weights (load_trained_vae fills them)."""
    return tiny_vae(block_out_channels=(16, 32, 32, 64), norm_num_groups=4)


def load_trained_vae(path: Path = TRAINED_VAE_FILE) -> AutoencoderKL:
    """The trained VAE (by default the shipped one), in fp32."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"the tiny trained VAE {path} is missing; `python utils/make_tiny_vae.py` makes it "
                                "again (a few minutes)")
    vae = tiny_vae_architecture()
    vae.load_state_dict({name: tensor.float() for name, tensor in load_file(path).items()})
    return vae.eval()


def scene(rng: random.Random, size: int = SCENE_SIZE, noise: bool | None = None) -> Image.Image:
    """One training scene: one to three circles and squares in palette colours, on a light plain background, or
    on colour noise (`noise`; None: NOISE_SCENES of the scenes)."""
    if noise is None:
        noise = rng.random() < NOISE_SCENES
    if noise:
        image = Image.fromarray(np.random.default_rng(rng.getrandbits(32)).integers(0, 256, (size, size, 3),
                                                                                  dtype=np.uint8))
    else:
        image = Image.new("RGB", (size, size), tuple(rng.randint(190, 255) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.choice((1, 1, 2, 3))):
        side = rng.randint(size // 6, size // 2)
        x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x0 + side, y0 + side), fill=rng.choice(PALETTE))
    return image


def scene_batch(rng: random.Random, count: int, noise: bool | None = None) -> torch.Tensor:
    pixels = np.stack([np.asarray(scene(rng, noise=noise)) for _ in range(count)])
    # the layout the shipped VAE was trained on: data.pixels.to_tensor's contiguous copy moved the last bits of
    # the tiny models' latents (measured on calibrated_scaling_factor), so it would not retrain the same file
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def reconstruction_loss(decoded: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    def chroma(image: torch.Tensor) -> torch.Tensor:
        return image - image.mean(dim=1, keepdim=True)

    return (torch.nn.functional.mse_loss(decoded, pixels)
            + CHROMA_WEIGHT * torch.nn.functional.mse_loss(chroma(decoded), chroma(pixels)))


def train_tiny_vae(steps: int = 1200, batch_size: int = 16, lr: float = 2e-3, seed: int = 0,
                   on_progress: Callable[[int, float], None] | None = None) -> AutoencoderKL:
    """Train the tiny VAE from `seed` on fresh scenes (one-cycle schedule); `on_progress(step, loss)` every 100
    steps."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae = tiny_vae_architecture()
    optimizer = torch.optim.AdamW(vae.parameters(), lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.05)
    for step in range(steps):
        pixels = scene_batch(rng, batch_size)
        latents = vae.encode(pixels).latent_dist.mean
        # a light pull towards 0 keeps the latents' scale in check, as SD's KL term does
        loss = reconstruction_loss(vae.decode(latents).sample, pixels) + 1e-4 * latents.square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        if on_progress is not None and (step % 100 == 0 or step == steps - 1):
            on_progress(step, loss.item())
    deterministic_posterior(vae)  # training used only the mean; set again rather than trusted to be untouched
    return vae.eval()


@torch.no_grad()
def reconstruction_error(vae: AutoencoderKL, count: int = 64, seed: int = 99) -> float:
    """Mean squared error (pixels in -1..1) of plain-background scenes through the VAE: what `make_tiny_vae`
    reports and a test bounds."""
    pixels = scene_batch(random.Random(seed), count, noise=False)
    return float(torch.nn.functional.mse_loss(vae.decode(vae.encode(pixels).latent_dist.mean).sample, pixels))
