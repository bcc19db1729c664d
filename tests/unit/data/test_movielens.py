"""MovieLens conversion of tiny hand-written files (ML-100K and ML-1M formats) against
hand-computed rows; the real ML-100K (when present) converts to the documented counts."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys_moe.data.movielens import TABLE_SIZES, convert, main
from tests.movielens_fixtures import FLAGS, RATINGS, write_1m, write_100k

# Hand-computed. Users: 1 = 24 y/o (bucket 1 = 18-24), M, technician (20th of u.occupation ->
# id 20), zip 857.. (-> 858); 2 = 53 (bucket 5 = 50-55), F, other (14th -> 14), Canadian zip
# (-> 0); 3 = 17 (bucket 0), M, writer (21st -> 21), zip 010.. (-> 11). ML-1M: age 18 -> 1,
# 50 -> 5, 1 -> 0; occupation codes 19, 13, 20 -> +1.
USERS = {1: (1, 0, 20, 858), 2: (5, 1, 14, 0), 3: (0, 0, 21, 11)}
# Movies: year - 1900 + 1 (1995 -> 96, 1922 -> 23, none -> 0)
YEARS = {1: 96, 2: 96, 3: 0, 4: 23}
# (user, movie) -> (watch, rating): rated pairs, then negatives. User 1 rated 2 of 4 movies ->
# both others; user 2 rated 3 -> the only one left; user 3 rated 2 -> both others.
PAIRS = {(u, m): (1.0, float(r)) for u, m, r in RATINGS} | {
    (1, 3): (0.0, 0.0),
    (1, 4): (0.0, 0.0),
    (2, 4): (0.0, 0.0),
    (3, 1): (0.0, 0.0),
    (3, 2): (0.0, 0.0),
}


def _expected(genres_of_3: list[int]) -> list[dict]:
    genres = {**FLAGS, 3: genres_of_3}
    rows = []
    for (u, m), (watch, rating) in sorted(PAIRS.items()):
        age, gender, occ, zp = USERS[u]
        rows.append(
            dict(
                user_id=u,
                movie_id=m,
                age=age,
                gender=gender,
                occupation=occ,
                zip_prefix=zp,
                genres=genres[m],
                year=YEARS[m],
                watch=watch,
                rating=rating,
                rating_observed=watch == 1.0,
            )
        )
    return rows


def _read(out: Path) -> dict[str, list[dict]]:
    return {s: pq.read_table(out / s).to_pylist() for s in ("train", "validation", "test")}


@pytest.mark.parametrize("fmt,genres_of_3", [("100k", [0]), ("1m", [8])])
def test_conversion_matches_hand_computed_rows(tmp_path, fmt, genres_of_3):
    src = (write_100k if fmt == "100k" else write_1m)(tmp_path / fmt)
    out = tmp_path / "out"
    rows = convert(src, out, seed=3, val_fraction=0.25, test_fraction=0.25, files=2)
    assert rows == {"train": 6, "validation": 3, "test": 3}
    splits = _read(out)
    for part in splits.values():
        assert [r.pop("row_id") for r in part] == list(range(len(part)))
    got = sorted(
        (r for p in splits.values() for r in p), key=lambda r: (r["user_id"], r["movie_id"])
    )
    assert got == _expected(genres_of_3)
    assert len(list((out / "train").glob("*.parquet"))) == 2
    assert json.loads((out / "dataset.json").read_text())["table_sizes"] == TABLE_SIZES


def test_split_and_negatives_are_seeded(tmp_path):
    src = write_100k(tmp_path / "src")
    out = {}
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        convert(src, tmp_path / name, seed=seed)
        out[name] = _read(tmp_path / name)
    assert out["a"] == out["b"]
    assert out["a"] != out["c"]


def test_cli_rejects_a_folder_without_movielens_files(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--src", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "neither MovieLens-100K" in capsys.readouterr().err


def test_real_movielens_100k(movielens_100k, tmp_path):
    rows = convert(movielens_100k, tmp_path / "ml", files=2)
    assert rows == {"train": 160000, "validation": 20000, "test": 20000}
    t = pa.concat_tables(pq.read_table(tmp_path / "ml" / s) for s in rows)
    assert t.column("watch").to_numpy().sum() == 100000  # every rating, plus as many negatives
    assert t.column("rating_observed").to_numpy().sum() == 100000
    for name, size in TABLE_SIZES.items():
        col = t.column(name)
        values = col.combine_chunks().flatten() if name == "genres" else col
        assert max(values.to_pylist()) < size
