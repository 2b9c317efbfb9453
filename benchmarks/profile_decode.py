"""Where a decode step's time goes, on one device and without Ray: eager vs CUDA graphs.

One in-process shard worker (world size 1) under the engine, with a random-weight model. For each
context length L: cache L random tokens, then time `--steps` greedy decode steps (the worker's
`execute` time) eagerly and from captured CUDA graphs (`cuda_graphs`; on CPU the "emulate" mode, which only checks the path), both against the
HBM floor (all weights plus the KV of L tokens read once per token at the measured copy
bandwidth); then pipelined (the served engine's launch / finish at world size 1, in-process: the
period between two steps' reads). Last, torch.profiler over one eager step and one graph
replay: the number of kernels launched, host vs device time, the ops that cost the host most,
and (CUDA) one replay's back-to-back wall time against its kernels' sum. Tokens from every mode
must be equal.

  python3 benchmarks/profile_decode.py --lengths 32768,131072          # GPU, Llama-3-8B shape
  python3 benchmarks/profile_decode.py --preset tiny --device cpu --lengths 300 --steps 8   # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import sys


import torch

PRESETS = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128),
    "deep": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=32,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}


def _e2e():
    """bench_e2e (beside this file): its presets of the other families, their active
    parameters."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_e2e
    return bench_e2e


FAMILY_PRESETS = ("qwen3-moe-30b-a3b", "deepseek-v2-lite", "gemma2-9b", "gemma3-12b")


def config(preset: str, max_len: int = 1 << 21) -> dict:
    if preset in FAMILY_PRESETS:
        return _e2e().hf_config(preset, max_len)
    c = dict(PRESETS[preset])
    c.update(architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5,
             rope_theta=500000.0, max_position_embeddings=1 << 21, hidden_act="silu",
             tie_word_embeddings=False)
    return c


class _OneRank:
    """The ActorGroup interface over one in-process worker (no Ray)."""
    world_size = 1

    def __init__(self, worker):
        self.w = worker

    def call(self, method, *args, **kw):
        return [getattr(self.w, method)(*args)]

    def call_per_rank(self, method, args_list, **kw):
        return [getattr(self.w, method)(*args_list[0])]

    def rebuild(self):
        raise RuntimeError("profile_decode: the worker failed")

    def shutdown(self):
        self.w.shutdown()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS) + list(FAMILY_PRESETS),
                   default="llama3-8b", help="a Llama shape here, or a family preset of "
                   "bench_e2e (the floor then counts the parameters a token uses)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--lengths", default="32768,131072")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per mode")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=1,
                   help="questions decoding together on the cached document (its KV shared: "
                        "the cascade decode; the per-GPU-speed issue's batch-16 row)")
    p.add_argument("--fused-kernels", action="store_true",
                   help="the fused few-token kernels (kernels/fused.py; LLM(fused_kernels=True))")
    p.add_argument("--host-sample", action="store_true",
                   help="sample the engine thread's Python stack every 0.5 ms during the "
                        "pipelined mode: where a pipelined step's host time goes (the served "
                        "period is the longer of the host's work and the device's)")
    p.add_argument("--pipeline-trace", default=None, metavar="FILE",
                   help="after the timed modes, the pipelined mode once more under "
                        "torch.profiler (every thread's CUDA runtime calls, the kernels): "
                        "the runtime calls that cost the host most, the device's busy share, "
                        "and the trace written to FILE (Chrome format)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device (use --device cpu for a smoke run)")
    from ringserve.actors.model_worker import ModelShardWorker
    from ringserve.engine import Engine, EngineConfig
    from ringserve.sampling import SamplingParams

    lengths = [int(x) for x in a.lengths.split(",") if x]
    if a.batch < 1:
        p.error(f"--batch must be >= 1, got {a.batch}")
    cfg = config(a.preset, max(lengths) + 4 * a.steps + 1024)
    dtype = "bfloat16" if a.device == "cuda" else "float32"
    w = ModelShardWorker(0, 1, a.device, model={"config": cfg, "seed": 0}, dtype=dtype,
                         page_size=a.page_size,
                         kv_tokens=max(lengths) + a.batch * (4 * a.steps + 1024),
                         cuda_graphs=True if a.device == "cuda" else "emulate",
                         fused_kernels=a.fused_kernels)
    # async scheduling with pipelined steps switched per mode (`_pipeline`): off for the eager
    # and graph rows (each step's execute timed alone), on for the pipelined row (the served
    # engine's way at world size 1, here without Ray: the period between steps' reads)
    eng = Engine(_OneRank(w), None, (), EngineConfig(max_num_batched_tokens=8192,
                                                     cuda_graphs=True, async_scheduling=True))
    eng._pipeline = False
    bw = w.copy_bandwidth()
    if a.preset in FAMILY_PRESETS:     # MoE: the shared part + top_k of the experts
        n_params = _e2e().param_counts(cfg)["decode_read"]
    else:
        n_params = sum(t.numel() for t in w.model.parameters())
    w_bytes = n_params * w.model.dtype.itemsize
    kv_tok = w.pool.cfg.bytes_per_token
    greedy = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=a.steps + 3)
    g = torch.Generator().manual_seed(0)
    sync = (lambda: torch.cuda.synchronize()) if a.device == "cuda" else (lambda: None)
    rows = []

    def set_mode(graphs: bool, pipelined: bool = False):
        w.cuda_graphs = graphs
        eng.sched.cfg.graphs = graphs
        eng._pipeline = pipelined

    for L in lengths:
        ids = torch.randint(0, cfg["vocab_size"], (L,), generator=g).tolist()
        key = eng.submit("cache_document", ids).result()
        row = {"length": L, "batch": a.batch}

        def questions(first: int, params, ids=ids) -> list:
            """`--batch` questions on the cached document (one token each, then decoding
            together: a shared prefix), their outputs."""
            hs = [eng.submit("generate", ids + [first + j], params) for j in range(a.batch)]
            return [h.result() for h in hs]

        for mode in ("eager", "graphs", "pipelined"):
            set_mode(mode != "eager", mode == "pipelined")
            sampler = _HostSampler(eng._thread) if a.host_sample and mode == "pipelined" \
                else None
            timer = _CallTimer(w, ("launch", "finish", "execute")) if mode == "pipelined" \
                else None
            before = eng.stats()
            outs = questions(1, greedy)
            sync()
            if sampler is not None:
                row["host_sample"] = sampler.stop()
                _print_host_sample(L, row["host_sample"])
            row.setdefault("engine", {})[mode] = _engine_delta(eng, before, eng.stats())
            if timer is not None:
                row["engine"][mode]["worker_calls"] = timer.stop()
            # the last steps decode every question (they finish together), after their
            # extensions and two warm-up steps
            dec = w.step_times[-a.steps:]
            dt = sum(dec) / len(dec)
            row[mode] = {"ms_per_token": dt * 1e3,
                         "median_ms": sorted(dec)[len(dec) // 2] * 1e3,
                         "worst_ms": max(dec) * 1e3,
                         "tokens": [o.token_ids[3:] for o in outs] if a.batch > 1
                         else outs[0].token_ids[3:]}
            if mode == "pipelined":
                # served: the engine's read-to-read period (median of the steady state); the
                # worker's own step times are kept beside it (their mean read 18-32 ms at
                # batch 16 on the H200 against a 11.9 ms period, session 24)
                row[mode]["worker_mean_ms"] = row[mode]["ms_per_token"]
                row[mode]["ms_per_token"] = row["engine"][mode]["period_ms"]
        if a.pipeline_trace:
            set_mode(True, True)
            acts = [torch.profiler.ProfilerActivity.CPU]
            if a.device == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=acts) as prof:
                questions(1, greedy)
                sync()
            row["pipeline_trace"] = _trace_summary(prof)
            _print_trace_summary(L, row["pipeline_trace"])
            prof.export_chrome_trace(a.pipeline_trace)
        # windowed layers read at most window + 1 of the L tokens (bench_e2e.kv_tokens_read);
        # with a batch, the document once and each question's own tokens
        own = a.batch * (a.steps + 4) if a.batch > 1 else 0
        floor = ((w_bytes + kv_tok * (_e2e().kv_tokens_read(cfg, L) + own)) / bw if bw
                 else float("nan"))
        row["floor_ms"] = floor * 1e3
        row["same_tokens"] = row["eager"]["tokens"] == row["graphs"]["tokens"] \
            == row["pipelined"]["tokens"]
        row["pipelined_launches"] = w.pipelined_launches
        # one decode step under the profiler: eager (the ops, host and device), then a graph
        # replay (its kernels' device time against the step's wall time: the gaps)
        acts = [torch.profiler.ProfilerActivity.CPU]
        if a.device == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        real = eng._send   # the async loop (not pipelined here) executes inside it
        profs = {}
        for mode in ("graphs", "eager"):
            set_mode(mode == "graphs")   # one step at a time under the profiler
            box = {}

            def profiled(step, real=real, box=box, acts=acts):
                # the third step: after the extension and one decode step
                box["n"] = box.get("n", 0) + 1
                if box["n"] != 3 or any(wk.n > 1 for wk in step.works):
                    return real(step)
                with torch.profiler.profile(activities=acts) as prof:
                    r = real(step)
                    sync()
                box["prof"] = prof
                return r

            eng._send = profiled
            questions(1 + a.batch, SamplingParams(temperature=0.0, ignore_eos=True,
                                                  max_tokens=4))
            eng._send = real
            profs[mode] = box.get("prof")
        if a.device == "cuda" and w._graphs:
            row["replay_ms"] = _replay_ms(next(reversed(w._graphs.values())).graph)
        eng.submit("drop_document", key).result()
        if profs["graphs"] is not None and a.device == "cuda":
            kg = [e for e in profs["graphs"].key_averages()
                  if "cuda" in str(getattr(e, "device_type", "")).lower()]
            row["graph_step_profile"] = {
                "kernels": sum(e.count for e in kg),
                "device_ms": sum(getattr(e, "self_device_time_total", 0) for e in kg) / 1e3}
            print(f"L={L}: one graph step's kernels: {row['graph_step_profile']}", flush=True)
            if "replay_ms" in row:      # the gaps between the graph's kernels, on the device
                print(f"L={L}: one replay back to back {row['replay_ms']:.3f} ms against its "
                      f"kernels' {row['graph_step_profile']['device_ms']:.3f} ms", flush=True)
            print(profs["graphs"].key_averages().table(sort_by="self_cuda_time_total",
                                                       row_limit=30), flush=True)
        ka = profs["eager"].key_averages()
        row["profile"] = {
            "host_ms": sum(e.self_cpu_time_total for e in ka) / 1e3,
            "device_ms": sum(getattr(e, "self_device_time_total", 0) for e in ka) / 1e3,
            "kernels": sum(e.count for e in ka if getattr(e, "device_type", None) is not None
                           and "cuda" in str(e.device_type).lower()),
            "aten_ops": sum(e.count for e in ka if e.key.startswith("aten::")),
        }
        rows.append(row)
        print(f"L={L}: eager {row['eager']['ms_per_token']:.2f} ms/token, graphs "
              f"{row['graphs']['ms_per_token']:.2f}, pipelined "
              f"{row['pipelined']['ms_per_token']:.2f}, floor {row['floor_ms']:.2f}, same tokens "
              f"{row['same_tokens']}; one eager step: {row['profile']}", flush=True)
        for mode, d in row["engine"].items():
            print(f"L={L}: engine thread, {mode}: {d}", flush=True)
        print(ka.table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
        if a.device == "cuda":    # where the device's time goes (the floor's gap, op by op)
            print(ka.table(sort_by="self_cuda_time_total", row_limit=25), flush=True)
    print(f"\nprofile_decode: {a.preset}, batch {a.batch}, {dtype}, {a.device}, copy bandwidth "
          f"{bw / 1e12:.2f} TB/s")
    print(f"{'tokens':>9} | {'eager ms':>8} | {'graphs ms':>9} | {'floor ms':>8} | "
          f"{'eager/floor':>11} | {'graphs/floor':>12} | {'pipelined ms':>12} | "
          f"{'pipel./floor':>12} | same")
    for r in rows:
        e, gr, f = r["eager"]["ms_per_token"], r["graphs"]["ms_per_token"], r["floor_ms"]
        pl = r["pipelined"]["ms_per_token"]
        print(f"{r['length']:>9} | {e:>8.2f} | {gr:>9.2f} | {f:>8.2f} | {e / f:>11.2f} | "
              f"{gr / f:>12.2f} | {pl:>12.2f} | {pl / f:>12.2f} | {r['same_tokens']}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"args": vars(a), "rows": rows}, fh, indent=1)
    eng.shutdown()
    w.shutdown()
    return 0 if all(r["same_tokens"] for r in rows) else 1


def _engine_delta(eng, before: dict, after: dict) -> dict:
    """The engine thread's steps between two `stats()`: how many (and planned while one was in
    flight), and over the decode steps of every row (the steady state) the medians of its
    own schedule and update ms a step, of the group call (send to read) and of the period
    between two steps' results (read to read, and its worst)."""
    import statistics
    out = {k: _num(after, k) - _num(before, k) for k in ("steps", "steps_planned_ahead")}
    steps = eng.recent_steps(int(out["steps"]))
    full = max((s["decode_rows"] for s in steps), default=0)
    dec = [s for s in steps if s["decode_rows"] == full and not s["prompt_tokens"]]
    med = (lambda xs: round(statistics.median(xs) * 1e3, 3) if xs else float("nan"))
    out.update(decode_steps=len(dec), schedule_ms=med([s["schedule_s"] for s in dec]),
               update_ms=med([s["update_s"] for s in dec]),
               period_ms=med([b["read"] - a["read"] for a, b in zip(dec, dec[1:])]),
               worst_period_ms=round(max((b["read"] - a["read"] for a, b in zip(dec, dec[1:])),
                                         default=float("nan")) * 1e3, 3),
               execute_ms=med([s["execute_s"] for s in dec]))
    return out


class _CallTimer:
    """Times the worker's calls (its methods wrapped on the instance until `stop`): per name,
    the count and the median and longest ms; for the pipelined mode, the host's time to
    launch a step against the time a finish waits for one."""

    def __init__(self, worker, names):
        import time
        self.w, self.names, self.t = worker, names, {n: [] for n in names}
        for n in names:
            real = getattr(worker, n)

            def timed(*args, _real=real, _n=n, **kw):
                t0 = time.perf_counter()
                try:
                    return _real(*args, **kw)
                finally:
                    self.t[_n].append(time.perf_counter() - t0)
            setattr(worker, n, timed)

    def stop(self) -> dict:
        import statistics
        for n in self.names:
            delattr(self.w, n)
        return {n: (len(v), round(statistics.median(v) * 1e3, 3), round(max(v) * 1e3, 3))
                for n, v in self.t.items() if v}


def _num(stats: dict, key: str) -> float:
    """A counter from `Engine.stats()`."""
    v = stats.get(key, 0)
    return v if isinstance(v, (int, float)) else 0


class _HostSampler:
    """A poor man's sampling profiler of one thread (the engine's): its stack every 0.5 ms,
    from a daemon thread, counted by innermost frame and by innermost ringserve frame. Biased
    toward waits: the sampler needs the GIL, which the engine thread holds while it runs
    Python and releases while it waits on the device (session 24: 68% of samples in a
    synchronize while the thread's own work was ~1.5 of each 11.9 ms); the engine's medians
    and `_CallTimer` are the measure, this says which frames."""

    def __init__(self, thread, period_s: float = 5e-4):
        import collections
        import threading
        import time
        self.leaf = collections.Counter()
        self.own = collections.Counter()
        self.n = 0
        self._stop = threading.Event()
        tid = thread.ident

        def run():
            while not self._stop.is_set():
                f = sys._current_frames().get(tid)
                if f is not None:
                    self.n += 1
                    self.leaf[_where(f)] += 1
                    g = f
                    while g is not None and not any(
                            d in g.f_code.co_filename for d in ("/ringserve/", "/actors/")):
                        g = g.f_back
                    if g is not None:
                        self.own[_where(g)] += 1
                time.sleep(period_s)
        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()

    def stop(self) -> dict:
        self._stop.set()
        self._t.join()
        n = max(self.n, 1)
        return {"samples": self.n,
                "leaf": [(k, round(100 * c / n, 1)) for k, c in self.leaf.most_common(15)],
                "ringserve": [(k, round(100 * c / n, 1)) for k, c in self.own.most_common(15)]}


def _where(frame) -> str:
    c = frame.f_code
    return f"{os.path.basename(c.co_filename)}:{frame.f_lineno} {c.co_name}"


def _print_host_sample(L: int, hs: dict) -> None:
    print(f"L={L}: pipelined mode, the engine thread sampled {hs['samples']} times; "
          "innermost frames (% of samples):", flush=True)
    for k, pct in hs["leaf"]:
        print(f"   {pct:5.1f}%  {k}", flush=True)
    print(f"L={L}: innermost ringserve / actors frames:", flush=True)
    for k, pct in hs["ringserve"]:
        print(f"   {pct:5.1f}%  {k}", flush=True)


def _trace_summary(prof) -> dict:
    """From a profile of the pipelined mode: the CUDA runtime / driver calls by total host
    time (count, total and longest ms), and the device's busy share of the span from its first
    kernel to its last (the union of the kernels' intervals)."""
    import collections
    calls = collections.defaultdict(lambda: [0, 0.0, 0.0])
    spans = []
    for e in prof.events():
        dev = "cuda" in str(getattr(e, "device_type", "")).lower()
        dur = e.time_range.elapsed_us() / 1e3
        if dev:
            spans.append((e.time_range.start, e.time_range.end))
        elif e.name.startswith(("cuda", "cu")) and not e.name.startswith("cudnn"):
            c = calls[e.name]
            c[0] += 1
            c[1] += dur
            c[2] = max(c[2], dur)
    busy, end = 0.0, None
    for a0, a1 in sorted(spans):
        if end is None or a0 > end:
            busy += a1 - a0
            end = a1
        elif a1 > end:
            busy += a1 - end
            end = a1
    span = (max(b for _, b in spans) - min(a for a, _ in spans)) if spans else 0
    top = sorted(calls.items(), key=lambda kv: -kv[1][1])[:12]
    return {"device_busy": round(busy / span, 3) if span else None,
            "device_span_ms": span / 1e3,
            "runtime_calls": [(k, n, round(t, 3), round(m, 3)) for k, (n, t, m) in top]}


def _print_trace_summary(L: int, t: dict) -> None:
    print(f"L={L}: pipelined under the profiler: device busy {t['device_busy']} of "
          f"{t['device_span_ms']:.1f} ms; runtime calls (count, total ms, longest ms):",
          flush=True)
    for name, n, tot, mx in t["runtime_calls"]:
        print(f"   {name[:40]:40} {n:6d} {tot:10.3f} {mx:9.3f}", flush=True)


def _replay_ms(graph, n: int = 50) -> float:
    """The device's wall time of one replay of a captured decode step, replayed n times back
    to back (CUDA events; the host queues them faster than they run): against the sum of its
    kernels' times, what the gaps between them cost. The replays rewrite the last step's KV
    slot and outputs with the same values."""
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(n):
        graph.replay()
    e1.record()
    e1.synchronize()
    return e0.elapsed_time(e1) / n


if __name__ == "__main__":
    sys.exit(main())
