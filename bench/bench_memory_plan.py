"""The memory plan's activations and gradients against an exact allocation timeline, at the sizes users train.

One real forward and backward of a UNet built from SD1.5's (or SD2.1-v's) real config, random weights, batch 1, on
this CPU in fp32, under torch's memory profiler: every allocation and free in order, whose running sum's peak is
what the step itself needed beyond the weights (created before the profile starts). Beside it, the plan's replay
of the same step (trainer/preflight/memory.py `replay`, from the meta-device trace of
trainer/preflight/activations.py): the part of the plan that depends on the architecture, the resolution and the
attention kernel. Four rows per model: the CPU's fused attention kernel (it keeps what a GPU's flash kernel keeps)
and the plain kernel that `deterministic` runs on a GPU, each without and with gradient checkpointing. What a GPU
adds (autocast's half copies, the CUDA kernels' own workspaces) only the GPU check can measure
(bench/gpu/gpu_check.sh).

    python bench/bench_memory_plan.py [--model sd15|sd21v] [--resolution N] [--rows fused,plain,fused-ckpt,...]

SD1.5 at 512 px: about 12 GiB of RAM at most (the plain kernel without checkpointing) and 3-5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.gpu.gpu_rows import SPECS, real_configs  # noqa: E402
from convert.tokenizer import CLIP_MAX_LENGTH  # noqa: E402
from trainer.preflight.activations import trace  # noqa: E402
from trainer.preflight.memory import GIB, replay  # noqa: E402

ROWS = ("fused", "fused-ckpt", "plain", "plain-ckpt")
KERNELS = {"fused": ("FLASH_ATTENTION", "MATH"), "plain": ("MATH",)}  # SDPBackend names: the CPU's fused kernel, or
# only the plain one (what `deterministic` runs on a GPU)


def sdpa_kernels(attention: str):
    """A context in which SDPA runs the `attention` kernel (fused or plain) on this CPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, name) for name in KERNELS[attention]])


def timeline_peak(step: Callable[[], None]) -> int:
    """The peak bytes allocated while `step` runs, beyond what existed before it: the running sum of every
    allocation and free in torch's memory profiler's timeline, in order."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as profiled:
        step()
    live = peak = 0
    for _, action, _, nbytes in sorted(profiled._memory_profile().timeline, key=lambda event: event[0]):
        live += {Action.CREATE: nbytes, Action.DESTROY: -nbytes}.get(action, 0)
        peak = max(peak, live)
    return peak


def step_peak(unet: torch.nn.Module, resolution: int, attention: str) -> int:
    """The peak of one forward and backward of `unet` at batch 1 with the `attention` kernel (fused or plain),
    beyond its weights."""
    latent = resolution // 8
    noisy = torch.randn(1, unet.config.in_channels, latent, latent)
    states = torch.randn(1, CLIP_MAX_LENGTH, unet.config.cross_attention_dim)

    def step() -> None:
        with sdpa_kernels(attention):
            F.mse_loss(unet(noisy, torch.tensor([500]), states).sample, torch.randn_like(noisy)).backward()

    unet.zero_grad(set_to_none=True)
    peak = timeline_peak(step)
    unet.zero_grad(set_to_none=True)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(SPECS), default="sd15")
    parser.add_argument("--resolution", type=int, default=None, help="pixels (default: the model's own)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"a comma-separated choice of {', '.join(ROWS)}")
    args = parser.parse_args()
    from diffusers import UNet2DConditionModel

    spec = SPECS[args.model]
    resolution = args.resolution or spec.resolution
    unet_config, _, _ = real_configs(spec)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(unet_config).train().requires_grad_(True)
    print(f"{spec.label} UNet at {resolution} px, batch 1, fp32, on this CPU: plan = the replay of the meta-device trace "
          "(activations and gradients); measured = the peak of torch's memory profiler's allocation timeline")
    print(f"{'row':>11} {'measured GiB':>12} {'plan GiB':>9} {'plan/measured':>13} {'seconds':>8}")
    for row in args.rows.split(","):
        attention, checkpointing = row.split("-")[0], row.endswith("-ckpt")
        if checkpointing:
            unet.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing()
        started = time.perf_counter()
        peak = step_peak(unet, resolution, attention)
        _, planned = replay(trace(unet_config, None, resolution, "no", attention == "plain"), batch=1,
                            checkpointing=checkpointing, fused_backward=False)
        print(f"{row:>11} {peak / GIB:12.2f} {planned / GIB:9.2f} {planned / peak:13.3f} "
              f"{time.perf_counter() - started:8.0f}", flush=True)


if __name__ == "__main__":
    main()
