"""Loader throughput vs raw pyarrow decoding of the same file, side by side in one process.

    python -m recsys_moe.bench.data --out bench_data.json

Writes one synthetic Parquet file (recsys_moe.data.synthetic: 8 dense, 4 single-valued and 2
multi-valued sparse columns, 4 labels, a mask and a row id), then measures, with the same batch
size and columns:
- raw: ParquetFile.iter_batches over the columns, decoded to Arrow only (page checksums
  verified, as the loader does), single-threaded (one worker's worth of CPU) and with pyarrow's
  thread pool;
- loader: SplitInput producing training Batches (validated, shuffled, KeyedJaggedTensors) with
  data.num_workers = 0, 1 and 2 (worker threads, the default data.worker_type), with 1 and 2
  worker processes (data.worker_type=process), and with shuffling off (1 worker).
Each case runs once per round, --repeats rounds; the JSON holds every run, the median rows/s of
each case and "ratios" (medians over rounds of the ratio within a round), among them
loader_vs_raw_decode = loader (1 worker) / raw (single-threaded); the goal is >= 0.8.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq

from recsys_moe.config.schema import (
    DataConfig,
    ShuffleConfig,
    SparseFeature,
    TaskSpec,
    TaskType,
    WorkerType,
)
from recsys_moe.data.loader import SplitInput
from recsys_moe.data.synthetic import SyntheticSpec, generate
from recsys_moe.data.write import write_table

GOAL = 0.8


def data_config(path: Path, spec: SyntheticSpec, batch_size: int) -> DataConfig:
    """The columns of conf/data/synthetic.yaml, with the spec's table sizes."""
    return DataConfig(
        path=str(path),
        train="train",
        eval="train",
        batch_size=batch_size,
        dense=[f"dense_{i}" for i in range(spec.num_dense)],
        sparse=[
            SparseFeature(name="user_id", num_embeddings=spec.num_users),
            SparseFeature(name="item_id", num_embeddings=spec.num_items),
            SparseFeature(name="item_category", num_embeddings=spec.num_categories),
            SparseFeature(name="device", num_embeddings=spec.num_devices),
            SparseFeature(name="user_history", num_embeddings=spec.num_items, table="item_id"),
            SparseFeature(name="item_tags", num_embeddings=spec.num_tags),
        ],
        tasks=[
            TaskSpec(name="click"),
            TaskSpec(name="like"),
            TaskSpec(name="watch_time", type=TaskType.regression),
            TaskSpec(name="rating", type=TaskType.regression, mask="rating_observed"),
        ],
        row_id="row_id",
        shuffle=ShuffleConfig(),
    )


def raw_decode(path: Path, columns: list[str], batch_size: int, threads: bool) -> int:
    rows = 0
    # Checksums verified as the loader does (files.open_parquet): the same work per page.
    for rb in pq.ParquetFile(path, page_checksum_verification=True).iter_batches(
        batch_size=batch_size, columns=columns, use_threads=threads
    ):
        rows += rb.num_rows
    return rows


def loader_rows(cfg: DataConfig) -> int:
    inp = SplitInput(cfg, "train")
    rows = 0
    for batch, _ in inp.batches():
        rows += batch.batch_size
    return rows


def measure(cases: dict[str, Callable[[], int]], repeats: int) -> dict[str, list[float]]:
    """rows/s of every case in each of `repeats` rounds. Rounds visit the cases in turn, so a
    slow spell of a shared machine hits all of them rather than one."""
    for fn in cases.values():
        fn()  # warm-up: page cache, imports, worker start-up code paths
    rates: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for k, fn in cases.items():
            t0 = time.perf_counter()
            rows = fn()
            rates[k].append(rows / (time.perf_counter() - t0))
    return rates


def run(rows: int, batch_size: int, repeats: int, row_group_size: int) -> dict:
    spec = SyntheticSpec(train_rows=rows, eval_rows=1, row_group_size=row_group_size)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "train").mkdir()
        path = root / "train" / "part-00000.parquet"
        train, _ = generate(spec)
        write_table(train, path, row_group_size=row_group_size)
        cfg = data_config(root, spec, batch_size)
        columns = SplitInput(cfg, "train").decoder.columns
        cases: dict[str, Callable[[], int]] = {
            "raw_decode_1_thread": lambda: raw_decode(path, columns, batch_size, False),
            "raw_decode_threads": lambda: raw_decode(path, columns, batch_size, True),
        }
        for w in (0, 1, 2):
            cases[f"loader_{w}_workers"] = lambda w=w: loader_rows(replace(cfg, num_workers=w))
        for w in (1, 2):
            cases[f"loader_{w}_process_workers"] = lambda w=w: loader_rows(
                replace(cfg, num_workers=w, worker_type=WorkerType.process)
            )
        cases["loader_1_worker_no_shuffle"] = lambda: loader_rows(
            replace(cfg, num_workers=1, shuffle=ShuffleConfig(enabled=False))
        )
        rates = measure(cases, repeats)
    results = {k: {"rows_per_sec": statistics.median(v), "runs": v} for k, v in rates.items()}

    def ratio(k: str, base: str = "raw_decode_1_thread") -> float:
        # median over rounds of the ratio within a round (both measured moments apart)
        return statistics.median(a / b for a, b in zip(rates[k], rates[base]))

    ratios = {
        "loader_vs_raw_decode": ratio("loader_1_workers"),
        "loader_0_workers_vs_raw_decode": ratio("loader_0_workers"),
        "loader_2_workers_vs_raw_decode": ratio("loader_2_workers"),
        "loader_1_process_worker_vs_raw_decode": ratio("loader_1_process_workers"),
        "loader_2_process_workers_vs_raw_decode": ratio("loader_2_process_workers"),
        "loader_no_shuffle_vs_raw_decode": ratio("loader_1_worker_no_shuffle"),
        "raw_threads_vs_raw_1_thread": ratio("raw_decode_threads"),
    }
    return {
        "benchmark": "recsys_moe.bench.data",
        "rows": rows,
        "batch_size": batch_size,
        "row_group_size": row_group_size,
        "repeats": repeats,
        "columns": columns,
        "results": results,
        "ratios": ratios,
        "goal": {"loader_vs_raw_decode": GOAL},
        "meets_goal": ratios["loader_vs_raw_decode"] >= GOAL,
    }


def table(report: dict) -> str:
    lines = [f"{'what':<28} {'rows/s (median)':>16}"]
    for k, v in report["results"].items():
        lines.append(f"{k:<28} {v['rows_per_sec']:>16,.0f}")
    lines.append("")
    for k, v in report["ratios"].items():
        lines.append(f"{k:<40} {v:>6.2f}")
    lines.append(
        f"goal loader_vs_raw_decode >= {GOAL}: {'met' if report['meets_goal'] else 'MISSED'}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="JSON report")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--row-group-size", type=int, default=65536)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    report = run(a.rows, a.batch_size, a.repeats, a.row_group_size)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))


if __name__ == "__main__":
    main()
