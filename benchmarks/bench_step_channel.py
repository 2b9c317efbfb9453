"""How a step reaches the actors: a Ray Compiled Graph (`step_channel="compiled"`) against one
Ray task per actor (the default), on any machine. A tiny random Llama decodes `--tokens` tokens of one
request through `LLM.generate` at each world size, both channels in one process, the median of
`--repeats` runs; the tokens must be the same both ways. What it measures is the per-step cost
outside the model (the model is tiny): the Ray call, the plan's serialization, the engine loop.

    python3 benchmarks/bench_step_channel.py [--world-sizes 1,2] [--tokens 200] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world-sizes", default="1,2")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    import ray
    import torch
    import transformers

    from ringserve import LLM, SamplingParams
    mine = not ray.is_initialized()      # a test session's cluster is shared, not ours
    if mine:
        ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False,
                 log_to_driver=False)
    path = tempfile.mkdtemp(prefix="step-channel-")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=4096)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    sp = SamplingParams(max_tokens=a.tokens, temperature=0.0, ignore_eos=True)
    rows = []
    _measure(a, LLM, path, sp, rows)
    print(f"{'world size':>10}  {'tasks ms/token':>14}  {'compiled ms/token':>17}")
    for ws in sorted({r["world_size"] for r in rows}):
        t, c = (next(r["ms_per_token"] for r in rows if r["world_size"] == ws and r["channel"] == k)
                for k in ("tasks", "compiled"))
        print(f"{ws:>10}  {t:>14.2f}  {c:>17.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "tokens": a.tokens, "repeats": a.repeats,
                       "cpus": os.cpu_count()}, f, indent=1)
    if mine:
        ray.shutdown()
    return 0


def _measure(a, LLM, path, sp, rows) -> None:
    for ws in (int(x) for x in a.world_sizes.split(",")):
        toks = {}
        for ch in ("tasks", "compiled"):
            llm = LLM(path, world_size=ws, max_kv_tokens=4096, num_cpus_per_worker=0.5,
                      tokenizer=None, step_channel=ch)
            try:
                llm.generate([[1, 2, 3]], sp)                       # warm: the graph compiles
                times = []
                for _ in range(a.repeats):
                    t = time.perf_counter()
                    out = llm.generate([[1, 2, 3, 4]], sp)[0]
                    times.append((time.perf_counter() - t) / a.tokens)
                assert llm.stats()["step_channel"] == ch
            finally:
                llm.shutdown()
            toks[ch] = out.token_ids
            rows.append({"world_size": ws, "channel": ch,
                         "ms_per_token": round(statistics.median(times) * 1e3, 3)})
        assert toks["tasks"] == toks["compiled"], f"world size {ws}: the channels' tokens differ"


if __name__ == "__main__":
    raise SystemExit(main())
