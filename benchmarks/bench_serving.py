"""Serving benchmark of the continuous-batching engine on GPUs (random-weight 8B-shaped model).

Scenarios (each figure printed beside its target; raw JSON with --json):
  concurrent  N = 1, 4, 16, 64 questions (128 output tokens each) on one cached document
              (--doc-len, 128K): aggregate output tokens/s and per-stream inter-token latency.
              Targets: tokens/s at 16 >= 8x the single-question rate; ITL at 16 <= 2x single.
              On CUDA each row also gives rank 0's step and the ITL against the step's HBM
              floor (weights + the document's KV once + each question's own KV, at the
              measured copy bandwidth): the per-GPU-speed issue's batch-16 target, <= 1.5x.
  prefill     a --prefill-len (256K) document prefilled while 8 streams decode, for each
              prefill budget in --budgets (tokens per step): the streams' ITL during the
              prefill vs their solo ITL (target <= 3x at the default budget), the prefill's
              time vs its solo time (target <= 1.5x), and the TTFT of a 100-token request
              submitted mid-prefill (target <= 2 s). A --budgets item B:k runs budget B
              with interleave_decode_steps k (k decode-only steps after each mixed step).
  mixed       8 requests with different 4K prompts and 256 output tokens, arriving together,
              vs the same 8 one after another (target >= 3x sooner).
  single      one cold prefill (MFU), its follow-up TTFT and decode ms/token (compare with
              bench_e2e.py of the previous engine in the same run).

  python3 benchmarks/bench_serving.py --json out.json                # all scenarios, 8B
  python3 benchmarks/bench_serving.py --preset small --doc-len 8192 --prefill-len 16384  # smoke
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import (decode_floor_s, hf_config, kv_bytes_per_token,  # noqa: E402
                       param_counts, prefill_flops)



def _rand(g, vocab: int, n: int) -> List[int]:
    import torch
    return torch.randint(0, vocab, (n,), generator=g).tolist()


class Streams:
    """Requests submitted together; per-token arrival times kept per request."""

    def __init__(self, llm, prompts, params):
        self.times: List[List[float]] = [[] for _ in prompts]
        self.t0 = time.perf_counter()
        self.handles = [llm.submit(p, params, on_delta=self._cb(i))
                        for i, p in enumerate(prompts)]

    def _cb(self, i):
        def cb(_d):
            self.times[i].append(time.perf_counter())
        return cb

    def wait(self):
        outs = [h.result() for h in self.handles]
        self.t1 = time.perf_counter()
        return outs

    def cancel(self):
        for h in self.handles:
            h.cancel()

    def itl_s(self, lo: float = 0.0, hi: float = float("inf")) -> Optional[float]:
        """Median over streams of the mean gap between consecutive tokens arriving in [lo, hi]."""
        per = []
        for ts in self.times:
            w = [t for t in ts if lo <= t <= hi]
            if len(w) >= 2:
                per.append((w[-1] - w[0]) / (len(w) - 1))
        return statistics.median(per) if per else None

    def gaps_ms(self, lo: float, hi: float) -> Dict[str, float]:
        """The gaps between consecutive tokens arriving in [lo, hi], all streams pooled: their
        median, 90th percentile and largest, in ms (with interleaved prefill the gaps alternate
        between a mixed step's and a decode step's: the mean is the ITL, these show the rhythm)."""
        gaps = []
        for ts in self.times:
            w = [t for t in ts if lo <= t <= hi]
            gaps += [b - a for a, b in zip(w, w[1:])]
        gaps.sort()
        if not gaps:
            return {}
        return {"p50": round(gaps[len(gaps) // 2] * 1e3, 2),
                "p90": round(gaps[int(0.9 * (len(gaps) - 1))] * 1e3, 2),
                "max": round(gaps[-1] * 1e3, 2)}


def round_trip(steps: List[Dict], stamps: List) -> Optional[Dict[str, float]]:
    """Medians (ms) of where each step's group call went, from the engine's wall-clock
    "sent" / "read" and rank 0's execute (signature, begin, end), paired by the plans'
    signature: to the worker, its execute, back to the engine, and the worker's idle time
    between two calls (what the GPU waits for the host; with async scheduling the next step
    is sent before one ends, so "to" then includes its wait in the actor's queue). None when
    nothing pairs."""
    by_sig = {st["signature"]: st for st in steps if st.get("signature") is not None}
    pairs = [(by_sig[sig], b, e) for sig, b, e in stamps if sig in by_sig]
    if not pairs:
        return None
    med = statistics.median
    return {"pairs": len(pairs),
            "to_worker": round(med(b - st["sent"] for st, b, _ in pairs) * 1e3, 3),
            "execute": round(med(e - b for _, b, e in pairs) * 1e3, 3),
            "back": round(med(st["read"] - e for st, _, e in pairs) * 1e3, 3),
            "worker_idle": round(med(stamps[i + 1][1] - stamps[i][2]
                                     for i in range(len(stamps) - 1)) * 1e3, 3)
            if len(stamps) > 1 else None}


def concurrent(llm, g, vocab, args) -> Dict:
    from ringserve import SamplingParams
    doc = _rand(g, vocab, args.doc_len)
    key = llm.cache_document(doc)
    params = SamplingParams(max_tokens=args.out_tokens, temperature=0.0, ignore_eos=True)
    rows = []
    for n in args.concurrency:
        qs = [doc + _rand(g, vocab, 32) for _ in range(n)]
        n0 = len(llm._group.call("recent_step_times", 4096)[0])
        llm._group.call("set_call_stamps", True)
        st0 = llm.stats()
        s = Streams(llm, qs, params)
        outs = s.wait()
        st1 = llm.stats()
        stamps = llm._group.call("call_stamps", 4096)[0]
        llm._group.call("set_call_stamps", False)
        inner = llm._group.call("recent_step_times", 4096)[0][n0:]
        nst = max(1, st1["steps"] - st0["steps"])
        per_step = {k: round((st1["engine_time_s"][k] - st0["engine_time_s"][k]) / nst * 1e3, 2)
                    for k in st1["engine_time_s"]}
        # the engine thread's own time step by step: a few slow steps or all of them
        recent = llm._engine.recent_steps(nst)
        spread = {f"{k}_{q}": round(f([r[f"{k}_s"] for r in recent]) * 1e3, 2)
                  for k in ("schedule", "update")
                  for q, f in (("median", statistics.median), ("max", max))} if recent else {}
        toks = sum(len(o.token_ids) for o in outs)
        first = min(ts[0] for ts in s.times)
        # the HBM floor of one step of n questions sharing the document (per-GPU-speed issue:
        # batch 16 <= 1.5x): the document's KV read once (cascade), each question's own KV (32
        # tokens + on average half the output)
        floor_ms = None if args.floor is None else decode_floor_s(
            *args.floor[:2], args.doc_len + n * (32 + args.out_tokens / 2), args.floor[2],
            args.world_size) * 1e3
        rows.append({"n": n, "tokens": toks, "wall_s": s.t1 - s.t0,
                     "tok_s": toks / (s.t1 - s.t0),
                     "decode_tok_s": (toks - n) / (s.t1 - first),
                     "itl_ms": s.itl_s() * 1e3,
                     "ttft_s": statistics.median(o.timings["ttft_s"] for o in outs),
                     "cached": min(o.num_cached_tokens for o in outs),
                     "worker_step_ms": statistics.median(inner) * 1e3 if inner else None,
                     "engine_ms_per_step": per_step, "engine_ms_spread": spread,
                     "round_trip_ms": round_trip(llm._engine.recent_steps(nst + 8), stamps),
                     "steps": nst, "floor_ms": floor_ms})
        if floor_ms and rows[-1]["worker_step_ms"]:
            rows[-1]["step_vs_floor"] = rows[-1]["worker_step_ms"] / floor_ms
            rows[-1]["itl_vs_floor"] = rows[-1]["itl_ms"] / floor_ms
        print(f"[concurrent] {json.dumps(rows[-1])}", flush=True)
    llm.drop_document(key)
    base = rows[0]
    for r in rows:
        r["tok_s_x"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["itl_x"] = r["itl_ms"] / base["itl_ms"]
    return {"rows": rows}


def by_prefix(steps: List[Dict], prompt_len: int, bins: int = 4) -> List[Dict]:
    """Steps that carried a prompt chunk, binned by the cached prefix the chunk attended to
    (quarters of the prompt): how many, the median chunk, the median and p90 step (the
    driver's execute call) in ms."""
    out = []
    width = max(1, prompt_len // bins)
    for i in range(bins):
        lo, hi = i * width, (i + 1) * width if i < bins - 1 else float("inf")
        sel = [s for s in steps if s["prompt_tokens"] and lo <= s["max_prefix"] < hi]
        if not sel:
            continue
        ms = sorted(s["execute_s"] * 1e3 for s in sel)
        out.append({"prefix": f"{lo}-{'end' if hi == float('inf') else int(hi)}",
                    "steps": len(sel),
                    "chunk_tokens": int(statistics.median(s["prompt_tokens"] for s in sel)),
                    "step_ms": round(statistics.median(ms), 1),
                    "step_ms_p90": round(ms[int(0.9 * (len(ms) - 1))], 1)})
    return out


def _wait_tokens(s: Streams, n: int, timeout_s: float = 600.0) -> None:
    """Until every stream of `s` has `n` tokens (a stream that ends or fails first: an error,
    the streams' max_tokens must exceed n)."""
    end = time.monotonic() + timeout_s
    while min((len(t) for t in s.times), default=0) < n:
        done = [h for h in s.handles if h.done()]
        if done:
            raise RuntimeError(f"a stream ended before {n} tokens (give the streams more "
                               f"max_tokens): {done[0].result()!r:.200}")
        if time.monotonic() > end:
            raise TimeoutError(f"the streams did not reach {n} tokens in {timeout_s:.0f} s")
        time.sleep(0.005)


def _run_tag(equiv, default, k: int) -> str:
    """' E=...' for a cost model other than the engine's own, ' k=...' for interleaved
    prefill."""
    return ("" if equiv == default else f" E={equiv:g}") + (f" k={k}" if k else "")


def prefill_under_load(llm, g, vocab, args) -> Dict:
    from ringserve import SamplingParams
    eng = llm._engine
    doc = _rand(g, vocab, args.doc_len)
    dkey = llm.cache_document(doc)
    big = _rand(g, vocab, args.prefill_len)
    stream_params = SamplingParams(max_tokens=args.stream_tokens, temperature=0.0,
                                   ignore_eos=True)
    out = {"budgets": []}
    # solo: the prefill alone, and the 8 streams alone
    t = time.perf_counter()
    k = llm.cache_document(big)
    out["prefill_solo_s"] = time.perf_counter() - t
    llm.drop_document(k)
    # the streams alone, measured as under load: from the moment each has 8 tokens (their
    # admission and first steps left out) over the next (up to) 64 tokens of all; until
    # session 12 this was the mean gap of 8 fresh 64-token streams from their first token,
    # which a slow start inflated (24.01 ms in one run against 16.6-18.8 ms in others)
    s = Streams(llm, [doc + _rand(g, vocab, 32) for _ in range(8)], stream_params)
    window = min(64, args.stream_tokens - 9)     # tokens; --stream-tokens >= 16
    _wait_tokens(s, 8)
    t0 = time.perf_counter()
    _wait_tokens(s, 8 + window)
    out["itl_solo_ms"] = s.itl_s(t0, time.perf_counter()) * 1e3
    s.cancel()
    s.wait()
    print(f"[prefill] solo prefill {out['prefill_solo_s']:.2f} s, 8-stream ITL "
          f"{out['itl_solo_ms']:.2f} ms (steady: {window} tokens after each stream's 8th)",
          flush=True)
    default = eng.sched.cfg.max_num_batched_tokens
    default_equiv = eng.sched.cfg.attn_equiv_tokens
    default_k = eng.sched.cfg.interleave_decode_steps
    out["attn_equiv_default"] = default_equiv
    runs = [(b, e, default_k if k is None else k)
            for e in (args.attn_equiv or [default_equiv]) for b, k in args.budgets]
    for budget, equiv, il in runs:
        eng.sched.cfg.max_num_batched_tokens = budget
        eng.sched.cfg.attn_equiv_tokens = equiv
        eng.sched.cfg.interleave_decode_steps = il
        tag = _run_tag(equiv, default_equiv, il)
        s = Streams(llm, [doc + _rand(g, vocab, 32) for _ in range(8)], stream_params)
        _wait_tokens(s, 8)                                  # streams decoding
        n_before = len(llm._group.call("recent_step_times", 4096)[0])
        steps_before = eng.stats()["steps"]
        t0 = time.perf_counter()
        h = eng.submit("cache_document", big)
        time.sleep(min(2.0, out["prefill_solo_s"] / 3))
        t_short = time.perf_counter()
        short = llm.submit(_rand(g, vocab, 100), SamplingParams(max_tokens=4, temperature=0.0,
                                                                 ignore_eos=True))
        so = short.result()
        key = h.result()
        t1 = time.perf_counter()
        steps = eng.stats()["steps"] - steps_before
        inner = llm._group.call("recent_step_times", 4096)[0][n_before:]
        s.cancel()
        s.wait()
        llm.drop_document(key)
        row = {"budget": budget, "attn_equiv": equiv, "interleave_decode_steps": il,
               "prefill_s": t1 - t0, "steps": steps, "gaps_ms": s.gaps_ms(t0, t1),
               "worker_step_ms": [round(x * 1e3, 1) for x in inner[:steps]],
               "stats": {k: v for k, v in eng.stats().items() if isinstance(v, int)},
               "prefill_x": (t1 - t0) / out["prefill_solo_s"],
               "itl_ms": s.itl_s(t0, t1) * 1e3,
               "short_ttft_s": so.timings["ttft_s"], "short_submitted_after_s": t_short - t0}
        row["itl_x"] = row["itl_ms"] / out["itl_solo_ms"]
        row["by_prefix"] = by_prefix(eng.recent_steps(steps), args.prefill_len)
        for b in row["by_prefix"]:
            print(f"[prefill] budget {budget}{tag}: prefix "
                  f"{b['prefix']}: {b['steps']} steps, "
                  f"chunk median {b['chunk_tokens']} tokens, step median {b['step_ms']} ms "
                  f"(p90 {b['step_ms_p90']})", flush=True)
        out["budgets"].append(row)
        print(f"[prefill] {json.dumps(row)}", flush=True)
    eng.sched.cfg.max_num_batched_tokens = default
    eng.sched.cfg.attn_equiv_tokens = default_equiv
    eng.sched.cfg.interleave_decode_steps = default_k
    llm.drop_document(dkey)
    return out


def mixed(llm, g, vocab, args) -> Dict:
    from ringserve import SamplingParams
    params = SamplingParams(max_tokens=256, temperature=0.0, ignore_eos=True)
    prompts = [_rand(g, vocab, 4096) for _ in range(8)]
    t = time.perf_counter()
    for p in prompts:
        llm.generate([p], params)
    seq = time.perf_counter() - t
    prompts = [_rand(g, vocab, 4096) for _ in range(8)]   # fresh: nothing cached
    t = time.perf_counter()
    llm.generate(prompts, params)
    together = time.perf_counter() - t
    row = {"sequential_s": seq, "together_s": together, "speedup": seq / together}
    print(f"[mixed] {json.dumps(row)}", flush=True)
    return row


def single(llm, g, vocab, cfg, args) -> Dict:
    from ringserve import SamplingParams
    n = args.doc_len
    doc = _rand(g, vocab, n)
    t = time.perf_counter()
    key = llm.cache_document(doc)
    wall = time.perf_counter() - t
    out = llm.generate([doc + _rand(g, vocab, 32)], SamplingParams(
        max_tokens=64, temperature=0.0, ignore_eos=True))[0]
    llm.drop_document(key)
    row = {"length": n, "prefill_s": wall,
           # per GPU: the group's world_size GPUs share the prefill's flops
           "mfu": prefill_flops(cfg, n) / wall / (args.world_size * args.peak_tflops * 1e12),
           "followup_ttft_s": out.timings["ttft_s"],
           "decode_ms": out.timings["decode_s"] / (len(out.token_ids) - 1) * 1e3}
    print(f"[single] {json.dumps(row)}", flush=True)
    return row


def compile_causes(events, since: float) -> List[str]:
    """For each compile after `since`: the parts of its cache key (specializations, constexprs)
    that differ from the closest earlier compile of the same kernel and launch options."""
    out = []
    for i, (ts, r) in enumerate(events):
        if ts <= since:
            continue
        name, _, key = r.partition(" ")
        parts = re.split(r",\s*", key)
        best = None
        for _, r0 in events[:i]:
            name0, _, key0 = r0.partition(" ")
            if name0.split("[")[0] != name.split("[")[0]:
                continue
            p0 = re.split(r",\s*", key0)
            diff = [f"#{j}: {a} -> {b}" for j, (a, b) in enumerate(zip(p0, parts)) if a != b]
            if len(p0) != len(parts):
                diff.append(f"{len(p0)} -> {len(parts)} key parts")
            if best is None or len(diff) < len(best):
                best = diff
        out.append("; ".join(best)[:400] if best else "no earlier compile of this kernel")
    return out


def host_probe(rounds: int = 7, n: int = 20000) -> float:
    """Microseconds per unit of a fixed host workload (a small tensor made and viewed, a few
    Python calls): the GPU machines' hosts differ by ~1.4x in speed between calls (session 9,
    same code, same cProfile call counts), and a host-bound mixed step follows the host. The
    median of `rounds` runs."""
    import torch
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for i in range(n):
            x = torch.empty(4)
            x.view(2, 2).stride()
            _ = (i & 15, divmod(i, 7), [i] * 2)
        times.append((time.perf_counter() - t) / n * 1e6)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama3-8b")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--doc-len", type=int, default=131072)
    p.add_argument("--prefill-len", type=int, default=262144)
    p.add_argument("--out-tokens", type=int, default=128)
    p.add_argument("--stream-tokens", type=int, default=8192,
                   help="max tokens of the streams that run during the prefill (cancelled "
                        "once it ends)")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--budgets", default="1536:0,2100,3000:2",
                   help="prefill tokens per step to try under load (around LLM's CUDA default "
                        "of 2100 per GPU with interleave_decode_steps 1); an item B:k also sets "
                        "interleave_decode_steps k for that run, a bare B keeps the engine's "
                        "(e.g. 1536:0,2100,3000:2, the default: session 13's three points)")
    p.add_argument("--attn-equiv", default="",
                   help="prefill scenario: also sweep the flops cost model's attention-equivalent "
                        "tokens (comma list; each with every budget; default: the engine's own, "
                        "flops per token / attention flops per key)")
    p.add_argument("--scenarios", default="single,concurrent,mixed,prefill")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="decode steps as CUDA graphs (default: the engine's, on with CUDA)")
    p.add_argument("--fused-kernels", action=argparse.BooleanOptionalAction, default=None,
                   help="fused few-token kernels (default: the engine's, on with CUDA)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="LLM(async_scheduling=...): the next decode step planned and sent "
                        "while one runs (default: the engine's, on with CUDA at world size 1; "
                        "--no-async-scheduling: the synchronous engine)")
    p.add_argument("--in-process", action="store_true",
                   help="LLM(in_process=True): world size 1, the worker in this process (no "
                        "Ray actor: each step a direct call)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.stream_tokens < 16:
        p.error(f"--stream-tokens must be >= 16 (8 to start, then a window), got "
                f"{args.stream_tokens}")
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    try:   # "B" or "B:k" (k: interleave_decode_steps for that run; else the engine's)
        args.budgets = [(int(x.split(":")[0]), int(x.split(":")[1]) if ":" in x else None)
                        for x in args.budgets.split(",")]
    except ValueError:
        p.error(f"--budgets takes B or B:k items, got {args.budgets!r}")
    if any(b < 1 or (k is not None and k < 0) for b, k in args.budgets):
        p.error(f"--budgets: budgets >= 1 and k >= 0, got {args.budgets}")
    args.attn_equiv = [float(x) for x in args.attn_equiv.split(",") if x]
    if any(not e > 0 for e in args.attn_equiv):
        p.error(f"--attn-equiv values must be > 0, got {args.attn_equiv}")
    import ray
    import torch
    from ringserve import LLM, SamplingParams

    if not ray.is_initialized() and not args.in_process:
        ray.init(include_dashboard=False)
    cfg = hf_config(args.preset, max(args.prefill_len, args.doc_len) * 2)
    t = time.perf_counter()
    cpu = args.device == "cpu"
    if cpu:
        cfg["head_dim"] = 16
    llm = LLM({"config": cfg, "seed": 0}, world_size=args.world_size, device=args.device,
              dtype="float32" if cpu else "bfloat16", tokenizer=None,
              cuda_graphs=args.cuda_graphs, fused_kernels=args.fused_kernels,
              max_num_batched_tokens=args.max_num_batched_tokens,
              async_scheduling=args.async_scheduling, in_process=args.in_process,
              **({"max_kv_tokens": 4 * (args.prefill_len + args.doc_len)} if cpu else {}))
    print(f"[serving] up in {time.perf_counter() - t:.1f} s, capacity {llm.capacity_tokens} "
          f"tokens, budget {llm.config.max_num_batched_tokens}", flush=True)
    g = torch.Generator().manual_seed(0)
    vocab = cfg["vocab_size"]
    # warm-up: compiles and autotuning of prefill, chunk-vs-cache, extension and batched decode
    w = _rand(g, vocab, min(16384, args.doc_len))
    k = llm.cache_document(w)
    llm.generate([w + _rand(g, vocab, 32) for _ in range(4)], SamplingParams(
        max_tokens=8, temperature=0.0, ignore_eos=True))
    llm.drop_document(k)
    print(f"[serving] warm at {time.perf_counter() - t:.1f} s", flush=True)
    t_warm = time.time()
    res: Dict = {"args": vars(args), "default_budget": llm.config.max_num_batched_tokens,
                 "features": llm._group.call("features")[0], "host_probe_us": host_probe()}
    # the decode floor's terms (CUDA): weight bytes a token reads, KV bytes a token, and the
    # measured copy bandwidth (bytes/s, read + write, as bench_e2e's floor)
    bw = 0.0 if cpu else max(llm._group.call("copy_bandwidth"))
    args.floor = (param_counts(cfg)["decode_read"] * 2, kv_bytes_per_token(cfg), bw) \
        if bw > 0 else None
    res["async_scheduling"] = llm.config.async_scheduling   # as the engine resolved it
    print(f"[serving] features {res['features']}, async scheduling "
          f"{'on' if llm.config.async_scheduling else 'off'}; host probe "
          f"{res['host_probe_us']:.2f} us", flush=True)
    for sc in args.scenarios.split(","):
        t1 = time.perf_counter()
        if sc == "single":
            res["single"] = single(llm, g, vocab, cfg, args)
        elif sc == "concurrent":
            res["concurrent"] = concurrent(llm, g, vocab, args)
        elif sc == "mixed":
            res["mixed"] = mixed(llm, g, vocab, args)
        elif sc == "prefill":
            res["prefill"] = prefill_under_load(llm, g, vocab, args)
        print(f"[serving] {sc} took {time.perf_counter() - t1:.1f} s", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))
    res["stats"] = llm.stats()
    # Triton compiles after the warm-up (each stalls the step it falls in): rank 0's
    res["compiles_after_warmup"] = llm._group.call("compile_events", t_warm)[0]
    res["compile_causes"] = compile_causes(llm._group.call("compile_events", 0.0)[0], t_warm)
    llm.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    late = res["compiles_after_warmup"]
    print(f"\n{len(late)} Triton compiles after the warm-up on rank 0"
          + "".join(f"\n  {time.strftime('%H:%M:%S', time.localtime(ts))} {r[:160]}"
                    for ts, r in late[:12]))
    for cause in res["compile_causes"][:12]:
        print(f"    differs from its closest earlier compile in: {cause}")
    print("\nscenario                     figure                      target   measured")
    if "concurrent" in res:
        for r in res["concurrent"]["rows"]:
            fl = (f", step {r['step_vs_floor']:.2f}x / ITL {r['itl_vs_floor']:.2f}x its floor "
                  f"{r['floor_ms']:.2f} ms" if r.get("step_vs_floor") else "")
            print(f"concurrent n={r['n']:<3}             decode tok/s {r['decode_tok_s']:9.1f}"
                  f"  x{r['tok_s_x']:.2f}, ITL {r['itl_ms']:.2f} ms x{r['itl_x']:.2f}{fl}")
    if "prefill" in res:
        for r in res["prefill"]["budgets"]:
            tag = _run_tag(r["attn_equiv"], res["prefill"]["attn_equiv_default"],
                           r["interleave_decode_steps"])
            gp = r["gaps_ms"]
            gaps = f"  gaps p50/p90/max {gp['p50']}/{gp['p90']}/{gp['max']} ms" if gp else ""
            print(f"prefill budget {r['budget']:<6}{tag:9} ITL x{r['itl_x']:.2f} (<=3)  prefill "
                  f"x{r['prefill_x']:.2f} (<=1.5)  short TTFT {r['short_ttft_s']:.2f} s (<=2)"
                  f"{gaps}")
    if "mixed" in res:
        print(f"mixed 8x4K                   speedup x{res['mixed']['speedup']:.2f} (>=3)")
    if "single" in res:
        s = res["single"]
        print(f"single {s['length']}              prefill {s['prefill_s']:.2f} s MFU "
              f"{s['mfu'] * 100:.1f}%, follow-up TTFT {s['followup_ttft_s']:.3f} s, decode "
              f"{s['decode_ms']:.2f} ms/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
