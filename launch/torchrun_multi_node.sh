#!/usr/bin/env bash
# Many nodes: run this on every node with the same MASTER_ADDR, NNODES and RUN_DIR (on a shared
# file system); NODE_RANK = 0 .. NNODES-1 (c10d rendezvous assigns the ranks).
#   MASTER_ADDR=node0 NNODES=2 NODE_RANK=0 RUN_DIR=/shared/runs/exp1 launch/torchrun_multi_node.sh
#   NPROC=4 ... launch/torchrun_multi_node.sh parallel.ep_size=4 model.num_experts=16
# A rank that dies stops the job on every node (torchrun); one that hangs is stopped by
# trainer.collective_timeout_s. MAX_RESTARTS restarts the whole job that many times.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
source launch/env.sh  # allocator settings (memory cost: see the file)
: "${MASTER_ADDR:?set MASTER_ADDR to the address of the first node}"
: "${NNODES:?set NNODES to the number of nodes}"
: "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1)}"
: "${RUN_DIR:?set RUN_DIR to a folder every node can write}"
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$($PY -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
exec $PY -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" \
  --nproc_per_node="$NPROC" --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" \
  --rdzv_id="${RDZV_ID:-recsys_moe}" --max_restarts="${MAX_RESTARTS:-0}" \
  -m recsys_moe.train hydra.run.dir="$RUN_DIR" "$@"
