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
    # Re-merge onto the schema: keys forced in with `+key=value` bypass Hydra's struct check
    # and would otherwise be dropped silently. Merging plain containers re-checks every key.
    plain = OmegaConf.to_container(cfg, resolve=True)
    obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), plain))
    assert isinstance(obj, TrainConfig), type(obj)
    return obj
