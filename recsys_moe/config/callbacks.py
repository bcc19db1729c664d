"""Hydra callbacks (set in conf/train.yaml under hydra.callbacks)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from recsys_moe.report.summary import write_summary

log = logging.getLogger("recsys_moe")


class SweepSummary(Callback):
    """When a multirun ends, writes <sweep dir>/summary.csv and summary.md: mean ± standard
    error over seeds per configuration (recsys_moe.report.summary), optionally with differences
    to a baseline configuration paired by seed."""

    def __init__(self, baseline: Optional[str] = None) -> None:
        self.baseline = baseline

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            # the sweep config's baseline may have been overridden away (sweep=gates
            # model/gate=dselect_k): the summary is written all the same, without the pairs
            csv_path, md_path = write_summary(sweep_dir, self.baseline, strict_baseline=False)
        except (FileNotFoundError, ValueError) as e:  # a summary never fails the sweep
            log.warning("sweep summary not written: %s", e)
            return
        log.info("sweep summary: %s and %s\n%s", csv_path, md_path, md_path.read_text())
