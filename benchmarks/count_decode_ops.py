"""How many ops one decode step launches per layer, on CPU: aten ops and Triton launches.

An eager decode step is launch-bound on the GPU (docs/benchmarks.md: ~55 kernels per layer of
the 8B shape for ~12 that the math needs), so the count of launches is the figure to cut, and it
does not need a GPU: the same Python runs on CPU with backend="triton" under TRITON_INTERPRET=1,
where every Triton launch goes through the interpreter. One in-process shard worker (world size
1, no Ray) under the engine runs a narrow random-weight Llama; one batch-`--batch` decode step is
profiled (torch.profiler), the eager step (StepAttention) and the emulated CUDA-graph body.
Counted: Triton launches (by kernel), aten ops (all, as profile_decode.py counts them, and
top-level: the ops the Python code calls, without the ops they call), leaving out the aten ops
the interpreter runs inside a launch (on a GPU a launch is one kernel). Per layer = the
difference between a `--layers` model and one of half the depth, divided by the layers between.

  TRITON_INTERPRET=1 python3 benchmarks/count_decode_ops.py             # 32 vs 16 layers
  TRITON_INTERPRET=1 python3 benchmarks/count_decode_ops.py --unfused   # without kernels/fused.py
  python3 benchmarks/count_decode_ops.py --backend torch                # the CPU serving path
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_decode import _OneRank  # noqa: E402  (the one-worker group, no Ray)


def _config(layers: int, family: str) -> dict:
    c = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
             rope_theta=500000.0, max_position_embeddings=1 << 16, hidden_act="silu",
             tie_word_embeddings=False)
    if family == "llama":
        c.update(architectures=["LlamaForCausalLM"], model_type="llama")
    elif family == "qwen3":
        c.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3")
    elif family == "qwen3-moe":
        c.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=8,
                 num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                 decoder_sparse_step=1, mlp_only_layers=[])
    elif family == "deepseek":
        # DeepSeek-V2-Lite-like: MLA (a 32 + 8 = 40-wide latent, q_proj direct), 8 experts top-2
        # + 2 shared, layer 0 dense (so both depths must be > 1), plain RoPE
        c.update(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2",
                 num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
                 qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
                 n_shared_experts=2, moe_intermediate_size=32, first_k_dense_replace=1,
                 topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0,
                 n_group=1, topk_group=1)
    else:
        raise ValueError(family)
    return c


_LAUNCHES: Counter = Counter()
_TAG = "triton_launch"


def _watch_launches() -> None:
    """Count every Triton launch and mark its extent for the profiler (interpreter: the
    launch's own host copies are aten ops that a GPU launch does not make)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter
    cls = interpreter.InterpretedFunction
    if getattr(cls.run, "_counted", False):
        return
    real = cls.run

    def run(self, *args, **kwargs):
        if not kwargs.get("warmup"):
            _LAUNCHES[self.fn.__name__] += 1
        with torch.profiler.record_function(_TAG):
            return real(self, *args, **kwargs)

    run._counted = True
    cls.run = run


def _inside_launch(ev) -> bool:
    p = ev.cpu_parent
    while p is not None:
        if p.name == _TAG:
            return True
        p = p.cpu_parent
    return False


# ops that only make a view or allocate: no kernel on a GPU
_NO_KERNEL = {"aten::" + n for n in (
    "view", "reshape", "_reshape_alias", "select", "slice", "unsqueeze", "squeeze", "t",
    "transpose", "expand", "permute", "as_strided", "split", "split_with_sizes", "chunk",
    "unflatten", "flatten", "detach", "detach_", "alias", "unbind", "narrow", "view_as", "_unsafe_view",
    "lift_fresh", "empty", "empty_like", "empty_strided", "resolve_conj", "resolve_neg",
    "to", "_to_copy", "contiguous", "clone", "numpy_T", "lift", "result_type", "is_nonzero",
    "item", "_local_scalar_dense", "size", "stride", "dim")}
# ops that may or may not copy: a kernel when they do (a copy_ below them)
_MAYBE_COPY = {"aten::to", "aten::_to_copy", "aten::contiguous", "aten::reshape", "aten::clone"}


def _copies(ev) -> bool:
    return any(c.name == "aten::copy_" or _copies(c) for c in ev.cpu_children)


def _kernel_like(ev) -> bool:
    """A top-level op that would launch (at least) one GPU kernel."""
    if ev.name in _MAYBE_COPY:
        return _copies(ev)
    return ev.name not in _NO_KERNEL


def _top_level(ev) -> bool:
    p = ev.cpu_parent
    while p is not None:
        if p.name.startswith("aten::"):
            return False
        p = p.cpu_parent
    return True


def _summary(box: dict, tokens) -> dict:
    """The counts of the profiled step in box ("prof", "launches")."""
    evs = [e for e in box["prof"].events() if e.name.startswith("aten::")
           and not _inside_launch(e)]
    top = [e for e in evs if _top_level(e)]
    kern = [e for e in top if _kernel_like(e)]
    return {"aten_ops": len(evs), "aten_top": len(top), "kernel_ops": len(kern),
            "kernel_names": dict(Counter(e.name for e in kern)),
            "triton": sum(box["launches"].values()), "by_kernel": dict(box["launches"]),
            "top_ops": Counter(e.name for e in top).most_common(12),
            "top_names": dict(Counter(e.name for e in top)),
            "tokens": tokens}


def _moe_backend(w, backend: str) -> None:
    """The MoE layers' kernels by the worker's backend: theirs is "auto" (Triton on CUDA, torch
    on CPU), so on CPU they would take the grouped torch path that a GPU decode does not run."""
    from ringserve.moe import MoE
    for mod in w.model.modules():
        if isinstance(mod, MoE):
            mod.backend = backend


def _profile_first(eng, wanted) -> dict:
    """Wrap the engine's step so that the first step for which wanted(step) holds runs under
    the CPU profiler with its Triton launches counted: the box gets "prof" and "launches"."""
    box = {}
    real = eng._execute

    def profiled(step):
        if "prof" in box or not wanted(step):
            return real(step)
        _LAUNCHES.clear()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            r = real(step)
        box["prof"], box["launches"] = prof, Counter(_LAUNCHES)
        return r

    eng._execute = profiled
    return box


def count_step(layers: int, backend: str, graphs: bool, batch: int, family: str,
               dtype: str = "float16", prompt: int = 40) -> dict:
    """Counts of one decode step of `batch` rows (the first step where every row decodes)."""
    from ringserve.actors.model_worker import ModelShardWorker
    from ringserve.engine import Engine, EngineConfig
    from ringserve.sampling import SamplingParams

    _watch_launches()
    cfg = _config(layers, family)
    w = ModelShardWorker(0, 1, "cpu", model={"config": cfg, "seed": 0}, dtype=dtype,
                         page_size=16, kv_tokens=batch * (prompt + 16) + 64, backend=backend,
                         cuda_graphs="emulate" if graphs else False, fused_kernels=True)
    _moe_backend(w, backend)
    eng = Engine(_OneRank(w), None, (), EngineConfig(max_num_batched_tokens=4096,
                                                     cuda_graphs=graphs))
    box = _profile_first(eng, lambda step: len(step.works) >= batch
                         and all(wk.n == 1 for wk in step.works))
    g = torch.Generator().manual_seed(1)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=3)
    hs = [eng.submit("generate", torch.randint(0, cfg["vocab_size"], (prompt + i,),
                                               generator=g).tolist(), params)
          for i in range(batch)]
    tokens = [h.result().token_ids for h in hs]
    eng.shutdown()
    w.shutdown()
    if "prof" not in box:
        raise RuntimeError("no all-decode step of the whole batch was seen")
    return _summary(box, tokens)


def count_mixed_step(layers: int, backend: str, batch: int, family: str,
                     dtype: str = "float16") -> dict:
    """Counts of one mixed step: a ring chunk of a long prompt against its cached prefix (split
    into 8 key ranges, as a short chunk against a long prefix is on a GPU) beside `batch`
    decoding rows that share a cached document (what the serving benchmark's prefill under
    load runs for hundreds of steps)."""
    from ringserve.actors.model_worker import ModelShardWorker
    from ringserve.engine import Engine, EngineConfig
    from ringserve.parallel import step_attention as sa
    from ringserve.sampling import SamplingParams

    _watch_launches()
    saved = sa.MIN_SPLIT_TOKENS, sa.TARGET_PROGRAMS
    sa.MIN_SPLIT_TOKENS, sa.TARGET_PROGRAMS = 16, 1 << 14    # 8 splits, as on the GPU
    cfg = _config(layers, family)
    w = ModelShardWorker(0, 1, "cpu", model={"config": cfg, "seed": 0}, dtype=dtype,
                         page_size=16, kv_tokens=4096, backend=backend,
                         cuda_graphs=False, fused_kernels=True)
    _moe_backend(w, backend)
    eng = Engine(_OneRank(w), None, (), EngineConfig(max_num_batched_tokens=64,
                                                     passq_max_tokens=4))
    box = _profile_first(eng, lambda step: any(wk.kind == "ring" and wk.start >= 256
                                               for wk in step.works)
                         and sum(wk.n == 1 for wk in step.works) >= batch)
    g = torch.Generator().manual_seed(1)
    V = cfg["vocab_size"]
    try:
        doc = torch.randint(0, V, (64,), generator=g).tolist()
        eng.submit("cache_document", doc).result()
        hs = [eng.submit("generate", doc + torch.randint(0, V, (4,), generator=g).tolist(),
                         SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=1000))
              for _ in range(batch)]
        eng.submit("cache_document", torch.randint(0, V, (400,), generator=g).tolist()).result()
        for h in hs:
            h.cancel()
        tokens = [h.result().token_ids[:4] for h in hs]
    finally:
        sa.MIN_SPLIT_TOKENS, sa.TARGET_PROGRAMS = saved
        eng.shutdown()
        w.shutdown()
    if "prof" not in box:
        raise RuntimeError("no mixed step (a late ring chunk beside every decode) was seen")
    return _summary(box, tokens)


KEYS = ("aten_ops", "aten_top", "kernel_ops", "triton")
FAMILIES = ("llama", "qwen3", "qwen3-moe", "deepseek")


def _per_layer(full: dict, half: dict, n: int) -> dict:
    """Per-layer count of each name whose count changes with the depth, most first."""
    d = {k: (full.get(k, 0) - half.get(k, 0)) / n for k in set(full) | set(half)}
    return dict(sorted(((k, v) for k, v in d.items() if v), key=lambda kv: (-kv[1], kv[0])))


def _fmt(d: dict) -> str:
    return ", ".join(f"{k.removeprefix('aten::')} {v:g}" for k, v in d.items())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--backend", default="triton", choices=("triton", "torch"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--family", default="llama", choices=FAMILIES)
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"),
                   help="float16: the casts to float32 and back copy, as bf16 does on a GPU")
    p.add_argument("--unfused", action="store_true",
                   help="the model's torch path around the Triton attention (what ran before "
                        "the fused kernels of kernels/fused.py)")
    p.add_argument("--mixed", action="store_true",
                   help="a mixed step instead: a late prompt chunk against its cached prefix "
                        "beside --batch decoding rows on a shared document (eager)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.unfused:
        from ringserve import model
        model.FUSED_MAX_TOKENS = 0
    if a.family == "deepseek" and a.layers // 2 <= 1:
        p.error("--family deepseek: layer 0 is dense, so --layers must be >= 4 (both depths "
                "of the per-layer difference > 1)")
    if a.backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("backend triton on CPU needs TRITON_INTERPRET=1")
    torch.set_num_threads(1)
    rows = []
    for graphs in ((None,) if a.mixed else (False, True)):
        if a.mixed:
            full = count_mixed_step(a.layers, a.backend, a.batch, a.family, a.dtype)
            half = count_mixed_step(a.layers // 2, a.backend, a.batch, a.family, a.dtype)
        else:
            full = count_step(a.layers, a.backend, graphs, a.batch, a.family, a.dtype)
            half = count_step(a.layers // 2, a.backend, graphs, a.batch, a.family, a.dtype)
        n = a.layers - a.layers // 2
        row = {"path": "mixed" if a.mixed else "graph body" if graphs else "eager", "step": full,
               "per_layer": {k: (full[k] - half[k]) / n for k in KEYS}}
        row["per_layer_kernels"] = {k: (v - half["kernel_names"].get(k, 0)) / n
                                    for k, v in full["kernel_names"].items()
                                    if v != half["kernel_names"].get(k, 0)}
        row["per_layer_launches"] = _per_layer(full["by_kernel"], half["by_kernel"], n)
        row["per_layer_top"] = _per_layer(full["top_names"], half["top_names"], n)
        row["outside_layers"] = {k: full[k] - a.layers * row["per_layer"][k]
                                 for k in row["per_layer"]}
        rows.append(row)
    shape = {"deepseek": "hidden 64, MLA 4 heads, latent 32 + rope 8, 8 experts top-2 + 2 "
                         "shared, layer 0 dense",
             "qwen3-moe": "hidden 64, 4/2 heads x 16, 8 experts top-2"}.get(
                 a.family, "hidden 64, 4/2 heads x 16")
    print(f"count_decode_ops: {a.family}, {a.layers} layers ({shape}), "
          f"batch {a.batch}, backend {a.backend}{' (unfused)' if a.unfused else ''}, "
          f"{a.dtype} CPU"
          f"{', TRITON_INTERPRET=1' if os.environ.get('TRITON_INTERPRET') == '1' else ''}")
    print(f"{'path':>10} | {'aten/step':>9} | {'aten/layer':>10} | {'top-level/layer':>15} | "
          f"{'kernel ops/layer':>16} | {'triton/layer':>12} | {'triton/step':>11} | "
          f"outside the layers (aten, top, kernel ops, triton)")
    for r in rows:
        s, pl, o = r["step"], r["per_layer"], r["outside_layers"]
        print(f"{r['path']:>10} | {s['aten_ops']:>9} | {pl['aten_ops']:>10.1f} | "
              f"{pl['aten_top']:>15.1f} | {pl['kernel_ops']:>16.1f} | {pl['triton']:>12.1f} | "
              f"{s['triton']:>11} | {o['aten_ops']:.0f}, {o['aten_top']:.0f}, "
              f"{o['kernel_ops']:.0f}, {o['triton']:.0f}")
    for r in rows:
        print(f"{r['path']}: launches {r['step']['by_kernel']}")
        print(f"{r['path']}: torch ops that launch a kernel, per layer {r['per_layer_kernels']}")
        print(f"{r['path']}: Triton launches per layer: {_fmt(r['per_layer_launches'])}")
        print(f"{r['path']}: top-level aten ops per layer: {_fmt(r['per_layer_top'])}")
    if a.mixed:
        same = True
    else:
        same = rows[0]["step"]["tokens"] == rows[1]["step"]["tokens"]
        print(f"eager and graph-body tokens equal: {same}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"args": vars(a), "rows": rows}, fh, indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
