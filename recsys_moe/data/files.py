"""Finding a split's Parquet files and checking them against the configured schema.

Checks read Parquet footers only (no data pages), so they are cheap enough to run on every file
before training starts.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from recsys_moe.config.schema import DataConfig


class DataError(ValueError):
    """Bad input data: the message names the file and column (and row group where known)."""


def resolve_split(root: str, split: str, key: str) -> list[str]:
    """The sorted Parquet files of one split.

    `split` is a folder, a file or a glob, relative to `root` unless absolute. `key` is the config
    key that named it (for error messages), e.g. "data.train".
    """
    if not root:
        raise DataError("data.path is empty: set it to the folder holding the data")
    if not os.path.exists(root):
        raise DataError(f"data.path ({root}) does not exist")
    spec = split if os.path.isabs(split) else os.path.join(root, split)
    if os.path.isdir(spec):
        files = sorted(
            os.path.join(spec, f)
            for f in os.listdir(spec)
            if f.endswith(".parquet") and not f.startswith((".", "_"))
        )
    elif os.path.isfile(spec):
        files = [spec]
    else:
        files = sorted(f for f in glob.glob(spec) if os.path.isfile(f))
    if not files:
        raise DataError(f"{key} ({split}): no Parquet files at {spec}")
    return files


@dataclass(frozen=True)
class ColumnKinds:
    """Arrow type of every configured column, as found in the files (one entry per column)."""

    types: dict[str, pa.DataType]

    def is_list(self, column: str) -> bool:
        return _is_list(self.types[column])


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def _expected(cfg: DataConfig) -> dict[str, tuple[str, str]]:
    """column -> (config key, kind) for every column the config declares."""
    want: dict[str, tuple[str, str]] = {}
    for i, c in enumerate(cfg.dense):
        want[c] = (f"data.dense[{i}]", "dense")
    for i, f in enumerate(cfg.sparse):
        want[f.column_name] = (f"data.sparse[{i}] ({f.name})", "ids")
    for i, t in enumerate(cfg.tasks):
        want[t.label_column] = (f"data.tasks[{i}] ({t.name}).label", "label")
        if t.mask:
            want[t.mask] = (f"data.tasks[{i}] ({t.name}).mask", "mask")
        if t.weight:
            want[t.weight] = (f"data.tasks[{i}] ({t.name}).weight", "weight")
    return want


def _type_ok(kind: str, t: pa.DataType) -> bool:
    numeric = pa.types.is_integer(t) or pa.types.is_floating(t)
    if kind in ("dense", "weight"):
        return numeric
    if kind == "label":
        return numeric or pa.types.is_boolean(t)
    if kind == "mask":
        return pa.types.is_boolean(t) or pa.types.is_integer(t)
    if kind == "ids":
        return pa.types.is_integer(t) or (_is_list(t) and pa.types.is_integer(t.value_type))
    raise AssertionError(kind)


_KIND_TEXT = {
    "dense": "a float or integer column",
    "weight": "a float or integer column",
    "label": "a float, integer or bool column",
    "mask": "a bool or integer column",
    "ids": "an integer or list<integer> column",
}


def check_columns(files: Sequence[str], cfg: DataConfig) -> ColumnKinds:
    """Checks every file's footer against the config; returns the column types found.

    Raises DataError naming the file and the column when a declared column is missing, has a
    type its role cannot take, or has a different type than in the split's first file.
    """
    want = _expected(cfg)
    found: dict[str, pa.DataType] = {}
    first: dict[str, str] = {}
    for path in files:
        try:
            schema = pq.read_schema(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad footers
            raise DataError(f"{path}: not a readable Parquet file ({e})") from e
        for column, (key, kind) in want.items():
            idx = schema.get_field_index(column)
            if idx < 0:
                raise DataError(f"{path}: column '{column}' ({key}) is missing")
            t = schema.field(idx).type
            if not _type_ok(kind, t):
                raise DataError(
                    f"{path}: column '{column}' ({key}) has type {t}; expected {_KIND_TEXT[kind]}"
                )
            if column in found and found[column] != t:
                raise DataError(
                    f"{path}: column '{column}' ({key}) has type {t} but {found[column]} in {first[column]}"
                )
            found.setdefault(column, t)
            first.setdefault(column, path)
    return ColumnKinds(found)
