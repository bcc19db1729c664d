"""UnitDecoder keeps the files it reads open (a few at a time): a shuffled window takes its row
groups from several files in turn, and each opening reads the file's footer again."""

from __future__ import annotations

import pyarrow.fs as pafs
import pyarrow.parquet as pq
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
