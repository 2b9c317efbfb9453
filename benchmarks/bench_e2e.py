"""End-to-end benchmark on GPUs: ringserve.LLM over N GPU actors vs HF transformers on one GPU.

A model of a real shape (--preset: Llama-3-8B by default; Qwen3-30B-A3B MoE, Gemma-2-9B,
Gemma-3-12B) with random bf16 weights, built on each worker in GPU memory (nothing written to
disk). MFU and the decode floor count the parameters a token uses (MoE: the shared part plus
top-k of the experts). For each context length L:
  - cold prefill of L random tokens + the first token: prefill time, tokens/s, MFU, TTFT;
  - a follow-up on the cached document (L tokens + a 32-token question): TTFT without re-prefill,
    then decode ms/token at context ~L against the HBM floor (every rank reads all weights plus
    its share of the KV cache once per token, at the measured device copy bandwidth);
  - HF transformers (sdpa, bf16) prefill on one GPU at the same lengths until it runs out of
    memory (run in a subprocess before the actors start, so the memory is its own).
Prints a table last. Needs CUDA, Ray, cupy with NCCL. Run it from a directory other than the
repository root when ringserve is not pip-installed (Ray adds the working directory to the
actors' sys.path, and the bare `ringserve/` there lacks ringserve.kernels / ringserve.actors).

  python3 benchmarks/bench_e2e.py --world-size 2 --lengths 32768,131072,524288,max
  python3 benchmarks/bench_e2e.py --world-size 1 --tp 2 --lengths 131072,524288  # TP x CP
  python3 benchmarks/bench_e2e.py --world-size 2 --lengths 4096 --preset small --no-hf  # smoke
  python3 benchmarks/bench_e2e.py --world-size 1 --preset qwen3-moe-30b-a3b --lengths 8192,131072
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

LLAMA3 = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256,
              hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
              rope_theta=500000.0, tie_word_embeddings=False, hidden_act="silu",
              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
              bos_token_id=128000, eos_token_id=128001)
# the released configs' shapes (config.json of each model), random weights
PRESETS = {
    "llama3-8b": LLAMA3,
    # same per-layer shapes, 4 layers: a quick check of the whole path
    "small": dict(LLAMA3, num_hidden_layers=4),
    # a CPU smoke of the scripts themselves (bench_serving / profile_step --device cpu)
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2,
                 architectures=["LlamaForCausalLM"], model_type="llama"),
    # Qwen3-30B-A3B: 128 experts, top-8, 3.3B active parameters
    "qwen3-moe-30b-a3b": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936,
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[], rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
        hidden_act="silu", bos_token_id=151643, eos_token_id=151645),
    # Gemma-2-9B: 4K windows on every other layer, soft-capped scores (50) and logits (30)
    "gemma2-9b": dict(
        architectures=["Gemma2ForCausalLM"], model_type="gemma2", vocab_size=256000,
        hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, rope_theta=10000.0,
        tie_word_embeddings=True, bos_token_id=2, eos_token_id=1),
    # Gemma-3-12B (text): 1K windows on 5 of every 6 layers, RoPE 10K local / 1M x8 global
    "gemma3-12b": dict(
        architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", vocab_size=262208,
        hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=1024, sliding_window_pattern=6, hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=1e-6, rope_theta=1000000.0, rope_local_base_freq=10000.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0}, tie_word_embeddings=True,
        bos_token_id=2, eos_token_id=1),
    # DeepSeek-V2-Lite: MLA (a 512 + 64 latent per token and layer), 64 experts top-6 + 2 shared,
    # YaRN x40 over 4K with mscale; 2.7B of 15.7B parameters active
    "deepseek-v2-lite": dict(
        architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", vocab_size=102400,
        hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1,
        routed_scaling_factor=1.0, topk_method="greedy", n_group=1, topk_group=1,
        rope_theta=10000.0, rope_scaling={"type": "yarn", "factor": 40.0,
                                          "original_max_position_embeddings": 4096,
                                          "mscale": 0.707, "mscale_all_dim": 0.707,
                                          "beta_fast": 32, "beta_slow": 1},
        rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
        bos_token_id=100000, eos_token_id=100001),
}


def hf_config(preset: str, max_len: int) -> dict:
    c = dict(PRESETS[preset])
    c.update(max_position_embeddings=max(131072, max_len), torch_dtype="bfloat16")
    return c


def param_counts(c: dict) -> Dict[str, int]:
    """Parameters of ringserve's model for the config (built on the meta device): "layers"
    counts what one token uses (MoE: the shared part + top_k / num_experts of the experts),
    "layers_stored" everything the layers hold."""
    from ringserve.config import ModelConfig
    from ringserve.model import CausalLM

    cfg = ModelConfig.from_hf_dict(c)
    model = CausalLM(cfg, device="meta")
    share = cfg.moe.top_k / cfg.moe.num_experts if cfg.moe is not None else 1.0
    stored = active = 0
    for name, p in model.named_parameters():
        if name.startswith(("model.embed_tokens", "lm_head")):
            continue
        stored += p.numel()
        active += p.numel() * (share if ".experts." in name else 1.0)
    embed = cfg.vocab_size * cfg.hidden_size
    read = int(active) + embed * (1 if cfg.tie_word_embeddings else 2)
    return {"layers": int(active), "layers_stored": stored, "embed": embed, "lm_head": embed,
            "decode_read": read, "total": stored + embed * (1 if cfg.tie_word_embeddings else 2)}


def decode_floor_s(w_bytes: float, kv_tok: float, kv_tokens: float, bw: float,
                   world_size: int = 1, tp: int = 1) -> float:
    """The HBM floor of one decode step: each GPU reads its 1/tp of the weights and of its
    shard's share of the `kv_tokens` the step attends to, at `bw` bytes/s."""
    return (w_bytes + kv_tok * kv_tokens / world_size) / tp / bw


def kv_tokens_read(c: dict, n: int) -> float:
    """The cached tokens a decode step at context n must read, as a mean over the layers: n
    for a global layer, at most window + 1 for a windowed one (Gemma's local layers). Times
    kv_bytes_per_token, the KV bytes of the HBM floor (until session 15 the floor counted n
    for every layer, which overstated Gemma's floors)."""
    from ringserve.config import ModelConfig
    ws = ModelConfig.from_hf_dict(c).layer_window_sizes
    return sum(n if w is None else min(n, w + 1) for w in ws) / len(ws)


def kv_bytes_per_token(c: dict, elem: int = 2, decompressed: bool = False) -> int:
    """Cached bytes per token over all layers (MLA: the latent; decompressed=True: the K and V
    of every head that transformers' expanded form would keep)."""
    from ringserve.config import ModelConfig
    cfg = ModelConfig.from_hf_dict(c)
    if cfg.mla is not None and decompressed:
        m = cfg.mla
        per_layer = cfg.num_attention_heads * (m.qk_head_dim + m.v_head_dim)
        return cfg.num_hidden_layers * per_layer * elem
    kv = 1 if cfg.values_are_keys else 2
    return kv * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elem


def prefill_flops(c: dict, n: int) -> float:
    """Matmul FLOPs of a causal prefill of n tokens: 2 * active params * n for the layers (the
    embedding is a lookup; the LM head runs on the last token only) + attention QK^T and PV
    (causal: half of 4 * n^2 * d per head and layer; a layer windowed to w keys: 4 * d per head
    for each of the n * w - w^2 / 2 visible pairs). MLA counts the model's own attention
    FLOPs, those of the expanded form (d = qk_head_dim for QK^T, v_head_dim for PV), which
    ringserve's prefill chunks run (session 16; before, the absorbed form: latent_dim for both,
    ~3.4x more), not counting the keys' expansion nor the kernel's padding of qk_head_dim and
    v_head_dim to 256."""
    from ringserve.config import ModelConfig
    cfg = ModelConfig.from_hf_dict(c)
    d2 = (cfg.mla.qk_head_dim + cfg.mla.v_head_dim if cfg.mla is not None else 2 * cfg.head_dim)
    per_pair = 2.0 * d2 * cfg.num_attention_heads
    attn = 0.0
    for w in cfg.layer_window_sizes:
        w = n if w is None else min(n, w + 1)
        attn += per_pair * (n * w - w * w / 2)
    pc = param_counts(c)
    return 2.0 * pc["layers"] * n + 2.0 * pc["lm_head"] + attn


# --------------------------------------------------------------------------------------------
# HF transformers baseline (own process)


def run_hf(args) -> int:
    import torch
    import transformers

    lengths = [int(x) for x in args.hf_lengths.split(",") if x]
    c = hf_config(args.preset, max(lengths))
    cfg = transformers.AutoConfig.for_model(c["model_type"], **{
        k: v for k, v in c.items() if k not in ("architectures", "model_type", "torch_dtype")})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)
    # sdpa (Gemma 2's soft-capping has only eager in transformers: it runs out of memory early)
    model.config._attn_implementation = "eager" if c["model_type"] == "gemma2" else "sdpa"
    model.eval()
    results = []
    for n in lengths:
        ids = torch.randint(0, cfg.vocab_size, (1, n), device="cuda", generator=g)
        try:
            with torch.no_grad():
                model(ids[:, :1024], use_cache=False, logits_to_keep=1)  # warm-up
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                model(ids, use_cache=False, logits_to_keep=1)
                torch.cuda.synchronize()
                dt = time.perf_counter() - t0
            results.append({"length": n, "prefill_s": dt,
                            "peak_gb": torch.cuda.max_memory_allocated() / 1e9})
            print(f"[hf] {n}: {dt:.2f} s", flush=True)
        except torch.OutOfMemoryError:
            results.append({"length": n, "oom": True})
            print(f"[hf] {n}: out of memory", flush=True)
            break
        finally:
            del ids
            torch.cuda.empty_cache()
    with open(args.hf_out, "w") as f:
        json.dump(results, f)
    return 0


# --------------------------------------------------------------------------------------------
# ringserve


def run_ringserve(args, lengths: List[str]) -> List[dict]:
    import torch
    from ringserve import LLM, SamplingParams

    import ray
    numeric = [int(x) for x in lengths if x != "max"]
    cfg = hf_config(args.preset, max(numeric + [1 << 20]) * 2)
    t0 = time.perf_counter()
    if not ray.is_initialized() and not args.in_process:
        # no dashboard: the GPU machine's Ray bundle has no dashboard build (a failed start
        # costs ~60 s), and a benchmark does not need one
        ray.init(include_dashboard=False)
    if args.pipeline_one_call is not None:
        os.environ["RINGSERVE_PIPELINE_ONE_CALL"] = "1" if args.pipeline_one_call else "0"
    llm = LLM({"config": cfg, "seed": 0}, context_parallel_size=args.world_size,
              tensor_parallel_size=args.tp, layout=args.schedule,
              device="cuda", dtype="bfloat16", chunk_tokens=args.chunk_tokens,
              max_kv_tokens=args.max_kv_tokens, page_size=args.page_size,
              decode_steps=args.decode_steps, cuda_graphs=args.cuda_graphs,
              async_scheduling=args.async_scheduling, pipeline_steps=args.pipeline_steps,
              pipeline_depth=args.pipeline_depth, in_process=args.in_process,
              memory_reserve_bytes=(int(args.reserve_gb * 2**30) if args.reserve_gb is not None
                                    else None), tokenizer=None)
    one_call = "on" if llm._engine.config.pipeline_one_call else "off"
    print(f"[ringserve] group of {args.world_size} x TP {args.tp} up in "
          f"{time.perf_counter() - t0:.1f} s; "
          f"capacity {llm.capacity_tokens} KV tokens; async scheduling "
          f"{'on' if llm.config.async_scheduling else 'off'}, pipelined steps "
          f"{'on' if llm._engine._pipeline else 'off'}"
          f"{'; worker in process' if args.in_process else ''}"
          f"{'' if args.in_process else '; one call a pipelined step: ' + one_call}",
          flush=True)
    bw = max(llm._group.call("copy_bandwidth"))  # bytes/s counting read + write
    w_bytes = param_counts(cfg)["decode_read"] * 2
    kv_tok = kv_bytes_per_token(cfg)
    g = torch.Generator().manual_seed(0)
    vocab = cfg["vocab_size"]
    greedy = dict(temperature=0.0, ignore_eos=True)
    # warm-up: Triton compiles (and any autotuning) of the prefill, extension and decode paths
    # happen here, not in the timed runs (a first 32K run measured 3.3 s prefill and 3.3 s
    # follow-up TTFT cold, on 2x H200)
    warm = torch.randint(0, vocab, (4096,), generator=g).tolist()
    wq = torch.randint(0, vocab, (args.question_tokens,), generator=g).tolist()
    wk = llm.cache_document(warm)
    llm.generate([warm + wq], SamplingParams(max_tokens=4, **greedy))
    llm.drop_document(wk)
    first = next((int(x) for x in lengths if x != "max"), None)
    if args.warmup_first and first:
        wk = llm.cache_document(torch.randint(0, vocab, (first,), generator=g).tolist())
        llm.drop_document(wk)
    rows = []
    # --solo-budgets: the timed prefill again for each budget a lone prompt takes per step
    # (per rank, token-equivalents; LLM's default is ringserve.llm.GPU_SOLO_BUDGET), set on the
    # running engine's scheduler (a benchmark's reach into the engine: its config is read
    # each step)
    solos = [int(x) for x in args.solo_budgets.split(",") if x] if args.solo_budgets else [None]
    runs = [(spec, solo) for spec in lengths for solo in solos]
    sched = llm._engine.sched.cfg
    for spec, solo in runs:
        if solo is not None:
            sched.solo_budget_factor = max(
                1, -(-solo * args.world_size // sched.max_num_batched_tokens))
        margin = args.question_tokens + args.decode_tokens + 2 * args.page_size * args.world_size
        n = (llm.capacity_tokens - margin) // 1024 * 1024 if spec == "max" else int(spec)
        row = {"length": n}
        if solo is not None:
            row["solo_budget"] = solo
        if n + margin > llm.capacity_tokens:
            row["error"] = f"does not fit: capacity {llm.capacity_tokens}"
            rows.append(row)
            continue
        doc = torch.randint(0, vocab, (n,), generator=g).tolist()
        q = torch.randint(0, vocab, (args.question_tokens,), generator=g).tolist()
        try:
            for e in list(llm._engine.doc_cache.entries()):  # room for this length
                llm.drop_document(e.key)
            steps0 = llm.stats()["steps"]
            t0 = time.perf_counter()
            key = llm.cache_document(doc)
            wall = time.perf_counter() - t0
            # where a chunked prefill's time goes: the engine's steps (the driver's group
            # call) and rank 0's execute, against the wall time (the rest: the engine
            # thread's planning and updates, the Ray round trips)
            nsteps = llm.stats()["steps"] - steps0     # the prefill's steps (nothing else ran)
            chunks = [s for s in llm._engine.recent_steps(nsteps) if s["prompt_tokens"]]
            worker = llm._group.call("recent_step_times", nsteps)[0] if nsteps else []
            out = llm.generate([doc + q], SamplingParams(max_tokens=args.decode_tokens,
                                                         **greedy))[0]
            # rank 0's execute time of each decode step (the last steps ran this request
            # alone: its question step gave the first token, one step each gave the others):
            # the steady state apart from the worst step (a graph capture, a compile)
            k = len(out.token_ids) - 1
            steps = llm._group.call("recent_step_times", k)[0] if k > 0 else []
            ab = None
            if llm._engine._pipeline:
                # the same question again with one blocking call a step (the engine reads the
                # switch each step; nothing is in flight between requests): its inter-token
                # latency and worker steps, and whether the greedy tokens are the same
                llm._engine._pipeline = False
                # from the same cache as the first: the document alone (that question's
                # finished sequence is cached too, and would make this one's first token a
                # one-row extension instead of the question's)
                for e in list(llm._engine.doc_cache.entries()):
                    if e.key != key:
                        llm.drop_document(e.key)
                try:
                    o2 = llm.generate([doc + q], SamplingParams(max_tokens=args.decode_tokens,
                                                                **greedy))[0]
                    s2 = llm._group.call("recent_step_times", len(o2.token_ids) - 1)[0]
                finally:
                    llm._engine._pipeline = True
                ab = dict(unpipelined_itl_median_ms=o2.timings.get("itl_median_s", 0) * 1e3,
                          unpipelined_step_median_ms=sorted(s2)[len(s2) // 2] * 1e3
                          if s2 else None,
                          pipelined_same_tokens=o2.token_ids == out.token_ids)
            llm.drop_document(key)
        except Exception as e:  # noqa: BLE001 - report and go on to the table
            row["error"] = f"{type(e).__name__}: {e}"[:200]
            rows.append(row)
            print(f"[ringserve] {n}: {row['error']}", flush=True)
            continue
        fl = prefill_flops(cfg, n)
        dec_s = out.timings["decode_s"] / max(1, len(out.token_ids) - 1)
        floor = decode_floor_s(w_bytes, kv_tok, kv_tokens_read(cfg, n + args.question_tokens),
                               bw, args.world_size, args.tp)
        row.update(prefill_s=wall, prefill_tok_s=n / wall,
                   mfu=fl / wall / (args.world_size * args.tp * args.peak_tflops * 1e12),
                   followup_ttft_s=out.timings["ttft_s"], cached=out.num_cached_tokens,
                   decode_ms=dec_s * 1e3, floor_ms=floor * 1e3, decode_vs_floor=dec_s / floor)
        if ab is not None:
            row.update(ab)
        if "itl_median_s" in out.timings:   # the served rate apart from one slow step
            row.update(itl_median_ms=out.timings["itl_median_s"] * 1e3,
                       itl_max_ms=out.timings["itl_max_s"] * 1e3,
                       itl_vs_floor=out.timings["itl_median_s"] / floor)
        if steps:
            steady = sorted(steps)[len(steps) // 2]
            row.update(decode_step_median_ms=steady * 1e3, decode_step_worst_ms=max(steps) * 1e3,
                       steady_vs_floor=steady / floor)
        nch = len(worker)
        drv = sum(s["execute_s"] for s in chunks[-nch:]) if nch else 0.0
        row.update(prefill_steps=nch, prefill_driver_exec_s=drv,
                   prefill_worker_exec_s=sum(worker),
                   prefill_gap_ms_per_step=(wall - sum(worker)) / max(1, nch) * 1e3)
        rows.append(row)
        print(f"[ringserve] {json.dumps(row)}", flush=True)
    row0 = {"capacity_tokens": llm.capacity_tokens, "copy_bw_tb_s": bw / 1e12,
            "kv_bytes_per_token": kv_tok,
            "kv_bytes_per_token_decompressed": kv_bytes_per_token(cfg, decompressed=True)}
    llm.shutdown()
    return [row0] + rows


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world-size", type=int, default=2,
                   help="sequence shards (context parallel size)")
    p.add_argument("--tp", type=int, default=1,
                   help="GPUs per shard splitting the model (tensor parallel size); the group "
                        "uses world-size x tp GPUs")
    p.add_argument("--lengths", default="32768,131072,524288,max",
                   help="comma-separated token counts; 'max' = the longest that fits")
    p.add_argument("--schedule", choices=("striped", "ring"), default="striped")
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--question-tokens", type=int, default=32)
    p.add_argument("--cuda-graphs", action="store_true",
                   help="decode steps replayed from captured CUDA graphs (LLM(cuda_graphs=True))")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="LLM(async_scheduling=...): the next decode step planned and sent "
                        "while one runs (default: the engine's, on with CUDA at world size 1; "
                        "--no-async-scheduling: the synchronous engine)")
    p.add_argument("--pipeline-steps", action=argparse.BooleanOptionalAction, default=True,
                   help="LLM(pipeline_steps=...): with async scheduling, a step launched on the "
                        "actor before the one in flight is read (--no-pipeline-steps: one "
                        "blocking call a step)")
    p.add_argument("--pipeline-depth", type=int, default=1,
                   help="LLM(pipeline_depth=...): pipelined steps in flight at once")
    p.add_argument("--pipeline-one-call", action=argparse.BooleanOptionalAction, default=None,
                   help="pipelined steps through the Ray actor as one call a step (`advance`; "
                        "the engine's default) or two (--no-pipeline-one-call: launch, finish); "
                        "sets RINGSERVE_PIPELINE_ONE_CALL")
    p.add_argument("--in-process", action="store_true",
                   help="LLM(in_process=True): world size 1, the worker in this process (no "
                        "Ray actor: each step a direct call)")
    p.add_argument("--decode-steps", type=int, default=1,
                   help="decode steps per Ray call (LLM(decode_steps=...))")
    p.add_argument("--chunk-tokens", type=int, default=16384)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--solo-budgets", default="",
                   help="comma-separated per-rank step budgets of a lone prompt (token-"
                        "equivalents): each length's prefill is timed at each (default: the "
                        "engine's)")
    p.add_argument("--max-kv-tokens", type=int, default=None)
    p.add_argument("--reserve-gb", type=float, default=None,
                   help="GPU memory per rank kept free besides weights and KV (default: "
                        "estimated per token)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="dense bf16 peak per GPU for MFU (H100/H200 SXM: 989)")
    p.add_argument("--no-warmup-first", dest="warmup_first", action="store_false",
                   help="skip the untimed prefill of the first length (kernel shapes warm-up)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument("--hf-lengths", default=None, help="default: the numeric --lengths")
    p.add_argument("--hf-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--hf-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.hf_only:
        return run_hf(args)
    lengths = [x.strip() for x in args.lengths.split(",") if x.strip()]
    hf_rows: List[dict] = []
    if not args.no_hf:
        import tempfile
        out = os.path.join(tempfile.mkdtemp(), "hf.json")
        hf_lengths = args.hf_lengths or ",".join(x for x in lengths if x != "max")
        cmd = [sys.executable, __file__, "--hf-only", "--hf-out", out, "--preset", args.preset,
               "--hf-lengths", hf_lengths]
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=os.environ.get(
            "CUDA_VISIBLE_DEVICES", "0").split(",")[0])
        subprocess.run(cmd, env=env, check=False)
        if os.path.exists(out):
            hf_rows = json.load(open(out))
    rs = run_ringserve(args, lengths)
    info, rows = rs[0], rs[1:]
    hf = {r["length"]: r for r in hf_rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "info": info, "ringserve": rows, "hf": hf_rows}, f,
                      indent=1)
    print(f"\nbench_e2e: {args.preset}, bf16, world_size {args.world_size} x tp {args.tp}, "
          f"{args.schedule}; "
          f"capacity {info['capacity_tokens']} KV tokens; copy bandwidth "
          f"{info['copy_bw_tb_s']:.2f} TB/s (read+write)")
    ratio = info["kv_bytes_per_token_decompressed"] / info["kv_bytes_per_token"]
    if ratio != 1:   # MLA: the latent cache against transformers' expanded K/V
        print(f"KV bytes per token {info['kv_bytes_per_token']} (latent) vs "
              f"{info['kv_bytes_per_token_decompressed']} decompressed: {ratio:.2f}x; a "
              f"decompressed cache would hold about {info['capacity_tokens'] / ratio:.0f} tokens "
              f"(less: the weights' share of memory is the same)")
    print(f"{'tokens':>9} | {'prefill s':>9} | {'tok/s':>8} | {'MFU':>5} | "
          f"{'follow-up TTFT':>14} | {'decode ms/tok':>13} | {'HBM floor':>9} | {'x floor':>7} | "
          f"{'HF 1 GPU s':>10}")
    for r in rows:
        h = hf.get(r["length"], {})
        hf_s = "OOM" if h.get("oom") else (f"{h['prefill_s']:.2f}" if "prefill_s" in h else "-")
        if "error" in r:
            print(f"{r['length']:>9} | {r['error']}  (HF: {hf_s})")
            continue
        print(f"{r['length']:>9} | {r['prefill_s']:>9.2f} | {r['prefill_tok_s']:>8.0f} | "
              f"{r['mfu']:>5.1%} | {r['followup_ttft_s']:>12.3f} s | {r['decode_ms']:>13.2f} | "
              f"{r['floor_ms']:>7.2f}ms | {r['decode_vs_floor']:>7.2f} | {hf_s:>10}"
              + (f"  solo budget {r['solo_budget']}" if "solo_budget" in r else "")
              + f"  ({r['prefill_steps']} steps, {r['prefill_gap_ms_per_step']:.1f} ms/step "
                f"outside rank 0's execute)"
              + (f"; served inter-token median {r['itl_median_ms']:.2f} ms "
                 f"({r['itl_vs_floor']:.2f}x floor), worst {r['itl_max_ms']:.2f} ms"
                 if "itl_median_ms" in r else "")
              + (f"; one call a step: inter-token median {r['unpipelined_itl_median_ms']:.2f}"
                 f" ms, same tokens {r['pipelined_same_tokens']}"
                 if "unpipelined_itl_median_ms" in r else "")
              + (f"; decode steps at rank 0: median {r['decode_step_median_ms']:.2f} ms "
                 f"({r['steady_vs_floor']:.2f}x floor), worst {r['decode_step_worst_ms']:.2f} ms"
                 if "decode_step_median_ms" in r else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
