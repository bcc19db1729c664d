"""Exact metrics against brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recsys_moe.metrics import functional as M


def brute_force_auc(scores, labels, weights):
    num, den = 0.0, 0.0
    for si, yi, wi in zip(scores, labels, weights):
        if yi != 1:
            continue
        for sj, yj, wj in zip(scores, labels, weights):
            if yj != 0:
                continue
            den += wi * wj
            num += wi * wj * (1.0 if si > sj else 0.5 if si == sj else 0.0)
    return num / den


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_pairwise_count_with_ties_and_weights(seed):
    rng = np.random.default_rng(seed)
    n = 200
    scores = rng.integers(0, 15, size=n).astype(np.float64) / 7  # many ties
    labels = (rng.random(n) < 0.4).astype(np.float64)
    weights = rng.uniform(0.1, 2.0, size=n)
    got = M.auc(torch.tensor(scores), torch.tensor(labels), torch.tensor(weights))
    assert got == pytest.approx(brute_force_auc(scores, labels, weights), abs=1e-12)
    unweighted = M.auc(torch.tensor(scores), torch.tensor(labels))
    assert unweighted == pytest.approx(brute_force_auc(scores, labels, np.ones(n)), abs=1e-12)


def test_auc_extremes_and_single_class():
    s = torch.tensor([0.1, 0.2, 0.8, 0.9])
    assert M.auc(s, torch.tensor([0.0, 0.0, 1.0, 1.0])) == 1.0
    assert M.auc(s, torch.tensor([1.0, 1.0, 0.0, 0.0])) == 0.0
    assert M.auc(torch.zeros(4), torch.tensor([0.0, 1.0, 0.0, 1.0])) == 0.5
    assert math.isnan(M.auc(s, torch.ones(4)))


def test_log_loss_rmse_mae_match_formulas():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=50)
    y = (rng.random(50) < 0.5).astype(np.float64)
    w = rng.uniform(0.5, 1.5, size=50)
    p = 1 / (1 + np.exp(-logits))
    expected = -(w * (y * np.log(p) + (1 - y) * np.log(1 - p))).sum() / w.sum()
    assert M.log_loss(torch.tensor(logits), torch.tensor(y), torch.tensor(w)) == pytest.approx(
        expected, rel=1e-10
    )

    pred, target = rng.normal(size=50), rng.normal(size=50)
    assert M.rmse(torch.tensor(pred), torch.tensor(target), torch.tensor(w)) == pytest.approx(
        math.sqrt((w * (pred - target) ** 2).sum() / w.sum()), rel=1e-12
    )
    assert M.mae(torch.tensor(pred), torch.tensor(target)) == pytest.approx(
        np.abs(pred - target).mean(), rel=1e-12
    )


def test_accuracy_thresholds_probabilities_at_one_half_with_weights():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0, 0.0])  # p > 0.5 for rows 0 and 2 only
    y = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])
    assert M.accuracy(logits, y) == pytest.approx(3 / 5)  # rows 0, 3, 4 right
    w = torch.tensor([1.0, 3.0, 1.0, 1.0, 2.0])
    assert M.accuracy(logits, y, w) == pytest.approx((1 + 1 + 2) / 8)
