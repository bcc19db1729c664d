"""The end-of-run warning when DSelect-k's hard_inference rounded many eval selectors: the
metrics are then the rounded gate's, which training never saw."""

from __future__ import annotations

from recsys_moe.config.schema import GateConfig, GateType
from recsys_moe.trainer import rounded_selectors_warning

NAMES = ["click", "rating"]


def _metrics(click: float, rating: float) -> dict[str, float]:
    return {
        "eval/gate/click/saturated_fraction": click,
        "eval/gate/rating/saturated_fraction": rating,
        "eval/click/auc": 0.8,
    }


def test_names_the_tasks_whose_selectors_did_not_saturate_and_the_way_out():
    gate = GateConfig(type=GateType.dselect_k, hard_inference=True)
    msg = rounded_selectors_warning(gate, _metrics(0.9999, 0.577), NAMES)
    assert msg is not None
    assert "rating 57.7%" in msg and "click" not in msg
    assert "model.gate.hard_inference=false" in msg


def test_silent_when_saturated_or_not_rounding():
    assert (
        rounded_selectors_warning(
            GateConfig(type=GateType.dselect_k, hard_inference=True), _metrics(1.0, 0.995), NAMES
        )
        is None
    )
    for gate in (
        GateConfig(type=GateType.dselect_k, hard_inference=False),
        GateConfig(type=GateType.dselect_k),
        GateConfig(type=GateType.topk),
    ):
        assert rounded_selectors_warning(gate, _metrics(0.5, 0.5), NAMES) is None
