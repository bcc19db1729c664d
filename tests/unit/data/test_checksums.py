"""Every Parquet file the project writes carries page checksums, and the reader verifies them: a
byte flipped inside a data page is a bad row group (reason checksum_mismatch), never rows with
different values."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from recsys_moe.data.criteo import convert as convert_criteo
from recsys_moe.data.files import DataError
from recsys_moe.data.loader import SplitInput
from recsys_moe.data.movielens import convert as convert_movielens
from tests.movielens_fixtures import write_100k
from tests.tests_support import data_config


def flip_last_page_byte(path: Path, row_group: int, column: int) -> None:
    """Flips one bit of the last byte of a column chunk: the end of its last data page's payload
    (a chunk is [dictionary page] data pages, each a header followed by its payload)."""
    col = pq.read_metadata(path).row_group(row_group).column(column)
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    data = bytearray(path.read_bytes())
    data[start + col.total_compressed_size - 1] ^= 0x01
    path.write_bytes(bytes(data))


def _written_by(writer: str, tiny_data: Path, tmp_path: Path) -> Path:
    """A Parquet file written by one of the project's writers."""
    if writer == "synthetic":
        return sorted((tiny_data / "eval").glob("*.parquet"))[0]
    if writer == "movielens":
        convert_movielens(write_100k(tmp_path / "ml"), tmp_path / "out", files=1)
    else:
        line = "\t".join(["1", *["2"] * 13, *["a1"] * 26]) + "\n"
        (tmp_path / "day_0").write_text(line * 20)
        convert_criteo([tmp_path / "day_0"], tmp_path / "out", val_fraction=0, test_fraction=0)
    return tmp_path / "out" / "train" / "part-00000.parquet"


@pytest.mark.parametrize("writer", ["synthetic", "movielens", "criteo"])
def test_every_writer_writes_page_checksums(writer, tiny_data, tmp_path):
    source = _written_by(writer, tiny_data, tmp_path)
    num_columns = pq.read_metadata(source).num_columns
    for j in range(num_columns):
        copy = tmp_path / f"copy{j}.parquet"
        shutil.copy(source, copy)
        flip_last_page_byte(copy, 0, j)
        with pytest.raises(OSError, match="checksum"):
            pq.ParquetFile(copy, page_checksum_verification=True).read_row_group(0)


def test_without_checksums_the_same_flip_decodes_silently(tiny_data, tmp_path):
    """Why the checksums: the flip that the tests above catch decodes to different values when
    the file has none (as the project's files had before)."""
    source = sorted((tiny_data / "eval").glob("*.parquet"))[0]
    table = pq.read_table(source)
    path = tmp_path / "plain.parquet"
    pq.write_table(table, path, row_group_size=400)  # no page checksums
    flip_last_page_byte(path, 0, table.schema.get_field_index("dense_0"))
    got = pq.ParquetFile(path, page_checksum_verification=True).read_row_group(0)
    assert not got.equals(table.slice(0, 400))


def test_flipped_synthetic_page_stops_the_loader_or_is_skipped(tiny_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    path = sorted((root / "train").glob("*.parquet"))[0]
    meta = pq.read_metadata(path)
    click = [meta.schema.column(j).path for j in range(meta.num_columns)].index("click")
    flip_last_page_byte(path, 1, click)
    with pytest.raises(DataError) as e:
        list(SplitInput(data_config(root, shuffle={"enabled": False}), "train").batches())
    msg = str(e.value)
    assert f"{path}: row group 1: could not be read: a page's checksum" in msg, msg
    assert "reason checksum_mismatch" in msg
    inp = SplitInput(data_config(root, on_bad_rows="skip", equal_steps="pad"), "train")
    rows = sum(int((b.row_ids >= 0).sum()) for b, _ in inp.batches())  # padding rows: -1
    skipped = inp.metrics()["data/skipped_rows/checksum_mismatch"]
    assert skipped == meta.row_group(1).num_rows
    assert rows == inp.total_rows - skipped
