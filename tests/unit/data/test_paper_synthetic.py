"""The many-task generator: clusters of related tasks, determinism, and its data config."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from recsys_moe.data.paper_synthetic import PaperSyntheticSpec, generate, ground_truth, write


def test_tasks_of_one_cluster_are_related_and_others_are_not():
    spec = PaperSyntheticSpec(num_tasks=8, num_clusters=2, relatedness=0.9, noise=0.1)
    w, _, _ = ground_truth(spec)
    cos = w @ w.T  # unit directions: pairwise cosines
    same = np.equal.outer(np.arange(8) % 2, np.arange(8) % 2) & ~np.eye(8, dtype=bool)
    assert np.allclose(np.diag(cos), 1.0)
    # rho^2 = 0.81 from the shared cluster direction, plus (1 - rho^2) v_s . v_t (random
    # unit vectors in 100 dims: |v_s . v_t| is about 0.1)
    assert np.allclose(cos[same], 0.81, atol=0.06)
    assert np.abs(cos[~same & ~np.eye(8, dtype=bool)]).max() < 0.1  # orthogonal clusters
    y = generate(spec, rows=4000, stream=0)
    labels = np.stack([y.column(f"t{t:03d}").to_numpy() for t in range(8)])
    corr = np.corrcoef(labels)
    assert corr[same].min() > 0.5 > 0.2 > np.abs(corr[~same & ~np.eye(8, dtype=bool)]).max()


def test_relatedness_zero_makes_every_task_independent():
    w, _, _ = ground_truth(PaperSyntheticSpec(num_tasks=8, num_clusters=2, relatedness=0.0))
    off = ~np.eye(8, dtype=bool)
    assert np.abs((w @ w.T)[off]).max() < 0.5  # random directions in 100 dims, nothing shared


def test_write_is_deterministic_and_describes_its_columns(tmp_path):
    spec = PaperSyntheticSpec(
        num_tasks=8,
        num_clusters=4,
        num_features=5,
        train_rows=300,
        validation_rows=50,
        test_rows=50,
        files=2,
    )
    write(spec, tmp_path / "a")
    write(spec, tmp_path / "b")
    meta = json.loads((tmp_path / "a" / "dataset.json").read_text())
    cfg = meta["data_config"]
    assert cfg["dense"] == [f"x_{i}" for i in range(5)]
    assert [(t["name"], t["cluster"]) for t in cfg["tasks"][:5]] == [
        ("t000", "c00"),
        ("t001", "c01"),
        ("t002", "c02"),
        ("t003", "c03"),
        ("t004", "c00"),
    ]
    for split, rows in (("train", 300), ("validation", 50), ("test", 50)):
        a = pq.read_table(tmp_path / "a" / split)
        assert a.num_rows == rows and a.equals(pq.read_table(tmp_path / "b" / split))
    train, test = pq.read_table(tmp_path / "a" / "train"), pq.read_table(tmp_path / "a" / "test")
    assert not np.allclose(train.column("x_0").to_numpy()[:50], test.column("x_0").to_numpy())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(num_tasks=10, num_clusters=4),
            "num_tasks (10) must be a multiple of num_clusters (4)",
        ),
        (dict(relatedness=1.5), "relatedness (1.5) must be in [0, 1]"),
        (
            dict(num_clusters=8, num_tasks=8, num_features=8),
            "num_clusters (8) must be < num_features",
        ),
    ],
)
def test_bad_specs_name_the_argument(kwargs, message):
    with pytest.raises(
        ValueError,
        match=message.replace("(", r"\(")
        .replace(")", r"\)")
        .replace("[", r"\[")
        .replace("]", r"\]"),
    ):
        PaperSyntheticSpec(**kwargs).validate()
