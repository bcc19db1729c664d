#!/usr/bin/env bash
# Many nodes: run this on every node with the same MASTER_ADDR, NNODES and RUN_DIR (on a shared
# file system), and NODE_RANK = 0 .. NNODES-1.
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=0 RUN_DIR=/shared/runs/exp1 launch/torchrun_multi_node.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
: "${MASTER_ADDR:?set MASTER_ADDR to the first node's address}"
: "${NNODES:?set NNODES}"
: "${NODE_RANK:?set NODE_RANK}"
: "${RUN_DIR:?set RUN_DIR to a folder every node can write}"
MASTER_PORT=${MASTER_PORT:-29500}
NPROC=${NPROC:-$($PY -c "import torch; print(max(torch.cuda.device_count(), 1))")}
exec $PY -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" \
  --nproc_per_node="$NPROC" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
  --rdzv_id="${RDZV_ID:-recsys_moe}" \
  -m recsys_moe.train hydra.run.dir="$RUN_DIR" "$@"
