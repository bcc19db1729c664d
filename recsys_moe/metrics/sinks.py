"""Where metrics go: metrics.jsonl / summary.json in the run dir, the console, Weights & Biases.

Every sink receives the same flat keys ("train/loss", "eval/<task>/auc", ...).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from recsys_moe.config.schema import TaskType, WandbConfig

log = logging.getLogger(__name__)


def _jsonable(v: Any) -> Any:
    # JSON has no NaN/Inf: write them as null rather than as invalid JSON.
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricSink:
    """Base sink: log() per logged step or eval, summary() once at the end, close()."""

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_image(self, key: str, path: Path, step: int) -> None: ...

    def summary(self, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlSink(MetricSink):
    """metrics.jsonl: one JSON object per log() call, {"step": N, <flat keys>}; summary.json.

    resume_step: a run resumed from a checkpoint at that step keeps the records up to it and
    drops the later ones (written after the checkpoint by the run that stopped), so the file
    holds each step once.
    """

    def __init__(self, run_dir: Path, resume_step: Optional[int] = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        if resume_step is not None and path.exists():
            _truncate_after(path, resume_step)
        self._file = open(path, "a", buffering=1)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")

    def summary(self, metrics: Mapping[str, float]) -> None:
        payload = {k: _jsonable(v) for k, v in metrics.items()}
        (self.run_dir / "summary.json").write_text(
            json.dumps(payload, indent=2, sort_keys=True) + "\n"
        )

    def close(self) -> None:
        self._file.close()


def _truncate_after(path: Path, step: int) -> None:
    """Keeps the records of steps <= `step` (and a torn last line is dropped); atomic."""
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill that stopped the run
            dropped += 1
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
        else:
            dropped += 1
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    if dropped:
        log.info(
            "%s: %d records after step %d dropped (the run resumes there)", path, dropped, step
        )


def new_run_id() -> str:
    """A W&B run id (8 lowercase letters and digits, as wandb makes them), made before the run
    so a resumed job continues the same W&B run."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class WandbSink(MetricSink):
    """Weights & Biases run. Offline unless configured (logger.wandb.mode or $WANDB_MODE).

    An online run that cannot start (no network, no API key) falls back to offline with a
    warning: monitoring never stops training.
    """

    def __init__(
        self,
        cfg: WandbConfig,
        run_dir: Path,
        config: dict[str, Any],
        run_id: Optional[str] = None,
    ) -> None:
        import wandb

        self._wandb = wandb
        mode = cfg.mode or os.environ.get("WANDB_MODE") or "offline"
        kwargs = dict(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name,
            group=cfg.group,
            tags=list(cfg.tags) or None,
            dir=str(run_dir),
            config=config,
            settings=wandb.Settings(init_timeout=30, console="off", silent=True),
        )
        if run_id is not None:  # a resumed job continues its run (one W&B run per job)
            kwargs.update(id=run_id, resume="allow")
        try:
            self.run = wandb.init(mode=mode, **kwargs)
        except Exception as e:  # noqa: BLE001 - wandb raises many types for network/auth problems
            if mode == "offline":
                raise
            log.warning("W&B %s run could not start (%s); logging offline instead", mode, e)
            mode = "offline"
            self.run = wandb.init(mode=mode, **kwargs)
        self.mode = mode
        log.info("W&B run %s (%s) in %s", self.run.id, mode, run_dir)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        self.run.log({key: self._wandb.Image(str(path))}, step=step)

    def summary(self, metrics: Mapping[str, float]) -> None:
        self.run.summary.update(dict(metrics))

    def close(self) -> None:
        self.run.finish()


def format_task_table(
    metrics: Mapping[str, float],
    names: Sequence[str],
    types: Sequence[TaskType],
    prefix: str = "eval/",
) -> str:
    """A fixed-width per-task table of the eval metrics ('-' where a metric does not apply)."""
    cols = ["auc", "log_loss", "rmse", "rmse_baseline", "mae", "rows"]
    width = max([len("task"), *(len(n) for n in names)])
    lines = [f"{'task':<{width}}  {'type':<10}  " + "  ".join(f"{c:>13}" for c in cols)]
    for name, kind in zip(names, types):
        cells = []
        for c in cols:
            v: Optional[float] = metrics.get(f"{prefix}{name}/{c}")
            cells.append(
                f"{'-':>13}" if v is None else (f"{int(v):>13d}" if c == "rows" else f"{v:>13.4f}")
            )
        lines.append(f"{name:<{width}}  {kind.value:<10}  " + "  ".join(cells))
    return "\n".join(lines)


def format_gate_table(
    metrics: Mapping[str, float], names: Sequence[str], prefix: str = "eval/"
) -> str:
    """Per task: experts active per example, the most on one example, experts used, mixture
    entropy, the fraction of DSelect-k's soft selectors saturated ('-' for other gates), top
    experts."""
    width = max([len("task"), *(len(n) for n in names)])
    lines = [
        f"{'task':<{width}}  active/example  max active  experts_used  entropy  saturated"
        "  top experts (mean weight)"
    ]
    for name in names:
        p = f"{prefix}gate/{name}"
        weights = sorted(
            ((v, k.rsplit("/", 1)[1]) for k, v in metrics.items() if k.startswith(f"{p}/weight/")),
            reverse=True,
        )
        top = ", ".join(f"{e}:{v:.2f}" for v, e in weights[:4] if v >= 0.005)
        nan = float("nan")
        lines.append(
            f"{name:<{width}}  {metrics.get(f'{p}/active_experts', nan):>14.3f}"
            f"  {metrics.get(f'{p}/max_active_experts', nan):>10.0f}"
            f"  {metrics.get(f'{p}/experts_used', nan):>12.0f}"
            f"  {metrics.get(f'{p}/entropy', nan):>7.3f}  {_saturated(metrics.get(f'{p}/saturated_fraction'))}"
            f"  {top}"
        )
    return "\n".join(lines)


def _saturated(fraction: Optional[float]) -> str:
    """DSelect-k's saturated selector fraction as a percentage, 9 wide ('-' when absent)."""
    if fraction is None:
        return f"{'-':>9}"
    return f"{100.0 * fraction:>8.3f}%"
