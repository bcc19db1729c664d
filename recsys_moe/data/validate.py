"""Checks every row of the train and eval splits, with exactly the trainer's checks, before a run.

    python -m recsys_moe.data.validate [--config-dir DIR] [overrides]     (or: recsys-moe-validate)

Takes the trainer's Hydra overrides (`data=movielens data.path=data/movielens`, or
`--config-dir my_conf data=my_set` for a data config of your own) and composes the same
conf/train.yaml against the same typed schema. Every file's footer goes through the checks the
trainer runs at start-up (recsys_moe.data.files.scan_split) and every row of every row group
through the checks of its batches (recsys_moe.data.parquet.UnitDecoder), reading everything
whatever data.on_bad_rows says. Prints, per split and per reason, the bad files and rows and
where the first one is (file, row group, row, column).

Exit code: 0 when every file and row is good; 1 when anything is bad (under data.on_bad_rows=skip
the trainer would leave it out and count it; under error it would stop there); 2 when the
config does not compose or a split cannot be checked at all (no files, no readable rows).

The Compose API rather than @hydra.main: a check should not create a run directory or log files.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from recsys_moe.config.schema import BadRows, DataConfig
from recsys_moe.data.files import FILE_REASONS, REASONS, DataError, locate_split, scan_split
from recsys_moe.data.parquet import UnitDecoder

CONF = Path(__file__).resolve().parents[2] / "conf"
SPLITS = ("train", "eval")


@dataclass
class SplitReport:
    """What a full pass over one split found."""

    key: str  # config key of the split: data.train or data.eval
    files: int = 0  # Parquet files found
    row_groups: int = 0  # non-empty row groups of the usable files
    rows: int = 0  # rows of the usable files (from their footers), all of them read
    bad_files: Counter = field(default_factory=Counter)  # reason -> files left out
    bad_rows: Counter = field(default_factory=Counter)  # reason -> rows
    first: dict[str, str] = field(default_factory=dict)  # reason -> where its first case is
    hashed_ids: Counter = field(default_factory=Counter)  # feature -> ids hashed into range
    error: Optional[str] = None  # the split cannot be checked at all

    @property
    def ok(self) -> bool:
        return self.error is None and not self.bad_files and not self.bad_rows


def validate_split(cfg: DataConfig, split: str) -> SplitReport:
    """Reads every row of data.<split> through the trainer's checks, leaving nothing out silently."""
    key = f"data.{split}"
    # Under skip every check counts instead of stopping, so one pass finds every bad row.
    lenient = dataclasses.replace(cfg, on_bad_rows=BadRows.skip)
    report = SplitReport(key)
    try:
        fs, files = locate_split(cfg.path, getattr(cfg, split), key)
        report.files = len(files)
        scan = scan_split(fs, files, lenient, key)
    except DataError as e:
        report.error = str(e)
        return report
    report.row_groups, report.rows = len(scan.units), scan.total_rows
    report.bad_files.update(scan.skipped_files)
    report.bad_rows.update({r: n for r, n in scan.skipped_rows.items() if n})
    decoder = UnitDecoder(lenient)
    for unit in scan.units:
        chunk = decoder.read(fs, unit)
        for reason, n in zip(REASONS, chunk.skipped.tolist()):
            if n:
                report.bad_rows[reason] += n
        for f, n in zip(cfg.sparse, chunk.hashed.tolist()):
            if n:
                report.hashed_ids[f.name] += n
    report.first = {**decoder.first_bad, **scan.first}  # a file's problem comes first
    return report


def format_report(report: SplitReport, spec: str) -> str:
    head = f"{report.key} ({spec}): "
    if report.error is not None:
        return head + "cannot be checked: " + report.error
    head += f"{report.files} files, {report.row_groups} row groups, {report.rows} rows: "
    if report.ok:
        lines = [head + "all good"]
    else:
        bad_rows = sum(report.bad_rows.values())
        lines = [head + f"bad: {sum(report.bad_files.values())} file(s), {bad_rows} row(s)"]
        lines.append(f"  {'reason':<18} {'files':>6} {'rows':>9}  first")
        for reason in REASONS:
            if reason in report.bad_files or reason in report.bad_rows:
                files = str(report.bad_files[reason]) if reason in FILE_REASONS else "-"
                rows = report.bad_rows[reason]
                lines.append(f"  {reason:<18} {files:>6} {rows:>9}  {report.first[reason]}")
    if report.hashed_ids:
        hashed = ", ".join(f"{k} {v}" for k, v in sorted(report.hashed_ids.items()))
        lines.append(f"  ids hashed into range (id_policy hash, not bad): {hashed}")
    return "\n".join(lines)


def compose_data_config(overrides: list[str], config_dir: Optional[str] = None) -> DataConfig:
    """data of conf/train.yaml with the trainer's overrides (and a user's config folder)."""
    from hydra import compose, initialize_config_dir

    from recsys_moe.config.store import register, to_typed

    register()
    if config_dir is not None:  # what @hydra.main's --config-dir does: one more search path
        overrides = [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]", *overrides]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_typed(compose("train", overrides=overrides)).data


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m recsys_moe.data.validate",
        description="Checks every file and row of the train and eval splits with the trainer's "
        "checks; exit code 1 when anything is bad.",
    )
    p.add_argument(
        "--config-dir", "-cd", help="a folder of configs of your own (e.g. data/my_set.yaml)"
    )
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for recsys_moe.train")
    a = p.parse_args(argv)
    try:
        cfg = compose_data_config(a.overrides, a.config_dir)
    except Exception as e:  # noqa: BLE001 - Hydra and OmegaConf raise many types, all usage errors
        print(f"the config does not compose: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    reports = [validate_split(cfg, split) for split in SPLITS]
    for report, split in zip(reports, SPLITS):
        print(format_report(report, f"{getattr(cfg, split)} under {cfg.path}"))
    if any(r.error is not None for r in reports):
        return 2
    if all(r.ok for r in reports):
        return 0
    print(
        "bad input: with data.on_bad_rows=error (now: "
        f"{cfg.on_bad_rows.value}) training stops at the first bad row; with skip, bad files and "
        "rows are left out and counted as data/skipped_files/<reason> and data/skipped_rows/<reason>"
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
