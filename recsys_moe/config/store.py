"""Registers the typed schema with Hydra so composed configs are validated against it."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from recsys_moe.config.schema import TrainConfig

SCHEMA_NAME = "train_schema"


def register() -> None:
    """Store the schema as `train_schema`; conf/train.yaml lists it first in its defaults."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)


def to_typed(cfg: DictConfig) -> TrainConfig:
    """The composed config as plain dataclasses (enums resolved, interpolations expanded)."""
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, TrainConfig), type(obj)
    return obj
