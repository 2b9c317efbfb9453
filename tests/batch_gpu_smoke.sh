#!/usr/bin/env bash
# By hand on a 2-GPU host without Ray (device machine): unpack the Ray bundle, start a
# token-auth head, run the batch job with `ray job submit` (the package from PYTHONPATH, not
# --working-dir, which the CPU test covers; device picked from the cluster:
# cuda), check it against LLM on the GPUs, then deploy deploy/serve_config.yaml unchanged
# (/models/model = a tiny checkpoint) and ask it for a completion.
set -euo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p /tmp/site && tar xJf .devsite/ray-bundle.tar.xz -C /tmp/site
# the bundle leaves out the dashboard's web client, but the job server (same process) needs its folder
mkdir -p /tmp/site/ray/dashboard/client/build/static
# the source tree as the installed package: ringserve.kernels / ringserve.actors are package-dir
# mappings in pyproject; mirror them with links in this throwaway copy
ln -sfn ../kernels ringserve/kernels && ln -sfn ../actors ringserve/actors
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH RAY_USAGE_STATS_ENABLED=0
ray stop --force >/dev/null 2>&1 || true   # a Ray left by an earlier try on this (throwaway) machine
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import ray, torch; print('ray', ray.__version__, 'torch', torch.__version__, torch.cuda.device_count(), 'GPUs')"
python3 -c "import sys; sys.path.insert(0, 'tests'); from tinymodels import build_tiny_model; build_tiny_model('/models/model', 'llama', seed=5)" >/dev/null 2>&1
W=/tmp/bw; rm -rf $W; python3 tests/batch_gpu_check.py prepare $W
ray get-auth-token --generate >/dev/null; export RAY_AUTH_MODE=token
ray start --head --num-cpus 8 --disable-usage-stats > "$OUT/ray_start.log" 2>&1 || { tail -30 "$OUT/ray_start.log"; exit 1; }
t0=$(date +%s)
ray job submit --address http://127.0.0.1:8265 --submission-id gpu-batch -- \
  python3 -m ringserve.batch --model /models/model --input $W/docs.jsonl --output $W/results.jsonl \
  --world-size 2 --max-tokens 16 --max-kv-tokens 4096 --prompt-format plain 2>&1 | tee "$OUT/batch_job.log" | grep -E "ringserve.batch|Job '" || true
echo "batch job wall: $(( $(date +%s) - t0 )) s"
cp $W/results.jsonl "$OUT/batch_results.jsonl"
python3 tests/batch_gpu_check.py check $W /models/model 2 2>&1 | tail -3
serve deploy deploy/serve_config.yaml
for i in $(seq 1 120); do curl -sf http://127.0.0.1:8000/ready >/dev/null && break; sleep 2; done
curl -s http://127.0.0.1:8000/ready; echo
curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
  -d '{"model": "model", "prompt": "The harbour at dawn", "max_tokens": 8, "temperature": 0}'; echo
serve status | head -30
ray stop >/dev/null 2>&1 || true
