"""Gate telemetry from known weights."""

from __future__ import annotations

import pytest
import torch

from recsys_moe.metrics.gates import GateTelemetry, save_heatmap
from recsys_moe.moe.gates.base import GateOutput


def _out(w, **stats):
    values = {k: torch.tensor(v) for k, v in stats.items()}
    return GateOutput(weights=torch.tensor(w), aux_loss=torch.zeros(()), stats_fn=lambda: values)


def test_counts_and_means_over_batches():
    tel = GateTelemetry(["a", "b"], num_experts=3, device=torch.device("cpu"))
    # batch 1: 2 examples; batch 2: 1 example
    tel.update(
        [
            _out([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], saturated_fraction=0.5),
            _out([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]),
        ],
        {"sparse": torch.tensor(1.0)},
    )
    tel.update(
        [_out([[0.0, 1.0, 0.0]], saturated_fraction=1.0), _out([[0.0, 0.0, 1.0]])],
        {"sparse": torch.tensor(0.0)},
    )
    m = tel.compute()
    assert m["gate/a/active_experts"] == pytest.approx((1 + 2 + 1) / 3)
    assert m["gate/b/active_experts"] == pytest.approx(1.0)
    assert m["gate/a/experts_used"] == 2 and m["gate/b/experts_used"] == 1
    assert m["gate/a/max_active_experts"] == 2 and m["gate/b/max_active_experts"] == 1
    assert m["gate/a/selected/0"] == pytest.approx(2 / 3) and m["gate/a/selected/2"] == 0.0
    assert m["gate/a/weight/1"] == pytest.approx(1.5 / 3)
    assert m["gate/a/entropy"] == pytest.approx(
        (0 + 2 * 0.5 * torch.log(torch.tensor(2.0)).item() + 0) / 3
    )
    # mean over examples: batch means weighted by batch size
    assert m["gate/a/saturated_fraction"] == pytest.approx((2 * 0.5 + 1 * 1.0) / 3)
    assert "gate/b/saturated_fraction" not in m
    # expert load: union over tasks per example: ex1 {0,2}, ex2 {0,1,2}, ex3 {1,2}
    assert [m[f"expert/{e}/load"] for e in range(3)] == pytest.approx([2 / 3, 2 / 3, 1.0])
    assert m["moe/sparse_fraction"] == 0.5
    torch.testing.assert_close(
        tel.mean_weights(), torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    )
    tel.reset()
    assert tel.compute() == {}


def test_gate_stats_of_some_batches_only():
    """gate_stats=False: the batch counts in every weight statistic but not in the gates' own
    statistics, which average over the batches that had them (and are never computed)."""
    tel = GateTelemetry(["a"], num_experts=2, device=torch.device("cpu"))

    def never():
        raise AssertionError("stats of a skipped batch were computed")

    skipped = GateOutput(
        weights=torch.tensor([[1.0, 0.0]] * 3), aux_loss=torch.zeros(()), stats_fn=never
    )
    tel.update([skipped], gate_stats=False)
    tel.update([_out([[0.0, 1.0]], saturated_fraction=0.25)])
    m = tel.compute()
    assert m["gate/a/selected/0"] == pytest.approx(3 / 4)  # all 4 examples
    assert m["gate/a/saturated_fraction"] == pytest.approx(0.25)  # the 1 example that had it


def test_weights_of_some_batches_only_but_every_selection_change():
    """weights=False (the trainer's unsampled steps): the batch adds to no statistic, its
    gate stats are never computed, but a static gate's selection change is still counted."""
    tel = GateTelemetry(["a"], num_experts=2, device=torch.device("cpu"), track_selection=True)

    def never():
        raise AssertionError("stats of an unsampled batch were computed")

    tel.update([_out([[1.0, 0.0]] * 2, saturated_fraction=1.0)])
    unsampled = GateOutput(
        weights=torch.tensor([[0.0, 1.0]] * 5), aux_loss=torch.zeros(()), stats_fn=never
    )
    tel.update([unsampled], {"sparse": torch.tensor(1.0)}, weights=False)
    tel.update([_out([[0.0, 1.0]] * 2, saturated_fraction=0.5)], {"sparse": torch.tensor(0.0)})
    m = tel.compute()
    assert m["gate/a/selected/0"] == pytest.approx(2 / 4)  # the 4 sampled examples only
    assert m["gate/a/saturated_fraction"] == pytest.approx(0.75)
    assert m["moe/sparse_fraction"] == 0.0  # the sampled batch's
    assert m["gate/a/selection_changes"] == 1.0  # [1, 0] -> [0, 1] at the unsampled batch


def test_pending_updates_sum_the_same_whenever_they_are_folded(monkeypatch):
    """update() keeps batches and adds them up when read, at most MAX_PENDING at a time: the
    same figures as adding each batch at once (MAX_PENDING 1), also after a reset."""
    g = torch.Generator().manual_seed(0)

    def batch(rows):
        w = torch.rand(rows, 4, generator=g)
        w = w * (w > 0.5)  # some experts off
        w = w / w.sum(1, keepdim=True).clamp_min(1e-9)
        return [
            GateOutput(weights=w, aux_loss=torch.zeros(())),
            GateOutput(weights=w.flip(1), aux_loss=torch.zeros(())),
        ]

    batches = [batch(rows) for rows in (5, 3, 7, 2, 6)]
    moe = [
        {"sparse": torch.tensor(float(i % 2)), "active_fraction": torch.tensor(0.1 * i)}
        for i in range(5)
    ]

    def figures(max_pending):
        monkeypatch.setattr(GateTelemetry, "MAX_PENDING", max_pending)
        tel = GateTelemetry(["a", "b"], num_experts=4, device=torch.device("cpu"))
        tel.update(batches[0], moe[0])
        tel.reset()  # what was pending before a reset is gone
        for b, m in zip(batches, moe):
            tel.update(b, m)
        return tel.compute(), tel.mean_weights()

    (want, want_w), (got, got_w) = figures(1), figures(3)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    torch.testing.assert_close(got_w, want_w, rtol=1e-12, atol=0)
    assert want["expert/0/load"] > 0 and want["moe/sparse_fraction"] == pytest.approx(2 / 5)


def test_heatmap_png(tmp_path):
    path = save_heatmap(
        torch.rand(4, 16), ["click", "like", "watch_time", "rating"], tmp_path / "g" / "h.png", "t"
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
