"""Registers the typed schema with Hydra so composed configs are validated against it, and the
`from_dataset` resolver that data configs use to read their columns from the data set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from recsys_moe.config.schema import TrainConfig

SCHEMA_NAME = "train_schema"


def register() -> None:
    """Store the schema as `train_schema`; conf/train.yaml lists it first in its defaults."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)
    OmegaConf.register_new_resolver("from_dataset", from_dataset, replace=True)


def from_dataset(key: str, *, _root_: DictConfig) -> Any:
    """`${from_dataset:tasks}`: the `data_config.<key>` entry of `<data.path>/dataset.json`,
    written by generators whose columns depend on their arguments (e.g. the number of tasks of
    recsys_moe.data.paper_synthetic), so one data config serves every generated set."""
    path = Path(str(_root_.data.path)) / "dataset.json"
    if not path.is_file():
        raise ValueError(
            f"data.path ({_root_.data.path}): no dataset.json, which this data config reads "
            f"'{key}' from; write the data first (see the data config's comment)"
        )
    entries = json.loads(path.read_text()).get("data_config", {})
    if key not in entries:
        raise ValueError(f"{path}: data_config has no '{key}' (it has {sorted(entries)})")
    return entries[key]


def to_typed(cfg: DictConfig) -> TrainConfig:
    """The composed config as plain dataclasses (enums resolved, interpolations expanded)."""
    # Re-merge onto the schema: keys forced in with `+key=value` bypass Hydra's struct check
    # and would otherwise be dropped silently. Merging plain containers re-checks every key.
    plain = OmegaConf.to_container(cfg, resolve=True)
    obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), plain))
    assert isinstance(obj, TrainConfig), type(obj)
    return obj


def to_yaml(cfg: TrainConfig) -> str:
    """A typed config as the YAML that `to_typed` reads back (saved with every checkpoint)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(text: str) -> TrainConfig:
    """The typed config of a YAML written by `to_yaml` (or a run's config.yaml)."""
    return to_typed(OmegaConf.create(text))
