"""Synthetic multi-task ranking data with a hidden ground truth, written as sharded Parquet.

    python -m recsys_moe.data.synthetic --out data/synthetic        (or: recsys-moe-synthetic)

Rows are (user, item, context) impressions:
- dense: `dense_0 .. dense_{F-1}` float32, standard normal;
- sparse, single-valued int64: `user_id`, `item_id`, `item_category` (a function of the item),
  `device`; multi-valued list<int64> of variable length: `user_history` (0..max_history item ids,
  empty lists included) and `item_tags` (1..4 tag ids, a function of the item). User, item,
  history and tag ids follow a power law (Zipf) and are scattered over the id space;
- labels for four tasks in two related clusters: `engagement` = {click (binary), watch_time
  (regression)} and `satisfaction` = {like (binary), rating (regression)}. `rating` exists only on
  clicked rows (bool mask column `rating_observed`; its value elsewhere is 0 and meaningless);
- `row_id` int64: the row's index in its split, for tracing.

Hidden ground truth: every id has a latent vector; a row's latent h concatenates the user, item
(+ category + mean tag), mean history item, device and projected dense latents. Each cluster c
has a direction e_c and each task t in it w_t = rho e_c + sqrt(1 - rho^2) e_t, so tasks of one
cluster share most of their signal (rho = cluster_correlation). A task's score adds a
user-item interaction and a smooth nonlinearity (MMoE-style sin terms) to h . w_t; binary
labels are Bernoulli(sigmoid(sharpness * score + bias)), regression labels score + noise.
Per-task gates therefore have structure to find: experts shared within a cluster.

Deterministic for a seed: the same arguments write the same rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from recsys_moe.data.write import write_table

log = logging.getLogger(__name__)

# task name -> (cluster, type)
TASKS = {
    "click": ("engagement", "binary"),
    "watch_time": ("engagement", "regression"),
    "like": ("satisfaction", "binary"),
    "rating": ("satisfaction", "regression"),
}
MASKS = {"rating": "rating_observed"}  # task -> mask column
MAX_TAGS = 4
INTERACTION_WEIGHT = 0.7  # user x item interaction, relative to the linear term
NONLINEAR_WEIGHT = 0.5  # each sin term, relative to the linear term


@dataclass
class SyntheticSpec:
    train_rows: int = 200_000
    eval_rows: int = 25_000
    train_files: int = 4
    eval_files: int = 2
    row_group_size: int = 8_192
    num_dense: int = 8
    num_users: int = 20_000
    num_items: int = 10_000
    num_categories: int = 100
    num_tags: int = 500
    num_devices: int = 8
    max_history: int = 20
    latent_dim: int = 8
    zipf_exponent: float = 1.1
    cluster_correlation: float = 0.9
    binary_sharpness: float = 2.5
    regression_noise: float = 0.5
    seed: int = 0

    def validate(self) -> None:
        for key in (
            "train_rows",
            "eval_rows",
            "train_files",
            "eval_files",
            "row_group_size",
            "num_dense",
            "num_users",
            "num_items",
            "num_categories",
            "num_tags",
            "num_devices",
            "latent_dim",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"synthetic: {key} ({getattr(self, key)}) must be >= 1")
        if self.max_history < 0:
            raise ValueError(f"synthetic: max_history ({self.max_history}) must be >= 0")
        if not 0.0 <= self.cluster_correlation <= 1.0:
            raise ValueError(
                f"synthetic: cluster_correlation ({self.cluster_correlation}) must be in [0, 1]"
            )


def _zipf_sampler(rng: np.random.Generator, vocab: int, exponent: float):
    """Draws ids with P(rank r) ~ (r + 1)^-exponent; ranks are scattered over [0, vocab)."""
    p = 1.0 / np.arange(1, vocab + 1, dtype=np.float64) ** exponent
    cdf = np.cumsum(p / p.sum())
    perm = rng.permutation(vocab)

    def draw(size: int) -> np.ndarray:
        ranks = np.searchsorted(cdf, rng.random(size), side="right")
        return perm[np.minimum(ranks, vocab - 1)].astype(np.int64)

    return draw


def _segment_mean(vectors: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Mean of consecutive segments of `vectors` [N, L] with the given lengths (0 -> zeros)."""
    ends = np.cumsum(lengths)
    csum = np.concatenate([np.zeros((1, vectors.shape[1])), np.cumsum(vectors, axis=0)])
    sums = csum[ends] - csum[ends - lengths]
    return sums / np.maximum(lengths, 1)[:, None]


def _gather_lists(offsets: np.ndarray, values: np.ndarray, rows: np.ndarray):
    """For each index in rows, the list values[offsets[i]:offsets[i+1]], flattened + lengths."""
    lengths = (offsets[1:] - offsets[:-1])[rows]
    starts = np.repeat(offsets[rows], lengths)
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return values[starts + within], lengths


def generate(spec: SyntheticSpec, truth: dict | None = None) -> tuple[pa.Table, pa.Table]:
    """Draws the train and eval splits (as Arrow tables) from one hidden ground truth.

    If `truth` is a dict, it receives each task's noiseless score per row (train rows first),
    for measuring what the best possible model would reach.
    """
    spec.validate()
    rng = np.random.default_rng(spec.seed)
    L = spec.latent_dim
    n = spec.train_rows + spec.eval_rows

    # Hidden ground truth: latent vectors per id and per-task directions.
    user_lat = rng.normal(size=(spec.num_users, L))
    item_lat = rng.normal(size=(spec.num_items, L))
    cat_lat = rng.normal(size=(spec.num_categories, L))
    tag_lat = rng.normal(size=(spec.num_tags, L))
    dev_lat = rng.normal(size=(spec.num_devices, L))
    dense_proj = rng.normal(size=(spec.num_dense, L)) / np.sqrt(spec.num_dense)
    item_category = rng.integers(spec.num_categories, size=spec.num_items)
    tag_draw = _zipf_sampler(rng, spec.num_tags, spec.zipf_exponent)
    item_tag_len = rng.integers(1, MAX_TAGS + 1, size=spec.num_items)
    item_tag_off = np.concatenate([[0], np.cumsum(item_tag_len)])
    item_tags = tag_draw(int(item_tag_off[-1]))
    device_p = rng.dirichlet(np.ones(spec.num_devices))

    H = 5 * L
    clusters = sorted({c for c, _ in TASKS.values()})
    cluster_dir = {c: _unit(rng.normal(size=H)) for c in clusters}
    rho = spec.cluster_correlation
    task_dir = {
        t: rho * cluster_dir[c] + np.sqrt(1 - rho**2) * _unit(rng.normal(size=H))
        for t, (c, _) in TASKS.items()
    }
    # Every cluster shares one interaction matrix and nonlinearity, so related tasks really share.
    inter = {c: rng.normal(size=(L, L)) / L for c in clusters}
    sin_freq = {c: rng.uniform(0.5, 1.5, size=2) for c in clusters}
    sin_phase = {c: rng.uniform(0, 2 * np.pi, size=2) for c in clusters}

    # Rows.
    users = _zipf_sampler(rng, spec.num_users, spec.zipf_exponent)(n)
    item_draw = _zipf_sampler(rng, spec.num_items, spec.zipf_exponent)
    items = item_draw(n)
    device = rng.choice(spec.num_devices, size=n, p=device_p).astype(np.int64)
    hist_len = rng.integers(0, spec.max_history + 1, size=n)
    history = item_draw(int(hist_len.sum()))
    row_tags, tag_len = _gather_lists(item_tag_off, item_tags, items)
    dense = rng.normal(size=(n, spec.num_dense)).astype(np.float32)

    item_vec = (
        item_lat[items] + cat_lat[item_category[items]] + _segment_mean(tag_lat[row_tags], tag_len)
    )
    h = np.concatenate(
        [
            user_lat[users],
            item_vec / np.sqrt(3),
            _segment_mean(item_lat[history], hist_len),
            dev_lat[device],
            dense @ dense_proj,
        ],
        axis=1,
    )  # [n, H]

    labels: dict[str, np.ndarray] = {}
    for t, (c, kind) in TASKS.items():
        # Each component is standardised before mixing, so every seed gives a task of the same
        # difficulty (the mixture would otherwise be dominated by whichever term drew large).
        lin = _standardise(h @ task_dir[t])
        uv = _standardise(np.einsum("nl,lm,nm->n", user_lat[users], inter[c], item_vec))
        s = _standardise(
            lin
            + INTERACTION_WEIGHT * uv
            + NONLINEAR_WEIGHT * np.sin(sin_freq[c][0] * lin + sin_phase[c][0])
            + NONLINEAR_WEIGHT * np.sin(sin_freq[c][1] * uv + sin_phase[c][1])
        )
        if truth is not None:
            truth[t] = s
        if kind == "binary":
            p = 1.0 / (1.0 + np.exp(-(spec.binary_sharpness * s - 1.0)))  # base rate ~ 0.3
            labels[t] = (rng.random(n) < p).astype(np.float32)
        else:
            labels[t] = (s + spec.regression_noise * rng.normal(size=n)).astype(np.float32)
    observed = labels["click"] > 0.5
    labels["rating"] = np.where(observed, labels["rating"], 0.0).astype(np.float32)

    hist_off = np.concatenate([[0], np.cumsum(hist_len)]).astype(np.int32)
    tag_off = np.concatenate([[0], np.cumsum(tag_len)]).astype(np.int32)
    columns: dict[str, pa.Array] = {}
    for j in range(spec.num_dense):
        columns[f"dense_{j}"] = pa.array(dense[:, j])
    columns["user_id"] = pa.array(users)
    columns["item_id"] = pa.array(items)
    columns["item_category"] = pa.array(item_category[items].astype(np.int64))
    columns["device"] = pa.array(device)
    columns["user_history"] = pa.ListArray.from_arrays(pa.array(hist_off), pa.array(history))
    columns["item_tags"] = pa.ListArray.from_arrays(pa.array(tag_off), pa.array(row_tags))
    for t in TASKS:
        columns[t] = pa.array(labels[t])
    columns["rating_observed"] = pa.array(observed)
    table = pa.table(columns)
    train = table.slice(0, spec.train_rows)
    eval_ = table.slice(spec.train_rows)
    train = train.append_column("row_id", pa.array(np.arange(spec.train_rows, dtype=np.int64)))
    eval_ = eval_.append_column("row_id", pa.array(np.arange(spec.eval_rows, dtype=np.int64)))
    return train, eval_


def _standardise(v: np.ndarray) -> np.ndarray:
    return (v - v.mean()) / v.std()


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def write_split(table: pa.Table, out: Path, num_files: int, row_group_size: int, seed: int) -> None:
    """Writes `table` as num_files Parquet shards of uneven size (as Spark output usually is)."""
    out.mkdir(parents=True, exist_ok=True)
    n = table.num_rows
    num_files = min(num_files, n)
    rng = np.random.default_rng(seed)
    # Uneven shards: cut points drawn uniformly, at least one row per file.
    cuts = (
        np.sort(rng.choice(np.arange(1, n), size=num_files - 1, replace=False))
        if num_files > 1
        else []
    )
    bounds = [0, *[int(c) for c in cuts], n]
    for i in range(num_files):
        part = table.slice(bounds[i], bounds[i + 1] - bounds[i])
        write_table(part, out / f"part-{i:05d}.parquet", row_group_size=row_group_size)


def write(spec: SyntheticSpec, out: Path) -> None:
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    train, eval_ = generate(spec)
    write_split(train, out / "train", spec.train_files, spec.row_group_size, spec.seed + 1)
    write_split(eval_, out / "eval", spec.eval_files, spec.row_group_size, spec.seed + 2)
    (out / "dataset.json").write_text(
        json.dumps({"generator": "recsys_moe.data.synthetic", "spec": asdict(spec)}, indent=2)
    )
    (out / "_SUCCESS").touch()  # written last: a partial folder is never mistaken for data


def parse_spec(spec_type, argv: list[str] | None, description: str):
    """(spec, out) from the command line: --out and one --flag per field of the dataclass
    spec_type (its defaults); a spec that does not validate exits with usage naming the flag."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, type=Path, help="output folder (replaced)")
    for key, value in asdict(spec_type()).items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    spec = spec_type(**args)
    try:
        spec.validate()
    except ValueError as e:
        parser.error(str(e))
    return spec, out


def main(argv: list[str] | None = None) -> None:
    spec, out = parse_spec(SyntheticSpec, argv, __doc__.split("\n\n")[0])
    write(spec, out)
    print(
        f"wrote {spec.train_rows} train rows ({spec.train_files} files) and {spec.eval_rows} eval rows ({spec.eval_files} files) to {out}"
    )


if __name__ == "__main__":
    main()
