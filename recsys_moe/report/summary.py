"""Per-run metrics and the sweep summary: mean and standard error per configuration over seeds.

    python -m recsys_moe.report.summary SWEEP_DIR [--baseline model/gate=softmax]

writes SWEEP_DIR/summary.csv (every metric) and SWEEP_DIR/summary.md (the headline metrics; with
--baseline, also differences to that configuration paired by seed). A Hydra multirun writes the
same files when it ends (recsys_moe.config.callbacks.SweepSummary, set in conf/train.yaml).

A configuration is a run's overrides less its seed (trainer.seed) and less the overrides every
run of the sweep shares; runs of one configuration are its seeds. The standard error is the
sample standard deviation over seeds / sqrt(n).
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from recsys_moe.report.runs import Run, load_sweep

SEED_KEYS = ("trainer.seed",)
TASK_METRICS = ("auc", "accuracy", "log_loss", "rmse", "mae")
LOWER_IS_BETTER = ("log_loss", "rmse", "mae", "mse", "loss", "selection_changes", "across")


def run_metrics(run: Run) -> dict[str, float]:
    """The numbers a sweep compares, from one finished run (flat keys, all floats):
    - <task>/<metric>: final eval auc, accuracy, log_loss (binary); rmse, mae (regression);
    - tasks/mean_<metric>: the mean over tasks, and tasks/mean_mse (mean of rmse^2: the test
      loss of the paper's synthetic benchmark); eval/loss (the weighted eval loss);
    - gate/active_experts (mean over tasks of experts with nonzero weight per example),
      gate/max_active_experts (the most on any example, any task), gate/saturated_fraction;
    - gate/cluster_overlap_within and _across (tasks with a `cluster` in the data config):
      the mean over pairs of tasks of sum_e min(w_s,e, w_t,e), w the tasks' mean eval weights:
      1 when two tasks use the same experts in the same proportions, 0 when they share none;
    - gate/selection_changes and gate/selection_changes_last_quarter (static gates): training
      steps at which a task's selected experts changed, mean over tasks, over the run and over
      its last quarter (log windows ending after 3/4 of the steps: has the selection settled?);
    - train/samples_per_sec.
    """
    s = run.summary or {}
    out: dict[str, float] = {}
    names = run.task_names
    per_metric: dict[str, list[float]] = {}
    for t in names:
        for m in TASK_METRICS:
            v = s.get(f"eval/{t}/{m}")
            if v is not None:
                out[f"{t}/{m}"] = float(v)
                per_metric.setdefault(m, []).append(float(v))
        if s.get(f"eval/{t}/rmse") is not None:
            per_metric.setdefault("mse", []).append(float(s[f"eval/{t}/rmse"]) ** 2)
    for m, values in per_metric.items():
        out[f"tasks/mean_{m}"] = sum(values) / len(values)
    for key in ("eval/loss", "train/samples_per_sec"):
        if s.get(key) is not None:
            out[key] = float(s[key])

    def gate(t: str, k: str) -> Optional[float]:
        v = s.get(f"eval/gate/{t}/{k}")
        return None if v is None else float(v)

    active = [v for t in names if (v := gate(t, "active_experts")) is not None]
    if active:
        out["gate/active_experts"] = sum(active) / len(active)
    most = [v for t in names if (v := gate(t, "max_active_experts")) is not None]
    if most:
        out["gate/max_active_experts"] = max(most)
    sat = [v for t in names if (v := gate(t, "saturated_fraction")) is not None]
    if sat:
        out["gate/saturated_fraction"] = sum(sat) / len(sat)
    out.update(cluster_overlap(run))
    out.update(selection_changes(run))
    return out


def mean_weights(run: Run) -> dict[str, list[float]]:
    """task -> its mean eval weight per expert (from summary.json)."""
    s = run.summary or {}
    out = {}
    for t in run.task_names:
        w = [s.get(f"eval/gate/{t}/weight/{e}") for e in range(run.num_experts)]
        if all(v is not None for v in w) and w:
            out[t] = [float(v) for v in w]
    return out


def cluster_overlap(run: Run) -> dict[str, float]:
    clusters = run.clusters
    weights = mean_weights(run)
    names = [t for t in run.task_names if t in clusters and t in weights]
    within, across = [], []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            overlap = sum(min(x, y) for x, y in zip(weights[a], weights[b]))
            (within if clusters[a] == clusters[b] else across).append(overlap)
    out = {}
    if within:
        out["gate/cluster_overlap_within"] = sum(within) / len(within)
    if across:
        out["gate/cluster_overlap_across"] = sum(across) / len(across)
    return out


def selection_changes(run: Run) -> dict[str, float]:
    names = run.task_names
    total_steps = float((run.summary or {}).get("step", 0.0))
    keys = [f"gate/{t}/selection_changes" for t in names]
    records = [r for r in run.records if all(k in r for k in keys)]
    if not records or not names:
        return {}

    def mean_changes(rs: list[dict]) -> float:
        return sum(sum(r[k] for k in keys) for r in rs) / len(keys)

    return {
        "gate/selection_changes": mean_changes(records),
        "gate/selection_changes_last_quarter": mean_changes(
            [r for r in records if r["step"] > 0.75 * total_steps]
        ),
    }


# ---------------------------------------------------------------------------------- sweeps


@dataclass
class ConfigStats:
    """One configuration of a sweep: its seeds and, per metric, the values in seed order."""

    label: str
    seeds: list[str] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)
    failed: int = 0

    def mean(self, metric: str) -> float:
        v = self.values.get(metric, [])
        return sum(v) / len(v) if v else math.nan

    def se(self, metric: str) -> float:
        v = self.values.get(metric, [])
        if len(v) < 2:
            return math.nan
        m = sum(v) / len(v)
        return math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1) / len(v))


@dataclass
class SweepSummary:
    configs: list[ConfigStats]
    common: list[str]  # overrides every run shares
    metrics: list[str]  # every metric some run has, in first-seen order
    headline: list[str]  # the ones summary.md shows


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.lstrip("+~").partition("=")
    return key, value


def summarize(runs: Sequence[Run]) -> SweepSummary:
    """Groups the runs into configurations (overrides less seeds and shared ones)."""
    shared = set(runs[0].overrides) if runs else set()
    for r in runs[1:]:
        shared &= set(r.overrides)
    by_label: dict[str, ConfigStats] = {}
    metrics: list[str] = []
    for r in runs:
        own = [o for o in r.overrides if o not in shared and _split(o)[0] not in SEED_KEYS]
        label = " ".join(own) or "(all runs)"
        seed = ",".join(_split(o)[1] for o in r.overrides if _split(o)[0] in SEED_KEYS)
        stats = by_label.setdefault(label, ConfigStats(label))
        if not r.finished:
            stats.failed += 1
            continue
        stats.seeds.append(seed or str(r.config.get("trainer", {}).get("seed", "")))
        for k, v in run_metrics(r).items():
            if k not in metrics:
                metrics.append(k)
            stats.values.setdefault(k, []).append(v)
    finished = [r for r in runs if r.finished]
    return SweepSummary(
        list(by_label.values()),
        sorted(shared),
        metrics,
        headline_metrics(finished[0], metrics) if finished else [],
    )


def headline_metrics(run: Run, metrics: Sequence[str]) -> list[str]:
    """Per task for a few tasks (auc and accuracy for binary ones, rmse for regression ones),
    task means for many; then the gates' sparsity and expert-selection numbers."""
    names = run.task_names
    if len(names) <= 4:
        wanted = [f"{t}/{m}" for t in names for m in ("auc", "accuracy", "rmse")]
    else:
        wanted = ["tasks/mean_mse", "tasks/mean_auc", "tasks/mean_accuracy"]
    wanted += [
        "gate/active_experts",
        "gate/cluster_overlap_within",
        "gate/cluster_overlap_across",
        "gate/selection_changes",
        "gate/selection_changes_last_quarter",
    ]
    return [m for m in wanted if m in metrics]


def fmt(mean: float, se: float) -> str:
    if math.isnan(mean):
        return "-"
    digits = 4 if abs(mean) < 10 else 1  # counts (selection changes) need no 4 decimals
    if math.isnan(se):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def markdown_table(summary: SweepSummary, metrics: Optional[Sequence[str]] = None) -> str:
    metrics = list(metrics or summary.headline)
    head = ["configuration", "n", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in summary.configs:
        n = f"{len(c.seeds)}" + (f" ({c.failed} failed)" if c.failed else "")
        cells = [c.label, n, *(fmt(c.mean(m), c.se(m)) for m in metrics)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_differences(
    summary: SweepSummary, baseline: str, metrics: Optional[Sequence[str]] = None
) -> str:
    """Markdown: per configuration, mean ± s.e. of (its value - the baseline's), paired by
    seed over the seeds both have."""
    metrics = list(metrics or summary.headline)
    base = next((c for c in summary.configs if c.label == baseline), None)
    if base is None:
        labels = [c.label for c in summary.configs]
        raise ValueError(f"--baseline ({baseline}): no such configuration (have: {labels})")
    head = ["configuration minus " + baseline, "seeds", *metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in summary.configs:
        if c is base:
            continue
        common = [s for s in c.seeds if s in base.seeds]
        cells = [c.label, str(len(common))]
        for m in metrics:
            diffs = ConfigStats("d")
            mine = dict(zip(c.seeds, c.values.get(m, [])))
            theirs = dict(zip(base.seeds, base.values.get(m, [])))
            diffs.values["d"] = [mine[s] - theirs[s] for s in common if s in mine and s in theirs]
            cells.append(fmt(diffs.mean("d"), diffs.se("d")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(
    sweep_dir: Path, baseline: Optional[str] = None, strict_baseline: bool = True
) -> tuple[Path, Path]:
    """summary.csv (every metric: mean, se and n per configuration) and summary.md.

    A baseline that is not one of the configurations raises (ValueError), or, with
    strict_baseline=False (a sweep config's default baseline that the command line overrode,
    e.g. sweep=gates model/gate=dselect_k), leaves the paired differences out, saying why in
    summary.md."""
    sweep_dir = Path(sweep_dir)
    summary = summarize(load_sweep(sweep_dir))
    missing = None
    if baseline and all(c.label != baseline for c in summary.configs):
        labels = [c.label for c in summary.configs]
        missing = f"baseline {baseline} is not one of the configurations (have: {labels})"
        if strict_baseline:
            raise ValueError(f"--baseline ({baseline}): no such configuration (have: {labels})")
    csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["configuration", "n", "failed", "seeds"]
            + [f"{m}_{s}" for m in summary.metrics for s in ("mean", "se")]
        )
        for c in summary.configs:
            row: list = [c.label, len(c.seeds), c.failed, " ".join(c.seeds)]
            for m in summary.metrics:
                row += [_num(c.mean(m)), _num(c.se(m))]
            w.writerow(row)
    parts = [
        f"# Sweep summary: {sweep_dir}",
        "",
        "Mean ± standard error over seeds (sample standard deviation / sqrt(n)).",
        "Overrides shared by every run: " + (" ".join(summary.common) or "none") + ".",
        "",
        markdown_table(summary),
    ]
    if missing:
        parts += ["", f"No differences paired by seed: {missing}."]
    elif baseline:
        parts += ["", "Paired by seed:", "", paired_differences(summary, baseline)]
    md_path.write_text("\n".join(parts) + "\n")
    return csv_path, md_path


def _num(v: float) -> str:
    return "" if math.isnan(v) else repr(v)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Sweep summary: mean ± s.e. per configuration.")
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--baseline", help="a configuration label, e.g. model/gate=softmax")
    a = p.parse_args(argv)
    try:
        csv_path, md_path = write_summary(a.sweep_dir, a.baseline)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    print(md_path.read_text())
    print(f"wrote {csv_path} and {md_path}")


if __name__ == "__main__":
    main()
