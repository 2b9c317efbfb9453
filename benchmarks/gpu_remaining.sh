#!/usr/bin/env bash
# The GPU runs still owed by issues 3, 4 and 8, as ONE device call (device time is the scarce
# thing). Not yet run: written at the end of the 2026-11-28 session, after its device time was
# spent. On the device machine (repo root, .devsite carried):
#   bash benchmarks/gpu_remaining.sh [N]      # N GPUs: 2 (default), 4 or 8
# Writes logs and JSON under $OUT (or /tmp/out) and prints the tables last.
set -uo pipefail
cd "$(dirname "$0")/.."
N=${1:-2}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# Ray from the bundle (the device image has none); the source tree as the installed package
if [ -f .devsite/ray-bundle.tar.xz ]; then
  mkdir -p /tmp/site && tar xJf .devsite/ray-bundle.tar.xz -C /tmp/site
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PATH=/tmp/site/bin:$PATH
fi
mkdir -p /tmp/pkg && rm -rf /tmp/pkg/ringserve && cp -r ringserve /tmp/pkg/ringserve \
  && cp -r kernels /tmp/pkg/ringserve/kernels && cp -r actors /tmp/pkg/ringserve/actors
export PYTHONPATH=/tmp/pkg:$PYTHONPATH RAY_USAGE_STATS_ENABLED=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
# issue 3: NCCL exactness (bf16) and deadlines, then the ring benchmark with its own check
python3 -m pytest -q -x tests/test_ring_gpu.py 2>&1 | tee "$OUT/test_ring_gpu.log" | tail -3
python3 benchmarks/bench_ring.py --world "$N" --check --json "$OUT/bench_ring.json" \
  2>&1 | tee "$OUT/bench_ring.log" | tail -40
# issue 4: the lengths not yet measured (512K and the longest that fits), decode with k steps
# per Ray call; run from outside the repo root so `ringserve` resolves to /tmp/pkg
(cd /tmp && python3 "$OLDPWD/benchmarks/bench_e2e.py" --world-size "$N" \
  --lengths 131072,524288,max --decode-steps 8 --no-hf --json "$OUT/bench_e2e.json") \
  2>&1 | tee "$OUT/bench_e2e.log" | tail -20
