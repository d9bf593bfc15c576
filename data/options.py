"""DataOptions: the settings data/ reads, as a small value of its own, so data/ needs nothing from trainer/.

Each field is named exactly as the training config's key of the same meaning, so the trainer builds the options
with one generic line, `DataOptions.from_config(cfg)`. The functions that take DataOptions read only these
attributes, so any object that has them (the training config itself) works in its place.
An image's own flip_p, cond_dropout and shuffle_tags from its data files (data/settings.py) win over these for
that image. Imports no torch: the preflight and `--dry_run` use it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class DataOptions:
    data_root: str | Path  # the training images, searched recursively
    resolution: int  # bucket area is about resolution^2; a multiple of 64
    batch_size: int  # rows per batch on each process
    flip_p: float  # probability of a horizontal flip per row (of images without their own)
    seed: int  # every random choice of the data derives from it and the epoch
    cond_dropout: float  # probability of the empty caption per row (of images without their own)
    shuffle_tags: bool  # shuffle a caption's comma-separated tags per row (of images without their own)
    keep_tags: int  # with shuffle_tags: tags after the first chunk kept in place
    num_workers: int  # loader worker processes; 0: load in the calling process
    cache_latents: bool  # encode each image once and train from the cached posterior
    validation_split: float  # share of data_root held out for the validation loss; 0: none
    validation_data_root: str | Path | None  # a validation folder of its own (wins over validation_split)
    # masked training (data/masking/masks.py); defaults as the config's, for callers that build options by hand
    masked_training: bool = False  # weight each image's loss by its mask (<stem>-masklabel.png)
    mask_from_alpha: bool = False  # an image without a mask file is masked by its alpha channel
    unmasked_weight: float = 0.1  # the loss weight outside a mask, 0 to 1
    normalize_masked_area_loss: bool = False  # each image's loss divided by its weight map's mean

    @classmethod
    def from_config(cls, config: object) -> DataOptions:
        """The options read off `config` (the training config, or anything with these attributes)."""
        return cls(**{field.name: getattr(config, field.name) for field in fields(cls)})
