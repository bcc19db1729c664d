"""Criteo display-advertising TSV -> sharded Parquet (one binary task, `click`).

    python -m recsys_moe.data.criteo --src train.txt --out data/criteo     (or recsys-moe-criteo)
    python -m recsys_moe.train data=criteo data.path=data/criteo

Input: labelled Criteo files (Kaggle's train.txt, or the Terabyte set's day_N, plain or .gz),
one example per line, tab-separated: label, 13 integer features, 26 categorical features as
hex strings (hashed by Criteo); an empty field is missing. Several files or a folder of them
are read in order, streamed in blocks (memory stays bounded whatever the input size).

Output columns:
- click: float32 label (0 or 1);
- int_1 .. int_13: float32 log(1 + max(x, 0)), missing -> 0 (DLRM's transform: the counts are
  heavy-tailed and a few are -1/-2 sentinels);
- cat_1 .. cat_26: int64 = the hex value + 1, missing -> 0. They are NOT reduced to a table
  size here: conf/data/criteo.yaml gives each feature `id_policy: hash`, so the loader maps
  every id >= num_embeddings into range (splitmix64 modulo num_embeddings, see
  recsys_moe.data.parquet.hash_ids) and the table size stays a training-time choice;
- row_id: the row's index in its split.

Split: each row goes to train / validation / test by a seeded uniform draw against the given
fractions (the draws follow row order, so the split does not depend on block sizes). Each split
is written as files of at most --rows-per-file rows in row groups of --row-group-size.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from recsys_moe.data.write import parquet_writer

NUM_INT, NUM_CAT = 13, 26
INT_COLUMNS = [f"int_{i}" for i in range(1, NUM_INT + 1)]
CAT_COLUMNS = [f"cat_{i}" for i in range(1, NUM_CAT + 1)]
SPLITS = ("train", "validation", "test")

_HEX = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i


def parse_hex(arr: pa.Array, where: str) -> np.ndarray:
    """Hex strings (up to 16 digits) -> int64 value + 1; null or empty -> 0. Vectorised over
    the Arrow string buffers (one pass per digit position, never per row)."""
    arr = arr.cast(pa.string())
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + n + 1]
    data = arr.buffers()[2]
    chars = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(1, np.uint8)
    lengths = np.diff(offsets)
    if arr.null_count:
        lengths = np.where(arr.is_null().to_numpy(zero_copy_only=False), 0, lengths)
    if n and lengths.max() > 16:
        row = int(np.argmax(lengths > 16))
        raise ValueError(
            f"{where}: line {row + 1}: a categorical value has more than 16 hex digits"
        )
    value = np.zeros(n, dtype=np.uint64)
    for k in range(int(lengths.max()) if n else 0):
        has = lengths > k
        digit = _HEX[chars[np.where(has, offsets[:-1] + k, 0)]]
        if (digit[has] == 255).any():
            row = int(np.flatnonzero(has & (digit == 255))[0])
            raise ValueError(f"{where}: line {row + 1}: categorical value is not hexadecimal")
        value = np.where(has, value * np.uint64(16) + digit.astype(np.uint64), value)
    out = value.astype(np.int64) + 1  # 0 stays "missing"; 64-bit values wrap, as hashes may
    return np.where(lengths > 0, out, 0)


def transform(batch: pa.RecordBatch, where: str) -> dict[str, np.ndarray]:
    """One block of raw columns -> the output columns (without row_id)."""
    label = batch.column(0)
    if label.null_count:
        row = int(np.flatnonzero(label.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"{where}: line {row + 1}: the label is missing")
    y = label.to_numpy().astype(np.float32)
    if ((y != 0) & (y != 1)).any():
        raise ValueError(f"{where}: a label is not 0 or 1")
    cols: dict[str, np.ndarray] = {"click": y}
    for i, name in enumerate(INT_COLUMNS):
        x = batch.column(1 + i).to_numpy(zero_copy_only=False).astype(np.float64)  # null -> NaN
        cols[name] = np.log1p(np.clip(np.nan_to_num(x, nan=0.0), 0, None)).astype(np.float32)
    for i, name in enumerate(CAT_COLUMNS):
        cols[name] = parse_hex(batch.column(1 + NUM_INT + i), f"{where} ({name})")
    return cols


def _inputs(src: list[Path]) -> list[Path]:
    files: list[Path] = []
    for s in src:
        files += sorted(p for p in s.iterdir() if p.is_file()) if s.is_dir() else [s]
    if not files:
        raise FileNotFoundError(f"--src ({', '.join(map(str, src))}): no files")
    return files


class _SplitWriter:
    """Writes one split as files of at most rows_per_file rows."""

    def __init__(self, folder: Path, rows_per_file: int, row_group_size: int) -> None:
        folder.mkdir(parents=True)
        self.folder, self.rows_per_file, self.row_group_size = folder, rows_per_file, row_group_size
        self.writer: pq.ParquetWriter | None = None
        self.files, self.in_file, self.rows = 0, 0, 0

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self.writer is None or self.in_file == self.rows_per_file:
                self.close()
                path = self.folder / f"part-{self.files:05d}.parquet"
                schema = table.schema.append(pa.field("row_id", pa.int64()))
                self.writer = parquet_writer(path, schema)
                self.files, self.in_file = self.files + 1, 0
            take = min(table.num_rows, self.rows_per_file - self.in_file)
            part = table.slice(0, take)
            ids = pa.array(np.arange(self.rows, self.rows + take, dtype=np.int64))
            self.writer.write_table(part.append_column("row_id", ids), self.row_group_size)
            self.in_file, self.rows, table = (
                self.in_file + take,
                self.rows + take,
                table.slice(take),
            )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def convert(
    src: list[Path],
    out: Path,
    seed: int = 0,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    rows_per_file: int = 2_000_000,
    row_group_size: int = 65536,
    block_bytes: int = 64 << 20,
) -> dict[str, int]:
    """Converts the TSV files into `out` (replaced); returns the rows of each split."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"--val-fraction ({val_fraction}) and --test-fraction ({test_fraction}) must be in "
            "[0, 1) with a sum < 1"
        )
    files = _inputs([Path(s) for s in src])
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    writers = {s: _SplitWriter(out / s, rows_per_file, row_group_size) for s in SPLITS}
    names = ["label", *INT_COLUMNS, *CAT_COLUMNS]
    types = {"label": pa.int64(), **{c: pa.int64() for c in INT_COLUMNS}}
    types |= {c: pa.string() for c in CAT_COLUMNS}
    rng = np.random.default_rng(seed)
    bounds = np.array([1 - val_fraction - test_fraction, 1 - test_fraction])
    for path in files:
        reader = pacsv.open_csv(
            pa.input_stream(str(path)),  # .gz and other compressions detected by extension
            read_options=pacsv.ReadOptions(column_names=names, block_size=block_bytes),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=True),
        )
        for batch in reader:
            cols = transform(batch, str(path))
            which = np.searchsorted(bounds, rng.random(batch.num_rows), side="right")
            table = pa.table(cols)
            for k, split in enumerate(SPLITS):
                idx = np.flatnonzero(which == k)
                if len(idx):
                    writers[split].write(table.take(pa.array(idx)))
    for w in writers.values():
        w.close()
    rows = {s: w.rows for s, w in writers.items()}
    (out / "dataset.json").write_text(
        json.dumps(
            {
                "converter": "recsys_moe.data.criteo",
                "sources": [str(f) for f in files],
                "seed": seed,
                "rows": rows,
            },
            indent=2,
        )
    )
    (out / "_SUCCESS").touch()
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, type=Path, nargs="+", help="TSV files or folders")
    p.add_argument("--out", required=True, type=Path, help="output folder (replaced)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--test-fraction", type=float, default=0.05)
    p.add_argument("--rows-per-file", type=int, default=2_000_000)
    p.add_argument("--row-group-size", type=int, default=65536)
    a = p.parse_args(argv)
    try:
        rows = convert(
            a.src, a.out, a.seed, a.val_fraction, a.test_fraction, a.rows_per_file, a.row_group_size
        )
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    print(f"wrote {rows} rows to {a.out}; train with: data=criteo data.path={a.out}")


if __name__ == "__main__":
    main()
