"""`deterministic: true`: what makes a run on a GPU repeat bit for bit, given the same seed, data and machine.

A CPU run repeats bit for bit as it is. On CUDA three things part two runs of the same settings: kernels that add up
with atomics in whatever order threads finish (the backward of some convolutions, of embeddings, of the fused
attention kernels), cudnn's autotuner (it times a convolution's algorithms in each process and may pick another
one, with another rounding), and cuBLAS's per-stream workspaces. torch.use_deterministic_algorithms chooses an
ordered kernel for each op that has one (warn_only: an op with none is named in a warning and the run goes on,
rather than failing steps in), the autotuner stays off, and cuBLAS gets the fixed workspace its documentation asks
for. Attention runs PyTorch's plain ("math") kernel: the fused ones (flash, memory-efficient, cudnn) add up their
backward with atomics, and in warn-only mode torch leaves them so; the plain kernel holds each attention matrix, a
few hundred MiB more at 512 px. Steps are slower: the default stays off, as in every peer trainer.

Called before the first model is loaded: cuBLAS reads its workspace setting when torch first uses it, and the latent
cache's VAE encodes are then ordered too.
"""

from __future__ import annotations

import os

import torch

CUBLAS_WORKSPACE = ":4096:8"  # cuBLAS's documented setting for reproducible results (two 4 MiB workspaces)


def use_deterministic_kernels(cuda: bool) -> str:
    """Deterministic kernels from here on, in this process; returns the line that says so. On a CPU (`cuda`
    False) the attention kernels stay: they are ordered there, and a CPU run stays the one it was."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)  # a value the user set wins
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    if cuda:
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)
    return ("Deterministic: ordered kernels (torch.use_deterministic_algorithms; an op without one is named in a "
            f"warning){', the plain attention kernel' if cuda else ''}, cudnn's autotuner off, "
            f"CUBLAS_WORKSPACE_CONFIG={os.environ['CUBLAS_WORKSPACE_CONFIG']}: the same seed repeats this run bit for "
            "bit on this machine, with slower steps.")
