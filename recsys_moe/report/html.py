"""One self-contained HTML page for a run or a sweep directory (PNG figures inlined as base64).

Numbers in tables carry their exact value in a `data-value` attribute next to the rounded text,
so a reader (or a test) can check them against summary.json.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from recsys_moe.report import figures
from recsys_moe.report.runs import Run, is_sweep, load_run, load_sweep
from recsys_moe.report.summary import TASK_METRICS, SweepSummary, fmt, run_metrics, summarize

STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def _img(png: Optional[bytes], alt: str, shown: dict[str, bytes]) -> str:
    """An inlined PNG; `shown` collects every figure of the page by title."""
    if png is None:
        return ""
    shown[alt] = png
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _cell(v: Optional[float], digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "<td>-</td>"
    return f'<td data-value="{v!r}">{v:.{digits}f}</td>'


def _page(title: str, body: Sequence[str]) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>" + "\n".join(body) + "</body></html>\n"
    )


def task_table(run: Run) -> str:
    """Final eval metrics per task, from summary.json (ids: the summary keys)."""
    s = run.summary or {}
    metrics = [
        m
        for m in (*TASK_METRICS, "rmse_baseline", "rows")
        if any(f"eval/{t}/{m}" in s for t in run.task_names)
    ]
    rows = [
        "<table class='tasks'><tr><th>task</th>"
        + "".join(f"<th>{m}</th>" for m in metrics)
        + "<th>active experts / example</th></tr>"
    ]
    for t in run.task_names:
        cells = "".join(_cell(s.get(f"eval/{t}/{m}"), 0 if m == "rows" else 4) for m in metrics)
        cells += _cell(s.get(f"eval/gate/{t}/active_experts"), 3)
        rows.append(f"<tr data-task='{html.escape(t)}'><td>{html.escape(t)}</td>{cells}</tr>")
    rows.append("</table>")
    return "\n".join(rows)


def run_page(run: Run, shown: dict[str, bytes]) -> str:
    cfg = run.config
    gate = cfg.get("model", {}).get("gate", {})
    s = run.summary or {}
    body = [
        f"<p>Run directory <code>{html.escape(str(run.path))}</code>. "
        f"{len(run.task_names)} tasks, {run.num_experts} experts, gate "
        f"<code>{html.escape(str(gate.get('type')))}</code> "
        f"({'per example' if gate.get('per_example', True) else 'static'}), seed "
        f"{cfg.get('trainer', {}).get('seed')}; "
        + (f"finished at step {int(s['step'])}" if "step" in s else "<b>not finished</b>")
        + (
            f", {s['train/samples_per_sec']:.0f} train samples/s"
            if s.get("train/samples_per_sec")
            else ""
        )
        + ". Overrides: <code>"
        + html.escape(" ".join(run.overrides) or "none")
        + "</code>.</p>",
    ]
    if run.summary is not None:
        body += ["<h2>Final evaluation</h2>", task_table(run)]
        derived = run_metrics(run)
        keys = [k for k in derived if k.startswith(("gate/", "tasks/", "eval/loss"))]
        if keys:
            body.append("<table class='derived'><tr><th>metric</th><th>value</th></tr>")
            body += [f"<tr><td>{html.escape(k)}</td>{_cell(derived[k])}</tr>" for k in keys]
            body.append("</table>")
    for title, png in (
        ("Training loss", figures.training_loss(run)),
        ("Evaluation metrics over steps", figures.eval_metrics(run)),
        ("Gate telemetry over steps", figures.gate_telemetry(run)),
        ("Task x expert mean weights (eval)", figures.heatmaps(run)),
        ("Throughput", figures.throughput(run)),
    ):
        if png is not None:
            body += [f"<h2>{title}</h2>", _img(png, title, shown)]
    return _page(f"recsys_moe run: {run.path.name}", body)


def summary_table(summary: SweepSummary, metrics: Sequence[str]) -> str:
    rows = [
        "<table class='sweep'><tr><th>configuration</th><th>n</th>"
        + "".join(f"<th>{html.escape(m)}</th>" for m in metrics)
        + "</tr>"
    ]
    for c in summary.configs:
        cells = ""
        for m in metrics:
            mean, se = c.mean(m), c.se(m)
            attrs = (
                "" if math.isnan(mean) else f' data-metric="{html.escape(m)}" data-mean="{mean!r}"'
            )
            attrs += "" if math.isnan(se) else f' data-se="{se!r}"'
            cells += f"<td{attrs}>{html.escape(fmt(mean, se))}</td>"
        n = f"{len(c.seeds)}" + (f" ({c.failed} failed)" if c.failed else "")
        rows.append(
            f"<tr data-config='{html.escape(c.label)}'><td>{html.escape(c.label)}</td>"
            f"<td>{n}</td>{cells}</tr>"
        )
    rows.append("</table>")
    return "\n".join(rows)


def sweep_page(path: Path, runs: Sequence[Run], shown: dict[str, bytes]) -> str:
    summary = summarize(runs)
    body = [
        f"<p>Sweep directory <code>{html.escape(str(path))}</code>: {len(runs)} runs in "
        f"{len(summary.configs)} configurations. Mean ± standard error over seeds. Overrides "
        "shared by every run: <code>"
        + html.escape(" ".join(summary.common) or "none")
        + "</code>.</p>",
        "<h2>Comparison</h2>",
        summary_table(summary, summary.headline),
        _img(figures.sweep_bars(summary, summary.headline), "comparison with error bars", shown),
        "<h2>Runs</h2><table><tr><th>run</th><th>configuration</th><th>seed</th><th>step</th></tr>",
    ]
    for r in runs:
        step = (r.summary or {}).get("step")
        body.append(
            f"<tr><td>{html.escape(r.path.name)}</td><td>{html.escape(' '.join(r.overrides))}</td>"
            f"<td>{r.config.get('trainer', {}).get('seed')}</td>"
            + (_cell(step, 0) if step is not None else "<td>failed</td>")
            + "</tr>"
        )
    body.append("</table>")
    return _page(f"recsys_moe sweep: {path.name}", body)


def render(path: Path, out: Optional[Path] = None, figures_dir: Optional[Path] = None) -> Path:
    """Writes the report of a run or sweep directory to `out` (default DIR/report.html), and
    each of its figures as a PNG file into `figures_dir` when given."""
    path = Path(path)
    shown: dict[str, bytes] = {}
    if is_sweep(path):
        page = sweep_page(path, load_sweep(path), shown)
    else:
        page = run_page(load_run(path), shown)
    out = Path(out) if out is not None else path / "report.html"
    out.write_text(page)
    if figures_dir is not None:
        Path(figures_dir).mkdir(parents=True, exist_ok=True)
        for title, png in shown.items():
            slug = "".join(c if c.isalnum() else "_" for c in title.lower()).strip("_")
            (Path(figures_dir) / f"{slug}.png").write_bytes(png)
    return out
