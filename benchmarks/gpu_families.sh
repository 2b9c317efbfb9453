#!/usr/bin/env bash
# The GPU runs of issue 15 (model families), one device call each (<= 10 min):
#   bash benchmarks/gpu_families.sh kernels   # 1 GPU: the kernel tests of soft-capping and of
#                                             # MLA's 576-wide latent heads (forward, decode)
#   bash benchmarks/gpu_families.sh check     # 1-2 GPUs: tests/test_families_gpu.py (bf16 at 8K
#                                             # against transformers per family)
#   bash benchmarks/gpu_families.sh moe       # 1 GPU: bench_e2e Qwen3-30B-A3B shape, 8K + 128K
#   bash benchmarks/gpu_families.sh moe_tiles # 1 GPU: the expert GEMM's small vs default tiles
#   bash benchmarks/gpu_families.sh gemma2    # 1 GPU: bench_e2e Gemma-2-9B shape, 8K + 128K
#   bash benchmarks/gpu_families.sh gemma3    # 1 GPU: bench_e2e Gemma-3-12B shape, 8K + 128K
#   bash benchmarks/gpu_families.sh deepseek  # 1 GPU: bench_e2e DeepSeek-V2-Lite shape, 8K + 32K
#                                             # (prints KV tokens, latent against decompressed)
# On the device machine (repo root, .devsite carried as for gpu_serving.sh: ray-bundle.tar.xz,
# optionally head.tar.gz = `git archive HEAD ringserve kernels actors benchmarks tests | gzip`).
# Extra arguments go to bench_e2e (e.g. --lengths 8192,131072,max). Logs and JSON under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:-check}; shift || true
source benchmarks/gpu_setup.sh
e2e() {  # $1: preset, $2: default lengths, then bench_e2e arguments
  preset=$1 lengths=$2; shift 2
  timeout "${T:-560}" python3 "$REPO/benchmarks/bench_e2e.py" --world-size 1 --preset "$preset" \
    --lengths "$lengths" --no-hf --decode-tokens 64 --cuda-graphs \
    --json "$OUT/e2e_$preset.json" "$@" 2>&1 | tee "$OUT/e2e_$preset.log" \
    | grep -E '^\[ringserve\] \{|^bench_e2e|^KV bytes|^ *[0-9]+ \||Error|error' | tail -10
}
ab_deepseek_8k() {  # $1: an environment switch, $2: its name in the logs: DeepSeek 8K with
  # $1=1, then $1=0 (the first run compiles: a cold machine ~130 s; the second is warm)
  local n=0 i
  for i in 1 0; do
    n=$((n + 1))
    export "$1=$i"
    T=$((n == 1 ? 150 : 110)) e2e deepseek-v2-lite 8192
    for ext in log json; do
      mv "$OUT/e2e_deepseek-v2-lite.$ext" "$OUT/e2e_deepseek_8k_run${n}_$2$i.$ext"
    done
  done
  unset "$1"
}
prof() {  # $1: preset, $2: length, $3: name, $4: timeout: profile_decode --fused-kernels at
  # one length (one replay's kernels, its back-to-back time, the rows), the head printed
  timeout "$4" python3 "$REPO/benchmarks/profile_decode.py" --preset "$1" --lengths "$2" \
    --fused-kernels --json "$OUT/prof_$3.json" 2>&1 | tee "$OUT/prof_$3.log" \
    | grep -E "one graph step|back to back|^ *$2 \|" | cut -c1-300 | head -3
}
case "$PART" in
  kernels)
    timeout 560 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_kernels_gpu.py" -k "softcap or latent or moe_gemv" 2>&1 \
      | tee "$OUT/test_kernels_gpu_families.log" | tail -5 ;;
  check)
    timeout 560 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_families_gpu.py" "$@" 2>&1 | tee "$OUT/test_families_gpu.log" \
      | tail -8 ;;
  moe) e2e qwen3-moe-30b-a3b 8192,131072 "$@" ;;
  moe_tiles)  # the expert GEMM's tiles, A/B in one call: forced small (session 11's), then
              # the default (large from 512 rows an expert: every prefill here)
    for t in small ""; do
      RINGSERVE_MOE_TILES=$t timeout 280 python3 "$REPO/benchmarks/bench_e2e.py" --world-size 1 \
        --preset qwen3-moe-30b-a3b --lengths 8192,65536 --no-hf --decode-tokens 32 --cuda-graphs \
        --json "$OUT/e2e_moe_tiles_${t:-auto}.json" 2>&1 | tee "$OUT/e2e_moe_tiles_${t:-auto}.log" \
        | grep -E '^ *[0-9]+ \||Error|error' | tail -3
    done ;;
  gemma2) e2e gemma2-9b 8192,131072 "$@" ;;
  gemma3) e2e gemma3-12b 8192,131072 "$@" ;;
  deepseek) e2e deepseek-v2-lite 8192,32768 "$@" ;;
  s15d)  # session 15: MLA's latent decode kernel (GPU tests, against the general kernel, then
         # DeepSeek-V2-Lite's decode), and the Gemma 2 rows (never run before)
    timeout 130 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_kernels_gpu.py" -k "latent or paged_decode or softcap" 2>&1 \
      | tee "$OUT/test_kernels_latent.log" | tail -3
    timeout 60 python3 "$REPO/benchmarks/bench_latent_decode.py" --lengths 8192,32768,131072 \
      --json "$OUT/latent_decode.json" 2>&1 | tee "$OUT/latent_decode.log" | tail -32
    T=160 e2e deepseek-v2-lite 8192,32768
    T=210 e2e gemma2-9b 8192,131072 ;;
  s15e)  # session 15: the Gemma 3 rows (never run before; 256-wide heads with the new 128-row
         # tiles), then Llama-3-8B's batch-1 decode at 32K and 512K (per-GPU-speed issue: the
         # two lengths not measured with the fused kernels; async scheduling is now the default)
    T=215 e2e gemma3-12b 8192,131072
    timeout 330 python3 "$REPO/benchmarks/bench_e2e.py" --world-size 1 --lengths 32768,524288 \
      --no-hf --decode-tokens 64 --cuda-graphs --json "$OUT/e2e_llama_32k_512k.json" 2>&1 \
      | tee "$OUT/e2e_llama_32k_512k.log" | grep -E '^bench_e2e|^ *[0-9]+ \||Error|error' | tail -4 ;;
  s16b)  # session 16: the split-decode kernels after session 15's review refactor (GPU tests),
         # MLA's expanded form for prefill chunks (bf16 against transformers at 8K, then
         # DeepSeek-V2-Lite's prefill: 1.4% MFU at 32K absorbed)
    timeout 150 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_kernels_gpu.py" -k "latent or paged_decode" 2>&1 \
      | tee "$OUT/test_kernels_split.log" | tail -2
    timeout 120 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_families_gpu.py" -k "deepseek" 2>&1 | tee "$OUT/test_families_mla.log" \
      | tail -3
    T=170 e2e deepseek-v2-lite 8192,32768,131072 ;;
  s16c)  # session 16: the flash kernel's own values' head dim (MLA expanded: 192 / 128, no
         # padding of V), the warm-up tuning the expanded form's buckets (call 2's 32K prefill
         # tuned inside the timed run: 11.7 s)
    timeout 150 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_kernels_gpu.py" -k "attention_gpu or expanded_mla or latent_attention" \
      2>&1 | tee "$OUT/test_kernels_attention.log" | tail -2
    timeout 110 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_families_gpu.py" -k "deepseek" 2>&1 | tee "$OUT/test_families_mla.log" \
      | tail -3
    T=240 e2e deepseek-v2-lite 8192,32768,131072 ;;
  s16d)  # session 16: DeepSeek's few-token path with fewer launches (the router's float32
         # copy, q|kv_a joined, the shared experts' down GEMM adding into the routed output,
         # the latent's norm and cache store in the RoPE launch), Qwen3-MoE's router without
         # its cast; the merge warm-up at the values' head dim (call 3's 32K prefill 3.6 s)
    timeout 100 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_kernels_gpu.py" -k "fused_kernels_gpu or moe" 2>&1 \
      | tee "$OUT/test_kernels_fused.log" | tail -2
    timeout 130 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_families_gpu.py" -k "deepseek or qwen3-moe" 2>&1 \
      | tee "$OUT/test_families_moe_mla.log" | tail -3
    T=200 e2e deepseek-v2-lite 8192,32768,131072
    T=130 e2e qwen3-moe-30b-a3b 8192 ;;
  s19a)  # next session, first call (h200): W_UK inside the latent RoPE launch (GPU tests),
         # then DeepSeek-V2-Lite 8K alone, with it and without it (RINGSERVE_ABSORB_ROWS=0),
         # and Qwen3-30B-A3B 8K (PDL off, the default; session 18: DeepSeek 8K
         # 1.97-2.19x between runs, Qwen3-MoE 1.86x with PDL)
    timeout 70 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_kernels_gpu.py" -k "fused_kernels or fused_decode_graph or moe_gemv" \
      2>&1 | tee "$OUT/test_kernels_fused.log" | tail -2
    ab_deepseek_8k RINGSERVE_ABSORB_ROWS absorb
    T=175 e2e qwen3-moe-30b-a3b 8192 ;;
  s23a)  # next session, first call (h200, ~8 min): the Gluon kernel's unrouted paths
         # (strided ring shards, windows, soft-caps: tests and --striped bench), then
         # DeepSeek-V2-Lite 8K served three ways on one machine: through the actor with one
         # call a pipelined step (`advance`, the new default), with two (launch + finish, as
         # measured in s22b: 2.72 ms), and in process (s22b: 2.35 ms)
    timeout 200 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" --tb=short \
      "$REPO/tests/test_flash_gluon_gpu.py" -k "masks or says_no" 2>&1 \
      | tee "$OUT/test_gluon_masks.log" | grep -E "^E |passed|failed|rror" | head -8
    timeout 110 python3 "$REPO/benchmarks/bench_gluon_fwd.py" --striped \
      --json "$OUT/bench_gluon_striped.json" 2>&1 | tail -8
    for mode in one two local; do
      case $mode in
        one) T=170 e2e deepseek-v2-lite 8192 --pipeline-one-call ;;
        two) T=110 e2e deepseek-v2-lite 8192 --no-pipeline-one-call ;;
        local) T=110 e2e deepseek-v2-lite 8192 --in-process ;;
      esac
      mv "$OUT/e2e_deepseek-v2-lite.json" "$OUT/e2e_deepseek_8k_$mode.json"
      rm -f "$OUT/e2e_deepseek-v2-lite.log"
    done ;;
  s25c)  # session 25: Llama-3-8B's prefill MFU with the fused span path and one-launch
         # chunks: 128K with HF transformers in the same run, then 512K (no HF: out of memory)
    timeout 230 python3 "$REPO/benchmarks/bench_e2e.py" --world-size 1 --lengths 131072 \
      --decode-tokens 16 --cuda-graphs --in-process --json "$OUT/e2e_llama_128k.json" 2>&1 \
      | tee "$OUT/e2e_llama_128k.log" | grep -E '^ *[0-9]+ \||^\[hf\]|Error|error' \
      | cut -c1-200 | tail -4
    timeout 330 python3 "$REPO/benchmarks/bench_e2e.py" --world-size 1 --lengths 524288 \
      --decode-tokens 8 --cuda-graphs --in-process --no-hf --no-warmup-first \
      --json "$OUT/e2e_llama_512k.json" > "$OUT/e2e_llama_512k.log" 2>&1
    grep -E '^ *[0-9]+ \||Error|error' "$OUT/e2e_llama_512k.log" | cut -c1-200 | tail -3 ;;
  s25b)  # session 25: the prefill's elementwise work on the fused span path and a late
         # chunk's attention in one launch over its run of pages (no merge): the GPU test of
         # both against transformers in bf16, the 8K family checks at world size 1 (the span
         # path under every family's norms / RoPE / MLP), then the 128K prefill profile again
    timeout 120 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" --tb=short \
      "$REPO/tests/test_llm_gpu.py" -k "chunked_prefill_in_one_launch or one_gpu_bf16" 2>&1 \
      | tee "$OUT/test_llm_gpu_chunked.log" | grep -E "^E |passed|failed|rror" | head -6
    timeout 200 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" --tb=short \
      "$REPO/tests/test_families_gpu.py" -k "striped and not deepseek and not moe" 2>&1 \
      | tee "$OUT/test_families_gpu.log" | grep -E "^E |passed|failed|rror" | head -8
    timeout 240 python3 "$REPO/benchmarks/profile_step.py" --preset llama3-8b --single 131072 \
      --trace "$OUT/prefill_128k.trace.json" > "$OUT/profile_prefill_128k.log" 2>&1
    grep -E "tokens in|^device busy|^ +(kind|gemm|attention|merge|norm|other)|^GEMM FLOPs|rror" \
      "$OUT/profile_prefill_128k.log" | cut -c1-300
    python3 "$REPO/benchmarks/trace_kernels.py" "$OUT/prefill_128k.trace.json" 10 \
      | tee "$OUT/prefill_128k.kernels.txt" | cut -c1-110
    gzip -f "$OUT/prefill_128k.trace.json" ;;
  s25a)  # session 25: where a 128K prefill's time goes (57.4% MFU; >= 60% wanted): chunked
         # with LLM's budgets, in one step, then chunked under the profiler as a whole (kernels
         # by kind with TFLOP/s, the device's busy share); then cuBLAS alone on the chunk's
         # projection shapes
    timeout 320 python3 "$REPO/benchmarks/profile_step.py" --preset llama3-8b --single 131072 \
      --trace "$OUT/prefill_128k.trace.json" > "$OUT/profile_prefill_128k.log" 2>&1
    grep -E "tokens in|^device busy|^ +(kind|gemm|attention|merge|norm|other)|^GEMM FLOPs|rror" \
      "$OUT/profile_prefill_128k.log" | cut -c1-300
    python3 "$REPO/benchmarks/trace_kernels.py" "$OUT/prefill_128k.trace.json" 14 \
      | tee "$OUT/prefill_128k.kernels.txt" | cut -c1-110
    gzip -f "$OUT/prefill_128k.trace.json"
    timeout 90 python3 "$REPO/benchmarks/bench_prefill_gemms.py" --json "$OUT/gemms.json" \
      2>&1 | tee "$OUT/gemms.log" | cut -c1-200 ;;
  s24d)  # session 24: the batch-16 step with the shared document's part unmasked
         # (kernels.shared_prefix_kw: every document key precedes every row; s24c's trace had
         # that part at 203 us a layer with the causal mask and key positions, against 166.6
         # in the sweep without key positions): the graph / pipelined steps, their kernels by
         # launch shape from the pipelined mode's trace, the same tokens eager / graphs /
         # pipelined; then the cascade and decode kernel tests in bf16
    timeout 130 python3 "$REPO/benchmarks/profile_decode.py" --lengths 131072 --batch 16 \
      --fused-kernels --pipeline-trace "$OUT/pipelined_b16_nomask.trace.json" \
      --json "$OUT/prof_b16_nomask.json" > "$OUT/prof_b16_nomask.log" 2>&1
    python3 "$REPO/benchmarks/trace_kernels.py" "$OUT/pipelined_b16_nomask.trace.json" 8 \
      | tee "$OUT/pipelined_b16_nomask.kernels.txt"
    gzip -f "$OUT/pipelined_b16_nomask.trace.json"
    grep -E "^ *131072 \||engine thread, (graphs|pipelined)|back to back" \
      "$OUT/prof_b16_nomask.log" | cut -c1-330
    timeout 100 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" --tb=short \
      "$REPO/tests/test_kernels_gpu.py" -k "cascade" 2>&1 \
      | tee "$OUT/test_kernels_gpu_decode.log" | grep -E "^E |passed|failed|rror" | head -6 ;;
  s24c)  # session 24: the pipelined batch-16 step again: the worker's launch (host) and finish
         # (waiting) ms, the engine thread's medians a step, a profile of the pipelined mode (the
         # runtime calls by host time, the device's busy share); then the 512K prefill without
         # the untimed full-length warm-up (s24b's was cut at 340 s: 62 s init + two prefills)
    timeout 130 python3 "$REPO/benchmarks/profile_decode.py" --lengths 131072 --batch 16 \
      --fused-kernels --pipeline-trace "$OUT/pipelined_b16.trace.json" \
      --json "$OUT/prof_b16_calls.json" > "$OUT/prof_b16_calls.log" 2>&1
    gzip -f "$OUT/pipelined_b16.trace.json"
    grep -E "^ *131072 \||engine thread, (graphs|pipelined)" "$OUT/prof_b16_calls.log" \
      | cut -c1-330
    grep -A13 "pipelined under the profiler" "$OUT/prof_b16_calls.log" | head -14
    timeout 330 python3 "$REPO/benchmarks/bench_e2e.py" --world-size 1 --lengths 524288 \
      --decode-tokens 8 --cuda-graphs --in-process --no-hf --no-warmup-first \
      --json "$OUT/e2e_llama_512k.json" > "$OUT/e2e_llama_512k.log" 2>&1
    grep -E '^ *[0-9]+ \||Error|error' "$OUT/e2e_llama_512k.log" | cut -c1-200 | tail -3 ;;
  s24b)  # session 24: the served (pipelined) batch-16 step ran at 20-32 ms against the
         # graph step's 13 ms (s23c-s24a): the engine thread's stack sampled during it
         # (--host-sample) and its schedule / update ms a step; then Llama-3-8B's 512K prefill
         # in process with the Gluon forward default (s23d's was cut at 230 s)
    timeout 110 python3 "$REPO/benchmarks/profile_decode.py" --lengths 131072 --batch 16 \
      --fused-kernels --host-sample --json "$OUT/prof_b16_host.json" \
      > "$OUT/prof_b16_host.log" 2>&1
    grep -E "^ *131072 \||engine thread, pipelined" "$OUT/prof_b16_host.log" | cut -c1-250
    grep -A16 "innermost ringserve" "$OUT/prof_b16_host.log" | head -12
    timeout 340 python3 "$REPO/benchmarks/bench_e2e.py" --world-size 1 --lengths 524288 \
      --decode-tokens 8 --cuda-graphs --in-process --no-hf \
      --json "$OUT/e2e_llama_512k.json" > "$OUT/e2e_llama_512k.log" 2>&1
    grep -E '^ *[0-9]+ \||Error|error' "$OUT/e2e_llama_512k.log" | cut -c1-200 | tail -3 ;;
  s23e)  # session 23: the batch-16 graph step with its cascade merged in one launch a layer
         # (the graph body as the eager step: no reduces, no merge buffer, no casts) and the
         # many-row decode tile as default, then bf16 against transformers at 8K for the dense
         # and Mixtral / Gemma families at world size 1 (the Gluon forward default's first run
         # under them; DeepSeek / Qwen3-MoE ran in s21b)
    timeout 90 python3 "$REPO/benchmarks/profile_decode.py" --lengths 131072 --batch 16 \
      --fused-kernels > "$OUT/prof_b16_merged.log" 2>&1
    grep -E "one graph step|^ *131072 \|" "$OUT/prof_b16_merged.log" | cut -c1-250 | head -2
    timeout 170 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" --tb=short \
      "$REPO/tests/test_families_gpu.py" -k "striped and not deepseek and not moe" 2>&1 \
      | tee "$OUT/test_families_gpu.log" | grep -E "^E |passed|failed|rror" | head -8 ;;
  s23d)  # session 23, last call: the Gluon routing test (windows, striped shards); the
         # cascade's shared-document decode kernel at 16 questions on 128K (57% of the batch-16
         # step in s23c: 7.19 of 12.5 ms) swept, its best exported (RINGSERVE_DECODE_MANY_ROWS)
         # into profile_decode's batch-16 step with gemm_few's tuned tiles on and off; the
         # forward table's 64K rows with the Gluon default; Llama-3-8B's 512K prefill in process
    timeout 90 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" --tb=short \
      "$REPO/tests/test_kernels_gpu.py" -k "gluon_kernel_on_hopper" 2>&1 \
      | tee "$OUT/test_gluon_routing.log" | grep -E "^E |passed|failed|rror" | head -6
    timeout 120 python3 "$REPO/benchmarks/bench_decode_splits.py" --shapes llama3-8b \
      --lengths 131072 --queries 16 > "$OUT/decode_16q.log" 2>&1
    grep -E "^llama3-8b 131072|BEST" "$OUT/decode_16q.log" | cut -c1-300
    best=$(awk '/^BEST_MANY_ROWS/ {print $4}' "$OUT/decode_16q.log")
    for few in 16 0; do
      RINGSERVE_DECODE_MANY_ROWS=$best RINGSERVE_GEMM_FEW_ROWS=$few timeout 100 python3 \
        "$REPO/benchmarks/profile_decode.py" --lengths 131072 --batch 16 --fused-kernels \
        > "$OUT/prof_b16_tuned_few$few.log" 2>&1
      echo "many_rows=$best few=$few"; grep -E "one graph step|^ *131072 \|" \
        "$OUT/prof_b16_tuned_few$few.log" | cut -c1-250 | head -2
    done
    timeout 100 python3 "$REPO/benchmarks/bench_kernels.py" --no-decode --sizes 65536 \
      > "$OUT/bench_kernels_64k.log" 2>&1
    grep -E "^\| 64K" "$OUT/bench_kernels_64k.log"
    timeout 230 python3 "$REPO/benchmarks/bench_e2e.py" --world-size 1 --lengths 524288 \
      --decode-tokens 8 --cuda-graphs --in-process --no-hf \
      --json "$OUT/e2e_llama_512k.json" 2>&1 | grep -E '^ *[0-9]+ \||Error|error' \
      | cut -c1-200 | tail -3 ;;
  s23c)  # session 23: the batch-16 decode step (per-GPU-speed issue, 1.61x its floor): the
         # tensor-core few-row GEMM (kernels/gemv.py gemm_few) swept against cuBLAS at Llama-3-8B's
         # projections, 4 and 16 rows; then profile_decode at 128K with 16 questions on the
         # document, with gemm_few (RINGSERVE_GEMM_FEW_ROWS=16) and without (cuBLAS, the default)
    timeout 150 python3 "$REPO/benchmarks/bench_gemv.py" --few --rows 4,16 --shapes llama3-8b \
      --json "$OUT/bench_gemm_few.json" 2>&1 | tee "$OUT/bench_gemm_few.log" \
      | grep -E "^ *llama|shape" | tail -9
    for few in 16 0; do
      RINGSERVE_GEMM_FEW_ROWS=$few timeout $((few ? 200 : 150)) python3 \
        "$REPO/benchmarks/profile_decode.py" --lengths 131072 --batch 16 --fused-kernels \
        --json "$OUT/prof_b16_few$few.json" 2>&1 | tee "$OUT/prof_b16_few$few.log" \
        | grep -E "one graph step|back to back|^ *131072 \|" | cut -c1-250 | head -3
    done ;;
  s23b)  # session 23: the Gluon routing test (windows and striped shards now routed), the
         # bench_kernels forward table with the Gluon default (its 64K rows never ran with it),
         # then Llama-3-8B's 512K prefill at world size 1 in process (53.4% MFU with the Triton
         # kernel in session 15); the profile of a 128K prefill's late chunk with SINGLE=1
    timeout 90 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" --tb=short \
      "$REPO/tests/test_kernels_gpu.py" -k "gluon_kernel_on_hopper" 2>&1 \
      | tee "$OUT/test_gluon_routing.log" | grep -E "^E |passed|failed|rror" | head -6
    timeout 150 python3 "$REPO/benchmarks/bench_kernels.py" --no-decode \
      > "$OUT/bench_kernels.md" 2> "$OUT/bench_kernels.err"
    grep -E "^\| (16|32|64)K" "$OUT/bench_kernels.md"
    timeout 240 python3 "$REPO/benchmarks/bench_e2e.py" --world-size 1 --lengths 524288 \
      --decode-tokens 8 --cuda-graphs --in-process --no-hf \
      --json "$OUT/e2e_llama_512k.json" 2>&1 | tee "$OUT/e2e_llama_512k.log" \
      | grep -E '^ *[0-9]+ \||Error|error' | cut -c1-250 | tail -3
    [ "${SINGLE:-0}" = 1 ] && timeout 150 python3 "$REPO/benchmarks/profile_step.py" \
      --preset llama3-8b --single 131072 2>&1 | tee "$OUT/profile_prefill_128k.log" \
      | awk '/tokens in/ {print substr($0, 1, 140)} /^---/ {t++} t >= 1 && t <= 3' \
      | cut -c1-150 | head -26 ;;
  s22c)  # session 22: the Gluon forward kernel (kernels/flash_fwd_gluon.py) as flash_attn_fwd's
         # default on sm_90: its GPU tests and the routing test, then Llama-3-8B's 128K prefill
         # at world size 1 with it (and HF transformers in the same run), then with the Triton
         # kernel (RINGSERVE_FLASH_IMPL=triton), the worker in process (no Ray start)
    timeout 110 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" --tb=short \
      "$REPO/tests/test_flash_gluon_gpu.py" "$REPO/tests/test_kernels_gpu.py" \
      -k "gluon" 2>&1 | tee "$OUT/test_gluon.log" | grep -E "^E |passed|failed|rror" | head -8
    for impl in auto triton; do
      RINGSERVE_FLASH_IMPL=$impl timeout $([ $impl = auto ] && echo 230 || echo 150) \
        python3 "$REPO/benchmarks/bench_e2e.py" --world-size 1 --lengths 131072 \
        --decode-tokens 16 --cuda-graphs --in-process $([ $impl = triton ] && echo --no-hf) \
        --json "$OUT/e2e_llama_128k_$impl.json" 2>&1 | tee "$OUT/e2e_llama_128k_$impl.log" \
        | grep -E '^ *[0-9]+ \||^\[hf\]|Error|error' | cut -c1-200 | tail -4
    done ;;
  s22b)  # session 22: test_fast_launch_equals_triton_path (s22a: it failed, its log cut by
         # the 80 s timeout; the gemv check's absolute tolerance was below bf16's step since
         # widened); then the served DeepSeek-V2-Lite 8K row through the Ray actor and with
         # the worker in process (LLM(in_process=True): s22a measured 2.38 ms a token
         # pipelined in-process against 2.74-2.88 served)
    timeout 150 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" --tb=short \
      "$REPO/tests/test_kernels_gpu.py" -k "fast_launch" 2>&1 | tee "$OUT/test_fast.log" \
      | grep -E "^E |passed|failed|Error" | head -12
    for mode in actor local; do
      if [ $mode = actor ]; then T=170 e2e deepseek-v2-lite 8192
      else T=120 e2e deepseek-v2-lite 8192 --in-process; fi
      for ext in log json; do
        mv "$OUT/e2e_deepseek-v2-lite.$ext" "$OUT/e2e_deepseek_8k_$mode.$ext"
      done
    done ;;
  s22a)  # session 22's first call, first call (h200): DeepSeek-V2-Lite's and Qwen3-30B-A3B's 8K step
         # with the norm / residual folds (RINGSERVE_FOLD_ROWS=1: 52 launches fewer a DeepSeek
         # step) and without, now that the GEMV is pipelined: each replay's kernels and its
         # back-to-back wall time (the gaps: s21 served DeepSeek at 2.74-2.88 ms a token
         # against 2.28 ms of kernels), and the pipelined row in-process (no Ray); then the
         # engine's GPU test of async scheduling.
         # First the GPU tests of gemv / moe_gemv through FastLaunch (not run on a GPU yet)
    timeout 80 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_kernels_gpu.py" -k "gemv or fast_launch" 2>&1 \
      | tee "$OUT/test_kernels_fast.log" | tail -2
    for f in deepseek-v2-lite qwen3-moe-30b-a3b; do
      for fold in 0 1; do
        RINGSERVE_FOLD_ROWS=$fold prof $f 8192 "${f}_fold$fold" 100
      done
    done
    timeout 180 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_llm_gpu.py" -k "async and 1" 2>&1 | tee "$OUT/test_llm_gpu_async.log" \
      | tail -2 ;;
  s21e)  # session 21: the device-time A/B of s21a's defaults for Llama-3-8B's 32K decode step
         # (gemv now also takes qkv, gate|up and down at one row) against 0079b78
    for tree in head old; do
      use_tree $tree.tar.gz && prof llama3-8b 32768 "llama_32k_$tree" 110
    done ;;
  s21d)  # session 21: two pipelined steps in flight (LLM(pipeline_depth=2), the new default)
         # against one, DeepSeek-V2-Lite 8K + 32K on one machine (s21c: 2.88 / 3.06 ms a token
         # with one against 2.28 ms of device time a step at 8K: the round trip showed), then
         # Qwen3-30B-A3B 8K with two
    for d in 1 2; do
      T=$((d == 1 ? 200 : 130)) e2e deepseek-v2-lite 8192,32768 --pipeline-depth $d
      for ext in log json; do
        mv "$OUT/e2e_deepseek-v2-lite.$ext" "$OUT/e2e_deepseek_depth$d.$ext"
      done
    done
    T=150 e2e qwen3-moe-30b-a3b 8192 ;;
  s21c)  # session 21: the served rows with s21a's defaults (pipelined decode): DeepSeek-V2-Lite
         # 8K + 32K, Qwen3-30B-A3B 8K, Gemma-3-12B 8K
    T=190 e2e deepseek-v2-lite 8192,32768
    T=150 e2e qwen3-moe-30b-a3b 8192
    T=160 e2e gemma3-12b 8192 ;;
  s21b)  # session 21: the device-time A/B of s21a's defaults against the commit before them
         # (0079b78, .devsite/old.tar.gz): one graph replay's kernels of DeepSeek-V2-Lite's and
         # Qwen3-30B-A3B's 8K decode step, each tree in turn; then bf16 against transformers
    for f in deepseek-v2-lite qwen3-moe-30b-a3b; do
      for tree in head old; do
        use_tree $tree.tar.gz && prof $f 8192 "${f}_$tree" \
          $([ $f = deepseek-v2-lite ] && echo 90 || echo 110)
      done
    done
    use_tree head.tar.gz
    timeout 140 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_families_gpu.py" -k "deepseek or qwen3-moe" 2>&1 \
      | tee "$OUT/test_families_moe_mla.log" | tail -3 ;;
  s21a|s20a)  # session 21, first call (h200; s20a, session 20's sweep of the pipelined K
         # loops, was its first three steps): session 20's swept winners as defaults (gemv's tile
         # by shape over 3 stages and gemv for every one-row projection of at most 2^26
         # values, moe_gemv's tiles by shape, the absorption's (8, 128)): GPU tests, the sweeps
         # again (the default's row against cuBLAS and the best), DeepSeek-V2-Lite 8K
    timeout 70 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_kernels_gpu.py" -k "gemv or fused_kernels" 2>&1 \
      | tee "$OUT/test_kernels_gemv.log" | tail -2
    timeout 150 python3 "$REPO/benchmarks/bench_gemv.py" --rows 1 \
      --json "$OUT/gemv.json" 2>&1 | tee "$OUT/gemv.log" | tail -16
    timeout 110 python3 "$REPO/benchmarks/bench_moe_gemv.py" --tokens 1 \
      --json "$OUT/moe_gemv.json" 2>&1 | tee "$OUT/moe_gemv.log" | tail -4
    T=150 e2e deepseek-v2-lite 8192 ;;
  s19c)  # session 19: the decode token's norms inside the consuming GEMVs and the residual
         # adds inside o_proj's and the MoE down launch (GPU tests; bf16 against transformers
         # for DeepSeek-V2-Lite / V2 / Qwen3-MoE), then DeepSeek 8K and Qwen3-MoE 8K (call 1:
         # 2.63 ms = 2.00x and 3.55 ms = 2.00x)
    timeout 80 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_kernels_gpu.py" -k "fused_decode_graph or moe_gemv or fused_kernels" \
      2>&1 | tee "$OUT/test_kernels_folds.log" | tail -2
    timeout 130 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_families_gpu.py" -k "deepseek or qwen3-moe" 2>&1 \
      | tee "$OUT/test_families_moe_mla.log" | tail -2
    T=150 e2e deepseek-v2-lite 8192
    T=170 e2e qwen3-moe-30b-a3b 8192 ;;
  s19d)  # session 19: the folds without their statistic's own pass (call 2's version cost
         # ~7.7 us a MoE layer: DeepSeek 8K 2.63 -> 2.83 ms, Qwen3-MoE 3.55 -> 3.92): GPU
         # tests, DeepSeek 8K with the folds and without (RINGSERVE_FOLD_ROWS=0), Qwen3-MoE 8K
    timeout 80 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_kernels_gpu.py" -k "fused_decode_graph or moe_gemv" \
      2>&1 | tee "$OUT/test_kernels_folds.log" | tail -2
    ab_deepseek_8k RINGSERVE_FOLD_ROWS fold
    T=170 e2e qwen3-moe-30b-a3b 8192 ;;
  s19b)  # next session: bf16 against transformers for every family with today's paths, and
         # DeepSeek at 32K / 128K
    timeout 300 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_families_gpu.py" 2>&1 | tee "$OUT/test_families_gpu.log" | tail -3
    T=200 e2e deepseek-v2-lite 32768,131072 ;;
  s18a)  # session 18: MLA's absorption by head_gemv (GPU tests, against einsum), the latent
         # decode kernel's launches and its reduce swept apart, DeepSeek's step at 128K profiled
    timeout 70 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_kernels_gpu.py" -k "head_gemv or latent" 2>&1 \
      | tee "$OUT/test_kernels_head_gemv.log" | tail -2
    timeout 60 python3 "$REPO/benchmarks/bench_gemv.py" --heads-only --json "$OUT/head_gemv.json" \
      2>&1 | tee "$OUT/head_gemv.log" | tail -5
    timeout 250 python3 "$REPO/benchmarks/bench_latent_decode.py" --sweep \
      --lengths 8192,32768,131072 --json "$OUT/latent_sweep.json" 2>&1 \
      | tee "$OUT/latent_sweep.log" | grep -E "best|default|general|reduce of|bandwidth" | tail -30
    timeout 130 python3 "$REPO/benchmarks/profile_decode.py" --preset deepseek-v2-lite \
      --lengths 131072 --fused-kernels --json "$OUT/prof_deepseek_128k.json" 2>&1 \
      | tee "$OUT/prof_deepseek_128k.log" | grep -E "L=|kernel|Error|error" | head -30 ;;
  s18b)  # session 18: DeepSeek's shared experts inside the routed experts' two launches,
         # W_UV by head_gemv, the latent decode's new launches (GPU tests; bf16 against
         # transformers at 8K), then DeepSeek-V2-Lite's decode at 8K / 32K / 128K
    timeout 60 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_kernels_gpu.py" -k "moe_gemv or head_gemv or latent" 2>&1 \
      | tee "$OUT/test_kernels_moe_shared.log" | tail -2
    timeout 150 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_families_gpu.py" -k "deepseek or qwen3-moe" 2>&1 \
      | tee "$OUT/test_families_moe_mla.log" | tail -3
    T=230 e2e deepseek-v2-lite 8192,32768,131072
    timeout 90 python3 "$REPO/benchmarks/profile_decode.py" --preset deepseek-v2-lite \
      --lengths 8192 --fused-kernels --json "$OUT/prof_deepseek_8k.json" 2>&1 \
      | tee "$OUT/prof_deepseek_8k.log" | grep -E "L=|kernel|Error|error" | head -24 ;;
  s18c)  # session 18: programmatic dependent launch of the decode step's Triton kernels (GPU
         # tests: a 40-kernel chain in a graph bitwise equal without it, the fused paths),
         # then DeepSeek-V2-Lite 8K / 32K and Qwen3-30B-A3B 8K decode (call 2: 2.83 / 3.09 ms)
    timeout 90 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_kernels_gpu.py" -k "pdl or fused or gemv or greedy or paged_decode or merge_splits" \
      2>&1 | tee "$OUT/test_kernels_pdl.log" | tail -3
    T=150 e2e deepseek-v2-lite 8192,32768
    T=175 e2e qwen3-moe-30b-a3b 8192 ;;
  s18d)  # session 18: PDL inside graph captures only (call 3: with every launch PDL, DeepSeek's
         # pipelined 8K decode went 2.83 -> 3.03 ms): the PDL GPU test, then DeepSeek 8K with
         # PDL and without (RINGSERVE_PDL=0, same machine), bf16 against transformers
    timeout 60 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_kernels_gpu.py" -k "pdl_chain or fused_decode_graph" 2>&1 \
      | tee "$OUT/test_kernels_pdl.log" | tail -3
    T=110 e2e deepseek-v2-lite 8192
    mv "$OUT/e2e_deepseek-v2-lite.log" "$OUT/e2e_deepseek_pdl.log"
    mv "$OUT/e2e_deepseek-v2-lite.json" "$OUT/e2e_deepseek_pdl.json"
    export RINGSERVE_PDL=0
    T=90 e2e deepseek-v2-lite 8192
    unset RINGSERVE_PDL
    timeout 140 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_families_gpu.py" -k "deepseek or qwen3-moe" 2>&1 \
      | tee "$OUT/test_families_moe_mla.log" | tail -3 ;;
  s17a)  # next session, first call (h200): where DeepSeek's and Qwen3-MoE's decode steps go
         # after session 16's launch cuts (worker steps 2.86x / 2.64x their floors at 8K)
    timeout 190 python3 "$REPO/benchmarks/profile_decode.py" --preset deepseek-v2-lite \
      --lengths 8192 --fused-kernels --json "$OUT/prof_deepseek.json" 2>&1 \
      | tee "$OUT/prof_deepseek.log" | tail -6
    timeout 240 python3 "$REPO/benchmarks/profile_decode.py" --preset qwen3-moe-30b-a3b \
      --lengths 8192 --fused-kernels --json "$OUT/prof_qwen3moe.json" 2>&1 \
      | tee "$OUT/prof_qwen3moe.log" | tail -6
    T=100 e2e deepseek-v2-lite 8192 ;;  # its KV capacity after the reserve's fix (~683K?)
  s17c)  # session 17: the MoE down kernel's (k, BLOCK_N, BLOCK_K) tiles and the decode splits
         # shared over each sequence's own keys (GPU tests), both swept, then the two profiles
    timeout 100 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_kernels_gpu.py" -k "moe_gemv or paged_decode or latent" 2>&1 \
      | tee "$OUT/test_kernels_moe_decode.log" | tail -2
    timeout 130 python3 "$REPO/benchmarks/bench_moe_gemv.py" --json "$OUT/moe_gemv.json" 2>&1 \
      | tee "$OUT/moe_gemv.log" | tail -6
    timeout 130 python3 "$REPO/benchmarks/bench_decode_splits.py" --json "$OUT/decode_splits.json" \
      2>&1 | tee "$OUT/decode_splits.log" | tail -14
    for f in qwen3-moe-30b-a3b deepseek-v2-lite; do
      timeout 100 python3 "$REPO/benchmarks/profile_decode.py" --preset $f --lengths 8192 \
        --fused-kernels --json "$OUT/prof_$f.json" 2>&1 | tee "$OUT/prof_$f.log" | tail -2
    done ;;
  s17d)  # session 17: the decode kernel's new defaults (128-key tiles, ~2 waves) and the
         # few-row GEMV (GPU tests), the GEMV against cuBLAS, then the served rows after the
         # MoE / split changes: Qwen3-MoE 8K, DeepSeek 8K + 32K, Llama-3-8B 32K + 128K
    timeout 60 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_kernels_gpu.py" -k "paged_decode or latent or gemv" 2>&1 \
      | tee "$OUT/test_kernels_decode_gemv.log" | tail -2
    timeout 100 python3 "$REPO/benchmarks/bench_gemv.py" --json "$OUT/gemv.json" 2>&1 \
      | tee "$OUT/gemv.log" | tail -22
    T=100 e2e qwen3-moe-30b-a3b 8192
    T=120 e2e deepseek-v2-lite 8192,32768
    T=180 e2e llama3-8b 32768,131072 ;;
  s17e)  # session 17: pipelined steps (launch / finish: the next decode step queued behind
         # the one in flight; bench_e2e also runs the question with one call a step and
         # compares the tokens), the one-row GEMV in the model and the greedy kernel
    timeout 60 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_kernels_gpu.py" -k "gemv or greedy" 2>&1 \
      | tee "$OUT/test_kernels_gemv_greedy.log" | tail -2
    T=130 e2e llama3-8b 32768
    T=170 e2e qwen3-moe-30b-a3b 8192
    T=140 e2e deepseek-v2-lite 8192,32768 ;;
  s17f)  # session 17: the MoE rows' A/B again, the second question from the same cache as
         # the first (call 4's came from the first's cached sequence: tokens differed)
    T=170 e2e qwen3-moe-30b-a3b 8192
    T=110 e2e deepseek-v2-lite 8192 ;;
  s17b)  # next session (x2): MLA's expanded prefill over the ring on two GPUs
    timeout 400 python3 "$REPO/benchmarks/bench_e2e.py" --world-size 2 --preset deepseek-v2-lite \
      --lengths 32768,131072 --no-hf --decode-tokens 32 --cuda-graphs \
      --json "$OUT/e2e_deepseek_ws2.json" 2>&1 | tee "$OUT/e2e_deepseek_ws2.log" \
      | grep -E '^bench_e2e|^ *[0-9]+ \||Error|error' | tail -4 ;;
  s16e)  # session 16, on the x2 kind: MLA's expanded form over NCCL (bf16 against
         # transformers at 8K, 1 and 2 ranks, both layouts), and a Llama-3-8B 32K row after the
         # flash kernel's values' head dim (session 15: 51.1% MFU prefill, 6.88 ms decode)
    timeout 200 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_families_gpu.py" -k "deepseek" 2>&1 | tee "$OUT/test_families_mla.log" \
      | tail -3
    T=150 e2e llama3-8b 32768 ;;
  s16a)  # next session, first call: Gemma's decode with the window skip in the graph body
         # (98362cf; Gemma 3 at 128K was 2.93x its floor), DeepSeek with its joined shared
         # experts and the one-wave latent splits, and the latent split sweep with 256
    T=170 e2e gemma3-12b 8192,131072
    T=190 e2e gemma2-9b 8192,131072
    T=110 e2e deepseek-v2-lite 8192,32768
    timeout 60 python3 "$REPO/benchmarks/bench_latent_decode.py" --lengths 8192,32768,131072 \
      --json "$OUT/latent_decode.json" 2>&1 | tee "$OUT/latent_decode.log" | tail -4 ;;
  s15g)  # session 15, last call: soft-capping through tanh.approx (GPU tests), then Gemma 3
         # and Gemma 2 with the window skip (their floors now count a windowed layer's window
         # only), DeepSeek-V2-Lite with the latent decode's ~2 waves of splits
    timeout 75 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_kernels_gpu.py" -k "softcap" 2>&1 | tee "$OUT/test_softcap.log" | tail -2
    T=170 e2e gemma3-12b 8192,131072
    T=190 e2e gemma2-9b 8192,131072
    T=110 e2e deepseek-v2-lite 8192,32768 ;;
  s15f)  # session 15: soft-capping through tanh.approx (GPU tests), Gemma 2's 128K prefill with
         # the 128-row tiles (9.7% MFU before), DeepSeek-V2-Lite with the latent decode's splits
    timeout 80 python3 -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
      "$REPO/tests/test_kernels_gpu.py" -k "softcap" 2>&1 | tee "$OUT/test_softcap.log" | tail -2
    T=170 e2e gemma2-9b 131072
    T=130 e2e deepseek-v2-lite 8192,32768 ;;
  *) echo "unknown part $PART"; exit 2 ;;
esac
