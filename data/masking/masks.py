"""Masks for masked training: reading an image's mask, checking it once at start, carrying it through the image's
own transforms, and the weight map it gives the loss.

An image's mask is the grayscale `<stem>-masklabel.png` beside it (OneTrainer's name: photos/cat.jpg ->
photos/cat-masklabel.png; another image format is read too): white learns, black is ignored, gray between. The
scan finds it and never takes it for an image (data/images.py `is_mask_file`, data/scanning/walk.py). With mask_from_alpha
an image without one is masked by its own alpha channel (kohya's alpha_mask). Images without a mask train
everywhere (weight 1).

Checked once, before any model loads (`checked_masks`, in threads as the scan): a mask of its image's aspect ratio
but another size is resized to the image's size (counted); one of another aspect ratio, one that cannot be read, and
one black everywhere its image's bucket crop keeps, leave that image to train without a mask (everywhere, at weight
1), each said with the image: what was found and what to do. Without masked_training nothing is read, and the report says once that the mask files found are not used.

In training a mask takes exactly its image's geometric path (data/images.py `place_in_bucket`: bucket resize, center
crop, flip), is reduced to the latents' size by area averaging (`to_latent_size`), and gives the weight map
    w = unmasked_weight + (1 - unmasked_weight) * mask,
divided by its mean with normalize_masked_area_loss (a small subject then weighs as much as a large one), by which
trainer/objective/loss.py multiplies the elementwise loss. With cache_latents the latent-size masks are cached
(data/masking/cache.py). Imports torch only in the functions that make tensors: the dry run checks masks without it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from data.images import MASK_SUFFIX, place_in_bucket, resize, to_rgb
from data.scan import LISTED_AT_MOST, ImageItem, Scan, count_more, relative_name

if TYPE_CHECKING:
    import torch

ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
NAMING = "photos/cat.jpg -> photos/cat-masklabel.png"
Sets = dict[str, list[ImageItem]]  # validation set name -> its images


# ---------------------------------------------------------------- reading


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ALPHA_MODES or "transparency" in image.info


def read_mask(path: Path, alpha: bool) -> Image.Image:
    """The mask in `path` as 8-bit grayscale ("L"), the right way up (EXIF): with `alpha` the alpha channel of the
    image at `path` (255 everywhere when it has none), else the gray levels of a mask file (16-bit ones scaled, as
    images are), where a transparent part counts as black: nothing was painted there."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if alpha:
            return image.convert("RGBA").getchannel("A")
        if has_alpha(image):
            image = Image.alpha_composite(Image.new("RGBA", image.size, (0, 0, 0, 255)), image.convert("RGBA"))
        return to_rgb(image).convert("L")


def from_alpha(item: ImageItem) -> bool:
    """Whether `item`'s mask is its own alpha channel (mask_from_alpha), not a mask file."""
    return item.mask == item.path


def bucket_mask_image(mask: Image.Image, item: ImageItem, flip: bool) -> Image.Image:
    """`mask` brought to its image's size (when it has only its aspect ratio), then through exactly the image's
    bucket resize, crop and flip (data/images.py `place_in_bucket`)."""
    return place_in_bucket(resize(mask, item.size), item.bucket, flip)


# ---------------------------------------------------------------- checking, before any model loads


@dataclass(frozen=True)
class MaskCheck:
    """What masked training found in one set of images, for its report (data/scan.py `Scan.masks`)."""

    on: bool  # masked_training
    images: int
    file_masks: int  # images masked by their -masklabel file (with masked_training off: that have one)
    alpha_masks: int  # images masked by their alpha channel
    unmasked_weight: float = 0.1
    normalize: bool = False
    from_alpha_asked: bool = False  # mask_from_alpha
    problems: list[tuple[Path, str]] = field(default_factory=list)  # (image, why it trains without its mask)
    resized: list[tuple[Path, tuple[int, int], Path, tuple[int, int]]] = field(default_factory=list)  # mask, image
    unmatched: list[Path] = field(default_factory=list)  # mask files with no image of their name

    def lines(self, root: Path, label: str = "Data") -> list[str]:
        """The report's lines, each starting with `label` ("Data"; a validation set's: its images are measured, not
        trained)."""
        def name(path: Path) -> str:
            return relative_name(path, root)

        if not self.on:
            return self._unused_lines(label)
        train = "train" if label == "Data" else "are measured"
        lines = [self._count_line(label, train)]
        if self.resized:
            mask, size, image, image_size = self.resized[0]
            lines.append(f"{label}: masked training: {len(self.resized)} mask(s) have their image's aspect ratio but "
                         f"another size, and are resized to it, e.g. {name(mask)} {size[0]}x{size[1]} for "
                         f"{name(image)} {image_size[0]}x{image_size[1]}; nothing to do.")
        if self.problems:
            lines.append(f"{label}: masked training: {len(self.problems)} image(s) {train} without their mask "
                         "(everywhere, at weight 1), since it cannot be used:")
            lines += [f"  {name(image)}: {why}" for image, why in self.problems[:LISTED_AT_MOST]]
            lines += count_more(self.problems)
        return lines + self._unmatched_lines(label, name)

    def _count_line(self, label: str, train: str) -> str:
        masked = self.file_masks + self.alpha_masks
        if not masked:
            alpha = "" if self.from_alpha_asked else ", or set mask_from_alpha for images with transparency"
            return (f"{label}: masked training: none of the {self.images} images has a mask, so all {train} "
                    "everywhere, as without masked_training. Put a grayscale <name>-masklabel.png beside each image "
                    f"(white: learn, black: ignore; {NAMING}){alpha}.")
        kinds = [f"{count} {kind}" for count, kind in ((self.file_masks, f"{MASK_SUFFIX}.png"),
                                                        (self.alpha_masks, "alpha channel")) if count]
        kinds_text = kinds[0].split(" ", 1)[1] if len(kinds) == 1 else ", ".join(kinds)  # one kind: no count again
        normalized = (", and each image's loss is divided by its mask's weighted area (normalize_masked_area_loss)"
                      if self.normalize else "")
        return (f"{label}: masked training: {masked} of {self.images} images have a mask ({kinds_text}), "
                f"{self.images - masked} {train} everywhere; outside a mask the loss weighs {self.unmasked_weight:g} "
                f"(unmasked_weight){normalized}.")

    def _unused_lines(self, label: str) -> list[str]:
        if not self.file_masks and not self.unmatched:
            return []
        what = (f"{self.file_masks} image(s) have a mask file ({MASK_SUFFIX}.png) beside them" if self.file_masks
                else f"{len(self.unmatched)} mask file(s) ({MASK_SUFFIX}.png) were found")
        return [(f"{label}: {what}, not used: masked_training is off (they are never trained on as images). To "
                 "weight each image's loss by its mask, set masked_training true (docs/DATA.md).")]

    def _unmatched_lines(self, label: str, name) -> list[str]:
        if not self.unmatched:
            return []
        listed = ", ".join(name(mask) for mask in self.unmatched[:LISTED_AT_MOST])
        more = f", and {len(self.unmatched) - LISTED_AT_MOST} more" if len(self.unmatched) > LISTED_AT_MOST else ""
        return [(f"{label}: masked training: {len(self.unmatched)} mask file(s) have no image of their name beside "
                 f"them, not used: {listed}{more}. A mask is named after its image: {NAMING}.")]


@dataclass(frozen=True)
class _Found:
    """One image's mask as checked: the file it is read from (None: it trains everywhere), why its mask is not used,
    and the mask's size when it is resized to its image's."""

    mask: Path | None
    problem: str | None = None
    resized: tuple[int, int] | None = None  # the mask file's size, when it is resized to its image's


def same_aspect(mask: tuple[int, int], image: tuple[int, int]) -> bool:
    """Whether `mask` is `image`'s size scaled: at the image's width its height is within a pixel (or 1%) of the
    image's (a mask saved at half size, or by a tool that rounds)."""
    return abs(mask[1] * image[0] / mask[0] - image[1]) <= max(1.0, 0.01 * image[1])


def check_mask(item: ImageItem, alpha_wanted: bool) -> _Found:
    """`item`'s mask, checked: its -masklabel file (found by the scan), else with `alpha_wanted` its alpha channel
    (an image without one, or a fully opaque one, has no mask), else none."""
    alpha = item.mask is None
    if alpha and not alpha_wanted:
        return _Found(None)
    source = item.path if alpha else item.mask
    said = "its alpha channel" if alpha else f"its mask {item.mask.name}"
    try:
        if alpha:
            with Image.open(source) as image:
                if not has_alpha(image):
                    return _Found(None)
        mask = read_mask(source, alpha)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # PIL's ways of saying so
        reason = ("not an image file PIL can read" if isinstance(err, UnidentifiedImageError) else
                  err.strerror if isinstance(err, OSError) and err.strerror else
                  str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
        fix = ("Save the image again with its transparency, or set mask_from_alpha false" if alpha else
               "Save the mask again as a grayscale PNG of the image's size, or delete it")
        return _Found(None, f"{said} cannot be read ({reason}). {fix}.")
    if alpha and mask.getextrema()[0] == 255:
        return _Found(None)  # fully opaque: the same as no mask
    if mask.size != item.size and not same_aspect(mask.size, item.size):
        return _Found(None, f"{said} is {mask.size[0]}x{mask.size[1]}, another aspect ratio than the image's "
                            f"{item.size[0]}x{item.size[1]}: no resize would put it on its subject. Make the mask "
                            "from this image (the same size), or delete it.")
    if bucket_mask_image(mask, item, flip=False).getextrema()[1] == 0:
        where = "everywhere" if mask.getextrema()[1] == 0 else f"everywhere its crop to the bucket {item.bucket} keeps"
        fix = "Give the image an opaque subject" if alpha else "Paint what it should learn white, or delete the mask"
        return _Found(None, f"{said} is {'transparent' if alpha else 'black'} {where}: with it the image would teach "
                            f"nothing but its background (at unmasked_weight). {fix}.")
    return _Found(source, resized=mask.size if mask.size != item.size else None)


def checked_masks(scan: Scan, options, sets: Sets | None = None) -> tuple[Scan, Sets, list[str]]:
    """The training scan and validation `sets` for `options`' masked training: each image's mask checked
    (`check_mask`, in threads: decoding releases the GIL) and kept only when it can be used; the scan's report then
    says what was found (`MaskCheck`), and each validation set's says in the lines returned. Without masked_training
    nothing is read or changed; the report says whether mask files were found, not used."""
    sets = dict(sets or {})
    if not options.masked_training:
        found = sum(item.mask is not None for item in scan.items)
        return replace(scan, masks=MaskCheck(False, len(scan.items), found, 0, unmatched=scan.unmatched_masks)), \
            sets, []
    everything = list(dict.fromkeys(item for items in (scan.items, *sets.values()) for item in items))  # each once
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        found = dict(zip(everything, pool.map(lambda item: check_mask(item, options.mask_from_alpha), everything)))
    train_items, train_check = _masked(scan.items, found, options, scan.unmatched_masks)
    lines = []
    for name, items in sets.items():
        sets[name], check = _masked(items, found, options)
        lines += check.lines(scan.root, f"Validation set {name!r}")
    return replace(scan, items=train_items, masks=train_check), sets, lines


def _masked(items: list[ImageItem], found: dict[ImageItem, _Found], options,
            unmatched: Iterable[Path] = ()) -> tuple[list[ImageItem], MaskCheck]:
    """`items` with the masks they train with, and what their report says."""
    masked = [replace(item, mask=found[item].mask) for item in items]
    alpha = sum(from_alpha(item) for item in masked)
    check = MaskCheck(
        True, len(items), sum(item.mask is not None for item in masked) - alpha, alpha, options.unmasked_weight,
        options.normalize_masked_area_loss, options.mask_from_alpha,
        problems=[(item.path, found[item].problem) for item in items if found[item].problem],
        resized=[(item.mask, found[item].resized, item.path, item.size) for item in items if found[item].resized],
        unmatched=list(unmatched))
    return masked, check


# ---------------------------------------------------------------- tensors, in training


def bucket_mask(item: ImageItem, flip: bool) -> torch.Tensor:
    """`item`'s mask as its bucket's pixels: (1, H, W) float32 in [0, 1], through exactly the image's transforms."""
    import torch

    mask = bucket_mask_image(read_mask(item.mask, from_alpha(item)), item, flip)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]


def to_latent_size(mask: torch.Tensor, size: Iterable[int]) -> torch.Tensor:
    """`mask` (..., H, W) reduced to `size` (h, w) by area averaging: each latent pixel weighs what the 8x8 pixels
    it encodes weigh on average (an edge pixel of the subject, partly masked, in between)."""
    import torch

    size = tuple(size)
    if tuple(mask.shape[-2:]) == size:
        return mask
    batched = mask.reshape(-1, 1, *mask.shape[-2:])
    return torch.nn.functional.interpolate(batched, size=size, mode="area").reshape(*mask.shape[:-2], *size)


def latent_mask(item: ImageItem, flip: bool, size: Iterable[int]) -> torch.Tensor:
    """`item`'s mask at the latents' `size`: (1, h, w); ones for an image without a mask."""
    import torch

    size = tuple(size)
    return torch.ones(1, *size) if item.mask is None else to_latent_size(bucket_mask(item, flip), size)


@dataclass(frozen=True)
class MaskWeighting:
    """How a mask weighs the loss: the options' unmasked_weight and normalize_masked_area_loss."""

    unmasked_weight: float
    normalize: bool

    @classmethod
    def of(cls, options) -> MaskWeighting | None:
        """The weighting of `options` (DataOptions, or the config); None without masked_training."""
        if not options.masked_training:
            return None
        return cls(options.unmasked_weight, options.normalize_masked_area_loss)

    def __call__(self, mask: torch.Tensor) -> torch.Tensor:
        """The weight map of `mask` (..., 1, h, w) in [0, 1]: w = unmasked_weight + (1 - unmasked_weight) * mask;
        with normalize, divided by its own mean (OneTrainer's normalize_masked_area_loss), so that every image
        contributes the same total weight however small its subject. A map of zeros stays zeros."""
        import torch

        weights = self.unmasked_weight + (1.0 - self.unmasked_weight) * mask
        if self.normalize:
            area = weights.mean(dim=(-3, -2, -1), keepdim=True)
            weights = weights / area.clamp(min=torch.finfo(weights.dtype).tiny)
        return weights
