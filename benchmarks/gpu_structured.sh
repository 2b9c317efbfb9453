#!/usr/bin/env bash
# Structured output's cost per decode step on one H200 (issue 16): bench_structured.py, 8B
# shape, batch 1 and 16, eager and CUDA graphs, plus the GPU test of the masked sampler.
# On the device machine (repo root; .devsite carried: ray-bundle.tar.xz, the llguidance wheel
# `pip download llguidance==1.9.1 --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux_2_31_x86_64 -d .devsite/`, and optionally head.tar.gz = `git archive
# HEAD ringserve kernels actors benchmarks tests | gzip`, a committed snapshot to measure):
#   bash benchmarks/gpu_structured.sh [bench_structured.py args]   (SKIP_TESTS=1: the benchmark alone)
# Writes logs and JSON under $OUT (or /tmp/out). About 5-7 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
mkdir -p /tmp/site
if [ -f .devsite/ray-bundle.tar.xz ]; then tar xJf .devsite/ray-bundle.tar.xz -C /tmp/site; fi
export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PATH=/tmp/site/bin:$PATH
WHL=$(ls .devsite/llguidance-*.whl 2>/dev/null | head -1)
[ -n "$WHL" ] || { echo "llguidance wheel missing in .devsite/"; exit 2; }
python3 -m zipfile -e "$WHL" /tmp/site   # a wheel is a zip of the package: no pip, no network
if [ -f .devsite/head.tar.gz ]; then  # measure a commit, not a tree others edit
  rm -rf /tmp/head && mkdir -p /tmp/head && tar xzf .devsite/head.tar.gz -C /tmp/head; REPO=/tmp/head
fi
mkdir -p /tmp/pkg && rm -rf /tmp/pkg/ringserve && cp -r "$REPO/ringserve" /tmp/pkg/ringserve \
  && cp -r "$REPO/kernels" /tmp/pkg/ringserve/kernels && cp -r "$REPO/actors" /tmp/pkg/ringserve/actors
export RAY_USAGE_STATS_ENABLED=0 PYTHONPATH=/tmp/pkg:$PYTHONPATH
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
cd /tmp   # Ray puts the driver's cwd on the actors' sys.path: not the bare repo root
if [ -z "${SKIP_TESTS:-}" ]; then   # SKIP_TESTS=1: the benchmark alone
timeout 60 python3 -m pytest -q -rf -p no:cacheprovider "$REPO/tests/test_kernels_gpu.py" \
  -k merge_splits > "$OUT/test_merge_gpu.log" 2>&1   # the one-launch merges in bf16 (~20 s)
grep -E "^FAILED|passed|failed" "$OUT/test_merge_gpu.log" | tail -3
timeout ${TEST_TIMEOUT:-120} python3 -m pytest -q -rf -p no:cacheprovider "$REPO/tests/test_structured.py" \
  -k "sampler or penalties or cuda_graphs" > "$OUT/test_structured_gpu.log" 2>&1
grep -E "^FAILED|^ERROR|passed|failed" "$OUT/test_structured_gpu.log" | tail -6
fi
timeout ${BENCH_TIMEOUT:-480} python3 "$REPO/benchmarks/bench_structured.py" --json "$OUT/bench_structured.json" \
  "$@" 2>&1 | tee "$OUT/bench_structured.log" | grep -E '^\[structured\]|^\||Error'
