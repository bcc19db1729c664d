"""Finding a split's Parquet files and checking them against the configured schema.

Paths are local folders, files or globs, or pyarrow filesystem URIs (file://, s3://, gs://,
hdfs://, whichever the installed pyarrow supports); a folder is listed recursively (Spark writes
partition folders), skipping names that start with '.' or '_' (_SUCCESS, .crc files).

Checks read Parquet footers only (no data pages), so they are cheap enough to run on every file
before training starts. A file that fails a check is an error naming the file and column, or,
under `data.on_bad_rows: skip`, is left out and counted per reason (`BadInput`).
"""

from __future__ import annotations

import fnmatch
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from recsys_moe.config.schema import BadRows, DataConfig

# Reasons a row (or a whole file) is bad; metrics keys are data/skipped_rows/<reason> and
# data/skipped_files/<reason>. Fixed order: counts are summed over ranks as one tensor.
REASONS = (
    "unreadable",  # footer or row group cannot be decoded (truncated, corrupt)
    "empty_file",  # zero bytes, or a valid footer with no rows
    "missing_column",  # a configured column is not in the file
    "wrong_type",  # a column's type cannot serve its role (e.g. a string label)
    "schema_mismatch",  # a column's type differs from the one most files of the split have
    "null_value",  # null in a dense, id, mask or weight column
    "null_label",  # null label where the task's mask says the label exists
    "nan_label",  # NaN or Inf label where the label exists
    "nonfinite_dense",  # NaN or Inf dense value
    "nonfinite_weight",  # NaN, Inf or negative sample weight
    "negative_id",  # negative id of a feature with id_policy error
    "id_out_of_range",  # id >= num_embeddings of a feature with id_policy error
    # (appended, so the counters of earlier reasons keep their positions)
    "checksum_mismatch",  # a page's CRC does not match its bytes: the row group is corrupt
    "label_not_binary",  # a binary task's label is not 0 or 1 where the label exists
)
FILE_REASONS = REASONS[:5]


class DataError(ValueError):
    """Bad input data: the message names the file and column (and row group and row where known)."""


@dataclass(frozen=True)
class RowGroup:
    """One work unit: row group `index` of the Parquet file `path`."""

    path: str
    index: int
    num_rows: int


@dataclass
class SplitFiles:
    """What the footers of one split say: its usable work units and what was left out."""

    fs: pafs.FileSystem
    files: list[str]  # usable files, sorted
    units: list[RowGroup]  # their row groups, in file order (empty row groups left out)
    types: dict[str, pa.DataType]  # configured column -> Arrow type
    skipped_files: Counter = field(default_factory=Counter)  # reason -> files left out
    skipped_rows: Counter = field(default_factory=Counter)  # reason -> their rows (from footers)
    first: dict[str, str] = field(default_factory=dict)  # reason -> why its first file is bad

    @property
    def total_rows(self) -> int:
        return sum(u.num_rows for u in self.units)


_GLOB_CHARS = "*?["


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a pyarrow filesystem URI."""
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad URIs
            raise DataError(f"{uri}: not a path or filesystem URI pyarrow can open ({e})") from e
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def open_parquet(fs: pafs.FileSystem, path: str) -> pq.ParquetFile:
    """Opens a Parquet file, verifying page checksums where the writer stored them (Spark's
    parquet-mr does by default), so corrupt pages fail loudly instead of decoding to garbage."""
    source = path if isinstance(fs, pafs.LocalFileSystem) else fs.open_input_file(path)
    return pq.ParquetFile(source, page_checksum_verification=True)


def _hidden(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative.split("/") if part)


def resolve_split(root: str, split: str, key: str) -> list[str]:
    """The sorted Parquet files of one split (paths inside its filesystem; see locate_split)."""
    return locate_split(root, split, key)[1]


def locate_split(root: str, split: str, key: str) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem and sorted Parquet files of one split.

    `split` is a folder, a file or a glob, relative to `root` unless absolute (or a URI). `key`
    is the config key that named it (for error messages), e.g. "data.train".
    """
    if not root:
        raise DataError("data.path is empty: set it to the folder holding the data")
    if "://" in split or os.path.isabs(split):
        spec = split
    else:
        spec = root.rstrip("/") + "/" + split
    fs, path = filesystem(spec)
    if "://" not in root and not os.path.exists(root):
        raise DataError(f"data.path ({root}) does not exist")
    if any(c in path for c in _GLOB_CHARS):
        head = path[: min(path.index(c) for c in _GLOB_CHARS if c in path)]
        base = head[: head.rfind("/")] if "/" in head else "."
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        files = [
            i.path
            for i in infos
            if i.type == pafs.FileType.File
            and fnmatch.fnmatchcase(i.path, path)
            and not _hidden(i.path[len(base) :])
        ]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            files = [
                i.path
                for i in infos
                if i.type == pafs.FileType.File
                and i.path.endswith(".parquet")
                and not _hidden(i.path[len(path) :])
            ]
        elif info.type == pafs.FileType.File:
            files = [path]
        else:
            files = []
    if not files:
        raise DataError(f"{key} ({split}): no Parquet files at {spec}")
    return fs, sorted(files)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def expected_columns(cfg: DataConfig) -> dict[str, tuple[str, str]]:
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
    if cfg.row_id:
        want[cfg.row_id] = ("data.row_id", "row_id")
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
    if kind == "row_id":
        return pa.types.is_integer(t)
    raise AssertionError(kind)


_KIND_TEXT = {
    "dense": "a float or integer column",
    "weight": "a float or integer column",
    "label": "a float, integer or bool column",
    "mask": "a bool or integer column",
    "ids": "an integer or list<integer> column",
    "row_id": "an integer column",
}


@dataclass
class _Footer:
    path: str
    meta: pq.FileMetaData | None
    schema: pa.Schema | None
    problem: tuple[str, str] | None  # (reason, message)


def _read_footer(fs: pafs.FileSystem, path: str) -> _Footer:
    try:
        if fs.get_file_info(path).size == 0:
            return _Footer(path, None, None, ("empty_file", f"{path}: empty file (0 bytes)"))
        pf = open_parquet(fs, path)
        return _Footer(path, pf.metadata, pf.schema_arrow, None)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for bad footers
        msg = f"{path}: not a readable Parquet file ({type(e).__name__}: {e})"
        return _Footer(path, None, None, ("unreadable", msg))


def scan_split(
    fs: pafs.FileSystem, files: Sequence[str], cfg: DataConfig, key: str = "data.train"
) -> SplitFiles:
    """Checks every file's footer against the config and lists the usable row groups.

    A file is bad when it is unreadable, empty, lacks a configured column, has a column whose
    type cannot serve its role, or has a type that differs from the type most files of the split
    have for that column (the first file's type breaks ties). Under on_bad_rows=error the first
    bad file raises DataError naming file and column; under skip, bad files are left out and
    counted (their rows too, where the footer tells them). No usable rows left is always an error.
    """
    want = expected_columns(cfg)
    footers = [_read_footer(fs, p) for p in files]
    # The reference type of every column: the most common one among readable files.
    votes: dict[str, Counter] = {c: Counter() for c in want}
    for f in footers:
        if f.schema is not None:
            for c in want:
                i = f.schema.get_field_index(c)
                if i >= 0:
                    votes[c][f.schema.field(i).type] += 1
    reference = {c: v.most_common(1)[0][0] for c, v in votes.items() if v}

    out = SplitFiles(fs=fs, files=[], units=[], types=reference)
    for f in footers:
        problem = f.problem or _schema_problem(f, want, reference)
        if problem is None and f.meta is not None and f.meta.num_rows == 0:
            problem = ("empty_file", f"{f.path}: the file holds no rows")
        if problem is not None:
            reason, msg = problem
            if cfg.on_bad_rows == BadRows.error:
                raise DataError(f"{msg} (data.on_bad_rows=skip leaves such files out)")
            out.skipped_files[reason] += 1
            out.first.setdefault(reason, msg)
            out.skipped_rows[reason] += 0 if f.meta is None else f.meta.num_rows
            continue
        assert f.meta is not None
        out.files.append(f.path)
        for i in range(f.meta.num_row_groups):
            n = f.meta.row_group(i).num_rows
            if n > 0:
                out.units.append(RowGroup(f.path, i, n))
    if not out.units:
        left = dict(out.skipped_files)
        raise DataError(
            f"{key}: no rows at all in {len(files)} file(s)"
            + (f" (files left out per reason: {left})" if left else "")
        )
    return out


def _schema_problem(
    f: _Footer, want: dict[str, tuple[str, str]], reference: dict[str, pa.DataType]
) -> tuple[str, str] | None:
    assert f.schema is not None
    for column, (key, kind) in want.items():
        idx = f.schema.get_field_index(column)
        if idx < 0:
            return "missing_column", f"{f.path}: column '{column}' ({key}) is missing"
        t = f.schema.field(idx).type
        if not _type_ok(kind, t):
            return "wrong_type", (
                f"{f.path}: column '{column}' ({key}) has type {t}; expected {_KIND_TEXT[kind]}"
            )
        if t != reference[column]:
            return "schema_mismatch", (
                f"{f.path}: column '{column}' ({key}) has type {t} but {reference[column]} in "
                "most files of the split"
            )
    return None


@dataclass(frozen=True)
class ColumnKinds:
    """Arrow type of every configured column, as found in the files (one entry per column)."""

    types: dict[str, pa.DataType]

    def is_list(self, column: str) -> bool:
        return _is_list(self.types[column])


def check_columns(files: Sequence[str], cfg: DataConfig) -> ColumnKinds:
    """Checks local files' footers against the config (always raising); returns column types."""
    strict = DataConfig(**{**cfg.__dict__, "on_bad_rows": BadRows.error})
    return ColumnKinds(scan_split(pafs.LocalFileSystem(), files, strict).types)
