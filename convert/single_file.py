"""The converter's entry points: an original single file -> a diffusers folder, and a diffusers folder -> a single
file. Each reads top to bottom: read (convert/read.py), detect once (convert/detect.py), plan
(convert/plan.py), convert the state dicts (convert/to_diffusers.py, convert/to_original.py), write whole or
not at all (convert/write.py). Every check runs before anything is written.

Tensors present in the original file that a diffusers model has no place for (the LDM noise-schedule
buffers, CLIP's `position_ids`, OpenCLIP's unused last block, `text_projection`, `logit_scale`, ...) are
kept in `original_extras.safetensors` inside the folder, so original -> diffusers -> original gives back
the same keys and bit-identical tensors. Only a second full copy of the UNet (the EMA or the non-EMA one,
whichever was not converted) is dropped, and the result says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import yaml
from torch import Tensor

from convert.configs import (
    original_config_from_diffusers,
    scheduler_class,
    scheduler_config,
    text_encoder_layers,
    yaml_text_layer,
)
from convert.detect import Detection, detect
from convert.errors import ConversionError
from convert.plan import plan_conversion
from convert.read import LoadedCheckpoint, load_checkpoint, load_original_config, read_json
from convert.shapes import block_indices
from convert.tables import (
    EXTRAS_FILE,
    FAMILIES,
    REPO_ROOT,
    STOCK_CONFIGS,
    WEIGHTED_COMPONENTS,
    Family,
    PredictionType,
    family_of_hidden_act,
    original_config_name,
)
from convert.to_diffusers import convert_state
from convert.to_original import diffusers_to_original
from convert.write import write_diffusers_folder, write_single_file

if TYPE_CHECKING:
    from typing import Unpack  # Python 3.11; annotations are not evaluated, so 3.10 runs this module too


@dataclass
class ConversionResult:
    """What `convert_checkpoint_file` found and did."""

    dump_path: Path
    family: Family
    prediction_type: PredictionType
    image_size: int
    upcast_attention: bool
    in_channels: int
    original_config: str
    evidence: list[str]
    notes: list[str]


@dataclass
class ExportResult:
    checkpoint_path: Path
    sidecar_yaml: Path | None
    family: Family
    prediction_type: PredictionType
    num_tensors: int


class ConversionOptions(TypedDict, total=False):
    """What `convert_checkpoint_file` passes on to `convert_loaded`, whose defaults they take."""

    original_config: str | os.PathLike | None
    image_size: int | None
    upcast_attention: bool | None
    num_in_channels: int | None
    extract_ema: bool
    half: bool
    scheduler_type: str


def convert_checkpoint_file(
    checkpoint_path: str | os.PathLike,
    dump_path: str | os.PathLike,
    *,
    prediction_type: str | None = None,
    from_safetensors: bool | None = None,
    **options: Unpack[ConversionOptions],
) -> ConversionResult:
    """Convert an original SD1.x/SD2.x single file into a diffusers folder at `dump_path`, atomically.

    Without `original_config`, a sidecar `<file>.yaml` is used if present, else the shipped yaml that the
    weights call for, else (no shipped yaml has their shapes) the configuration the weights' shapes imply.
    """
    _refuse_existing(Path(dump_path))
    ckpt = load_checkpoint(Path(checkpoint_path), from_safetensors)
    return convert_loaded(ckpt, detect(ckpt, override=prediction_type), dump_path, **options)


def convert_loaded(
    ckpt: LoadedCheckpoint,
    detection: Detection,
    dump_path: str | os.PathLike,
    *,
    original_config: str | os.PathLike | None = None,
    image_size: int | None = None,
    upcast_attention: bool | None = None,
    num_in_channels: int | None = None,
    extract_ema: bool = False,
    half: bool = False,
    scheduler_type: str = "pndm",
) -> ConversionResult:
    """A loaded file and its one detection -> a diffusers folder at `dump_path`, assembled beside it under a
    hidden partial name and renamed into place at the end."""
    dump_path = Path(dump_path)
    _refuse_existing(dump_path)
    plan = plan_conversion(
        ckpt, detection, original_config_path=Path(original_config) if original_config else detection.sidecar,
        image_size=image_size, upcast_attention=upcast_attention, num_in_channels=num_in_channels,
        scheduler_type=scheduler_type, extract_ema=extract_ema,
    )
    configs = {"unet": plan.unet_config, "vae": plan.vae_config, "text_encoder": plan.text_config}
    parts = convert_state(ckpt.state, plan.family, configs, extract_ema, plan.config_source)
    if parts.dropped:
        plan.notes.append(parts.dropped)
    write_diffusers_folder(
        dump_path, parts, pad_token=FAMILIES[plan.family].text_encoder.pad_token,
        scheduler_class=scheduler_class(plan.scheduler_type),
        scheduler_config=scheduler_config(plan.original_config, plan.prediction_type),
        inpainting=detection.inpainting, half=half,
    )
    return ConversionResult(
        dump_path=dump_path, family=plan.family, prediction_type=plan.prediction_type,
        image_size=plan.image_size, upcast_attention=plan.upcast_attention,
        in_channels=plan.unet_config["in_channels"],
        original_config=str(plan.original_config_path or plan.config_source),
        evidence=plan.evidence, notes=plan.notes,
    )


def _refuse_existing(dump_path: Path) -> None:
    if dump_path.exists():
        raise ConversionError(f"{dump_path} already exists; remove it or choose another --dump_path")


# --------------------------------------------------------------------------- diffusers -> single file


@dataclass
class DiffusersFolder:
    configs: dict[str, dict[str, Any]]  # "unet", "vae", "text_encoder" -> its config.json
    tensors: dict[str, dict[str, Tensor]]
    scheduler: dict[str, Any]
    extras: dict[str, Tensor] | None


def read_diffusers_folder(model_path: Path) -> DiffusersFolder:
    from safetensors.torch import load_file

    files = {c.name: model_path / c.name / c.weights for c in WEIGHTED_COMPONENTS}
    for f in files.values():
        if not f.is_file() or not (f.parent / "config.json").is_file():
            raise ConversionError(f"{model_path} is not a diffusers Stable Diffusion folder: {f} or its config.json "
                                  "is missing (models saved with safe_serialization=True are expected)")
    scheduler_file = model_path / "scheduler" / "scheduler_config.json"
    extras_file = model_path / EXTRAS_FILE
    return DiffusersFolder(
        configs={name: read_json(f.parent / "config.json") for name, f in files.items()},
        tensors={name: load_file(str(f)) for name, f in files.items()},
        scheduler=read_json(scheduler_file) if scheduler_file.is_file() else {},
        extras=load_file(str(extras_file)) if extras_file.is_file() else None,
    )


def export_single_file(model_path: str | os.PathLike, checkpoint_path: str | os.PathLike, *,
                       half: bool = False) -> ExportResult:
    """Write a diffusers folder as one original-layout .safetensors (+ `<file>.yaml` for SD2), atomically."""
    model_path, checkpoint_path = Path(model_path), Path(checkpoint_path)
    if checkpoint_path.suffix != ".safetensors":
        raise ConversionError(f"{checkpoint_path} should end in .safetensors; only safetensors is written")
    folder = read_diffusers_folder(model_path)
    configs, tensors = folder.configs, folder.tensors
    family = family_of_hidden_act(configs["text_encoder"].get("hidden_act"))
    state = diffusers_to_original(tensors["unet"], configs["unet"], tensors["vae"], configs["vae"],
                                  tensors["text_encoder"], family, folder.extras)
    prediction: PredictionType = folder.scheduler.get("prediction_type", "epsilon")
    sidecar = write_single_file(
        checkpoint_path, state, half=half, sidecar=sidecar_yaml(family, prediction, folder, state),
        # the file states its own prediction type, as modelspec does
        metadata={"modelspec.prediction_type": "v" if prediction == "v_prediction" else "epsilon"},
    )
    return ExportResult(checkpoint_path, sidecar, family, prediction, len(state))


def sidecar_yaml(family: Family, prediction: PredictionType, folder: DiffusersFolder,
                 state: dict[str, Tensor]) -> Path | str | None:
    """The yaml to write beside an exported file: the shipped one itself when it describes the model, else one
    written for it; None for a stock SD1 model (A1111 needs the yaml to know an SD2 model's parameterization,
    an SD1 model's only when it is not the stock one)."""
    layer = exported_text_layer(family, prediction, folder.configs["text_encoder"], state)
    ldm_yaml = original_config_from_diffusers(family, folder.configs["unet"], folder.configs["vae"], folder.scheduler,
                                              layer)
    stock = STOCK_CONFIGS.get((family, prediction))
    is_stock = stock is not None and yaml.safe_load((REPO_ROOT / stock.yaml).read_text()) == ldm_yaml
    if not is_stock:
        return yaml.safe_dump(ldm_yaml, sort_keys=False)
    return REPO_ROOT / stock.yaml if family == "sd2" else None


def exported_text_layer(family: Family, prediction: PredictionType, text_config: dict[str, Any],
                        state: dict[str, Tensor]) -> str | None:
    """The text-encoder layer the exported yaml must name so that converting the file again gives the model's
    layers: None when the shipped yaml's already does (SD2's "penultimate" for the real OpenCLIP, whose unused
    24th block may or may not be in the file), else "last" or "penultimate"."""
    spec = FAMILIES[family].text_encoder
    width, layers = text_config["hidden_size"], text_config["num_hidden_layers"]
    blocks = len(block_indices(state, FAMILIES[family].text_blocks))
    shipped = yaml_text_layer(load_original_config(REPO_ROOT / original_config_name(family, prediction)))
    if text_encoder_layers(spec, width, blocks, shipped) == layers:
        return None
    return next((layer for layer in ("last", "penultimate")
                 if text_encoder_layers(spec, width, blocks, layer) == layers), None)
