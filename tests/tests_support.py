"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

from recsys_moe.config.schema import DataConfig
from tests.conftest import synthetic_data_config


def data_config(path: Path, **overrides) -> DataConfig:
    """The tiny synthetic data's config with the row id carried into batches."""
    return synthetic_data_config(path, **{"row_id": "row_id", **overrides})
