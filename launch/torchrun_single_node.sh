#!/usr/bin/env bash
# One node, one process per GPU (or NPROC processes on CPU with gloo).
#   launch/torchrun_single_node.sh [hydra overrides...]
#   NPROC=2 launch/torchrun_single_node.sh trainer.device=cpu
# All ranks must write to one run dir, so it is fixed here once (Hydra's ${now:} could differ
# between ranks that start in different seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
source launch/env.sh  # allocator settings (memory cost: see the file)
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$($PY -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
RUN_DIR=${RUN_DIR:-outputs/$(date +%Y-%m-%d/%H-%M-%S)}
# MAX_RESTARTS: a rank that dies restarts the job from its last checkpoint, that many times.
exec $PY -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
  --max_restarts="${MAX_RESTARTS:-0}" \
  -m recsys_moe.train hydra.run.dir="$RUN_DIR" "$@"
