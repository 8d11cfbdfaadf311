"""Shared fixtures: tiny builtin pipelines (built in code, no download) and recipe files.

Plain helper functions shared by test modules live in tests/helpers.py (``from tests.helpers import ...``);
no test module imports another."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_sd():
    from diffsqueeze.loading import load_pipeline

    return load_pipeline("builtin:tiny-sd")


@pytest.fixture
def write_recipe(tmp_path: Path):
    """Write a recipe dict to a YAML file in tmp_path; output_dir defaults to tmp_path/run."""

    def write(data: dict, name: str = "recipe.yaml") -> Path:
        data = {"output_dir": str(tmp_path / "run"), **data}
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        return path

    return write
