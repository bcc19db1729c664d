"""Where checkpoints go and when a checkpoint counts: saving, pruning, finding the latest, loading.

    <run dir>/checkpoints/step_00000500/      one complete checkpoint: DCP's .metadata and
                                               __<rank>_<n>.distcp files, config.yaml (the run's
                                               resolved config) and meta.json (step, layout, and
                                               the sha256 of every other file)
    <run dir>/checkpoints/latest               the name of the newest complete one

A save writes into step_<N>.tmp/ and only when every rank has written (and meta.json lists the
files' hashes) is it renamed to step_<N>/ and `latest` replaced (a file rename: atomic), so a
kill during a save leaves the previous checkpoint loadable and `latest` pointing at it; the
.tmp leftovers are removed by the next run. With checkpoint.async_save the files are written by
a background thread (DCP's async_save, on a process group of its own) while training goes on;
the rename follows when it completes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.staging import BlockingAsyncStager

from recsys_moe.checkpoint.state import Part
from recsys_moe.config.schema import CheckpointConfig
from recsys_moe.distributed.parallel_dims import ParallelDims

log = logging.getLogger(__name__)

# 2: the task towers and heads stored stacked (modules/mlp.py, TaskTowers); format 1's
# per-task tensors do not load into it
FORMAT = 2
LATEST = "latest"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupted, or does not fit this run."""


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def resolve(path: str | Path) -> Path:
    """A checkpoint directory (it holds meta.json), or the complete checkpoint that a
    checkpoints/ folder or a run dir names in its `latest`."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    for folder in (path, path / "checkpoints"):
        pointer = folder / LATEST
        if pointer.is_file():
            name = pointer.read_text().strip()
            target = folder / name
            if not name or not (target / "meta.json").is_file():
                raise CheckpointError(
                    f"{pointer} names '{name}', which is not a complete checkpoint "
                    f"(no {target / 'meta.json'})"
                )
            return target
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    raise CheckpointError(
        f"{path}: neither a checkpoint (no meta.json) nor a run dir with checkpoints/{LATEST}"
    )


def latest(root: Path) -> Optional[Path]:
    """The checkpoint `root/latest` names, if complete (None: there is none)."""
    f = Path(root) / LATEST
    if not f.is_file():
        return None
    path = Path(root) / f.read_text().strip()
    return path if (path / "meta.json").is_file() else None


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / 'meta.json'}: cannot be read ({e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')}, not {FORMAT}")
    return meta


def write_meta(path: Path, step: int, extra: Mapping[str, Any], hashes: bool = True) -> None:
    """meta.json of a checkpoint whose other files are all written: the step, `extra`, and
    the sha256 of every file (or "" for each when `hashes` is off)."""
    files = sorted(p.name for p in Path(path).iterdir() if p.is_file() and p.name != "meta.json")
    meta = {
        "format": FORMAT,
        "step": step,
        "time": time.time(),
        **extra,
        "files": {name: sha256_file(path / name) if hashes else "" for name in files},
    }
    (Path(path) / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def verify(path: Path, meta: Mapping[str, Any]) -> None:
    """Every file meta.json lists has the sha256 it had when saved (and exists)."""
    for name, digest in meta["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from the checkpoint")
        if sha256_file(f) != digest:
            raise CheckpointError(f"{f}: sha256 differs from meta.json's: the file is corrupted")


def sha256_file(path: Path) -> str:
    """The file's sha256, hex (read in 4 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_sizes(path: Path) -> dict[str, torch.Size]:
    """Each key's global shape (JSON entries: their byte length), from DCP's metadata."""
    md = FileSystemReader(str(path)).read_metadata()
    return {k: getattr(v, "size", torch.Size([])) for k, v in md.state_dict_metadata.items()}


class Checkpointer:
    """Saves and loads the training state `parts` (prefix -> Part) of one run.

    Example:
        >>> ckpt = Checkpointer(cfg.checkpoint, run_dir, dims, parts, config_yaml)
        >>> path = ckpt.resume_path()          # None: start fresh
        >>> ckpt.load(path) if path else None
        >>> ckpt.save(step)                    # every rank; returns once it is written (sync)
    """

    def __init__(
        self,
        cfg: CheckpointConfig,
        run_dir: Path,
        dims: ParallelDims,
        parts: dict[str, Part],
        config_yaml: str,
        meta: Optional[dict[str, Any]] = None,
    ) -> None:
        for key, value, low in (
            ("checkpoint.keep", cfg.keep, 1),
            ("checkpoint.every_steps", cfg.every_steps, 0),
        ):
            if value < low:
                raise ValueError(f"{key} ({value}) must be >= {low}")
        self.cfg, self.dims, self.parts = cfg, dims, parts
        self.root = Path(run_dir) / "checkpoints"
        self.config_yaml = config_yaml
        self.meta = dict(meta or {})
        self._pending: Optional[tuple[Future, Path, Path, int]] = None
        self._group: Optional[dist.ProcessGroup] = None
        if cfg.async_save and dims.world_size > 1:
            # the background writer's collectives must not interleave with training's
            self._group = dist.new_group(backend="gloo")
        self.last_save_s = 0.0  # how long the last save blocked training
        if dims.is_main and self.root.is_dir():
            for tmp in self.root.glob("*.tmp"):  # left by a run killed while saving
                shutil.rmtree(tmp, ignore_errors=True)
        if dims.world_size > 1:
            dist.barrier(group=dims.world_group)

    # -- finding ---------------------------------------------------------------------------------

    def latest(self) -> Optional[Path]:
        return latest(self.root)

    def due(self, step: int) -> bool:
        return self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0

    # -- saving ------------------------------------------------------------------------------------

    def save(self, step: int) -> None:
        """Writes the state of every part at `step` (a collective: every rank calls it)."""
        t0 = time.perf_counter()
        self.wait()  # one save in flight at a time
        final = step_dir(self.root, step)
        tmp = final.with_name(final.name + ".tmp")
        if self.dims.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        if self.dims.world_size > 1:
            dist.barrier(group=self.dims.world_group)
        state = {
            f"{prefix}.{k}": v
            for prefix, part in self.parts.items()
            for k, v in part.state_dict().items()
        }
        if self.cfg.async_save:
            # a CPU copy first (BlockingAsyncStager: it copies TorchRec's ShardedTensors, which
            # DCP's default stager cannot), then the files are written in the background
            future = dcp.async_save(
                state,
                checkpoint_id=str(tmp),
                process_group=self._group,
                async_stager=BlockingAsyncStager(),
            )
            if not isinstance(future, Future):  # an AsyncSaveResponse
                future = future.upload_completion
            self._pending = (future, tmp, final, step)
        else:
            dcp.save(state, checkpoint_id=str(tmp))
            self._commit(tmp, final, step)
        self.last_save_s = time.perf_counter() - t0

    def wait(self) -> None:
        """Completes an asynchronous save in flight (renames it, updates latest)."""
        if self._pending is None:
            return
        future, tmp, final, step = self._pending
        self._pending = None
        future.result()
        self._commit(tmp, final, step)

    def poll(self) -> None:
        """Commits an asynchronous save that has finished (cheap when none is pending)."""
        if self._pending is not None and self._pending[0].done():
            self.wait()

    def _commit(self, tmp: Path, final: Path, step: int) -> None:
        """Rank 0, once every rank has written: meta.json with the files' hashes, the rename,
        `latest`, the pruning. DCP's save returns on every rank after the coordinator wrote
        .metadata, which it does only once every rank's files are written."""
        if self.dims.is_main:
            (tmp / "config.yaml").write_text(self.config_yaml)
            extra = {"world_size": self.dims.world_size, "ep_size": self.dims.ep, **self.meta}
            write_meta(tmp, step, extra, hashes=self.cfg.verify)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer = self.root / (LATEST + ".tmp")
            pointer.write_text(final.name + "\n")
            os.replace(pointer, self.root / LATEST)
            self._prune(final)
            log.info("checkpoint at step %d: %s", step, final)
        if self.dims.world_size > 1 and not self.cfg.async_save:
            dist.barrier(group=self.dims.world_group)  # nobody reads it before it is complete

    def _prune(self, newest: Path) -> None:
        done = sorted(p for p in self.root.glob("step_*") if not p.name.endswith(".tmp"))
        for old in done[: max(0, len(done) - self.cfg.keep)]:
            if old != newest:
                shutil.rmtree(old, ignore_errors=True)

    # -- loading -----------------------------------------------------------------------------------

    def load(self, path: Path, parts: Optional[list[str]] = None) -> dict[str, Any]:
        """Loads `parts` (default: all) from the checkpoint at `path` into the live state;
        returns its meta.json. A collective: every rank calls it."""
        path = Path(path)
        meta = read_meta(path)
        if self.cfg.verify and any(meta["files"].values()):
            error = None
            if self.dims.is_main:
                try:
                    verify(path, meta)
                except CheckpointError as e:
                    error = str(e)
            if self.dims.world_size > 1:
                box = [error]
                dist.broadcast_object_list(box, src=0, group=self.dims.world_group)
                error = box[0]
            if error:
                raise CheckpointError(error)
        sizes = checkpoint_sizes(path)
        names = parts or list(self.parts)
        targets: dict[str, Any] = {}
        for prefix in names:
            mine = {k[len(prefix) + 1 :]: v for k, v in sizes.items() if k.startswith(prefix + ".")}
            for k, v in self.parts[prefix].load_targets(mine).items():
                targets[f"{prefix}.{k}"] = v
        dcp.load(targets, checkpoint_id=str(path))
        for prefix in names:
            filled = {
                k[len(prefix) + 1 :]: v for k, v in targets.items() if k.startswith(prefix + ".")
            }
            self.parts[prefix].load_state_dict(filled)
        log.info("loaded %s from %s (step %d)", ", ".join(names), path, meta["step"])
        return meta

    def close(self) -> None:
        self.wait()
        if self._group is not None and dist.is_initialized():
            dist.destroy_process_group(self._group)  # the background writer's own group
        self._group = None
