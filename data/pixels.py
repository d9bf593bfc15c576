"""PIL pictures as the tensors the VAE takes, and an image file as the VAE's input for its bucket."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.buckets import Bucket
from data.images import load_for_bucket


def to_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 RGB -> CHW float32 in [-1, 1], the VAE's input range."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def bucket_pixels(path: Path, bucket: Bucket, flip: bool) -> torch.Tensor:
    """The image at `path` cropped to `bucket`, flipped or not, as (3, H, W) VAE input: what training, the latent
    cache and the validation set all encode, so a cached latent is exactly the one training would compute."""
    return to_tensor(load_for_bucket(path, bucket, flip))
