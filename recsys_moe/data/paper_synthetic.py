"""Many related regression tasks in clusters (the DSelect-k paper's synthetic benchmark), as Parquet.

    python -m recsys_moe.data.paper_synthetic --out data/paper_synthetic --num-tasks 16
    python -m recsys_moe.train experiment=paper_synthetic data.path=data/paper_synthetic

An MMoE-style generator (Ma et al., KDD 2018) extended from two tasks to many tasks in
clusters, as the DSelect-k paper does to test whether gates recover which tasks belong together:
- inputs x ~ N(0, I_d), d = num_features, written as float32 columns x_0 .. x_{d-1};
- T = num_tasks tasks split into C = num_clusters clusters of equal size, task t in cluster
  t mod C (columns t000, t001, ...; cluster names c00, c01, ...);
- cluster c has a unit direction u_c, the u_c orthonormal; task t in cluster c has
  w_t = rho u_c + sqrt(1 - rho^2) v_t, v_t a random unit vector orthogonal to every u_c;
  rho = relatedness: the linear parts of two tasks of one cluster have correlation about
  rho^2, of different clusters about 0 (MMoE's "task correlation" knob);
- y_t = w_t . x + sum_{j < m} sin(a_cj (w_t . x) + b_cj) + noise * eps, with the m sine
  frequencies a and phases b shared within a cluster (the MMoE nonlinearity), eps ~ N(0, 1).

Splits train / validation / test are drawn independently from the same distribution.
`dataset.json` holds the spec and a `data_config` (dense columns; tasks with their cluster)
that conf/data/paper_synthetic.yaml reads through the `${from_dataset:...}` resolver, so one
data config serves every task count. Deterministic for a seed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_moe.data.synthetic import parse_spec


@dataclass
class PaperSyntheticSpec:
    num_tasks: int = 16
    num_clusters: int = 4
    num_features: int = 100  # MMoE's input dimension
    relatedness: float = 0.9  # rho: how much of a task's direction its cluster shares
    num_sines: int = 3  # m: sine terms of the nonlinearity
    noise: float = 0.1
    train_rows: int = 40_000
    validation_rows: int = 10_000
    test_rows: int = 10_000
    files: int = 2  # Parquet files per split
    row_group_size: int = 8_192
    seed: int = 0

    def validate(self) -> None:
        for key in ("num_tasks", "num_clusters", "num_features", "train_rows", "files"):
            if getattr(self, key) < 1:
                raise ValueError(f"paper_synthetic: {key} ({getattr(self, key)}) must be >= 1")
        for key in ("validation_rows", "test_rows", "num_sines"):
            if getattr(self, key) < 0:
                raise ValueError(f"paper_synthetic: {key} ({getattr(self, key)}) must be >= 0")
        if self.num_tasks % self.num_clusters:
            raise ValueError(
                f"paper_synthetic: num_tasks ({self.num_tasks}) must be a multiple of "
                f"num_clusters ({self.num_clusters})"
            )
        if self.num_clusters >= self.num_features:
            raise ValueError(
                f"paper_synthetic: num_clusters ({self.num_clusters}) must be < num_features "
                f"({self.num_features}) (orthonormal cluster directions)"
            )
        if not 0.0 <= self.relatedness <= 1.0:
            raise ValueError(f"paper_synthetic: relatedness ({self.relatedness}) must be in [0, 1]")


def task_names(spec: PaperSyntheticSpec) -> list[str]:
    return [f"t{t:03d}" for t in range(spec.num_tasks)]


def cluster_of(spec: PaperSyntheticSpec) -> list[str]:
    """The cluster name of each task, in task order (task t is in cluster t mod C)."""
    return [f"c{t % spec.num_clusters:02d}" for t in range(spec.num_tasks)]


def ground_truth(spec: PaperSyntheticSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(w [T, d] task directions, a [C, m] sine frequencies, b [C, m] phases)."""
    spec.validate()
    rng = np.random.default_rng([spec.seed, 0])
    d, C, T = spec.num_features, spec.num_clusters, spec.num_tasks
    basis, _ = np.linalg.qr(rng.normal(size=(d, C)))  # [d, C] orthonormal columns
    u = basis.T  # [C, d]
    v = rng.normal(size=(T, d))
    v -= (v @ basis) @ u  # orthogonal to every cluster direction
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    rho = spec.relatedness
    cluster = np.arange(T) % C
    w = rho * u[cluster] + np.sqrt(1.0 - rho**2) * v
    a = rng.uniform(0.5, 1.5, size=(C, spec.num_sines))
    b = rng.uniform(0.0, 2.0 * np.pi, size=(C, spec.num_sines))
    return w, a, b


def generate(spec: PaperSyntheticSpec, rows: int, stream: int) -> pa.Table:
    """`rows` rows of one split; `stream` picks an independent draw of x and noise."""
    w, a, b = ground_truth(spec)
    rng = np.random.default_rng([spec.seed, 1, stream])
    x = rng.normal(size=(rows, spec.num_features))
    lin = x @ w.T  # [rows, T]
    cluster = np.arange(spec.num_tasks) % spec.num_clusters
    y = lin.copy()
    for j in range(spec.num_sines):
        y += np.sin(a[cluster, j] * lin + b[cluster, j])
    y += spec.noise * rng.normal(size=y.shape)
    cols: dict[str, pa.Array] = {
        f"x_{i}": pa.array(x[:, i].astype(np.float32)) for i in range(spec.num_features)
    }
    for t, name in enumerate(task_names(spec)):
        cols[name] = pa.array(y[:, t].astype(np.float32))
    cols["row_id"] = pa.array(np.arange(rows, dtype=np.int64))
    return pa.table(cols)


def data_config(spec: PaperSyntheticSpec) -> dict:
    """What conf/data/paper_synthetic.yaml takes from dataset.json: columns and tasks."""
    return {
        "dense": [f"x_{i}" for i in range(spec.num_features)],
        "tasks": [
            {"name": n, "type": "regression", "cluster": c}
            for n, c in zip(task_names(spec), cluster_of(spec))
        ],
    }


def write(spec: PaperSyntheticSpec, out: Path) -> None:
    spec.validate()
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    for stream, (split, rows) in enumerate(
        (("train", spec.train_rows), ("validation", spec.validation_rows), ("test", spec.test_rows))
    ):
        folder = out / split
        folder.mkdir(parents=True)
        table = generate(spec, rows, stream)
        bounds = np.linspace(0, rows, min(spec.files, max(rows, 1)) + 1).astype(int)
        for i in range(len(bounds) - 1):
            part = table.slice(bounds[i], bounds[i + 1] - bounds[i])
            pq.write_table(
                part, folder / f"part-{i:05d}.parquet", row_group_size=spec.row_group_size
            )
    (out / "dataset.json").write_text(
        json.dumps(
            {
                "generator": "recsys_moe.data.paper_synthetic",
                "spec": asdict(spec),
                "data_config": data_config(spec),
            },
            indent=2,
        )
    )
    (out / "_SUCCESS").touch()  # written last: a partial folder is never mistaken for data


def main(argv: list[str] | None = None) -> None:
    spec, out = parse_spec(PaperSyntheticSpec, argv, __doc__.split("\n\n")[0])
    write(spec, out)
    print(
        f"wrote {spec.num_tasks} tasks in {spec.num_clusters} clusters: {spec.train_rows} train, "
        f"{spec.validation_rows} validation, {spec.test_rows} test rows to {out}; train with: "
        f"experiment=paper_synthetic data.path={out}"
    )


if __name__ == "__main__":
    main()
