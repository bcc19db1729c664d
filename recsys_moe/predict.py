"""Scores Parquet data with an inference artifact; the data needs no label columns.

    python -m recsys_moe.predict ARTIFACT DATA OUT [--keep COL ...] [--batch-size N]
                                 [--expert-compute dense|sparse|auto] [--on-bad-rows error|skip]
    (or: recsys-moe-predict)

DATA: a Parquet file, a folder (read recursively) or a glob; local or a pyarrow filesystem URI.
OUT: the Parquet file written: the data config's row id column (unless --no-row-id), the --keep
columns, and pred_<task> for every task (probability for binary tasks, value for regression
tasks), one row per input row in input order (recsys_moe.inference.scoring).

Exit code: 0 when written; 1 for bad input or a bad artifact (the message names the file,
column and row); 2 for a usage error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from recsys_moe.config.schema import BadRows, ExpertCompute


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m recsys_moe.predict",
        description="Scores Parquet data with an inference artifact (recsys_moe.export).",
    )
    p.add_argument("artifact", help="an artifact directory written by recsys_moe.export")
    p.add_argument("data", help="Parquet file, folder or glob (local or a pyarrow URI)")
    p.add_argument("out", help="the Parquet file to write")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per forward (4096)")
    p.add_argument(
        "--keep",
        action="append",
        default=[],
        metavar="COL",
        help="an input column to copy to the output (repeatable)",
    )
    p.add_argument(
        "--no-row-id", action="store_true", help="do not read or copy the config's data.row_id"
    )
    p.add_argument(
        "--expert-compute",
        choices=[e.value for e in ExpertCompute],
        help="overrides the artifact's expert compute (dense unless exported otherwise)",
    )
    p.add_argument(
        "--on-bad-rows",
        choices=[b.value for b in BadRows],
        help="error: stop at the first bad row; skip: leave it out and count it "
        "(default: the artifact's data.on_bad_rows)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.batch_size < 1:
        p.error(f"--batch-size ({a.batch_size}) must be >= 1")

    # torch warns once per process that TorchRec's is_fx_tracing() is ambiguous (as train.py)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    from recsys_moe.data.files import DataError
    from recsys_moe.inference import ArtifactError, format_report, load_artifact, predict_parquet

    try:
        model, meta = load_artifact(
            a.artifact, a.expert_compute and ExpertCompute(a.expert_compute)
        )
        report = predict_parquet(
            model,
            meta,
            a.data,
            a.out,
            batch_size=a.batch_size,
            keep=a.keep,
            row_id=not a.no_row_id,
            on_bad_rows=a.on_bad_rows and BadRows(a.on_bad_rows),
            progress=not a.no_progress,
        )
    except (ArtifactError, DataError, ValueError, OSError) as e:
        print(f"predict failed: {e}", file=sys.stderr)
        return 1
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
