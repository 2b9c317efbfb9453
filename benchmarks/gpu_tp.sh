#!/usr/bin/env bash
# The GPU runs of issue 18 (tensor parallelism inside each shard), one device call each:
#   bash benchmarks/gpu_tp.sh check   # 2 GPUs: tests/test_tp_gpu.py (TP and rings over NCCL,
#                                     # captured decode graphs with TP all-reduces)
#   bash benchmarks/gpu_tp.sh tp2     # 2 GPUs: bench_e2e, 8B shape, (t, c) = (2, 1), 128K + 512K
#                                     # (LENGTHS=131072 for 128K alone)
#   bash benchmarks/gpu_tp.sh cp2     # 2 GPUs: the same at (t, c) = (1, 2)
#   bash benchmarks/gpu_tp.sh tp1     # 1 GPU: (1, 1) at 128K: unchanged speed (before TP:
#                                     # 12.3 s prefill, docs/benchmarks.md)
# On the device machine (repo root, .devsite carried as for gpu_serving.sh: ray-bundle.tar.xz,
# optionally head.tar.gz = `git archive HEAD ringserve kernels actors benchmarks tests | gzip`).
# Writes logs and JSON under $OUT (or /tmp/out).
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-check}; shift || true
source benchmarks/gpu_setup.sh
e2e() {  # $1: tag, then bench_e2e arguments
  tag=$1; shift
  timeout 560 python3 "$REPO/benchmarks/bench_e2e.py" --no-hf --decode-tokens 64 --cuda-graphs \
    --json "$OUT/e2e_$tag.json" "$@" 2>&1 | tee "$OUT/e2e_$tag.log" \
    | grep -E '^\[ringserve\] \{|^bench_e2e|^ *[0-9]+ \||Error|error' | tail -8
}
case "$PART" in
  check)
    timeout 560 python3 -m pytest -q -x -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_tp_gpu.py" 2>&1 | tee "$OUT/test_tp_gpu.log" | tail -8 ;;
  tp2) e2e tp2_cp1 --world-size 1 --tp 2 --lengths ${LENGTHS:-131072,524288} ;;
  cp2) e2e tp1_cp2 --world-size 2 --tp 1 --lengths ${LENGTHS:-131072,524288} ;;
  tp1) e2e tp1_cp1 --world-size 1 --tp 1 --lengths 131072 ;;
  *) echo "unknown part $PART"; exit 2 ;;
esac
