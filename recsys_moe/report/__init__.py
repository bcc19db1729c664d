"""Offline reading of run and sweep directories: per-run metrics, sweep summaries (mean and
standard error per configuration), and a self-contained HTML report.

    python -m recsys_moe.report DIR            # DIR/report.html for a run or a sweep directory
    python -m recsys_moe.report.summary DIR    # DIR/summary.csv and DIR/summary.md for a sweep

Everything is read from the directories alone (config.yaml, summary.json, metrics.jsonl and
Hydra's .hydra/overrides.yaml): no data set, no model, no network.
"""
