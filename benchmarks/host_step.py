"""The host's cost of a mixed serving step, measured on any machine (no GPU): the real engine
and worker (in-process, no Ray) run the Triton path of the 8B model's layer count on CPU, with
every Triton launch reduced to a no-op at the compiled launcher (FastLaunch's key and argument
work still runs; the kernels compute nothing), and layers so narrow that their GEMMs cost
little. A long prompt is chunked while streams decode on a cached document, as in the GPU
prefill-under-load scenario; the late steps are reported (the worker's `execute` wall, median)
and optionally cProfiled.

On an H200 the late mixed step is host-bound (session 9: all kernels queued ~2 ms before the
step ends); this measures the Python that makes it so, between GPU calls. The absolute figure
is this machine's: GPU hosts differ (bench_serving prints a host probe to compare), and the
GEMMs of the narrow layers still cost some CPU (printed apart from the rest).

  python3 benchmarks/host_step.py                       # 32 layers, 8 streams, budget 1536
  python3 benchmarks/host_step.py --profile 16          # and a cProfile of 16 late steps
  python3 benchmarks/host_step.py --count-ops 4         # aten ops of 4 late steps, by op

The aten-op count is the figure that carries over to a GPU host best: there each op (a view, a
`torch.empty`) goes through the CUDA dispatcher at several times its CPU cost, and the late
mixed step was host-bound there with ~2,400 of them (session 10: 2,638 counted here before its
cuts, 256 of them the CPU-only length checks of the paged kernel on CPU tensors).
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


class _Compiled:
    """Stands for a compiled kernel: its launcher does nothing."""
    function = 0
    packed_metadata = ()

    @staticmethod
    def run(*args):
        return None


class _NoLaunch:
    """A JIT function whose every launch compiles nothing and launches nothing."""

    def __init__(self, fn):
        self.fn = fn
        self.params = getattr(fn, "params", None)
        self.__name__ = getattr(fn, "__name__", "kernel")

    def __getitem__(self, grid):
        return lambda *a, **k: _Compiled()


def stub_launches():
    """Every FastLaunch of the kernels (their modules loaded first: the model imports some
    lazily) takes its direct path to a no-op launcher. Returns (how many, a function that
    undoes it all): the stubs are process-wide, and a test process runs real kernels after."""
    import gc

    from triton.runtime.jit import JITFunction

    from ringserve.kernels import _host, flash_decode, flash_fwd, fused, merge  # noqa: F401
    saved = [(_host, "_device_and_stream", _host._device_and_stream),
             (_host, "_hooked", _host._hooked)]
    _host._device_and_stream = lambda: (0, 0)
    _host._hooked = lambda: False
    objs = [o for o in gc.get_objects() if isinstance(o, _host.FastLaunch)]
    for obj in objs:
        saved.append((obj, "__dict__", dict(obj.__dict__)))
        fn = obj.fn
        # the interpreter's function keeps the Python function: parse its signature as the
        # compiler would (nothing compiles), so FastLaunch binds arguments as on a GPU
        jit = fn if hasattr(fn, "params") else JITFunction(fn.fn)
        nl = _NoLaunch(jit)
        nl.params = jit.params
        obj.fn, obj.off, obj.cache, obj.names = nl, False, {}, None

    def undo():
        for owner, name, value in saved:
            if name == "__dict__":
                owner.__dict__.clear()
                owner.__dict__.update(value)
            else:
                setattr(owner, name, value)
    return len(objs), undo


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--doc-len", type=int, default=16384)
    p.add_argument("--prefill-len", type=int, default=65536)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--budget", type=int, default=1536)
    p.add_argument("--attn-equiv", type=float, default=5000.0,
                   help="the cost model's attention-equivalent tokens: small, so that the late "
                        "chunks are the 128-token ones of a 256K prompt on the GPU")
    p.add_argument("--late", type=int, default=60, help="the last this many steps are timed")
    p.add_argument("--profile", type=int, default=0, help="cProfile this many late steps")
    p.add_argument("--count-ops", type=int, default=0,
                   help="count the aten ops of this many late steps (per step, by op)")
    p.add_argument("--kv-tokens", type=int, default=None)
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        p.error("needs TRITON_INTERPRET=1 (set by the script when run directly)")
    import torch
    from profile_step import OneRank
    # the 8B shape's heads and layers, narrow hidden and MLP (the GEMMs are not the subject)
    cfg = dict(vocab_size=512, hidden_size=64, intermediate_size=128,
               num_hidden_layers=a.layers, num_attention_heads=32, num_key_value_heads=8,
               head_dim=8, architectures=["LlamaForCausalLM"], model_type="llama",
               rope_theta=500000.0)
    kv = a.kv_tokens or 2 * (a.doc_len + a.prefill_len) + 64 * a.streams
    grp = OneRank("cpu", model={"config": cfg, "seed": 0}, dtype="float32", page_size=64,
                  chunk_tokens=8192, cuda_graphs=False, fused_kernels=True, kv_tokens=kv,
                  backend="triton")
    threads = torch.get_num_threads()
    undo = None
    try:
        torch.set_num_threads(1)      # the host's one thread, as the worker's step runs
        stubbed, undo = stub_launches()
        return _run(a, cfg, grp, stubbed)
    finally:
        if undo is not None:
            undo()
        torch.set_num_threads(threads)


def _run(a, cfg, grp, stubbed) -> int:

    from ringserve.engine import Engine, EngineConfig
    eng = Engine(grp, None, (), EngineConfig(
        max_num_batched_tokens=a.budget, passq_max_tokens=2048, prefill_cost="flops",
        solo_budget_factor=8, attn_equiv_tokens=a.attn_equiv))
    try:
        return _measure(a, cfg, grp, stubbed, eng)
    finally:
        eng.shutdown()      # also when a step failed: no engine thread left decoding


def _measure(a, cfg, grp, stubbed, eng) -> int:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from ringserve.sampling import SamplingParams
    g = torch.Generator().manual_seed(0)

    def rnd(n):
        return torch.randint(0, cfg["vocab_size"], (n,), generator=g).tolist()

    doc = rnd(a.doc_len)
    eng.submit("cache_document", doc).result()
    # decoding until cancelled (each must fit the cache alone: no more than the prompt's size)
    streams = [eng.submit("generate", doc + rnd(32), SamplingParams(
        max_tokens=a.prefill_len, temperature=0.0, ignore_eos=True)) for _ in range(a.streams)]
    time.sleep(0.5)
    for h in streams:
        if h.done():      # failed at admission: the measurement would have no decodes beside
            h.result()
    w = grp.w
    real = w.execute
    log = []          # (wall s, chunk tokens) of the prompt's steps
    prof = cProfile.Profile() if a.profile else None
    gemm = [0.0]
    lin = torch.nn.functional.linear

    def timed_linear(*x, **k):
        t = time.perf_counter()
        r = lin(*x, **k)
        gemm[0] += time.perf_counter() - t
        return r

    late_from = int(0.75 * a.prefill_len)
    profiled = [0]
    ops = collections.Counter()
    counted = [0]

    class _CountOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    def execute(plan):
        ring = [s for s in plan.seqs if s.kind == "ring"]
        chunk = sum(len(s.token_ids) for s in ring)
        g0 = gemm[0]
        t = time.perf_counter()
        late = any(s.chunk_start >= late_from for s in ring)
        if prof is not None and profiled[0] < a.profile and late:
            profiled[0] += 1      # cProfiled steps are not timed
            return prof.runcall(real, plan)
        if counted[0] < a.count_ops and late:
            counted[0] += 1       # counted steps are not timed
            with _CountOps():
                return real(plan)
        r = real(plan)
        log.append((time.perf_counter() - t, chunk, gemm[0] - g0))
        return r

    w.execute = execute
    torch.nn.functional.linear = timed_linear
    try:
        t = time.perf_counter()
        key = eng.submit("cache_document", rnd(a.prefill_len)).result()
        wall = time.perf_counter() - t
    finally:
        torch.nn.functional.linear = lin
        w.execute = real
    mixed = [x for x in log if x[1] > 0]
    late = mixed[-a.late:]
    eng.submit("drop_document", key).result()
    from ringserve.errors import RequestCancelledError
    for h in streams:
        h.cancel()
    for h in streams:
        try:
            h.result()
        except RequestCancelledError:
            pass
    med = statistics.median(x[0] for x in late) * 1e3
    med_gemm = statistics.median(x[2] for x in late) * 1e3
    print(f"host_step: {a.layers} layers, {a.streams} streams, budget {a.budget}, "
          f"{stubbed} kernels stubbed; prompt {a.prefill_len} in {len(mixed)} mixed steps "
          f"({wall:.1f} s)")
    print(f"late mixed step (last {len(late)}, chunk median "
          f"{statistics.median(x[1] for x in late):.0f} tokens): host {med:.2f} ms median, "
          f"of which CPU GEMMs {med_gemm:.2f} ms; without them {med - med_gemm:.2f} ms")
    if counted[0]:
        n = counted[0]
        print(f"aten ops per late mixed step: {sum(ops.values()) / n:.0f} (over {n} steps); "
              "the most frequent: " + ", ".join(f"{k} {v / n:.0f}" for k, v in ops.most_common(12)))
    if prof is not None:
        print(f"cProfile of {profiled[0]} steps with a chunk past {late_from} tokens:")
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
        print(s.getvalue())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")      # triton's CPU path, before it loads
    sys.exit(main())
