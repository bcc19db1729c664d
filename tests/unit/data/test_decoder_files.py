"""UnitDecoder keeps the files it reads open (a few at a time): a shuffled window takes its row
groups from several files in turn, and each opening reads the file's footer again."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from recsys_moe.data import parquet
from recsys_moe.data.files import RowGroup
from recsys_moe.data.parquet import UnitDecoder
from tests.tests_support import data_config


def _units(tiny_data) -> list[RowGroup]:
    """Row groups 0 and 1 of each train and eval file with two, alternating between files."""
    files = sorted(tiny_data.glob("*/*.parquet"))
    files = [f for f in files if pq.read_metadata(f).num_row_groups >= 2]
    assert len(files) >= 3
    return [
        RowGroup(str(f), i, pq.read_metadata(f).row_group(i).num_rows)
        for i in (0, 1)
        for f in files
    ]


def test_files_stay_open_across_their_row_groups_up_to_the_limit(tiny_data, monkeypatch):
    opened: list[str] = []
    real = parquet.open_parquet

    def counting(fs, path):
        opened.append(path)
        return real(fs, path)

    monkeypatch.setattr(parquet, "open_parquet", counting)
    fs, units = pafs.LocalFileSystem(), _units(tiny_data)
    cfg = data_config(tiny_data)
    chunks = [UnitDecoder(cfg).read(fs, u) for u in units]  # a new decoder each: no reuse
    assert len(opened) == len(units)

    opened.clear()
    decoder = UnitDecoder(cfg)
    for u, want in zip(units, chunks):
        got = decoder.read(fs, u)
        assert torch.equal(got.row_ids, want.row_ids) and torch.equal(got.dense, want.dense)
    assert sorted(opened) == sorted({u.path for u in units})  # each file once

    opened.clear()
    monkeypatch.setattr(UnitDecoder, "MAX_OPEN_FILES", 2)
    decoder = UnitDecoder(cfg)
    for u in units:  # 3 or more files in turn, 2 kept: each is closed before its next turn
        decoder.read(fs, u)
    assert len(opened) == len(units)


def _same_chunks(got, want) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g.row_ids, w.row_ids) and torch.equal(g.dense, w.dense)
        assert torch.equal(g.labels, w.labels) and torch.equal(g.skipped, w.skipped)
        for a, b in zip(g.values + g.lengths, w.values + w.lengths):
            assert torch.equal(a, b)


def test_read_units_reads_each_file_once_and_gives_what_read_gives(tiny_data, monkeypatch):
    fs, units = pafs.LocalFileSystem(), _units(tiny_data)
    cfg = data_config(tiny_data)
    want = [UnitDecoder(cfg).read(fs, u) for u in units]

    calls: list[list[int]] = []
    real = pq.ParquetFile.read_row_groups

    def counting(self, row_groups, *args, **kwargs):
        calls.append(list(row_groups))
        return real(self, row_groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", counting)
    _same_chunks(UnitDecoder(cfg).read_units(fs, units), want)
    assert calls == [[0, 1]] * len({u.path for u in units})  # one call per file, in order


def test_read_units_with_a_corrupt_row_group_is_read_unit_by_unit(tiny_data, tmp_path):
    """One flipped page in a file: that file's row groups are read one by one, so the error, or
    under skip the chunks, counts and first bad row group, are those of `read`."""
    from recsys_moe.data.files import DataError
    from tests.unit.data.test_checksums import flip_last_page_byte

    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    units = _units(root)
    flip_last_page_byte(Path(units[-1].path), units[-1].index, 0)  # the last unit's row group
    fs = pafs.LocalFileSystem()

    cfg = data_config(root)
    with pytest.raises(DataError) as want:
        [UnitDecoder(cfg).read(fs, u) for u in units]
    with pytest.raises(DataError) as got:
        UnitDecoder(cfg).read_units(fs, units)
    assert str(got.value) == str(want.value)
    assert f"{units[-1].path}: row group {units[-1].index}: could not be read" in str(got.value)

    cfg = data_config(root, on_bad_rows="skip")
    reference = UnitDecoder(cfg)
    want_chunks = [reference.read(fs, u) for u in units]
    decoder = UnitDecoder(cfg)
    _same_chunks(decoder.read_units(fs, units), want_chunks)
    assert int(want_chunks[-1].skipped.sum()) == units[-1].num_rows
    assert decoder.first_bad == reference.first_bad and "checksum_mismatch" in decoder.first_bad
