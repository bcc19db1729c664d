"""The data and model sections of a config.yaml, as typed configs.

A run's config.yaml (the trainer's resolved config, also written beside every checkpoint) holds
every group; rebuilding the model and reading its input needs only `data` and `model`. Each is
merged onto its schema dataclass, so an unknown key or a value of the wrong type fails naming the
file and the key, and keys added to other groups later (a run written by a newer trainer) do not
stop an older reader.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from recsys_moe.config.schema import DataConfig, ModelConfig


def read_model_sections(path: str | Path) -> tuple[DataConfig, ModelConfig]:
    """(data, model) of the config.yaml at `path`; ValueError naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (the config the model was trained with)")
    try:
        raw = OmegaConf.load(path)
    except Exception as e:  # noqa: BLE001 - yaml and OmegaConf raise several types
        raise ValueError(f"{path}: not a readable YAML config ({type(e).__name__}: {e})") from e
    out = []
    for key, schema in (("data", DataConfig), ("model", ModelConfig)):
        if key not in raw:
            raise ValueError(f"{path}: no '{key}' section")
        try:
            merged = OmegaConf.merge(OmegaConf.structured(schema), raw[key])
            out.append(OmegaConf.to_object(merged))
        except OmegaConfBaseException as e:
            raise ValueError(f"{path}: {key}: {e}") from e
    return out[0], out[1]


def write_model_sections(path: str | Path, data: DataConfig, model: ModelConfig) -> None:
    """Writes `data` and `model` as the sections of a YAML config that read_model_sections reads."""
    cfg = OmegaConf.create(
        {"data": OmegaConf.structured(data), "model": OmegaConf.structured(model)}
    )
    Path(path).write_text(OmegaConf.to_yaml(cfg))
