"""Training with each gate, on data where the outcome is known: DSelect-k ends k-sparse on every
example, Top-k keeps exactly k, softmax stays dense; lambda follows the trainer's steps; the
telemetry keys reach metrics.jsonl and summary.json; the heatmap PNG is drawn at the end (by
default) or at every eval."""

from __future__ import annotations

import json
import math

import pytest

from recsys_moe.config.schema import ExpertCompute, GateType, HeatmapWhen
from tests.tests_support import train_run


@pytest.mark.parametrize("gate", [GateType.dselect_k, GateType.topk, GateType.softmax])
def test_gates_end_as_sparse_as_they_promise(tiny_train_config, tmp_path, gate):
    cfg = tiny_train_config
    g = cfg.model.gate
    g.type = gate
    if gate != GateType.softmax:
        g.k = 2
    if gate == GateType.dselect_k:  # keys only DSelect-k uses (the others reject them)
        g.gamma, g.entropy_reg = 0.5, 3.0
        # the default schedule: lambda 0 for half the run, then a ramp over a tenth of it
        g.entropy_start_fraction, g.entropy_warmup_fraction = 0.5, 0.1
    cfg.model.num_experts = 6  # not a power of two: DSelect-k's reachability term is active
    cfg.model.expert_compute = ExpertCompute.auto
    # 23 steps per epoch; DSelect-k needs 92 steps to harden, the others show themselves in 23
    cfg.trainer.epochs = 4 if gate == GateType.dselect_k else 1
    if gate == GateType.dselect_k:
        cfg.logger.gate_heatmap = HeatmapWhen.every_eval
    cfg.trainer.eval_every = 40 if gate == GateType.dselect_k else 10
    cfg.trainer.log_every = 1
    summary = train_run(cfg, tmp_path)
    names = [t.name for t in cfg.data.tasks]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 23 * cfg.trainer.epochs + 1))
    assert all(f"gate/{n}/active_experts" in r for r in train for n in names)
    for n in names:
        active = summary[f"eval/gate/{n}/active_experts"]
        most = summary[f"eval/gate/{n}/max_active_experts"]
        if gate == GateType.softmax:
            assert active == most == 6.0  # dense: every expert on every example
        elif gate == GateType.topk:
            assert active == most == 2.0  # exactly k, always
        else:
            # dense while lambda is 0, k-sparse on every eval example at the end
            assert train[0][f"gate/{n}/active_experts"] == 6.0
            assert most <= 2.0 and summary[f"eval/gate/{n}/saturated_fraction"] == 1.0
        assert sum(summary[f"eval/gate/{n}/weight/{e}"] for e in range(6)) == pytest.approx(
            1.0, abs=1e-6
        )
    if gate == GateType.dselect_k:
        # lambda follows the optimizer step of a 92-step run: 0 before step 46, then
        # 3 * (step - 46) / 9.2 up to 3 (record r logs the step r - 1 trained at)
        lam = [r[f"gate/{names[0]}/entropy_reg"] for r in train]
        want = [3.0 * min(1.0, max(0.0, (r - 1 - 46) / 9.2)) for r in range(1, 93)]
        assert lam == pytest.approx(want, abs=1e-6)
    heatmaps = sorted((tmp_path / "gates").glob("heatmap_step*.png"))
    if gate == GateType.dselect_k:  # every_eval: steps 40, 80 and 92
        assert [h.name for h in heatmaps] == [f"heatmap_step{s:07d}.png" for s in (40, 80, 92)]
    else:  # the default, end: evals at steps 10, 20 and 23 draw one, at the last
        assert [h.name for h in heatmaps] == ["heatmap_step0000023.png"]
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


def test_gate_telemetry_stride_is_checked(tiny_train_config, tmp_path):
    from recsys_moe.trainer import Trainer

    tiny_train_config.logger.gate_telemetry_every = 0
    with pytest.raises(ValueError, match=r"logger\.gate_telemetry_every \(0\) must be >= 1"):
        Trainer(tiny_train_config, tmp_path)
