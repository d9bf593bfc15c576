"""GPU training throughput and memory: an SD1.5-size UNet (random weights, the real architecture) and CLIP
ViT-L text encoder at 512 px, for each batch size x precision x optimizer x gradient checkpointing, side by side.

    python bench/bench_gpu.py [--batch_sizes 1,4,8] [--steps 12]

Prints samples/s, peak VRAM, and each row's speed relative to the first. A step is a real trainer step:
text encoder + UNet forward under autocast, epsilon MSE in fp32, backward, optimizer step (fp32 master weights,
as the trainer keeps them). On a machine without CUDA it says so and exits with code 2.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def sd15_models():
    """SD1.5's UNet and text encoder configs, random weights (no download)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu"))
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    return unet, text_encoder, scheduler


def make_optimizer(name: str, params):
    if name == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=1e-6)
    return torch.optim.AdamW(params, lr=1e-6, fused=True)


def run_case(batch: int, precision: str, optimizer_name: str, checkpointing: bool, steps: int) -> tuple[float, float]:
    """(samples/s, peak GiB) of one configuration."""
    import torch.nn.functional as F

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    unet, text_encoder, scheduler = sd15_models()
    unet, text_encoder = unet.cuda().train(), text_encoder.cuda().train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
        text_encoder.gradient_checkpointing_enable()
    optimizer = make_optimizer(optimizer_name, [*unet.parameters(), *text_encoder.parameters()])
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    scaler = torch.amp.GradScaler(enabled=precision == "fp16")
    latents = torch.randn(batch, 4, 64, 64, device="cuda")
    input_ids = torch.randint(0, 49408, (batch, 77), device="cuda")
    alphas = scheduler.alphas_cumprod.cuda()
    times = []
    for step in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,), device="cuda")
        a = alphas[t].view(-1, 1, 1, 1)
        with torch.autocast("cuda", dtype=dtype):
            states = text_encoder(input_ids)[0]
            prediction = unet(a.sqrt() * latents + (1 - a).sqrt() * noise, t, states).sample
        scaler.scale(F.mse_loss(prediction.float(), noise)).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    measured = sorted(times[3:])[len(times[3:]) // 2]  # median after 3 warm-up steps
    peak = torch.cuda.max_memory_allocated() / 2**30
    del unet, text_encoder, optimizer
    return batch / measured, peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_sizes", default="1,4,8")
    parser.add_argument("--precisions", default="fp16,bf16")
    parser.add_argument("--optimizers", default="adamw,adamw8bit")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU and this machine has none (torch.cuda.is_available() is False); "
              "run it on a GPU machine. CPU benches: bench/bench_overhead.py, bench/bench_latent_cache.py.",
              file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; SD1.5-size UNet + CLIP-L, 512 px")
    print(f"{'batch':>5} {'prec':>5} {'optimizer':>10} {'ckpt':>5} {'samples/s':>10} {'peak GiB':>9} {'vs first':>9}")
    first = None
    for batch, precision, optimizer_name, checkpointing in itertools.product(
        [int(b) for b in args.batch_sizes.split(",")], args.precisions.split(","), args.optimizers.split(","),
        (True, False),
    ):
        try:
            speed, peak = run_case(batch, precision, optimizer_name, checkpointing, args.steps)
        except torch.cuda.OutOfMemoryError:
            print(f"{batch:>5} {precision:>5} {optimizer_name:>10} {str(checkpointing):>5} {'out of memory':>21}")
            continue
        except ImportError as err:
            print(f"{batch:>5} {precision:>5} {optimizer_name:>10} {str(checkpointing):>5} skipped: {err}")
            continue
        first = first or speed
        print(f"{batch:>5} {precision:>5} {optimizer_name:>10} {str(checkpointing):>5} {speed:>10.2f} {peak:>9.2f} "
              f"{speed / first:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
