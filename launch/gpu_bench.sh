#!/usr/bin/env bash
# One short GPU check (about 5 minutes on one GPU), for a machine with CUDA torch, fbgemm-gpu and
# torchrec installed (make install TORCH_INDEX=...): the trunk's bf16 TFLOPS against the device's
# peak, the CUDA-path tests, and the trainer ratios on the GPU. Results go to $OUT (default
# outputs/gpu_bench).
#   launch/gpu_bench.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/gpu_bench}
mkdir -p "$OUT"
source launch/env.sh
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
for b in 16384 65536 262144; do
  $PY -m recsys_moe.bench.trunk --device cuda --batch $b --out "$OUT/trunk_b$b.json"
done
$PY -m recsys_moe.bench.trunk --device cuda --batch 65536 --override model.num_experts=64 \
  --out "$OUT/trunk_n64.json"
# the batched expert kernel (auto takes per_expert on GPU, where only it has been measured)
$PY -m recsys_moe.bench.trunk --device cuda --batch 65536 --override model.expert_kernel=batched \
  --out "$OUT/trunk_b65536_batched.json"
timeout 240 $PY -m pytest -q tests/distributed/test_cuda_paths.py 2>&1 | tail -5 | tee "$OUT/cuda_tests.txt"
timeout 300 $PY -m recsys_moe.bench.trainer --device cuda --rounds 5 \
  --override trainer.precision=bf16 --out "$OUT/bench_trainer_cuda.json" 2>&1 | tail -12
