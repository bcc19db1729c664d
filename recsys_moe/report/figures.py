"""The report's figures (matplotlib, Agg backend), each returned as PNG bytes.

Every function takes what recsys_moe.report.runs reads from a run directory and returns None when
the run logged nothing to draw (e.g. no eval yet), so the report simply leaves it out.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from recsys_moe.report.runs import Run  # noqa: E402
from recsys_moe.report.summary import SweepSummary  # noqa: E402

MAX_LINES = 8  # above this many tasks, curves show the mean over tasks (and the range)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _series(records: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _per_task(ax, records: Sequence[dict], tasks: Sequence[str], pattern: str, label: str) -> bool:
    """Lines of `pattern.format(task=t)` per task, or their mean and range for many tasks."""
    series = {t: _series(records, pattern.format(task=t)) for t in tasks}
    series = {t: s for t, s in series.items() if s[0]}
    if not series:
        return False
    if len(series) <= MAX_LINES:
        for t, (x, y) in series.items():
            ax.plot(x, y, marker="." if len(x) < 30 else None, label=t)
        ax.legend(fontsize=7, ncol=2)
    else:
        steps = sorted(set.intersection(*(set(x) for x, _ in series.values())))
        rows = [[dict(zip(x, y))[s] for s in steps] for x, y in series.values()]
        mean = [sum(c) / len(c) for c in zip(*rows)]
        ax.plot(steps, mean, label=f"mean over {len(series)} tasks")
        ax.fill_between(
            steps,
            [min(c) for c in zip(*rows)],
            [max(c) for c in zip(*rows)],
            alpha=0.2,
            label="min to max",
        )
        ax.legend(fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    return True


def training_loss(run: Run) -> Optional[bytes]:
    train = [r for r in run.records if "train/loss" in r]
    if not train:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    x, y = _series(train, "train/loss")
    axes[0].plot(x, y)
    axes[0].set(xlabel="step", ylabel="train loss (weighted sum + gate regularisers)")
    axes[0].grid(alpha=0.3)
    _per_task(axes[1], train, run.task_names, "train/{task}/loss", "train loss per task")
    return _png(fig)


def eval_metrics(run: Run) -> Optional[bytes]:
    evals = [r for r in run.records if any(k.startswith("eval/") for k in r)]
    kinds = [
        m
        for m in ("auc", "accuracy", "rmse", "log_loss")
        if any(f"eval/{t}/{m}" in r for r in evals for t in run.task_names)
    ]
    if not evals or not kinds:
        return None
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 3.2), squeeze=False)
    for ax, m in zip(axes[0], kinds):
        _per_task(ax, evals, run.task_names, "eval/{task}/" + m, f"eval {m}")
    return _png(fig)


def gate_telemetry(run: Run) -> Optional[bytes]:
    """Active experts per example and (DSelect-k) saturated fraction and lambda, over steps."""
    train = [r for r in run.records if "train/loss" in r]
    names = run.task_names
    panels = [("gate/{task}/active_experts", "active experts per example (train)")]
    if any(f"gate/{t}/saturated_fraction" in r for r in train for t in names):
        panels.append(("gate/{task}/saturated_fraction", "saturated selectors (train)"))
    if any(f"gate/{t}/selection_changes" in r for r in train for t in names):
        panels.append(("gate/{task}/selection_changes", "selection changes per log window"))
    if any(f"gate/{t}/entropy_reg" in r for r in train for t in names):
        panels.append(("gate/{task}/entropy_reg", "entropy regulariser lambda"))
    if not train:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    drawn = [_per_task(ax, train, names, key, label) for ax, (key, label) in zip(axes[0], panels)]
    if not any(drawn):
        plt.close(fig)
        return None
    return _png(fig)


def heatmaps(run: Run, max_panels: int = 4) -> Optional[bytes]:
    """Task x expert mean eval weights at up to `max_panels` evaluations (the last included)."""
    names, n = run.task_names, run.num_experts
    evals = [
        r
        for r in run.records
        if names
        and n
        and all(f"eval/gate/{t}/weight/{e}" in r for t in names[:1] for e in range(n))
    ]
    if not evals:
        return None
    clusters = run.clusters
    if clusters:  # tasks of one cluster next to each other: shared experts show as blocks
        names = sorted(names, key=lambda t: (clusters.get(t, ""), t))
    labels = [f"{t} ({clusters[t]})" if t in clusters else t for t in names]
    idx = sorted({round(i * (len(evals) - 1) / max(1, max_panels - 1)) for i in range(max_panels)})
    picked = [evals[i] for i in idx]
    height = min(9.0, max(2.2, 0.22 * len(names) + 1.2))  # 128 tasks: a row is a pixel band
    fig, axes = plt.subplots(1, len(picked), figsize=(3.6 * len(picked) + 1, height), squeeze=False)
    for i, (ax, r) in enumerate(zip(axes[0], picked)):
        w = [[float(r.get(f"eval/gate/{t}/weight/{e}", math.nan)) for e in range(n)] for t in names]
        im = ax.imshow(w, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_title(f"step {r['step']}", fontsize=9)
        ax.set_xlabel("expert")
        if i > 0:
            ax.set_yticks([])  # the first panel names the tasks
        elif len(names) <= 32:
            ax.set_yticks(range(len(names)), labels, fontsize=6)
        else:
            ax.set_ylabel(f"{len(names)} tasks" + (", by cluster" if clusters else ""))
    fig.colorbar(im, ax=list(axes[0]), label="mean weight")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def throughput(run: Run) -> Optional[bytes]:
    x, y = _series([r for r in run.records if "train/loss" in r], "train/samples_per_sec")
    if not x:
        return None
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(x, y)
    ax.set(xlabel="step", ylabel="train samples / s (per log window)")
    ax.grid(alpha=0.3)
    return _png(fig)


def sweep_bars(summary: SweepSummary, metrics: Sequence[str]) -> Optional[bytes]:
    """One panel per metric: mean per configuration (dot) with standard-error bars (dots, not
    bars: the axis is zoomed onto the differences, which bars from 0 would hide)."""
    metrics = [m for m in metrics if any(c.values.get(m) for c in summary.configs)]
    if not metrics:
        return None
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    labels = [c.label for c in summary.configs]
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.6 * cols, 0.5 + rows * (2.4 + 0.12 * len(labels))), squeeze=False
    )
    for ax, m in zip(axes.flat, metrics):
        means = [c.mean(m) for c in summary.configs]
        ses = [0.0 if math.isnan(c.se(m)) else c.se(m) for c in summary.configs]
        ax.errorbar(means, range(len(labels)), xerr=ses, fmt="o", capsize=4, color="tab:blue")
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(m, fontsize=9)
        finite = [v for v in means if not math.isnan(v)]
        if finite and min(finite) > 0 and (max(finite) - min(finite)) < 0.2 * max(finite):
            lo = min(v - s for v, s in zip(means, ses) if not math.isnan(v))
            hi = max(v + s for v, s in zip(means, ses) if not math.isnan(v))
            pad = 0.15 * (hi - lo) + 1e-9
            ax.set_xlim(lo - pad, hi + pad)  # zoom: the differences are small
        ax.grid(alpha=0.3, axis="x")
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    return _png(fig)
