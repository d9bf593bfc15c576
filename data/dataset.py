"""Images and captions from a folder tree, resized and center-cropped to the training resolution.

Captions come from a sidecar file with the image's stem (`.txt`, then `.caption`), else from the file name:
the text before the first `_` (`a red car_03.jpg` -> `a red car`), as EveryDream2 does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import CLIPTokenizer

from trainer.config import TrainConfig
from trainer.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_EXTENSIONS = (".txt", ".caption")


@dataclass(frozen=True)
class Example:
    image_path: Path
    caption: str


def read_caption(image_path: Path) -> str:
    for extension in CAPTION_EXTENSIONS:
        sidecar = image_path.with_suffix(extension)
        if sidecar.is_file():
            # utf-8-sig drops a BOM; strip() drops CRLF and trailing newlines
            return sidecar.read_text(encoding="utf-8-sig").strip()
    return image_path.stem.split("_")[0].strip()


def find_examples(data_root: Path) -> list[Example]:
    """Every image under `data_root` (recursively, in a stable order) with its caption."""
    paths = sorted(p for p in data_root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise UserError(
            f"data_root {str(data_root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}), searched recursively. "
            "Point --data_root at your training images."
        )
    return [Example(path, read_caption(path)) for path in paths]


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)  # phone photos store rotation in EXIF
        return image.convert("RGB")


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Scale the short side to `size` and cut the middle square."""
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 -> CHW float in [-1, 1], the VAE's input range."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ImageCaptionDataset(torch.utils.data.Dataset):
    def __init__(self, examples: list[Example], resolution: int, tokenizer: CLIPTokenizer, flip_p: float = 0.0):
        self.examples = examples
        self.resolution = resolution
        self.tokenizer = tokenizer
        self.flip_p = flip_p

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        example = self.examples[index]
        image = resize_center_crop(load_rgb(example.image_path), self.resolution)
        # torch's RNG, not Python's: the DataLoader seeds it per worker from the run's seed
        if self.flip_p > 0 and torch.rand(()).item() < self.flip_p:
            image = ImageOps.mirror(image)
        input_ids = self.tokenizer(
            example.caption,
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids[0]
        return {"pixel_values": to_tensor(image), "input_ids": input_ids}


def build_dataloader(cfg: TrainConfig, tokenizer: CLIPTokenizer) -> torch.utils.data.DataLoader:
    """Batches of {"pixel_values": (B, 3, H, W) in [-1, 1], "input_ids": (B, 77)}, shuffled by the run's seed.

    The training loop also accepts {"latents": (B, 4, H/8, W/8)} (already scaled by the VAE's scaling factor)
    in place of "pixel_values", for data that comes with cached latents.
    """
    dataset = ImageCaptionDataset(find_examples(Path(cfg.data_root)), cfg.resolution, tokenizer, cfg.flip_p)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(cfg.seed),
        pin_memory=torch.cuda.is_available(),
    )
