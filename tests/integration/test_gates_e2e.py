"""Training with each gate: telemetry keys in metrics.jsonl / summary.json, heatmaps on disk."""

from __future__ import annotations

import json
import math

import pytest

from recsys_moe.config.schema import ExpertCompute, GateType
from tests.tests_support import train_run


@pytest.mark.parametrize("gate", [GateType.dselect_k, GateType.topk, GateType.softmax])
def test_gate_telemetry_is_logged(tiny_train_config, tmp_path, gate):
    cfg = tiny_train_config
    cfg.model.gate.type = gate
    if gate == GateType.dselect_k:
        cfg.model.gate.entropy_reg = 0.5  # a key only DSelect-k uses (others reject it)
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


@pytest.mark.parametrize(
    "gate, per_example",
    [
        (GateType.dselect_k, True),
        (GateType.dselect_k, False),
        (GateType.topk, True),
        (GateType.softmax, True),
    ],
)
def test_one_expert_trains_with_every_gate(tiny_train_config, tmp_path, gate, per_example):
    cfg = tiny_train_config
    cfg.model.num_experts = 1
    cfg.model.gate.type, cfg.model.gate.per_example = gate, per_example
    if gate != GateType.softmax:
        cfg.model.gate.k = 1
    if gate == GateType.dselect_k:
        cfg.model.gate.entropy_reg = 0.5
    cfg.trainer.max_steps = 6
    summary = train_run(cfg, tmp_path)
    assert summary["step"] == 6
    for task in cfg.data.tasks:
        assert summary[f"eval/gate/{task.name}/active_experts"] == 1.0
        assert summary[f"eval/gate/{task.name}/weight/0"] == pytest.approx(1.0)
    assert all(math.isfinite(v) for k, v in summary.items() if k.startswith("eval/click/"))
