#!/usr/bin/env python
"""Regenerate train.json (the defaults) and docs/CONFIG.md from TrainConfig, so neither drifts from the code."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from trainer.config.docs import markdown_reference  # noqa: E402
from trainer.config.schema import TrainConfig, config_to_dict  # noqa: E402


def main() -> None:
    (REPO_ROOT / "train.json").write_text(json.dumps(config_to_dict(TrainConfig()), indent=2) + "\n", encoding="utf-8")
    (REPO_ROOT / "docs").mkdir(exist_ok=True)
    (REPO_ROOT / "docs" / "CONFIG.md").write_text(markdown_reference(), encoding="utf-8")
    print("Wrote train.json and docs/CONFIG.md")


if __name__ == "__main__":
    main()
