"""Original single-file Stable Diffusion 1.x/2.x checkpoints <-> diffusers folders, exact and offline.

The bottom of the project with common/: it imports nothing from trainer/ or data/. One module per concern:

    tables.py        families, stock yamls with their image sizes, the diffusers folder's components
    read.py          reading files: format sniffing, integrity, weights-only loading, yamls and json
    detect.py        what one loaded file is (family, prediction type, image size, inpainting, EMA), once
    shapes.py        the UNet and VAE configuration a file's weights imply, when no yaml fits
    configs.py       yaml -> diffusers configs (through diffusers' own builders) and back
    plan.py          a detection, a yaml and the flags reconciled into every config, before anything is written
    to_diffusers.py  original state dict -> diffusers state dicts (pure)
    to_original.py   diffusers state dicts -> the original layout (pure)
    write.py         a diffusers folder / a single file with its yaml, whole or not at all
    single_file.py   the entry points below, each read -> detect -> plan -> convert -> write
    tokenizer.py     the CLIP tokenizer, built offline from the shipped vocabulary
    blank.py         a real-size single file without its weights (meta or random tensors), for benches and tests
"""

# The entry points load torch and diffusers; they are imported when first used, so that the light tables
# (convert.tables) can be read by code that must not load them (the preflight, --dry_run).
_ENTRY_POINTS = {
    "ConversionError": "convert.errors",
    "ConversionResult": "convert.single_file",
    "ExportResult": "convert.single_file",
    "convert_checkpoint_file": "convert.single_file",
    "convert_loaded": "convert.single_file",
    "export_single_file": "convert.single_file",
    "SCHEDULER_TYPES": "convert.tables",
}
__all__ = sorted(_ENTRY_POINTS)


def __getattr__(name: str):
    if name not in _ENTRY_POINTS:
        raise AttributeError(f"module 'convert' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_ENTRY_POINTS[name]), name)
