"""Split resolution: folders (recursive, hidden names skipped), files, globs, file:// URIs."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys_moe.data.files import DataError, locate_split, resolve_split
from recsys_moe.data.loader import SplitInput
from tests.tests_support import data_config


def _touch(path, rows=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"a": list(range(rows))}), path)


def test_folder_is_listed_recursively_skipping_hidden_names(tmp_path):
    for rel in ("t/date=1/part-0.parquet", "t/date=2/part-1.parquet", "t/_tmp/x.parquet"):
        _touch(tmp_path / rel)
    (tmp_path / "t" / "_SUCCESS").write_text("")
    (tmp_path / "t" / ".part-0.parquet.crc").write_text("")
    files = resolve_split(str(tmp_path), "t", "data.train")
    assert [f.split("/t/")[1] for f in files] == ["date=1/part-0.parquet", "date=2/part-1.parquet"]


def test_glob_and_uri(tmp_path):
    for i in range(3):
        _touch(tmp_path / "t" / f"part-{i}.parquet")
    files = resolve_split(str(tmp_path), "t/part-[01].parquet", "data.train")
    assert [f.rsplit("/", 1)[1] for f in files] == ["part-0.parquet", "part-1.parquet"]
    fs, files = locate_split(f"file://{tmp_path}", "t", "data.train")
    assert len(files) == 3 and type(fs).__name__ == "LocalFileSystem"


def test_missing_split_names_the_key(tmp_path):
    with pytest.raises(DataError, match=r"data.eval \(nope\): no Parquet files"):
        resolve_split(str(tmp_path), "nope", "data.eval")
    with pytest.raises(DataError, match=r"data.path \(/does/not/exist\) does not exist"):
        resolve_split("/does/not/exist", "train", "data.train")


def test_loader_reads_a_file_uri_like_a_local_path(tiny_data):
    local = SplitInput(data_config(tiny_data, batch_size=100), "train")
    uri = SplitInput(data_config(f"file://{tiny_data}", batch_size=100), "train")
    a = [b.row_ids.tolist() for b, _ in local.batches()]
    assert a == [b.row_ids.tolist() for b, _ in uri.batches()]
