"""Shared fixtures: tiny real SD models (built once per session), a generated image set, and test tiers.

Tests marked `slow` (real `python train.py` processes, full conversions) are skipped unless `--run-slow`
is given; CI and the README's test command pass it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hub_server import hub_server  # noqa: F401  (fixture shared by all tests)

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow (end-to-end runs)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: end-to-end test that takes more than a few seconds")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    """`tiny_model(family)` -> path of a tiny random diffusers model of that family, built once."""
    from trainer.tiny import save_tiny_model

    built: dict[str, Path] = {}

    def get(family: str = "sd1") -> Path:
        if family not in built:
            built[family] = save_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}"), family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 generated 64px images (red circles, blue squares) with .txt captions."""
    from trainer.synthetic import make_shapes_dataset

    return make_shapes_dataset(tmp_path_factory.mktemp("shapes"), images_per_concept=8, size=64)


def run_train(args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """A real `python train.py ...` process, run from `cwd`."""
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
