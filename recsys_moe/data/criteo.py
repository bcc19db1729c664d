"""Criteo display-advertising TSV -> sharded Parquet (one binary task, `click`).

    python -m recsys_moe.data.criteo --src train.txt --out data/criteo     (or recsys-moe-criteo)
    python -m recsys_moe.train data=criteo data.path=data/criteo

Input: labelled Criteo files (Kaggle's train.txt, or the Terabyte set's day_N, plain or .gz),
one example per line, tab-separated: label, 13 integer features, 26 categorical features as
hex strings (hashed by Criteo); an empty field is missing. Redistributions of the sample that
are comma-separated, start with a header line or write integers as floats (`260.0`) are read
too (told apart by the first line). Several files or a folder of them are read in order,
streamed in blocks (memory stays bounded whatever the input size). A line that does not fit
stops the conversion naming file, line and field, and leaves no output folder behind.

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
import io
import json
import re
import shutil
from collections.abc import Callable
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
FIELDS = ["label", *INT_COLUMNS, *CAT_COLUMNS]
FORMAT = (
    "expected Criteo's format: one example per line, the label (0 or 1), 13 integer and 26 "
    "hexadecimal fields, tab-separated (or comma-separated), empty fields for missing values, "
    "optionally a header line first"
)

_HEX = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i


def parse_hex(arr: pa.Array, where: str, first_line: int = 1) -> np.ndarray:
    """Hex strings (up to 16 digits) -> int64 value + 1; null or empty -> 0. Vectorised over
    the Arrow string buffers (one pass per digit position, never per row). Errors name the
    line, `first_line` being the line of arr[0]."""
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
            f"{where}: line {first_line + row}: a categorical value has more than 16 hex digits"
        )
    value = np.zeros(n, dtype=np.uint64)
    for k in range(int(lengths.max()) if n else 0):
        has = lengths > k
        digit = _HEX[chars[np.where(has, offsets[:-1] + k, 0)]]
        if (digit[has] == 255).any():
            row = int(np.flatnonzero(has & (digit == 255))[0])
            raise ValueError(
                f"{where}: line {first_line + row}: categorical value is not hexadecimal"
            )
        value = np.where(has, value * np.uint64(16) + digit.astype(np.uint64), value)
    out = value.astype(np.int64) + 1  # 0 stays "missing"; 64-bit values wrap, as hashes may
    return np.where(lengths > 0, out, 0)


def transform(batch: pa.RecordBatch, where: str, first_line: int = 1) -> dict[str, np.ndarray]:
    """One block of raw columns -> the output columns (without row_id); `first_line` is the
    file line of the block's first row, for errors."""
    label = batch.column(0)
    if label.null_count:
        row = int(np.flatnonzero(label.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"{where}: line {first_line + row}: the label is missing")
    y = label.to_numpy().astype(np.float32)
    if ((y != 0) & (y != 1)).any():
        row = int(np.flatnonzero((y != 0) & (y != 1))[0])
        raise ValueError(f"{where}: line {first_line + row}: the label ({y[row]:g}) is not 0 or 1")
    cols: dict[str, np.ndarray] = {"click": y}
    for i, name in enumerate(INT_COLUMNS):
        x = batch.column(1 + i).to_numpy(zero_copy_only=False).astype(np.float64)  # null -> NaN
        if np.isinf(x).any():
            row = int(np.flatnonzero(np.isinf(x))[0])
            raise ValueError(f"{where}: line {first_line + row}: {name} is infinite")
        cols[name] = np.log1p(np.clip(np.nan_to_num(x, nan=0.0), 0, None)).astype(np.float32)
    for i, name in enumerate(CAT_COLUMNS):
        cols[name] = parse_hex(batch.column(1 + NUM_INT + i), f"{where} ({name})", first_line)
    return cols


def _lines(path: Path) -> io.TextIOWrapper:
    """The text lines of a plain or compressed file (compression from the extension)."""
    return io.TextIOWrapper(pa.input_stream(str(path)), encoding="utf-8", errors="replace")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _layout(path: Path) -> tuple[str, bool]:
    """(field delimiter, whether line 1 is a header) of a Criteo file, from its first line."""
    with _lines(path) as f:
        first = f.readline().rstrip("\r\n")
    for delimiter in ("\t", ","):
        fields = first.split(delimiter)
        if len(fields) == len(FIELDS):
            # a header names the label and integer fields: none of them empty or a number
            header = all(x and not _is_number(x) for x in fields[: 1 + NUM_INT])
            return delimiter, header
    raise ValueError(
        f"{path}: line 1 has {len(first.split(chr(9)))} tab-separated and "
        f"{len(first.split(','))} comma-separated fields, not {len(FIELDS)}: {FORMAT}"
    )


def _first_line(path: Path, predicate: Callable[[str], bool]) -> int | None:
    """The number of the first line of `path` for which predicate(line) holds (error paths)."""
    with _lines(path) as f:
        for number, line in enumerate(f, start=1):
            if predicate(line.rstrip("\r\n")):
                return number
    return None


def _read_error(path: Path, delimiter: str, error: Exception) -> ValueError:
    """pyarrow's CSV error (which names neither file nor line) as one that names both."""
    msg = str(error)
    column = re.search(r"column #(\d+)", msg)
    value = re.search(r"invalid value '(.*)'", msg)
    if column and value:  # a field that is not a number
        j = int(column.group(1))
        line = _first_line(path, lambda s: s.split(delimiter)[j : j + 1] == [value.group(1)])
        what = f"{FIELDS[j]} (field {j + 1}) is not a number: '{value.group(1)}'"
    else:  # a line with another number of fields
        line = _first_line(path, lambda s: len(s.split(delimiter)) != len(FIELDS))
        what = f"not {len(FIELDS)} fields ({msg})"
    return ValueError(f"{path}: line {line}: {what}; {FORMAT}")


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


def _convert(
    files: list[Path],
    out: Path,
    seed: int,
    fractions: tuple[float, float],
    rows_per_file: int,
    row_group_size: int,
    block_bytes: int,
) -> dict[str, int]:
    writers = {s: _SplitWriter(out / s, rows_per_file, row_group_size) for s in SPLITS}
    # Integers read as floats: some redistributions write 260 as 260.0 (the output is a float).
    types = {c: pa.float64() for c in FIELDS[: 1 + NUM_INT]}
    types |= {c: pa.string() for c in CAT_COLUMNS}
    rng = np.random.default_rng(seed)
    bounds = np.array([1 - sum(fractions), 1 - fractions[1]])
    for path in files:
        delimiter, header = _layout(path)
        try:  # opening reads (and converts) the first block
            reader = pacsv.open_csv(
                pa.input_stream(str(path)),  # .gz and other compressions detected by extension
                read_options=pacsv.ReadOptions(
                    column_names=FIELDS, block_size=block_bytes, skip_rows=int(header)
                ),
                parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=False),
                convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=True),
            )
        except pa.ArrowInvalid as e:
            raise _read_error(path, delimiter, e) from e
        line = 1 + int(header)  # the file line of the next row
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except pa.ArrowInvalid as e:
                raise _read_error(path, delimiter, e) from e
            cols = transform(batch, str(path), line)
            line += batch.num_rows
            which = np.searchsorted(bounds, rng.random(batch.num_rows), side="right")
            table = pa.table(cols)
            for k, split in enumerate(SPLITS):
                idx = np.flatnonzero(which == k)
                if len(idx):
                    writers[split].write(table.take(pa.array(idx)))
    for w in writers.values():
        w.close()
    return {s: w.rows for s, w in writers.items()}


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
    try:
        rows = _convert(
            files,
            out,
            seed,
            (val_fraction, test_fraction),
            rows_per_file,
            row_group_size,
            block_bytes,
        )
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # a refused run leaves no half-written data
        raise
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
    p.add_argument(
        "--src",
        required=True,
        type=Path,
        nargs="+",
        help="Criteo files (plain or compressed, e.g. .gz) or folders of them: one example per "
        "line, the label (0 or 1), 13 integer and 26 hexadecimal fields, tab-separated (or "
        "comma-separated), empty fields for missing values, optionally a header line first",
    )
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
