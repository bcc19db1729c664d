"""MovieLens (GroupLens) -> sharded Parquet for the two tasks of the MMoE/DSelect-k papers.

    python -m recsys_moe.data.movielens --src ml-100k --out data/movielens   (or recsys-moe-movielens)
    python -m recsys_moe.train data=movielens data.path=data/movielens

Reads MovieLens-100K (u.data, u.user, u.item) or MovieLens-1M (ratings.dat, users.dat,
movies.dat), latin-1, whichever `--src` holds. The data sets are licensed for research use
only: convert them where they are, never into a repository.

Rows (one per user-movie pair):
- every rated pair, with watch = 1 and rating = its 1-5 stars (rating_observed = True);
- per user, as many unrated movies of the catalogue as the user rated, drawn uniformly without
  replacement (fewer when the catalogue has fewer unrated movies): watch = 0, rating = 0 and
  rating_observed = False (the `rating` task is masked to watched rows).

Features (int64 ids; 0 is "unknown" wherever a value can be missing):
- user_id, movie_id: the data set's own ids (1-based);
- age: 7 buckets, those of ML-1M: under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+ -> 0..6
  (ML-1M's codes 1, 18, 25, 35, 45, 50, 56 map to the same buckets);
- gender: M -> 0, F -> 1;
- occupation: ML-100K's names in u.occupation order -> 1..21; ML-1M's codes 0..20 -> 1..21;
- zip_prefix: the first three digits of the zip code + 1 (0: not three leading digits);
- genres (list): indices of the 19 genres of ML-100K's u.genre (ML-1M's names map to the same);
- year: release year - 1900 + 1, clipped to [1, 131] (0: unknown); from u.item's release date
  or the "(yyyy)" ending an ML-1M title.
Plus row_id (the row's index in its split).

Split: rows are shuffled with --seed and cut into train / validation / test by the given
fractions; each split is written as --files Parquet files of --row-group-size row groups.
Table sizes in conf/data/movielens.yaml cover both ML-100K and ML-1M; the converter checks
them and stops, naming the feature, if a data set needs more (e.g. ML-10M's ids).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys_moe.data.write import write_table

GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
OCCUPATIONS_100K = (
    "administrator",
    "artist",
    "doctor",
    "educator",
    "engineer",
    "entertainment",
    "executive",
    "healthcare",
    "homemaker",
    "lawyer",
    "librarian",
    "marketing",
    "none",
    "other",
    "programmer",
    "retired",
    "salesman",
    "scientist",
    "student",
    "technician",
    "writer",
)
AGE_EDGES = (18, 25, 35, 45, 50, 56)  # bucket = number of edges <= age
# Table sizes of conf/data/movielens.yaml (ML-1M: 6040 users, 3952 movies).
TABLE_SIZES = {
    "user_id": 6041,
    "movie_id": 3953,
    "age": 7,
    "gender": 2,
    "occupation": 22,
    "zip_prefix": 1001,
    "genres": len(GENRES),
    "year": 132,
}
ENCODING = "latin-1"


@dataclass
class Users:
    ids: np.ndarray  # [U] int64
    age: np.ndarray
    gender: np.ndarray
    occupation: np.ndarray
    zip_prefix: np.ndarray


@dataclass
class Movies:
    ids: np.ndarray  # [M] int64
    year: np.ndarray
    genres: list[list[int]]


def _lines(path: Path) -> list[str]:
    return [x for x in path.read_text(encoding=ENCODING).splitlines() if x.strip()]


def _zip_prefix(z: str) -> int:
    return int(z[:3]) + 1 if len(z) >= 3 and z[:3].isdigit() else 0


def _year(y: int | None) -> int:
    return 0 if y is None else int(np.clip(y - 1900, 0, 130)) + 1


def _users(rows: list[tuple[int, int, str, int, str]]) -> Users:
    """rows: (id, age bucket, gender, occupation id, zip)."""
    return Users(
        ids=np.array([r[0] for r in rows], dtype=np.int64),
        age=np.array([r[1] for r in rows], dtype=np.int64),
        gender=np.array([0 if r[2].upper() == "M" else 1 for r in rows], dtype=np.int64),
        occupation=np.array([r[3] for r in rows], dtype=np.int64),
        zip_prefix=np.array([_zip_prefix(r[4]) for r in rows], dtype=np.int64),
    )


def read_100k(src: Path) -> tuple[np.ndarray, Users, Movies]:
    """(ratings [N, 3] user, movie, stars), users, movies of a MovieLens-100K folder."""
    ratings = np.array(
        [[int(v) for v in x.split("\t")[:3]] for x in _lines(src / "u.data")], dtype=np.int64
    )
    users = []
    for x in _lines(src / "u.user"):
        uid, age, gender, occ, zipc = x.split("|")[:5]
        occ_id = OCCUPATIONS_100K.index(occ) + 1 if occ in OCCUPATIONS_100K else 0
        users.append(
            (int(uid), int(np.searchsorted(AGE_EDGES, int(age), "right")), gender, occ_id, zipc)
        )
    ids, years, genres = [], [], []
    for x in _lines(src / "u.item"):
        f = x.split("|")
        ids.append(int(f[0]))
        m = re.search(r"(\d{4})\s*$", f[2])
        years.append(_year(int(m.group(1)) if m else None))
        flags = f[-len(GENRES) :]
        genres.append([g for g, v in enumerate(flags) if v.strip() == "1"])
    return ratings, _users(users), Movies(np.array(ids, dtype=np.int64), np.array(years), genres)


def read_1m(src: Path) -> tuple[np.ndarray, Users, Movies]:
    """(ratings, users, movies) of a MovieLens-1M folder (:: separated)."""
    ratings = np.array(
        [[int(v) for v in x.split("::")[:3]] for x in _lines(src / "ratings.dat")], dtype=np.int64
    )
    users = []
    for x in _lines(src / "users.dat"):
        uid, gender, age, occ, zipc = x.split("::")[:5]
        users.append(
            (
                int(uid),
                int(np.searchsorted(AGE_EDGES, int(age), "right")),
                gender,
                int(occ) + 1,
                zipc,
            )
        )
    ids, years, genres = [], [], []
    for x in _lines(src / "movies.dat"):
        mid, title, names = x.split("::")[:3]
        ids.append(int(mid))
        m = re.search(r"\((\d{4})\)\s*$", title)
        years.append(_year(int(m.group(1)) if m else None))
        genres.append(sorted(GENRES.index(g) for g in names.split("|") if g in GENRES))
    return ratings, _users(users), Movies(np.array(ids, dtype=np.int64), np.array(years), genres)


def read(src: Path) -> tuple[np.ndarray, Users, Movies]:
    if (src / "u.data").exists():
        return read_100k(src)
    if (src / "ratings.dat").exists():
        return read_1m(src)
    raise FileNotFoundError(
        f"--src ({src}): neither MovieLens-100K (u.data) nor MovieLens-1M (ratings.dat) files"
    )


def sample_pairs(ratings: np.ndarray, movies: Movies, seed: int) -> np.ndarray:
    """[N, 4] user, movie, watch, stars: the rated pairs, then per user as many sampled unrated
    movies as it rated (stars 0)."""
    rng = np.random.default_rng(seed)
    catalogue = np.unique(movies.ids)
    order = np.argsort(ratings[:, 0], kind="stable")
    users, starts, counts = np.unique(ratings[order, 0], return_index=True, return_counts=True)
    negatives = []
    for u, s, c in zip(users, starts, counts):  # one step per user, not per row
        rated = ratings[order[s : s + c], 1]
        unrated = np.setdiff1d(catalogue, rated, assume_unique=False)
        k = min(int(c), len(unrated))
        picked = rng.choice(unrated, size=k, replace=False)
        negatives.append(np.stack([np.full(k, u), picked], axis=1))
    neg = np.concatenate(negatives) if negatives else np.zeros((0, 2), dtype=np.int64)
    pos = np.concatenate([ratings[:, :2], np.ones((len(ratings), 1), np.int64), ratings[:, 2:3]], 1)
    neg = np.concatenate([neg, np.zeros((len(neg), 2), np.int64)], 1)
    return np.concatenate([pos, neg]).astype(np.int64)


def build_table(pairs: np.ndarray, users: Users, movies: Movies) -> pa.Table:
    """One row per pair with every feature and label (see the module docstring)."""
    uidx = _index(users.ids, pairs[:, 0], "user")
    midx = _index(movies.ids, pairs[:, 1], "movie")
    genre_lists = [movies.genres[i] for i in range(len(movies.ids))]
    lens = np.array([len(g) for g in genre_lists], dtype=np.int64)
    flat = np.array([g for gl in genre_lists for g in gl], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    row_lens = lens[midx]
    row_starts = np.repeat(offsets[midx], row_lens)
    within = np.arange(row_lens.sum()) - np.repeat(np.cumsum(row_lens) - row_lens, row_lens)
    genres = pa.ListArray.from_arrays(
        pa.array(np.concatenate([[0], np.cumsum(row_lens)]).astype(np.int32)),
        pa.array(flat[row_starts + within] if len(flat) else np.zeros(0, np.int64)),
    )
    cols = {
        "user_id": pairs[:, 0],
        "movie_id": pairs[:, 1],
        "age": users.age[uidx],
        "gender": users.gender[uidx],
        "occupation": users.occupation[uidx],
        "zip_prefix": users.zip_prefix[uidx],
        "genres": genres,
        "year": movies.year[midx].astype(np.int64),
        "watch": pairs[:, 2].astype(np.float32),
        "rating": pairs[:, 3].astype(np.float32),
        "rating_observed": pairs[:, 2] == 1,
    }
    for name, size in TABLE_SIZES.items():
        values = cols[name]
        top = (
            int(pc.max(values.flatten()).as_py() or 0)
            if isinstance(values, pa.Array)
            else int(values.max(initial=0))
        )
        if top >= size:
            raise ValueError(
                f"{name}: id {top} does not fit the table size {size} of conf/data/movielens.yaml "
                "(raise it there and in recsys_moe.data.movielens.TABLE_SIZES)"
            )
    return pa.table(cols)


def _index(ids: np.ndarray, query: np.ndarray, what: str) -> np.ndarray:
    order = np.argsort(ids)
    pos = np.searchsorted(ids, query, sorter=order)
    pos = np.clip(pos, 0, len(ids) - 1)
    found = order[pos]
    missing = ids[found] != query
    if missing.any():
        raise ValueError(
            f"rating of {what} {int(query[missing][0])}, which is not in the {what} file"
        )
    return found


def split_rows(n: int, fractions: tuple[float, float], seed: int) -> dict[str, np.ndarray]:
    """Row indices of train / validation / test: a seeded permutation cut by the fractions."""
    perm = np.random.default_rng([seed, 1]).permutation(n)
    n_val, n_test = int(round(n * fractions[0])), int(round(n * fractions[1]))
    return {
        "train": perm[: n - n_val - n_test],
        "validation": perm[n - n_val - n_test : n - n_test],
        "test": perm[n - n_test :],
    }


def write_splits(
    table: pa.Table, splits: dict[str, np.ndarray], out: Path, files: int, row_group_size: int
) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, idx in splits.items():
        part = table.take(pa.array(idx))
        part = part.append_column("row_id", pa.array(np.arange(part.num_rows, dtype=np.int64)))
        folder = out / name
        folder.mkdir()
        n_files = max(1, min(files, part.num_rows))
        bounds = np.linspace(0, part.num_rows, n_files + 1).astype(int)
        for i in range(n_files):
            write_table(
                part.slice(bounds[i], bounds[i + 1] - bounds[i]),
                folder / f"part-{i:05d}.parquet",
                row_group_size=row_group_size,
            )
        rows[name] = part.num_rows
    return rows


def convert(
    src: Path,
    out: Path,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    files: int = 4,
    row_group_size: int = 16384,
) -> dict[str, int]:
    """Converts `src` into `out` (replaced); returns the rows of each split."""
    for key, v in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not 0 <= v < 1:
            raise ValueError(f"{key} ({v}) must be in [0, 1)")
    if val_fraction + test_fraction >= 1:
        raise ValueError("--val-fraction + --test-fraction must be < 1")
    ratings, users, movies = read(Path(src))
    table = build_table(sample_pairs(ratings, movies, seed), users, movies)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    rows = write_splits(
        table,
        split_rows(table.num_rows, (val_fraction, test_fraction), seed),
        out,
        files,
        row_group_size,
    )
    (out / "dataset.json").write_text(
        json.dumps(
            {
                "converter": "recsys_moe.data.movielens",
                "source": "MovieLens-100K" if (Path(src) / "u.data").exists() else "MovieLens-1M",
                "seed": seed,
                "rows": rows,
                "ratings": int(len(ratings)),
                "table_sizes": TABLE_SIZES,
            },
            indent=2,
        )
    )
    (out / "_SUCCESS").touch()
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, type=Path, help="ml-100k or ml-1m folder")
    p.add_argument("--out", required=True, type=Path, help="output folder (replaced)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--files", type=int, default=4, help="Parquet files per split")
    p.add_argument("--row-group-size", type=int, default=16384)
    a = p.parse_args(argv)
    try:
        rows = convert(
            a.src, a.out, a.seed, a.val_fraction, a.test_fraction, a.files, a.row_group_size
        )
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    print(f"wrote {rows} rows to {a.out}; train with: data=movielens data.path={a.out}")


if __name__ == "__main__":
    main()
