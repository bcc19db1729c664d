"""Exports a training checkpoint as a single-device inference artifact.

    python -m recsys_moe.export CKPT OUT [--expert-compute dense|sparse|auto]   (or: recsys-moe-export)

CKPT is a checkpoint directory (DCP files, config.yaml, meta.json) or a run directory, whose
checkpoints/latest names its latest checkpoint. OUT, a new directory, receives
weights.safetensors, config.yaml and manifest.json (recsys_moe.inference.artifact). No process
group is needed: a checkpoint written by any number of ranks is read on one process.

Exit code: 0 when written; 1 when the checkpoint cannot be exported (the message names the file
or key); 2 for a usage error.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from recsys_moe.config.schema import ExpertCompute


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m recsys_moe.export",
        description="Exports a checkpoint (or a run directory's latest) as an inference artifact.",
    )
    p.add_argument("checkpoint", help="a checkpoint directory, or a run directory")
    p.add_argument("out", help="the artifact directory to write (must not exist)")
    p.add_argument(
        "--expert-compute",
        choices=[e.value for e in ExpertCompute],
        default=ExpertCompute.dense.value,
        help="the artifact's default expert compute: dense (every expert on every example), "
        "sparse (exact: only the experts a gate selects), auto (as in training); default dense",
    )
    a = p.parse_args(argv)

    from recsys_moe.inference import ArtifactError, CheckpointError, export_checkpoint

    try:
        out = export_checkpoint(a.checkpoint, a.out, ExpertCompute(a.expert_compute))
    except (ArtifactError, CheckpointError, FileExistsError, OSError) as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 1
    print(f"wrote the inference artifact {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
