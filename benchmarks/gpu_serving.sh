#!/usr/bin/env bash
# The GPU runs of the continuous-batching issue, one device call (<= 10 min) per part.
# On the device machine (repo root, .devsite carried: ray-bundle.tar.xz, and old.tar.gz =
# `git archive <commit> ringserve kernels actors benchmarks` of the engine before the rewrite):
#   bash benchmarks/gpu_serving.sh check      # GPU tests of the engine + a 4-layer serving smoke
#   bash benchmarks/gpu_serving.sh baseline   # bench_e2e 128K, world size 1: previous engine vs
#                                             # this one, eager and CUDA graphs, same machine
#   bash benchmarks/gpu_serving.sh serving [args]  # bench_serving.py, 8B shape, all scenarios
#   bash benchmarks/gpu_serving.sh final     # previous engine's bench_e2e 128K, then single+prefill
# Parts s4a..s6b: one session's call each (see the comment of each part). What is still owed,
# in order: benchmarks/GPU_OWED.md.
# Writes logs and JSON under $OUT (or /tmp/out).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PART=${1:-check}; shift || true
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -f .devsite/ray-bundle.tar.xz ]; then
  mkdir -p /tmp/site && tar xJf .devsite/ray-bundle.tar.xz -C /tmp/site
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-} PATH=/tmp/site/bin:$PATH
fi
pkg() {  # $1: source tree, $2: target site dir: the tree as the installed package
  mkdir -p "$2" && rm -rf "$2/ringserve" && cp -r "$1/ringserve" "$2/ringserve" \
    && cp -r "$1/kernels" "$2/ringserve/kernels" && cp -r "$1/actors" "$2/ringserve/actors"
}
if [ -f .devsite/head.tar.gz ]; then  # a committed snapshot (`git archive HEAD ringserve kernels
  # actors benchmarks tests | gzip`): what is measured is a commit, not a tree others edit
  rm -rf /tmp/head && mkdir -p /tmp/head && tar xzf .devsite/head.tar.gz -C /tmp/head
  mkdir -p /tmp/head/.devsite
  cp "$REPO/.devsite/"*.tar.* /tmp/head/.devsite/ 2>/dev/null; REPO=/tmp/head
fi
pkg "$REPO" /tmp/pkg
export RAY_USAGE_STATS_ENABLED=0
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
cd /tmp   # Ray puts the driver's cwd on the actors' sys.path: not the bare repo root
case "$PART" in
  check)
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 300 python3 -m pytest -q -x -p no:cacheprovider \
      "$REPO/tests/test_llm_gpu.py" 2>&1 | tee "$OUT/test_llm_gpu.log" | tail -5
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 240 python3 "$REPO/benchmarks/bench_serving.py" \
      --preset small --doc-len 16384 --prefill-len 65536 --concurrency 1,4,16 \
      --budgets 8192 --json "$OUT/serving_small.json" 2>&1 | tee "$OUT/serving_small.log" \
      | grep -v '^(' ;;
  baseline)
    mkdir -p /tmp/old && tar xzf "$REPO/.devsite/old.tar.gz" -C /tmp/old && pkg /tmp/old /tmp/oldpkg
    for v in old new; do
      for g in "" "--cuda-graphs"; do
        if [ $v = old ]; then P=/tmp/oldpkg; B=/tmp/old/benchmarks; else P=/tmp/pkg; B=$REPO/benchmarks; fi
        tag=$v${g:+_graphs}
        PYTHONPATH=$P:$PYTHONPATH timeout 200 python3 "$B/bench_e2e.py" --world-size 1 \
          --lengths 131072 --no-hf --decode-tokens 64 $g --json "$OUT/e2e_$tag.json" \
          2>&1 | tee "$OUT/e2e_$tag.log" | grep -E '^\[ringserve\] \{|Error|error' | tail -3
      done
    done ;;
  final)   # the previous engine's single-request figures, then the serving scenarios left
    mkdir -p /tmp/old && tar xzf "$REPO/.devsite/old.tar.gz" -C /tmp/old && pkg /tmp/old /tmp/oldpkg
    PYTHONPATH=/tmp/oldpkg:$PYTHONPATH timeout 170 python3 /tmp/old/benchmarks/bench_e2e.py \
      --world-size 1 --lengths 131072 --no-hf --decode-tokens 64 --json "$OUT/e2e_old.json" \
      2>&1 | tee "$OUT/e2e_old.log" | grep -E '^\[ringserve\] \{|Error' | tail -3
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 370 python3 "$REPO/benchmarks/bench_serving.py" \
      --scenarios ${SCENARIOS:-single,mixed,prefill} --budgets ${BUDGETS:-1536} \
      --json "$OUT/bench_serving_final.json" "$@" 2>&1 \
      | tee "$OUT/bench_serving_final.log" | grep -v '^(' ;;
  s4a)   # session 4, first call (2 GPUs): profiles of the eager steps (old vs new engine) on
         # GPU 1 beside the single-request figures of both engines on GPU 0; then world size 2
    mkdir -p /tmp/old && tar xzf "$REPO/.devsite/old.tar.gz" -C /tmp/old && pkg /tmp/old /tmp/oldpkg
    (export CUDA_VISIBLE_DEVICES=1
     [ -n "${SKIP_OLD:-}" ] || PYTHONPATH=/tmp/oldpkg:$PYTHONPATH timeout 150 python3 \
       /tmp/old/benchmarks/profile_decode.py --lengths 32768 --steps 32 \
       > "$OUT/profile_decode_old.log" 2>&1
     PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 150 python3 "$REPO/benchmarks/profile_decode.py" \
       --lengths 32768 --steps 32 > "$OUT/profile_decode_new.log" 2>&1
     PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 200 python3 "$REPO/benchmarks/profile_step.py" \
       --preset llama3-8b --doc-len 131072 --prefill-len 65536 --budget 2048 \
       > "$OUT/profile_step.log" 2>&1) &
    (export CUDA_VISIBLE_DEVICES=0
     [ -n "${SKIP_OLD:-}" ] || PYTHONPATH=/tmp/oldpkg:$PYTHONPATH timeout 170 python3 \
       /tmp/old/benchmarks/bench_e2e.py --world-size 1 --lengths 131072 --no-hf \
       --decode-tokens 64 --json "$OUT/e2e_old.json" > "$OUT/e2e_old.log" 2>&1
     PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 200 python3 "$REPO/benchmarks/bench_serving.py" \
       --scenarios single --json "$OUT/serving_single_ws1.json" > "$OUT/serving_single_ws1.log" 2>&1)
    wait
    grep -E '^\[ringserve\] \{' "$OUT/e2e_old.log" | tail -1
    grep -E '^single|^\[single' "$OUT/serving_single_ws1.log"
    grep -E 'step profile|^decode batch|^prefill|eager .* ms/token' "$OUT"/profile_*.log
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 330 python3 "$REPO/benchmarks/bench_serving.py" \
      --world-size 2 --scenarios single,concurrent,mixed --json "$OUT/serving_ws2.json" 2>&1 \
      | tee "$OUT/serving_ws2.log" | grep -v '^(' | tail -12 ;;
  s4b)   # session 4, second call (one GPU used): GPU tests of the step changes, the single
         # request eager and with graphs, 16 questions with graphs, the prefill under load at
         # the default budget
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 240 python3 -m pytest -q -x -p no:cacheprovider \
      "$REPO/tests/test_llm_gpu.py" -k "graph or shared_document" 2>&1 \
      | tee "$OUT/test_llm_gpu.log" | tail -4
    export CUDA_VISIBLE_DEVICES=0
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 120 python3 "$REPO/benchmarks/bench_serving.py" \
      --scenarios single --json "$OUT/single_eager.json" > "$OUT/single_eager.log" 2>&1
    grep -E '^single' "$OUT/single_eager.log"
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 150 python3 "$REPO/benchmarks/bench_serving.py" \
      --cuda-graphs --scenarios single,concurrent --concurrency 1,16 \
      --json "$OUT/graphs_single_concurrent.json" > "$OUT/graphs_single_concurrent.log" 2>&1
    grep -E '^single|^concurrent' "$OUT/graphs_single_concurrent.log"
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 260 python3 "$REPO/benchmarks/bench_serving.py" \
      --scenarios prefill --budgets 4096 --json "$OUT/prefill_default.json" \
      > "$OUT/prefill_default.log" 2>&1
    grep -E '^prefill|solo prefill' "$OUT/prefill_default.log" ;;
  s5a)   # session 5, second call: the shared-document GPU tests (verbose, timed: in s4b they
         # did not finish inside the step's limit), the fused kernels' bf16 tests, then the
         # prefill under load again after the autotune-key floor and the merge warm-up
    export CUDA_VISIBLE_DEVICES=0
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 250 python3 -m pytest -v -x -p no:cacheprovider \
      -o faulthandler_timeout=170 --durations=0 "$REPO/tests/test_llm_gpu.py" \
      -k "shared_document" 2>&1 | tee "$OUT/test_shared_gpu.log" | grep -E "PASS|FAIL|ERROR|s call|s setup|passed|failed|Timeout|File " | head -40
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 90 python3 -m pytest -q -x -p no:cacheprovider \
      "$REPO/tests/test_kernels_gpu.py" -k fused 2>&1 | tee "$OUT/test_fused_gpu.log" | tail -4
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 220 python3 "$REPO/benchmarks/bench_serving.py" \
      --scenarios prefill --budgets 4096 --json "$OUT/prefill_default.json" \
      > "$OUT/prefill_default.log" 2>&1
    grep -E '^prefill|solo prefill|compiles after|^  [0-9:]+ ' "$OUT/prefill_default.log" ;;
  s5b)   # session 5, third call: the prefill under load (s5a's limit cut it), then the fused
         # kernels under LLM (float32 equality, eager and graphs) and their decode profile
    export CUDA_VISIBLE_DEVICES=0
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 290 python3 "$REPO/benchmarks/bench_serving.py" \
      --scenarios prefill --budgets 4096 --json "$OUT/prefill_default.json" \
      > "$OUT/prefill_default.log" 2>&1
    grep -E '^prefill|solo prefill|compiles after|^  [0-9:]+ ' "$OUT/prefill_default.log"
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 120 python3 -m pytest -q -x -p no:cacheprovider \
      --durations=3 "$REPO/tests/test_llm_gpu.py" -k "fused" 2>&1 \
      | tee "$OUT/test_llm_fused.log" | tail -6
    for f in --fused-kernels ""; do   # fused, then the torch path in the same call
      tag=${f:+fused}; tag=${tag:-torch}
      PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 100 python3 "$REPO/benchmarks/profile_decode.py" \
        --lengths 131072 --steps 24 $f --json "$OUT/profile_decode_$tag.json" \
        > "$OUT/profile_decode_$tag.log" 2>&1
      echo "$tag:"; grep -E 'eager .* ms/token|^ +[0-9]+ \|' "$OUT/profile_decode_$tag.log" | cut -c1-300
    done ;;
  s6a)   # next session, first call (one GPU): the engine's CUDA defaults (graphs + fused
         # kernels) for the single request, 1 and 16 questions, and the 256K prefill under
         # load (with the compile causes printed), one process at a time
    export CUDA_VISIBLE_DEVICES=0
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 200 python3 "$REPO/benchmarks/bench_serving.py" \
      --scenarios single,concurrent --concurrency 1,16 --json "$OUT/defaults_single_concurrent.json" \
      > "$OUT/defaults_single_concurrent.log" 2>&1
    grep -E '^single|^concurrent|features' "$OUT/defaults_single_concurrent.log"
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 330 python3 "$REPO/benchmarks/bench_serving.py" \
      --scenarios prefill --budgets 4096 --json "$OUT/defaults_prefill.json" \
      > "$OUT/defaults_prefill.log" 2>&1
    grep -E '^prefill|solo prefill|compiles after|^  [0-9:]+ |differs from' "$OUT/defaults_prefill.log" | cut -c1-400 ;;
  s6b)   # the fused kernels' decode against the floor at 32K and 512K (graphs and eager)
    export CUDA_VISIBLE_DEVICES=0
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 560 python3 "$REPO/benchmarks/profile_decode.py" \
      --lengths 32768,524288 --steps 24 --fused-kernels --json "$OUT/profile_decode_fused.json" \
      > "$OUT/profile_decode_fused.log" 2>&1
    grep -E 'eager .* ms/token|^ +[0-9]+ \|' "$OUT/profile_decode_fused.log" | cut -c1-300 ;;
  s6c)   # where a late mixed step's time goes (8 decodes + a chunk after 3/4 of a 256K prompt,
         # the LLM's CUDA scheduling): host vs device, the kernels that cost most
    export CUDA_VISIBLE_DEVICES=0
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 570 python3 "$REPO/benchmarks/profile_step.py" \
      --preset llama3-8b --doc-len 131072 --prefill-len 262144 --budget 4096 \
      > "$OUT/profile_step_256k.log" 2>&1
    grep -E '^decode batch|^prefill|late mixed step' "$OUT/profile_step_256k.log" | cut -c1-300 ;;
  s6d)   # session 6, fourth call: after the per-bucket warm-up compiles, the multi-run
         # prefix views and the allocator's run continuation: the single request, then the
         # 256K prefill under load at three budgets (the trade-off curve; the default is chosen
         # from it), with the compile causes printed
    export CUDA_VISIBLE_DEVICES=0
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 540 python3 "$REPO/benchmarks/bench_serving.py" \
      --scenarios single,prefill --budgets 2048,1536,4096 --json "$OUT/s6d.json" \
      > "$OUT/s6d.log" 2>&1
    grep -E '^single|^prefill|solo prefill|compiles after|^  [0-9:]+ |differs from|warm' "$OUT/s6d.log" | cut -c1-400 ;;
  s6e)   # next session, first call: after the one-launch split merge (a6a9d44), does a
         # chunk's step still have a ~100 ms floor? the prefill under load at 1536, 2048, 4096
    export CUDA_VISIBLE_DEVICES=0
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 560 python3 "$REPO/benchmarks/bench_serving.py" \
      --scenarios prefill --budgets 2048,1536,4096 --json "$OUT/s6e.json" > "$OUT/s6e.log" 2>&1
    grep -E '^prefill|solo prefill|\[prefill\] budget|compiles after|^  [0-9:]+ |differs from|warm' "$OUT/s6e.log" | cut -c1-400 ;;
  s7a)   # session 7: the bf16 test of merge_splits, then where a late small-chunk mixed step's
         # time goes (budget 1536: 128-token chunks against 200K+ cached tokens took ~85 ms in
         # s6e, whatever the chunk: a floor)
    export CUDA_VISIBLE_DEVICES=0
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 50 python3 -m pytest -q -rf -p no:cacheprovider \
      "$REPO/tests/test_kernels_gpu.py" -k merge_splits 2>&1 | tee "$OUT/test_merge_splits.log" | tail -2
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 250 python3 "$REPO/benchmarks/profile_step.py" \
      --preset llama3-8b --doc-len 131072 --prefill-len 262144 --budget 1536 --late-only \
      > "$OUT/profile_late_1536.log" 2>&1
    grep -E '^late mixed|^last quarter|^warmup' "$OUT/profile_late_1536.log" | cut -c1-300 ;;
  s7b)   # session 7: structured output through CUDA graphs (GPU test; needs the llguidance
         # wheel unzipped into /tmp/site first), then the late small-chunk mixed step as served
         # (through Ray: 79-84 ms a step in s6e's worker times vs 53 ms in s7a in-process),
         # profiled inside the actor
    export CUDA_VISIBLE_DEVICES=0
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 150 python3 -m pytest -q -rf -p no:cacheprovider \
      "$REPO/tests/test_structured.py" -k cuda_graphs > "$OUT/test_structured_graphs.log" 2>&1
    grep -E "^FAILED|^ERROR|passed|failed" "$OUT/test_structured_graphs.log" | tail -4
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 330 python3 "$REPO/benchmarks/profile_step.py" \
      --preset llama3-8b --doc-len 131072 --prefill-len 262144 --budget 1536 --late-only --ray \
      > "$OUT/profile_late_1536_ray.log" 2>&1
    grep -E '^\[ray\]|Error' "$OUT/profile_late_1536_ray.log" | cut -c1-300 ;;
  s7c)   # next call: the late small-chunk mixed step in-process and as served in ONE call
         # (s7a and s7b ran on different machines: 53 vs 80 ms with the same device work),
         # with each step's timeline (wall, all kernels queued, device span) and a cProfile of
         # 16 late steps; then as served with 8 torch threads in the actor (Ray gives it 1)
    export CUDA_VISIBLE_DEVICES=0
    for v in "" "--ray" "--ray --torch-threads 8"; do
      tag=$(echo "inproc $v" | tr -d ' -')
      PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 185 python3 "$REPO/benchmarks/profile_step.py" \
        --preset llama3-8b --doc-len 131072 --prefill-len 262144 --budget 1536 --late-only $v \
        --python-profile 16 > "$OUT/late_1536_$tag.log" 2>&1
      echo "$tag:"; grep -E '^\[|^late mixed|^last quarter|^features' "$OUT/late_1536_$tag.log" | cut -c1-300
    done ;;
  s8b)   # session 8: after the host cuts (plain-int launch arithmetic, device queries once, the
         # autotuner's choice launched directly, the cascade's split partials merged without
         # reduce launches, literal kernel constants): their GPU kernel tests, then the 256K
         # prefill under load at 1536, 2048, 4096 (s7c: late steps 50 ms as served, host-bound)
    export CUDA_VISIBLE_DEVICES=0
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 90 python3 -m pytest -q -rf -p no:cacheprovider \
      "$REPO/tests/test_kernels_gpu.py" -k "merge_splits or cascade or autotuned" 2>&1 \
      | tee "$OUT/test_kernels_gpu.log" | tail -3
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 470 python3 "$REPO/benchmarks/bench_serving.py" \
      --scenarios prefill --budgets 1536,2048,4096 --json "$OUT/s8b.json" > "$OUT/s8b.log" 2>&1
    grep -E '^prefill|solo prefill|\[prefill\] budget|compiles after|^  [0-9:]+ |differs from|warm' "$OUT/s8b.log" | cut -c1-300 ;;
  s8c)   # session 8: an early mixed step (chunk at 1/8 of the 256K prompt, budget 1536): s8b
         # had early steps at 80-90 ms, late ones at 59 ms; host- or device-bound? (its
         # timeline, a torch profile of one step, a cProfile of 16)
    export CUDA_VISIBLE_DEVICES=0
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 190 python3 "$REPO/benchmarks/profile_step.py" \
      --preset llama3-8b --doc-len 131072 --prefill-len 262144 --budget 1536 --late-only \
      --at 0.125 --python-profile 16 > "$OUT/early_1536.log" 2>&1
    grep -E '^\[|^profiled mixed|^mixed steps|^features' "$OUT/early_1536.log" | cut -c1-300 ;;
  s9a)   # session 9: FastLaunch (the compiled kernels' launcher called directly): its GPU
         # test and the kernels it launches, then the late (3/4) and early (1/8) mixed steps of
         # the 256K prefill under load at budget 1536, in-process (s7c / s8c: late 46.6 ms with
         # host-bound launches; early 56 ms of device work, its prompt's pages in two runs)
    export CUDA_VISIBLE_DEVICES=0
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 120 python3 -m pytest -q -rf -p no:cacheprovider \
      "$REPO/tests/test_kernels_gpu.py" -k "fast_launch or fused or merge_splits or cascade or autotuned" \
      2>&1 | tee "$OUT/test_kernels_gpu.log" | tail -3
    for at in 0.75 0.125; do
      PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout ${STEP_TIMEOUT:-200} python3 "$REPO/benchmarks/profile_step.py" \
        --preset llama3-8b --doc-len 131072 --prefill-len 262144 --budget 1536 --late-only \
        --at $at --python-profile 16 > "$OUT/step_1536_at$at.log" 2>&1
      echo "at $at:"; grep -E '^\[|^late mixed|^last quarter|^profiled mixed|^mixed steps|^features' "$OUT/step_1536_at$at.log" | cut -c1-300
    done ;;
  s9b)   # session 9: s9a's machine ran the host ~1.4x slower than session 8's (same cProfile
         # calls): A/B in one call. FastLaunch's GPU test; the late mixed step with the direct
         # launch off and on (RINGSERVE_DIRECT_LAUNCH); the early step with power-of-two splits
    export CUDA_VISIBLE_DEVICES=0
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 100 python3 -m pytest -q -rf -p no:cacheprovider \
      "$REPO/tests/test_kernels_gpu.py" -k "fast_launch or fused or merge_splits or cascade" \
      2>&1 | tee "$OUT/test_kernels_gpu.log" | tail -3
    for v in "0 0.75" "1 0.75" "1 0.125"; do
      set -- $v
      RINGSERVE_DIRECT_LAUNCH=$1 PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout ${STEP_TIMEOUT:-150} \
        python3 "$REPO/benchmarks/profile_step.py" --preset llama3-8b --doc-len 131072 \
        --prefill-len 262144 --budget 1536 --late-only --at $2 --python-profile 16 \
        > "$OUT/step_1536_direct$1_at$2.log" 2>&1
      echo "direct $1 at $2:"; grep -E '^\[|^late mixed|^last quarter|^profiled mixed|^mixed steps' "$OUT/step_1536_direct$1_at$2.log" | cut -c1-300
    done ;;
  s9c)   # session 9: the 256K prefill under load after FastLaunch and the power-of-two splits
         # (s9b, one call: late step 69.6 -> 49.5 ms with the direct launch; early step device
         # 56.4 -> 51.3 ms), at budgets 1024, 1536, 2048 (s8b: 1536 gave 1.92x / 4.05x)
    export CUDA_VISIBLE_DEVICES=0
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout ${BENCH_TIMEOUT:-480} python3 "$REPO/benchmarks/bench_serving.py" \
      --scenarios prefill --budgets ${BUDGETS:-1024,1536,2048} --json "$OUT/s9c.json" "$@" > "$OUT/s9c.log" 2>&1
    grep -E '^prefill|solo prefill|\[prefill\] budget|compiles after|^  [0-9:]+ |differs from|warm|host probe' "$OUT/s9c.log" | cut -c1-300 ;;
  s9d)   # session 9: the prefill under load after check=False and the 1536 default, at
         # 1280 / 1536 (default) / 2048 (s9c: 1536 gave 1.44x prefill, 3.21x ITL)
    export CUDA_VISIBLE_DEVICES=0
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout ${BENCH_TIMEOUT:-420} python3 "$REPO/benchmarks/bench_serving.py" \
      --scenarios prefill --budgets ${BUDGETS:-1280,1536,2048} --json "$OUT/s9d.json" "$@" > "$OUT/s9d.log" 2>&1
    grep -E '^prefill|solo prefill|\[prefill\] budget|compiles after|differs from|warm|host probe' "$OUT/s9d.log" | cut -c1-300
    python3 -c "import json; d=json.load(open('$OUT/s9d.json')); print(d.get('stats', {}).get('engine_time_s'), d.get('stats', {}).get('steps'))" ;;
  s10a)  # session 10, first call: FastLaunch's GPU test after the review fixes, then the
         # single-request comparison in one call and one harness (bench_e2e 128K, world size 1,
         # CUDA graphs both): the previous engine, then this one with three budgets of a lone
         # prompt (32768 per rank is the default; its 14 chunks of 6-23K against one pass
         # before were the suspected +6.7% of session 6)
    export CUDA_VISIBLE_DEVICES=0
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 110 python3 -m pytest -q -x -p no:cacheprovider \
      "$REPO/tests/test_kernels_gpu.py" -k fast_launch 2>&1 | tee "$OUT/test_fast_launch.log" | tail -3
    mkdir -p /tmp/old && tar xzf "$REPO/.devsite/old.tar.gz" -C /tmp/old && pkg /tmp/old /tmp/oldpkg
    PYTHONPATH=/tmp/oldpkg:$PYTHONPATH timeout 165 python3 /tmp/old/benchmarks/bench_e2e.py \
      --world-size 1 --lengths 131072 --no-hf --decode-tokens 64 --cuda-graphs \
      --json "$OUT/e2e_old_graphs.json" > "$OUT/e2e_old_graphs.log" 2>&1
    grep -E '^\[ringserve\] \{|Error' "$OUT/e2e_old_graphs.log" | tail -2 | cut -c1-400
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout ${NEW_TIMEOUT:-310} python3 "$REPO/benchmarks/bench_e2e.py" \
      --world-size 1 --lengths 131072 --no-hf --decode-tokens 64 --cuda-graphs \
      --solo-budgets ${SOLOS:-32768,65536,131072} --json "$OUT/e2e_new_graphs.json" \
      > "$OUT/e2e_new_graphs.log" 2>&1
    grep -E '^ +[0-9]+ \||Error|error' "$OUT/e2e_new_graphs.log" | tail -5 | cut -c1-300 ;;
  s10b)  # session 10, second call: after the host cuts (ring chunks' plan fields as arrays,
         # admission without Python per token): this engine first (cold compiles), at the
         # default lone-prompt budget and at 65536, then the previous engine, both bench_e2e
         # 128K with graphs; then the 8 different 4K prompts arriving together at the default
         # budget (1536 since session 9)
    export CUDA_VISIBLE_DEVICES=0
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 250 python3 "$REPO/benchmarks/bench_e2e.py" \
      --world-size 1 --lengths 131072 --no-hf --decode-tokens 64 --cuda-graphs \
      --solo-budgets ${SOLOS:-32768,65536} --json "$OUT/e2e_new_graphs.json" \
      > "$OUT/e2e_new_graphs.log" 2>&1
    grep -E '^ +[0-9]+ \||Error|error' "$OUT/e2e_new_graphs.log" | tail -5 | cut -c1-300
    mkdir -p /tmp/old && tar xzf "$REPO/.devsite/old.tar.gz" -C /tmp/old && pkg /tmp/old /tmp/oldpkg
    PYTHONPATH=/tmp/oldpkg:$PYTHONPATH timeout 150 python3 /tmp/old/benchmarks/bench_e2e.py \
      --world-size 1 --lengths 131072 --no-hf --decode-tokens 64 --cuda-graphs \
      --json "$OUT/e2e_old_graphs.json" > "$OUT/e2e_old_graphs.log" 2>&1
    grep -E '^\[ringserve\] \{|Error' "$OUT/e2e_old_graphs.log" | tail -2 | cut -c1-400
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 170 python3 "$REPO/benchmarks/bench_serving.py" \
      --scenarios mixed --json "$OUT/mixed.json" > "$OUT/mixed.log" 2>&1
    grep -E '^mixed|sooner|host probe|Error' "$OUT/mixed.log" | cut -c1-300 ;;
  s10c)  # session 10, two GPUs: the world-size-2 cases of the graph, shared-document and
         # fused GPU tests, then serving at world size 2 (single, 1 vs 16 questions, 8 prompts)
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout ${TEST_TIMEOUT:-280} python3 -m pytest -q -p no:cacheprovider \
      -o faulthandler_timeout=250 "$REPO/tests/test_llm_gpu.py" -k "2 or two_gpus" 2>&1 \
      | tee "$OUT/test_llm_gpu_ws2.log" | grep -E "passed|failed|PASS|FAIL|Error" | tail -8
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout ${BENCH_TIMEOUT:-280} python3 "$REPO/benchmarks/bench_serving.py" \
      --world-size 2 --scenarios single,concurrent,mixed --concurrency 1,16 \
      --json "$OUT/serving_ws2.json" > "$OUT/serving_ws2.log" 2>&1
    grep -E '^single|^concurrent|^mixed|sooner|host probe|Error' "$OUT/serving_ws2.log" | cut -c1-300 ;;
  s10d)  # session 10, last call (two GPUs, GPU 0 for the benchmark): the 256K prefill under
         # load at the default budget after the host cuts, on a fast host (session 9's
         # call 3, host probe 3.58 us: 3.21x ITL), then the fused test's world-size-2 case
         # (s10c's time limit cut it)
    (export CUDA_VISIBLE_DEVICES=0
     PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout ${BENCH_TIMEOUT:-360} python3 "$REPO/benchmarks/bench_serving.py" \
       --scenarios prefill --budgets ${BUDGETS:-1536} --json "$OUT/s10d.json" > "$OUT/s10d.log" 2>&1)
    grep -E '^prefill|solo prefill|\[prefill\] budget|compiles after|differs from|host probe' "$OUT/s10d.log" | cut -c1-300
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider \
      "$REPO/tests/test_llm_gpu.py" -k "fused and 2" 2>&1 | tee "$OUT/test_fused_ws2.log" | tail -3 ;;
  s11a)  # session 11, first call (two GPUs): the GPU tests of the code changed since session 10's
         # calls (FastLaunch's call plans and type tags, the mixed step's view-op cuts, the
         # merge strides), then the fused and graph cases of the engine at world sizes 1 and 2
    (export CUDA_VISIBLE_DEVICES=0
     PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout ${KTEST_TIMEOUT:-170} python3 -m pytest -q -p no:cacheprovider \
       "$REPO/tests/test_kernels_gpu.py" -k "fast_launch or merge or split" 2>&1 \
       | tee "$OUT/test_kernels_gpu.log" | grep -E "passed|failed|Error" | tail -4)
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout ${TEST_TIMEOUT:-380} python3 -m pytest -q -p no:cacheprovider \
      -o faulthandler_timeout=360 "$REPO/tests/test_llm_gpu.py" -k "fused or graph" 2>&1 \
      | tee "$OUT/test_llm_gpu.log" | grep -E "passed|failed|PASS|FAIL|Error" | tail -8 ;;
  s11c)  # session 11 (two GPUs): the single 128K request at world size 2, the previous engine
         # (7806572) and this one in one call and one harness (bench_e2e, CUDA graphs both)
    mkdir -p /tmp/old && tar xzf "$REPO/.devsite/old.tar.gz" -C /tmp/old && pkg /tmp/old /tmp/oldpkg
    PYTHONPATH=/tmp/oldpkg:$PYTHONPATH timeout ${OLD_TIMEOUT:-200} python3 /tmp/old/benchmarks/bench_e2e.py \
      --world-size 2 --lengths 131072 --no-hf --decode-tokens 64 --cuda-graphs \
      --json "$OUT/e2e_old_ws2.json" > "$OUT/e2e_old_ws2.log" 2>&1
    grep -E '^\[ringserve\] \{|Error' "$OUT/e2e_old_ws2.log" | tail -2 | cut -c1-400
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout ${NEW_TIMEOUT:-300} python3 "$REPO/benchmarks/bench_e2e.py" \
      --world-size 2 --lengths 131072 --no-hf --decode-tokens 64 --cuda-graphs \
      --solo-budgets ${SOLOS:-32768,65536} --json "$OUT/e2e_new_ws2.json" > "$OUT/e2e_new_ws2.log" 2>&1
    grep -E '^ +[0-9]+ \||Error|error' "$OUT/e2e_new_ws2.log" | tail -5 | cut -c1-300 ;;
  s11d)  # session 11: merge_splits reading many parts a load (the late step's 64 merges took
         # 3.9 ms, the cascade's ~70 decode splits merged by 8 programs): its GPU tests, the
         # merge and doc-decode table, then the 256K prefill under load at 1280 / 1536
    export CUDA_VISIBLE_DEVICES=0
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 120 python3 -m pytest -q -p no:cacheprovider \
      "$REPO/tests/test_kernels_gpu.py" -k "merge or split or cascade" 2>&1 \
      | tee "$OUT/test_kernels_gpu.log" | grep -E "passed|failed|Error" | tail -4
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 90 python3 "$REPO/benchmarks/bench_merge.py" \
      --json "$OUT/bench_merge.json" > "$OUT/bench_merge.log" 2>&1; tail -12 "$OUT/bench_merge.log"
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout ${BENCH_TIMEOUT:-370} python3 "$REPO/benchmarks/bench_serving.py" \
      --scenarios prefill --budgets ${BUDGETS:-1280,1536} --json "$OUT/s11d.json" > "$OUT/s11d.log" 2>&1
    grep -E '^prefill|solo prefill|\[prefill\] budget|compiles after|differs from|host probe|Error' "$OUT/s11d.log" | cut -c1-300 ;;
  s12a)  # session 12, first call (one GPU): the GPU tests of session 11's CPU-only kernels (the
         # merge's warmed variants, the latent tile), then the 256K prefill under load at three
         # budgets and the 8 prompts together, the engine at budget ${DEFAULT_BUDGET:-1280}
         # (0 compiles expected after the warm-up; the compiled step channel, now the default)
    export CUDA_VISIBLE_DEVICES=0
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout ${KTEST_TIMEOUT:-90} python3 -m pytest -q -p no:cacheprovider \
      "$REPO/tests/test_kernels_gpu.py" -k "merge or split or cascade or latent_paged" 2>&1 \
      | tee "$OUT/test_kernels_gpu.log" | grep -E "passed|failed|Error" | tail -3
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout ${BENCH_TIMEOUT:-490} python3 "$REPO/benchmarks/bench_serving.py" \
      --scenarios prefill,mixed --budgets ${BUDGETS:-1280,1536,2048} \
      --max-num-batched-tokens ${DEFAULT_BUDGET:-1280} --json "$OUT/s12a.json" > "$OUT/s12a.log" 2>&1
    grep -E '^prefill|^mixed|solo prefill|\[prefill\] budget|took|compiles after|differs from|host probe|Error' \
      "$OUT/s12a.log" | cut -c1-300 ;;
  s12b)  # session 12, second call (one GPU): the single 128K request with the step channel
         # compiled and as Ray tasks (the decode token end to end: 12.30 ms = 1.58x its floor in
         # session 10), the previous engine (7806572, before TP: the (1, 1) row of the TP issue)
         # in the same call and harness, then the engine's fused / graph GPU tests
    export CUDA_VISIBLE_DEVICES=0
    for ch in compiled tasks; do
      RINGSERVE_STEP_CHANNEL=$ch PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout ${E2E_TIMEOUT:-130} \
        python3 "$REPO/benchmarks/bench_e2e.py" --world-size 1 --lengths 131072 --no-hf \
        --decode-tokens 64 --cuda-graphs --json "$OUT/e2e_$ch.json" > "$OUT/e2e_$ch.log" 2>&1
      echo "channel $ch:"; grep -E '^ +[0-9]+ \||Error|error' "$OUT/e2e_$ch.log" | tail -2 | cut -c1-300
    done
    mkdir -p /tmp/old && tar xzf "$REPO/.devsite/old.tar.gz" -C /tmp/old && pkg /tmp/old /tmp/oldpkg
    PYTHONPATH=/tmp/oldpkg:$PYTHONPATH timeout ${OLD_TIMEOUT:-130} python3 /tmp/old/benchmarks/bench_e2e.py \
      --world-size 1 --lengths 131072 --no-hf --decode-tokens 64 --cuda-graphs \
      --json "$OUT/e2e_old.json" > "$OUT/e2e_old.log" 2>&1
    echo "previous engine:"; grep -E '^\[ringserve\] \{|Error' "$OUT/e2e_old.log" | tail -2 | cut -c1-400
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q -p no:cacheprovider \
      "$REPO/tests/test_llm_gpu.py" -k "fused or graph" 2>&1 | tee "$OUT/test_llm_gpu.log" \
      | grep -E "passed|failed|Error" | tail -3 ;;
  s12c)  # session 12, third call (one GPU): s12a's solo 8-stream ITL was 24.01 ms through the
         # compiled step channel against 16.81 ms as Ray tasks in session 11: both channels
         # side by side, the single 128K request (bench_e2e) and 1 / 8 questions on a cached
         # 128K document (bench_serving concurrent)
    export CUDA_VISIBLE_DEVICES=0
    for ch in compiled tasks; do
      RINGSERVE_STEP_CHANNEL=$ch PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout $([ $ch = compiled ] && echo 200 || echo 100) \
        python3 "$REPO/benchmarks/bench_e2e.py" --world-size 1 --lengths 131072 --no-hf \
        --decode-tokens 64 --cuda-graphs --json "$OUT/e2e_$ch.json" > "$OUT/e2e_$ch.log" 2>&1
      echo "e2e channel $ch:"; grep -E '^ +[0-9]+ \||Error|error' "$OUT/e2e_$ch.log" | tail -2 | cut -c1-300
    done
    for ch in compiled tasks; do
      RINGSERVE_STEP_CHANNEL=$ch PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 100 python3 "$REPO/benchmarks/bench_serving.py" \
        --scenarios concurrent --concurrency 1,8 --out-tokens 64 --json "$OUT/conc_$ch.json" > "$OUT/conc_$ch.log" 2>&1
      echo "concurrent channel $ch:"; grep -E '^\[concurrent\]|Error' "$OUT/conc_$ch.log" | cut -c1-300
    done ;;
  s13a)  # next session, first call (one GPU): interleaved prefill (k decode-only steps after each
         # mixed step) against the default, the 256K prefill beside 8 streams (steady solo ITL)
    export CUDA_VISIBLE_DEVICES=0
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout ${BENCH_TIMEOUT:-540} python3 "$REPO/benchmarks/bench_serving.py" \
      --scenarios prefill --budgets ${BUDGETS:-1536,2400:1,2048:1} --json "$OUT/s13a.json" > "$OUT/s13a.log" 2>&1
    grep -E '^prefill|solo prefill|took|compiles after|differs from|host probe|Error' "$OUT/s13a.log" | cut -c1-300 ;;
  s17g)  # session 17, last call (one GPU): 1 and 16 questions on a cached 128K document with
         # pipelined steps (batch-16 target <= 1.5x its floor), then the 128K single request
    export CUDA_VISIBLE_DEVICES=0
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 165 python3 "$REPO/benchmarks/bench_serving.py" \
      --scenarios concurrent --concurrency 1,16 --json "$OUT/conc_pipelined.json" \
      > "$OUT/conc_pipelined.log" 2>&1
    grep -E '^concurrent|Error' "$OUT/conc_pipelined.log" | cut -c1-400
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 130 python3 "$REPO/benchmarks/bench_e2e.py" \
      --world-size 1 --lengths 131072 --no-hf --decode-tokens 64 --cuda-graphs \
      --json "$OUT/e2e_llama_128k.json" > "$OUT/e2e_llama_128k.log" 2>&1
    grep -E '^ *[0-9]+ \||Error' "$OUT/e2e_llama_128k.log" | cut -c1-600 ;;
  s17h)  # session 17: 1 / 16 questions again, pipelined (call 6's ran unpipelined: the call
         # stamps kept steps on the old path)
    export CUDA_VISIBLE_DEVICES=0
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 150 python3 "$REPO/benchmarks/bench_serving.py" \
      --scenarios concurrent --concurrency 1,16 --json "$OUT/conc_pipelined.json" \
      > "$OUT/conc_pipelined.log" 2>&1
    grep -E '^concurrent|Error' "$OUT/conc_pipelined.log" | cut -c1-400 ;;
  s14a)  # next session, first call (one GPU): async scheduling (session 13, CPU-tested only)
         # against the synchronous engine in one call: the 128K single request (decode vs its
         # floor: per-GPU-speed issue, <= 1.3x) and 1 / 16 questions on a cached 128K
         # document, each without and with it (the first start compiles: the longest limit)
    export CUDA_VISIBLE_DEVICES=0
    lim=190
    for a in "--no-async-scheduling" "--async-scheduling"; do
      tag=async; [ "$a" = --no-async-scheduling ] && tag=sync
      PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout $lim python3 "$REPO/benchmarks/bench_e2e.py" \
        --world-size 1 --lengths 131072 --no-hf --decode-tokens 64 --cuda-graphs $a \
        --json "$OUT/e2e_$tag.json" > "$OUT/e2e_$tag.log" 2>&1
      grep -E '^ *[0-9]+ \|' "$OUT/e2e_$tag.log" | sed "s/^/$tag /"
      PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 100 python3 "$REPO/benchmarks/bench_serving.py" \
        --scenarios concurrent --concurrency 1,16 $a --json "$OUT/conc_$tag.json" \
        > "$OUT/conc_$tag.log" 2>&1
      grep -E '^concurrent' "$OUT/conc_$tag.log" | sed "s/^/$tag /"
      lim=130
    done ;;
  s14b)  # session 14, last call (one GPU): the router kernel's GPU test; the 128K single
         # request synchronously (the first decode bucket now captured inside the prefill: the
         # worst decode step should be a step, not a capture); the MoE and MLA presets' decode
         # with async scheduling after the MoE and wide-head decode fixes
    export CUDA_VISIBLE_DEVICES=0
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 60 python3 -m pytest -q -p no:cacheprovider \
      --rootdir "$REPO" "$REPO/tests/test_kernels_gpu.py" -k "moe_route" 2>&1 | tail -1
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 170 python3 "$REPO/benchmarks/bench_e2e.py" \
      --world-size 1 --lengths 131072 --no-hf --decode-tokens 64 --cuda-graphs \
      --json "$OUT/e2e_sync.json" > "$OUT/e2e_sync.log" 2>&1
    grep -E '^ *[0-9]+ \|' "$OUT/e2e_sync.log"; grep -o '"decode_step_worst_ms": [0-9.]*' "$OUT/e2e_sync.log"
    for p in qwen3-moe-30b-a3b:8192,131072 deepseek-v2-lite:8192,32768; do
      PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 110 python3 "$REPO/benchmarks/bench_e2e.py" \
        --world-size 1 --preset ${p%%:*} --lengths ${p##*:} --no-hf --decode-tokens 64 \
        --cuda-graphs --async-scheduling --json "$OUT/e2e_${p%%:*}_async.json" \
        > "$OUT/e2e_${p%%:*}_async.log" 2>&1
      grep -E '^ *[0-9]+ \|' "$OUT/e2e_${p%%:*}_async.log" | sed "s/^/${p%%:*} /"
      grep -o '"decode_step_median_ms": [0-9.]*, "decode_step_worst_ms": [0-9.]*' "$OUT/e2e_${p%%:*}_async.log"
    done ;;
  s15a)  # next session, first call (one GPU): the engine's GPU tests not run since session 11
         # (fused, graphs) and session 14's async test (world size 1 here; 2 on the x2 kind)
    export CUDA_VISIBLE_DEVICES=0
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 560 python3 -m pytest -v -p no:cacheprovider \
      --durations=0 "$REPO/tests/test_llm_gpu.py" -k "async_scheduling or fused or graph" 2>&1 \
      | tee "$OUT/test_llm_gpu.log" | grep -E "PASS|FAIL|ERROR|SKIP|passed|failed" | tail -12 ;;
  s15c)  # session 15, first call: the async scheduling GPU test at world size 1, then where
         # the batch-1 step's device time goes at 32K and 128K (fused kernels, per-op table)
    export CUDA_VISIBLE_DEVICES=0
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 250 python3 -m pytest -v -p no:cacheprovider \
      --durations=0 "$REPO/tests/test_llm_gpu.py" -k "async_scheduling and 1" 2>&1 \
      | tee "$OUT/test_async.log" | grep -E "PASS|FAIL|ERROR|SKIP|passed|failed|Error" | tail -8
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 300 python3 "$REPO/benchmarks/profile_decode.py" \
      --lengths 32768,131072 --steps 24 --fused-kernels --json "$OUT/profile_decode_llama.json" \
      > "$OUT/profile_decode_llama.log" 2>&1
    grep -E '^ +[0-9]+ \|' "$OUT/profile_decode_llama.log" | cut -c1-200 ;;
  s15b)  # next: where each step's round trip goes (bench_serving's round_trip_ms: to the
         # worker, execute, back, the worker's idle time), 1 and 16 questions on a cached 128K
         # document, synchronous then async
    export CUDA_VISIBLE_DEVICES=0
    lim=200
    for a in "--no-async-scheduling" "--async-scheduling"; do
      tag=async; [ "$a" = --no-async-scheduling ] && tag=sync
      PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout $lim python3 "$REPO/benchmarks/bench_serving.py" \
        --scenarios concurrent --concurrency 1,16 $a --json "$OUT/conc_$tag.json" \
        > "$OUT/conc_$tag.log" 2>&1
      grep -E '^concurrent' "$OUT/conc_$tag.log" | sed "s/^/$tag /"
      grep -o '"n": [0-9]*\|"round_trip_ms": {[^}]*}' "$OUT/conc_$tag.log" | paste - - | sed "s/^/$tag /"
      lim=150
    done ;;
  fused)   # the fused decode kernels: correctness first, then the step's launches and time
    export CUDA_VISIBLE_DEVICES=0
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 120 python3 -m pytest -q -x -p no:cacheprovider \
      "$REPO/tests/test_kernels_gpu.py" -k fused 2>&1 | tee "$OUT/test_fused_gpu.log" | tail -4
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 180 python3 -m pytest -q -x -p no:cacheprovider \
      "$REPO/tests/test_llm_gpu.py" -k "graph or shared_document or fused" 2>&1 \
      | tee "$OUT/test_llm_gpu.log" | tail -4
    PYTHONPATH=/tmp/pkg:$PYTHONPATH timeout 240 python3 "$REPO/benchmarks/profile_decode.py" \
      --lengths 32768,131072 --steps 32 --fused-kernels --json "$OUT/profile_decode_fused.json" \
      > "$OUT/profile_decode_fused.log" 2>&1
    grep -E 'eager .* ms/token|^ +[0-9]+ \|' "$OUT/profile_decode_fused.log" ;;
  serving)
    PYTHONPATH=/tmp/pkg:$PYTHONPATH python3 "$REPO/benchmarks/bench_serving.py" \
      --json "$OUT/bench_serving.json" "$@" 2>&1 | tee "$OUT/bench_serving.log" | grep -v '^(' ;;
  *) echo "unknown part $PART"; exit 2 ;;
esac
