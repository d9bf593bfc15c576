"""`python train.py --help` and docs/CONFIG.md, both generated from TrainConfig's fields and their help."""

from __future__ import annotations

import json
import typing
from typing import Any, Literal

from trainer.config.schema import DEFAULT_CONFIG_FILE, FIELD_TYPES, FIELDS
from trainer.config.values import is_optional, shown, strip_optional, type_name


def help_text() -> str:
    lines = [
        "usage: python train.py [--config PATH] [--key value ...]",
        "",
        "Fine-tunes a Stable Diffusion 1.x/2.x model. Settings come from defaults, then the json file",
        f"(--config PATH, default ./{DEFAULT_CONFIG_FILE}), then --key value on the command line.",
        "Booleans take --flag, --flag true or --flag false; nullable keys take null.",
        "",
        "options:",
        "  --config PATH",
        "      json file of settings; EveryDream2 train.json files load too",
    ]
    for name, f in FIELDS.items():
        lines.append(f"  --{name} {_metavar(FIELD_TYPES[name])}")
        lines.append(f"      {f.metadata['help']} (default: {shown(f.default)})")
    return "\n".join(lines)


def markdown_reference() -> str:
    """docs/CONFIG.md: every key with its type, default and help (a test keeps the file equal to this)."""
    lines = [
        "# Configuration keys",
        "",
        "Generated from `TrainConfig` in trainer/config/schema.py by `python utils/write_config_docs.py`; do not edit.",
        "Every key goes in train.json or on the command line as `--key value`.",
        "",
        "| key | type | default | what it does |",
        "| --- | --- | --- | --- |",
    ]
    for name, f in FIELDS.items():
        tp = type_name(FIELD_TYPES[name]).replace("|", "\\|")
        lines.append(f"| `{name}` | {tp} | `{json.dumps(f.default)}` | {f.metadata['help']} |")
    return "\n".join(lines) + "\n"


def _metavar(tp: Any) -> str:
    if is_optional(tp):
        return _metavar(strip_optional(tp))
    if typing.get_origin(tp) is Literal:
        return "{" + ",".join(typing.get_args(tp)) + "}"
    return {bool: "[BOOL]", int: "INT", float: "FLOAT", str: "TEXT"}[tp]
