"""Batch prediction: Parquet in (features, no labels needed), Parquet out (one column per task).

Input rows are read in order (files sorted by path, then row groups, then rows) with the
training loader's checks (recsys_moe.data.ordered.OrderedReader): a missing feature column stops
the run naming the file and column; a bad row raises naming file, row group, row and column, or,
under on_bad_rows=skip, is left out of the output and counted per reason; ids hashed into range
(id_policy: hash) are counted per feature.

Output: the carried columns (data.row_id when the config has one, then the columns asked for),
as stored in the input, then pred_<task> (float32) for every task: the probability for binary
tasks, the value for regression tasks. One row per input row that was not left out, in input
order. Written through recsys_moe.data.write (page checksums) to a temporary file renamed when
complete.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections import Counter
from pathlib import Path
from typing import Optional

import pyarrow as pa
import torch
from tqdm import tqdm

from recsys_moe.config.schema import BadRows
from recsys_moe.data.files import locate_split, scan_split
from recsys_moe.data.ordered import OrderedReader
from recsys_moe.data.write import parquet_writer
from recsys_moe.inference.artifact import WEIGHTS, ArtifactMeta
from recsys_moe.models.ranker import MultiTaskRanker
from recsys_moe.modules.heads import predict

ROW_GROUP_ROWS = 65536  # rows per output row group


@dataclasses.dataclass
class PredictReport:
    """What a prediction run read and wrote."""

    out: Path
    files: int  # input files found
    rows_in: int  # rows of the files read (from their footers)
    rows_out: int  # rows written
    skipped_rows: Counter  # reason -> rows of those files left out (on_bad_rows=skip)
    skipped_files: Counter  # reason -> files left out whole (on_bad_rows=skip)
    first: dict[str, str]  # reason -> where its first case is
    hashed_ids: Counter  # feature -> ids hashed into range (id_policy: hash)


def predict_parquet(
    model: MultiTaskRanker,
    meta: ArtifactMeta,
    data: str,
    out: str | Path,
    *,
    batch_size: int = 4096,
    keep: tuple[str, ...] | list[str] = (),
    row_id: bool = True,
    on_bad_rows: Optional[BadRows] = None,
    progress: bool = True,
) -> PredictReport:
    """Scores the Parquet rows at `data` (a file, a folder or a glob; local or a pyarrow URI)
    with `model` and writes them to the Parquet file `out`.

    keep: input columns copied to the output beside the predictions; row_id: also the data
    config's row id column (when it has one); on_bad_rows: the policy for bad input (None: the
    artifact's data.on_bad_rows).
    """
    cfg = meta.data
    if on_bad_rows is not None:
        cfg = dataclasses.replace(cfg, on_bad_rows=BadRows(on_bad_rows))
    if not row_id:
        cfg = dataclasses.replace(cfg, row_id=None)
    carry = list(dict.fromkeys(([cfg.row_id] if cfg.row_id else []) + list(keep)))
    columns = meta.output_columns
    clash = [c for c in carry if c in columns]
    if clash:
        raise ValueError(f"keep: column '{clash[0]}' has the name of a prediction column")

    fs, files = locate_split(".", data, "data")
    features = dataclasses.replace(cfg, tasks=[])  # label columns need not exist
    scan = scan_split(fs, files, features, "data")
    reader = OrderedReader(cfg, fs, scan.units, batch_size, labels=False, carry=carry)
    carried = reader.carried_schema if carry else pa.schema([])
    schema = pa.schema(
        list(carried) + [pa.field(c, pa.float32(), nullable=False) for c in columns],
        metadata={
            "recsys_moe.artifact": str(meta.path),
            "recsys_moe.step": str(meta.step),
            "recsys_moe.weights_sha256": meta.manifest["files"][WEIGHTS]["sha256"],
        },
    )

    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"{out}: is a directory (OUT is the Parquet file to write)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    types = model.task_types
    rows_out = 0
    pending: list[pa.Table] = []
    bar = tqdm(total=scan.total_rows, unit="rows", disable=not progress, desc="predict")
    try:
        with parquet_writer(tmp, schema) as writer, torch.inference_mode():
            for batch, kept in reader:
                raw_BT = model(batch.dense, batch.sparse).raw
                preds = [
                    predict(kind, raw_BT[:, t]).float().numpy() for t, kind in enumerate(types)
                ]
                arrays = ([] if kept is None else list(kept.columns)) + [pa.array(p) for p in preds]
                pending.append(pa.Table.from_arrays(arrays, schema=schema))
                rows_out += batch.batch_size
                if sum(t.num_rows for t in pending) >= ROW_GROUP_ROWS:
                    writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_ROWS)
                    pending = []
                bar.update(batch.batch_size)
            if pending:
                writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_ROWS)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    return PredictReport(
        out=out,
        files=len(files),
        rows_in=scan.total_rows,
        rows_out=rows_out,
        skipped_rows=reader.skipped,
        skipped_files=scan.skipped_files,
        first={**reader.decoder.first_bad, **scan.first},
        hashed_ids=reader.hashed,
    )


def format_report(report: PredictReport) -> str:
    used = report.files - sum(report.skipped_files.values())
    lines = [
        f"wrote {report.rows_out} rows to {report.out} (of {report.rows_in} rows in {used} file(s))"
    ]
    for what, counts in (("file(s)", report.skipped_files), ("row(s)", report.skipped_rows)):
        for reason, n in sorted(counts.items()):
            lines.append(f"  left out: {n} {what} ({reason}); first: {report.first[reason]}")
    if report.hashed_ids:
        hashed = ", ".join(f"{k} {v}" for k, v in sorted(report.hashed_ids.items()))
        lines.append(f"  ids hashed into range (id_policy hash): {hashed}")
    return "\n".join(lines)
