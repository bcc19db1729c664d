"""trainer.precision=bf16 on a CPU without oneDNN's bf16 kernels warns that it is slower than
fp32 there (torch's fallback: 30-100x fp32's time for the trunk's matrix products)."""

from __future__ import annotations

import logging

import pytest

from recsys_moe import trainer as trainer_module
from recsys_moe.config.schema import Precision
from recsys_moe.trainer import Trainer


@pytest.mark.parametrize(
    "precision, kernels, warns",
    [(Precision.bf16, False, True), (Precision.bf16, True, False), (Precision.fp32, False, False)],
)
def test_bf16_without_cpu_kernels_warns(
    tiny_train_config, tmp_path, monkeypatch, caplog, precision, kernels, warns
):
    monkeypatch.setattr(trainer_module, "cpu_bf16_kernels", lambda: kernels)
    tiny_train_config.trainer.precision = precision
    with caplog.at_level(logging.WARNING, logger="recsys_moe.trainer"):
        Trainer(tiny_train_config, tmp_path / "run").close()
    said = [r.getMessage() for r in caplog.records if "oneDNN's bf16 kernels" in r.getMessage()]
    assert len(said) == (1 if warns else 0), said
