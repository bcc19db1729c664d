"""Training with each gate: telemetry keys in metrics.jsonl / summary.json, heatmaps on disk."""

from __future__ import annotations

import json

import pytest

from recsys_moe.config.schema import ExpertCompute, GateType
from tests.tests_support import train_run


@pytest.mark.parametrize("gate", [GateType.dselect_k, GateType.topk, GateType.softmax])
def test_gate_telemetry_is_logged(tiny_train_config, tmp_path, gate):
    cfg = tiny_train_config
    cfg.model.gate.type = gate
    cfg.model.gate.entropy_reg = 0.5
    cfg.model.num_experts = 6  # not a power of two: DSelect-k's reachability term is active
    cfg.model.expert_compute = ExpertCompute.auto
    cfg.trainer.eval_every = 10
    summary = train_run(cfg, tmp_path)
    names = [t.name for t in cfg.data.tasks]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert train and all(f"gate/{n}/active_experts" in r for r in train for n in names)
    for n in names:
        active = summary[f"eval/gate/{n}/active_experts"]
        if gate == GateType.topk:
            assert active == 2.0  # exactly k, always
        elif gate == GateType.softmax:
            assert active == 6.0
        else:
            assert 1.0 <= active <= 6.0
            assert 0.0 <= summary[f"eval/gate/{n}/saturated_fraction"] <= 1.0
        assert sum(summary[f"eval/gate/{n}/weight/{e}"] for e in range(6)) == pytest.approx(
            1.0, abs=0.05
        )
        assert 0.0 <= summary[f"eval/gate/{n}/selected/0"] <= 1.0
    assert all(0.0 <= summary[f"eval/expert/{e}/load"] <= 1.0 for e in range(6))
    heatmaps = sorted((tmp_path / "gates").glob("heatmap_step*.png"))
    assert len(heatmaps) >= 2  # every eval writes one
    if gate == GateType.softmax:
        assert "eval/moe/sparse_fraction" in summary and summary["eval/moe/sparse_fraction"] == 0.0
