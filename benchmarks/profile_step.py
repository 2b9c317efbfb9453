"""Where an engine step's time goes on one GPU, without Ray: the engine over one in-process
ModelShardWorker. Times decode-only steps at several batch sizes, a prefill chunk alone, and a
prefill chunk with decodes beside it (median ms per step), then prints a torch profiler table of
one mixed step.

  python3 benchmarks/profile_step.py --preset small --doc-len 16384 --prefill-len 65536
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import hf_config  # noqa: E402
from profile_decode import _OneRank  # noqa: E402
from torch.profiler import ProfilerActivity  # noqa: E402


def sync():
    import torch
    torch.cuda.synchronize()


ACTIVITIES = [ProfilerActivity.CPU, ProfilerActivity.CUDA]


class OneRank(_OneRank):
    """The ActorGroup interface over one in-process worker (no Ray)."""

    def __init__(self, device="cuda", **kw):
        from ringserve.actors.model_worker import ModelShardWorker
        super().__init__(ModelShardWorker(0, 1, device, **kw))


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="small")
    p.add_argument("--doc-len", type=int, default=16384)
    p.add_argument("--prefill-len", type=int, default=65536)
    p.add_argument("--budget", type=int, default=8192)
    p.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA graphs for decode-only steps (default: on CUDA, as LLM)")
    p.add_argument("--fused-kernels", action=argparse.BooleanOptionalAction, default=None,
                   help="the fused few-token kernels (default: on CUDA, as LLM)")
    p.add_argument("--kv-tokens", type=int, default=None,
                   help="KV capacity in tokens (default: what the device's memory holds)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: a smoke run of the script (tiny preset, float32, no CUDA profile)")
    p.add_argument("--ray", action="store_true", help="through a Ray actor (LLM) instead")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch's intra-op threads in the worker (0: leave them; a Ray actor "
                        "runs 1; with --ray: LLM(worker_torch_threads=))")
    p.add_argument("--python-profile", type=int, default=0,
                   help="with --late-only: cProfile this many late mixed steps in the worker "
                        "(function by function: where the host's Python time goes)")
    p.add_argument("--late-only", action="store_true",
                   help="only the profile of a late mixed step (8 decodes + a chunk in the "
                        "prompt's last quarter), with the last quarter's step times")
    p.add_argument("--at", type=float, default=0.75,
                   help="with --late-only: where in the prompt the profiled chunk starts, as a "
                        "fraction (default 0.75: the last quarter; 0.125: an early chunk); the "
                        "step times and timeline are those of the eighth of the prompt after it")
    p.add_argument("--single", type=int, default=0,
                   help="only time one cold prefill of this many tokens: chunked as LLM does on "
                        "CUDA (flops cost, its step budget and solo factor) vs one step, then "
                        "chunked under the profiler: kernels by kind, TFLOP/s, device busy")
    p.add_argument("--passes", default="chunked,one,profiled",
                   help="with --single: the prefills to run, in order: chunked (LLM's CUDA "
                        "budgets), one (one step), profiled (chunked under the profiler; ends "
                        "the run)")
    p.add_argument("--trace", default=None,
                   help="with --single: write the profiled prefill's Chrome trace here")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="dense bf16 peak for MFU (H100/H200 SXM: 989)")
    a = p.parse_args(argv)
    import torch
    from ringserve.engine import Engine, EngineConfig
    from ringserve.sampling import SamplingParams

    cfg = hf_config(a.preset, 2 * (a.doc_len + a.prefill_len))
    if not 0.0 < a.at < 1.0:
        p.error(f"--at must be a fraction in (0, 1), got {a.at}")
    # the profiled chunk starts at `at`; step times come from chunks in [at, at_end)
    at = int(a.at * a.prefill_len)
    at_end = min(a.prefill_len, at + a.prefill_len // 4)
    cpu = a.device == "cpu"
    if a.graphs is None:
        a.graphs = not cpu
    if a.fused_kernels is None:
        a.fused_kernels = not cpu
    global sync, ACTIVITIES
    if cpu:
        sync, ACTIVITIES = (lambda: None), [ProfilerActivity.CPU]
    if a.ray:
        import ray
        from ringserve import LLM
        ray.init(include_dashboard=False)
        llm = LLM({"config": cfg, "seed": 0}, device=a.device,
                  dtype="float32" if cpu else "bfloat16", tokenizer=None,
                  max_num_batched_tokens=a.budget, cuda_graphs=a.graphs,
                  fused_kernels=a.fused_kernels, max_kv_tokens=a.kv_tokens,
                  worker_torch_threads=a.torch_threads or None)
        eng = llm._engine
        grp = llm._group
    else:
        grp = OneRank(a.device, model={"config": cfg, "seed": 0},
                      dtype="float32" if cpu else "bfloat16", page_size=16 if cpu else 64,
                      chunk_tokens=8192, cuda_graphs=("emulate" if cpu else True) if a.graphs
                      else False, fused_kernels=a.fused_kernels, kv_tokens=a.kv_tokens)
        # the LLM's CUDA scheduling defaults (flops cost model, solo factor 8)
        eng = Engine(grp, None, (), EngineConfig(max_num_batched_tokens=a.budget,
                                                 passq_max_tokens=2048, cuda_graphs=a.graphs,
                                                 prefill_cost="flops", solo_budget_factor=8))
    if a.torch_threads and not a.ray:
        torch.set_num_threads(a.torch_threads)
    threads = (torch.get_num_threads() if not a.ray else
               a.torch_threads or "as Ray sets")
    print(f"features: cuda_graphs={a.graphs} fused_kernels={a.fused_kernels} torch threads "
          f"{threads}", flush=True)
    if a.single:
        return single(a, cfg, grp)
    if not a.ray:   # as LLM does on CUDA (session 6's in-process run compiled mid-prefill: a
        # 7.3 s step); on CPU there is nothing to warm
        print(f"warmup {grp.w.warmup():.1f} s", flush=True)
    times = []
    real = eng._execute

    def timed(step):
        if not a.ray:
            sync()
        t = time.perf_counter()
        r = real(step)
        if not a.ray:
            sync()
        times.append((time.perf_counter() - t,
                      sum(1 for w in step.works if w.n == 1), sum(w.n for w in step.works
                                                                   if w.n > 1)))
        return r

    eng._execute = timed
    from torch.profiler import profile
    profiled = {}

    def profiled_decode(step, n_want):
        """timed(), plus a profile of the 20th decode-only step of batch n_want: host vs device
        time, kernels, aten ops, the ops that cost the host most."""
        if (n_want not in profiled and len(times) == 20
                and all(w.n == 1 for w in step.works) and len(step.works) == n_want):
            with profile(activities=ACTIVITIES) as pr:
                r = timed(step)
            ev = pr.key_averages()
            kern = [e for e in pr.events() if e.device_type.name == "CUDA"]
            host = sum(e.self_cpu_time_total for e in ev) / 1e3
            dev = sum(e.self_device_time_total for e in ev if e.device_type.name == "CUDA") / 1e3
            aten = sum(e.count for e in ev if e.key.startswith("aten::"))
            print(f"decode batch {n_want} step profile: host {host:.2f} ms, device {dev:.2f} ms,"
                  f" {len(kern)} kernels, {aten} aten ops")
            print(ev.table(sort_by="self_cpu_time_total", row_limit=18))
            profiled[n_want] = True
            return r
        return timed(step)

    g = torch.Generator().manual_seed(0)
    V = cfg["vocab_size"]

    def rnd(n):
        return torch.randint(0, V, (n,), generator=g).tolist()

    doc = rnd(a.doc_len)
    eng.submit("cache_document", doc).result()
    greedy = dict(temperature=0.0, ignore_eos=True)
    # the streams beside a prefill decode until cancelled (each must fit the capacity alone)
    stream_max = 100000 if a.kv_tokens is None else a.kv_tokens - a.doc_len - 32
    for n in (() if a.late_only else (1, 1, 8, 16, 64)):
        times.clear()
        eng._execute = (lambda step, n=n: profiled_decode(step, n)) if n in (1, 8) else timed
        hs = [eng.submit("generate", doc + rnd(32), SamplingParams(max_tokens=40, **greedy))
              for _ in range(n)]
        t = time.perf_counter()
        for h in hs:
            h.result()
        dec = [x[0] for x in times if x[2] == 0 and x[1] == n]
        inner = grp.call("recent_step_times", len(times))[0]
        if not dec:   # the budget never let all n decode in one step
            print(f"decode batch {n:3d}: no step decoded all {n} at once (budget {a.budget})")
            continue
        print(f"decode batch {n:3d}: step {statistics.median(dec) * 1e3:7.2f} ms "
              f"(driver+worker; {len(dec)} steps; in execute {statistics.median(inner) * 1e3:.2f}"
              f" ms), wall {time.perf_counter() - t:.2f} s")
    eng._execute = timed
    for load in (() if a.late_only else (0, 8)):
        times.clear()
        hs = [eng.submit("generate", doc + rnd(32), SamplingParams(max_tokens=stream_max, **greedy))
              for _ in range(load)]
        time.sleep(0.5)
        t = time.perf_counter()
        key = eng.submit("cache_document", rnd(a.prefill_len)).result()
        wall = time.perf_counter() - t
        eng.submit("drop_document", key).result()   # room for the next one
        for h in hs:
            h.cancel()
        for h in hs:
            h.result()
        mixed = [x[0] for x in times if x[2] > 0]
        inner = grp.call("recent_step_times", len(times))[0]
        print(f"prefill {a.prefill_len} with {load} decodes: wall {wall:.2f} s, chunk steps "
              f"{[round(x * 1e3) for x in mixed]} ms; in execute "
              f"{[round(x * 1e3) for x in inner]}")
    if a.ray and a.late_only:
        # as served: the same late mixed step profiled inside the Ray actor, and the last
        # quarter's step times on the driver and in the worker
        hs = [eng.submit("generate", doc + rnd(32), SamplingParams(max_tokens=stream_max,
                                                                    **greedy)) for _ in range(8)]
        time.sleep(0.5)
        times.clear()
        n0 = len(grp.call("recent_step_times", 4096)[0])
        grp.call("set_step_timeline", True)
        grp.call("profile_chunk_step", at)
        if a.python_profile:
            grp.call("profile_python_steps", at + a.prefill_len // 16, a.python_profile)
        eng.submit("drop_document", eng.submit("cache_document", rnd(a.prefill_len)).result()
                   ).result()
        for h in hs:
            h.cancel()
        inner = grp.call("recent_step_times", 4096)[0][n0:]
        prof = grp.call("take_profile")[0]
        timeline_summary("ray", grp.call("step_timeline")[0], at, at_end)
        if a.python_profile:
            print(f"[ray] python profile: {grp.call('take_python_profile')[0]}")
        mixed = [x[0] * 1e3 for x in times if x[2] > 0]
        q = len(mixed) // 4
        print(f"[ray] last quarter's mixed steps: driver median "
              f"{statistics.median(mixed[-q:]):.1f} ms, worker median "
              f"{statistics.median(inner[-q:]) * 1e3:.1f} ms ({q} steps)")
        if prof:
            print(f"[ray] late mixed step in the actor ({prof['chunk_tokens']} tokens at "
                  f"{prof['chunk_start']}, {prof['rows']} rows, torch threads "
                  f"{prof['torch_threads']}): wall {prof['wall_ms']:.1f} ms, host "
                  f"{prof['host_ms']:.2f} ms, device {prof['device_ms']:.2f} ms")
            print(prof["by_host"])
            print(prof["by_device"])
        eng.shutdown()
        return
    if a.ray:
        eng.shutdown()
        return
    # profile one mixed step
    hs = [eng.submit("generate", doc + rnd(32), SamplingParams(max_tokens=stream_max, **greedy))
          for _ in range(8)]
    time.sleep(0.5)
    box = {}
    late = []    # (chunk tokens, ms) of the last quarter's mixed steps, the profiled one excluded

    def prof_step(step):
        # a late chunk (the last quarter of the prompt): its attention reads the longest prefix
        chunk = [w for w in step.works if w.n > 1 and at <= w.start < at_end]
        if "done" not in box and chunk:
            with profile(activities=ACTIVITIES) as pr:
                r = real(step)
                sync()
            box["done"] = pr
            box["chunk"] = (chunk[0].start, chunk[0].n)
            return r
        sync()
        t = time.perf_counter()
        r = real(step)
        sync()
        if chunk:
            late.append((chunk[0].n, (time.perf_counter() - t) * 1e3))
        return r

    eng._execute = prof_step
    if a.late_only:
        grp.call("set_step_timeline", True)
        if a.python_profile:   # the steps after the torch-profiled one
            grp.call("profile_python_steps", at + a.prefill_len // 16, a.python_profile)
    eng.submit("drop_document", eng.submit("cache_document", rnd(a.prefill_len)).result()).result()
    if a.late_only:
        timeline_summary("in-process", grp.call("step_timeline")[0], at, at_end)
        if a.python_profile:
            print(f"[in-process] python profile: {grp.call('take_python_profile')[0]}")
    for h in hs:
        h.cancel()
    if "done" not in box:
        print(f"no mixed step with a chunk in {at}..{at_end} to profile: the {a.prefill_len}-token prompt never ran in "
              f"several chunks at budget {a.budget}")
        eng.shutdown()
        return
    ev = box["done"].key_averages()
    host = sum(e.self_cpu_time_total for e in ev) / 1e3
    dev = sum(e.self_device_time_total for e in ev if e.device_type.name == "CUDA") / 1e3
    print(f"profiled mixed step (8 decodes + a chunk of {box['chunk'][1]} tokens at "
          f"{box['chunk'][0]}): host {host:.2f} ms, device {dev:.2f} ms")
    if late:
        print(f"mixed steps with a chunk in {at}..{at_end}: {len(late)}, chunk median "
              f"{statistics.median(n for n, _ in late)} tokens, step median "
              f"{statistics.median(t for _, t in late):.1f} ms (min {min(t for _, t in late):.1f})")
    print(box["done"].key_averages().table(sort_by="cpu_time_total", row_limit=25))
    print(box["done"].key_averages().table(sort_by="cuda_time_total", row_limit=12))
    eng.shutdown()


def timeline_summary(tag: str, rows, lo: int, hi: int) -> None:
    """The mixed steps (a prompt chunk beside decodes) whose chunk starts in [lo, hi): median
    wall, when every kernel was queued, and the device's span, in ms; queued close to wall:
    host-bound."""
    sel = [r for r in rows if r[3] > 8 and r[1] > 0 and lo <= r[4] < hi]
    if not sel:
        print(f"[{tag}] timeline: no mixed steps with a chunk in {lo}..{hi}")
        return
    med = [statistics.median(r[i] for r in sel) * 1e3 for i in range(3)]
    print(f"[{tag}] timeline of the {len(sel)} mixed steps with a chunk in {lo}..{hi} (median "
          f"ms): wall {med[0]:.1f}, all kernels queued at {med[1]:.1f}, device span "
          f"{med[2]:.1f}")


def single(a, cfg, grp):
    """A cold prefill of a.single tokens: chunked with LLM's CUDA budgets (the step budget and
    its solo factor), in one step, then chunked again under the profiler as a whole: the
    kernels by kind (GEMM, attention, ...) with their TFLOP/s, and the device's busy share."""
    import os
    import tempfile

    import torch
    from torch.profiler import profile
    from trace_kernels import category_totals

    from ringserve.config import ModelConfig
    from ringserve.engine import Engine, EngineConfig
    from ringserve.llm import step_budgets
    from ringserve.planner import layer_params, prefill_flops

    print(f"warmup {grp.w.warmup():.1f} s", flush=True)
    mc = ModelConfig.from_hf_dict(cfg)
    n = a.single
    gemm_fl = 2.0 * layer_params(mc) * n
    attn_fl = prefill_flops(mc, n) - gemm_fl
    budget, factor = step_budgets(True, 1)
    g = torch.Generator().manual_seed(1)
    trace = a.trace or os.path.join(tempfile.mkdtemp(), "prefill.trace.json")
    passes = {"chunked": (budget, factor, False), "one": (1 << 22, 1, False),
              "profiled": (budget, factor, True)}
    for name in a.passes.split(","):
        if name not in passes:
            raise SystemExit(f"--passes: unknown pass {name!r} (chunked, one, profiled)")
    pr = None
    for name in a.passes.split(","):
        bud, fac, profiled = passes[name]
        eng = Engine(grp, None, (), EngineConfig(max_num_batched_tokens=bud,
                                                 prefill_cost="flops", solo_budget_factor=fac))
        times = []
        real = eng._execute

        def timed(step, real=real, times=times):
            sync()
            t = time.perf_counter()
            w = step.works[0]
            r = real(step)
            sync()
            times.append((w.start, w.n, time.perf_counter() - t))
            return r

        eng._execute = timed
        ids = torch.randint(0, cfg["vocab_size"], (n,), generator=g).tolist()
        pr = profile(activities=ACTIVITIES) if profiled else None
        if pr is not None:
            pr.__enter__()
        t = time.perf_counter()
        try:
            eng.submit("cache_document", ids).result()
        finally:
            wall = time.perf_counter() - t
            if pr is not None:
                pr.__exit__(None, None, None)
        mfu = (gemm_fl + attn_fl) / wall / (a.peak_tflops * 1e12)
        tag = " (under the profiler)" if pr is not None else ""
        print(f"budget {bud} x{fac}{tag}: {n} tokens in {wall:.2f} s = {mfu:.1%} MFU, "
              f"{len(times)} steps: {[(s_, m, round(dt, 3)) for s_, m, dt in times]}",
              flush=True)
        eng.shutdown()
        if pr is not None:
            break
    if pr is None:
        return
    print(pr.key_averages().table(sort_by="cuda_time_total", row_limit=20))
    pr.export_chrome_trace(trace)
    tot = category_totals(trace)
    fl = {"gemm": gemm_fl, "attention": attn_fl}
    print(f"device busy {tot['busy_ms']:.0f} ms of a {tot['span_ms']:.0f} ms kernel span "
          f"({tot['busy_ms'] / max(tot['span_ms'], 1e-9):.1%}); wall {wall * 1e3:.0f} ms")
    print(f"{'kind':>14} | {'kernels':>7} | {'ms':>8} | {'share':>6} | {'TFLOP/s':>7} | top names")
    for k, (c, ms) in sorted(tot["kinds"].items(), key=lambda kv: -kv[1][1]):
        tf = f"{fl[k] / (ms / 1e3) / 1e12:7.0f}" if k in fl and ms > 0 else " " * 7
        print(f"{k:>14} | {c:>7} | {ms:8.1f} | {ms / max(tot['busy_ms'], 1e-9):6.1%} | {tf} | "
              f"{', '.join(tot['names'][k])}")
    print(f"GEMM FLOPs {gemm_fl / 1e15:.3f} PF, attention {attn_fl / 1e15:.3f} PF (peak "
          f"{a.peak_tflops:.0f} TFLOP/s)", flush=True)


if __name__ == "__main__":
    main()
