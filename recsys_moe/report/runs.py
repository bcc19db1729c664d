"""A run directory as data: its config, final summary, logged records and Hydra overrides."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


@dataclass
class Run:
    """One training run's directory (what recsys_moe.train writes).

    config:    config.yaml (the resolved config of the run)
    summary:   summary.json (final eval metrics), None when the run did not finish
    records:   metrics.jsonl, one dict per logged step or eval
    overrides: the run's command-line overrides (.hydra/overrides.yaml), e.g. ["trainer.seed=3"]
    """

    path: Path
    config: dict[str, Any]
    summary: Optional[dict[str, Any]]
    records: list[dict[str, Any]] = field(default_factory=list)
    overrides: list[str] = field(default_factory=list)

    @property
    def tasks(self) -> list[dict[str, Any]]:
        return list(self.config.get("data", {}).get("tasks") or [])

    @property
    def task_names(self) -> list[str]:
        return [t["name"] for t in self.tasks]

    @property
    def clusters(self) -> dict[str, str]:
        """task -> cluster, for the tasks whose data config names one."""
        return {t["name"]: t["cluster"] for t in self.tasks if t.get("cluster") is not None}

    @property
    def num_experts(self) -> int:
        return int(self.config.get("model", {}).get("num_experts", 0))

    @property
    def finished(self) -> bool:
        return self.summary is not None


def load_run(path: Path) -> Run:
    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{path}: no config.yaml, so not a run directory of recsys_moe.train"
        )
    config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    summary = (
        json.loads((path / "summary.json").read_text())
        if (path / "summary.json").is_file()
        else None
    )
    records = []
    if (path / "metrics.jsonl").is_file():
        records = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines() if x]
    overrides_file = path / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    return Run(path, config, summary, records, list(overrides or []))


def is_sweep(path: Path) -> bool:
    """A sweep directory (Hydra multirun): run directories below it, none of its own."""
    path = Path(path)
    return not (path / "config.yaml").is_file() and any(
        (p / "config.yaml").is_file() for p in path.iterdir() if p.is_dir()
    )


def load_sweep(path: Path) -> list[Run]:
    """The runs of a sweep directory, in job order (sub-folders named by job number first)."""
    path = Path(path)
    dirs = [p for p in path.iterdir() if p.is_dir() and (p / "config.yaml").is_file()]
    dirs.sort(key=lambda p: (0, int(p.name)) if p.name.isdigit() else (1, p.name))
    if not dirs:
        raise FileNotFoundError(f"{path}: no run directories (with config.yaml) below it")
    return [load_run(p) for p in dirs]
