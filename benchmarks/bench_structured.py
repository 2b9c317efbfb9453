"""Structured output's cost per decode step (issue 16): a JSON-schema grammar mask against no
mask, batch 1 and 16, on a random-weight 8B-shaped model, eager and with CUDA graphs.

The grammar needs a tokenizer; nothing can be downloaded on the GPU host, so the script trains a
byte-level BPE of --vocab tokens (default 128000, Llama 3's size) on generated text (words,
numbers, JSON punctuation) with `tokenizers` and gives it to the LLM (the model's vocabulary is
the preset's, 128256). Mask cost depends on the vocabulary's size and on what its tokens look
like; a trained Llama-3 vocabulary is the figure to quote when one is at hand (--tokenizer DIR).

Each case runs B requests together, prompt --prompt-len random tokens, --out-tokens output tokens
(temperature 1: the masked path samples), the constrained ones under a schema that cannot finish
within --out-tokens (an array of at least 10000 objects), so every row decodes to the end. Per
case: the median of the workers' step times over the decode-only steps, and the median
inter-token latency seen by the driver. Overhead = masked / unmasked - 1 (target <= 5%). Also
the host's mask time per step for B rows, measured alone (what the helper thread hides while the
forward runs).

  python3 benchmarks/bench_structured.py --json out.json                 # 8B, H200
  python3 benchmarks/bench_structured.py --device cpu --preset tiny-llama --vocab 4000 --out-tokens 24
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_e2e  # noqa: E402
from bench_e2e import hf_config  # noqa: E402

# a CPU smoke of the script itself
bench_e2e.PRESETS.setdefault("tiny-llama", dict(bench_e2e.LLAMA3, vocab_size=512, hidden_size=64,
                                                intermediate_size=128, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2))

SCHEMA = {"type": "object", "properties": {
    "records": {"type": "array", "minItems": 10000, "items": {
        "type": "object", "properties": {
            "party": {"type": "string"},
            "role": {"enum": ["owner", "master", "charterer", "broker"]},
            "amount": {"type": "number"},
            "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
            "clauses": {"type": "array", "items": {"type": "integer"}}},
        "required": ["party", "role", "amount", "date"]}}},
    "required": ["records"]}


def train_tokenizer(path: Path, vocab: int, seed: int = 0) -> Path:
    """A byte-level BPE of about `vocab` tokens with an EOS token, trained on generated text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    rng = random.Random(seed)
    letters = string.ascii_letters
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 12)))
             for _ in range(vocab * 2)]
    punct = ['{"', '": "', '", "', '": ', ", ", "}", "]", "[", "-", ".", ":", "\n", "  "]

    def lines():
        for _ in range(vocab // 2):
            parts = []
            for _ in range(24):
                r = rng.random()
                parts.append(rng.choice(words) if r < 0.7 else
                             str(rng.randint(0, 10 ** rng.randint(1, 6))) if r < 0.85 else
                             rng.choice(punct))
            yield " ".join(parts)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(lines(), trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|end|>",
         "bos_token": None}))
    return path


def mask_time_us(tok_dir: Path, vocab: int, rows: int, steps: int = 64) -> float:
    """Host time of one step's masks for `rows` constrained rows (matchers advanced by a random
    allowed token each step), alone: median microseconds."""
    import torch

    from ringserve.sampling import SamplingParams
    from ringserve.structured import GrammarMasks
    g = SamplingParams(guided_json=SCHEMA).grammar
    masks = GrammarMasks(str(tok_dir), vocab)
    outs: List[List[int]] = [[] for _ in range(rows)]
    rng = random.Random(0)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        bm = masks.fill([(i, g, outs[i]) for i in range(rows)])
        times.append(time.perf_counter() - t)
        bits = ((bm[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).reshape(rows, -1)
        for i in range(rows):
            allowed = torch.nonzero(bits[i, :vocab]).flatten().tolist()
            outs[i].append(rng.choice(allowed))
    return statistics.median(times) * 1e6


def run_case(llm, prompts, params) -> Dict:
    s0 = llm.stats()
    times: List[List[float]] = [[] for _ in prompts]

    def cb(i):
        return lambda _d: times[i].append(time.perf_counter())
    handles = [llm.submit(p, params, on_delta=cb(i)) for i, p in enumerate(prompts)]
    outs = [h.result() for h in handles]
    s1 = llm.stats()
    if s1["worker_failures"] != s0["worker_failures"]:
        raise RuntimeError(f"a step failed during the case (the group was rebuilt; graph "
                           f"capture failures {s1['graph_capture_failures']}): "
                           f"{s1.get('last_worker_failure')}")
    # this case's steps (counted by the engine: the workers keep only their last 4096)
    steps = llm._group.call("recent_step_times", s1["steps"] - s0["steps"])[0]
    decode = steps[-(params.max_tokens - 8):]    # the last steps: decode only, all rows
    if not decode:
        raise RuntimeError(f"no decode steps in the case ({len(steps)} steps)")
    itl = [statistics.median([b - a for a, b in zip(ts[4:], ts[5:])]) for ts in times]
    return {"step_ms": statistics.median(decode) * 1e3, "itl_ms": statistics.median(itl) * 1e3,
            "finish": sorted({o.finish_reason for o in outs}),
            "tokens": [len(o.token_ids) for o in outs]}


def main(argv=None) -> int:
    import torch

    from ringserve import LLM, SamplingParams
    from ringserve.tokenizer import Tokenizer
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama3-8b")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--out-tokens", type=int, default=128)
    p.add_argument("--vocab", type=int, default=128000)
    p.add_argument("--tokenizer", default=None, help="a tokenizer directory instead of training")
    p.add_argument("--graphs", default="0,1", help="cuda_graphs settings to run (0, 1)")
    p.add_argument("--mask-threads", default="1,2,4,8",
                   help="pool sizes to time the largest batch's masks with ('' : none)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    t = time.perf_counter()
    tok_dir = Path(args.tokenizer) if args.tokenizer else train_tokenizer(
        Path(tempfile.mkdtemp()) / "tok", args.vocab)
    tok = Tokenizer.from_dir(tok_dir)
    print(f"[structured] tokenizer: {tok.vocab_size} tokens ({time.perf_counter() - t:.1f} s)",
          flush=True)
    cfg = hf_config(args.preset, 1 << 15)
    cpu = args.device == "cpu"
    if cpu:
        cfg["head_dim"] = 16
    cfg["vocab_size"] = max(cfg["vocab_size"], tok.vocab_size)
    res: Dict = {"args": vars(args), "tokenizer_vocab": tok.vocab_size, "cases": []}
    batches = [int(b) for b in args.batches.split(",")]
    from ringserve.structured import mask_threads, usable_cpus
    res["mask_threads"], res["usable_cpus"] = mask_threads(), usable_cpus()
    print(f"[structured] mask threads {res['mask_threads']} (usable CPUs {res['usable_cpus']}, "
          f"os.cpu_count {os.cpu_count()})", flush=True)
    for b in batches:
        us = mask_time_us(tok_dir, cfg["vocab_size"], b)
        res[f"mask_host_us_batch{b}"] = us
        print(f"[structured] host mask time, {b} rows: {us:.0f} us per step", flush=True)
    # the largest batch's mask time by llguidance pool size (RINGSERVE_MASK_THREADS)
    res["mask_host_us_by_threads"] = {}
    for n in [int(x) for x in args.mask_threads.split(",") if x]:
        old_env = os.environ.get("RINGSERVE_MASK_THREADS")
        os.environ["RINGSERVE_MASK_THREADS"] = str(n)
        try:
            us = mask_time_us(tok_dir, cfg["vocab_size"], max(batches))
        finally:
            if old_env is None:
                os.environ.pop("RINGSERVE_MASK_THREADS")
            else:
                os.environ["RINGSERVE_MASK_THREADS"] = old_env
        res["mask_host_us_by_threads"][n] = us
        print(f"[structured] host mask time, {max(batches)} rows, {n} threads: {us:.0f} us per "
              f"step", flush=True)
    g = torch.Generator().manual_seed(0)
    import ray
    if not ray.is_initialized():
        ray.init(include_dashboard=False)   # no dashboard build on the GPU host: ~60 s saved
    for graphs in [bool(int(x)) for x in args.graphs.split(",")]:
        llm = LLM({"config": cfg, "seed": 0, "tokenizer": str(tok_dir)}, world_size=1,
                  device=args.device, dtype="float32" if cpu else "bfloat16", tokenizer=tok,
                  cuda_graphs=("emulate" if graphs and cpu else graphs),
                  max_num_seqs=max(batches),
                  **({"max_kv_tokens": 8 * max(batches) * (args.prompt_len + args.out_tokens)}
                     if cpu else {}))
        try:
            plain = SamplingParams(max_tokens=args.out_tokens, temperature=1.0, seed=1,
                                   ignore_eos=True)
            masked = SamplingParams(max_tokens=args.out_tokens, temperature=1.0, seed=1,
                                    guided_json=SCHEMA)
            warm = [torch.randint(0, tok.vocab_size, (args.prompt_len,), generator=g).tolist()
                    for _ in range(max(batches))]
            run_case(llm, warm, plain)          # compiles, graphs, autotuning
            run_case(llm, warm[:2], masked)     # the tokenizer's load on the worker
            for b in batches:
                for name, params in (("plain", plain), ("json_schema", masked),
                                     ("plain_again", plain)):
                    prompts = [torch.randint(0, tok.vocab_size, (args.prompt_len,),
                                             generator=g).tolist() for _ in range(b)]
                    r = run_case(llm, prompts, params)
                    r.update(batch=b, graphs=graphs, case=name)
                    res["cases"].append(r)
                    print(f"[structured] graphs={graphs} batch={b} {name}: step "
                          f"{r['step_ms']:.2f} ms, ITL {r['itl_ms']:.2f} ms, {r['finish']}",
                          flush=True)
        finally:
            llm.shutdown()
    print("\n| graphs | batch | step ms plain | step ms json_schema | overhead | ITL ms plain "
          "| ITL ms json_schema | overhead |")
    print("|---|---|---|---|---|---|---|---|")
    for graphs in (False, True):
        for b in batches:
            c = {r["case"]: r for r in res["cases"] if r["graphs"] == graphs and r["batch"] == b}
            if "json_schema" not in c:
                continue
            base_step = min(c["plain"]["step_ms"], c["plain_again"]["step_ms"])
            base_itl = min(c["plain"]["itl_ms"], c["plain_again"]["itl_ms"])
            m = c["json_schema"]
            row = (graphs, b, base_step, m["step_ms"], m["step_ms"] / base_step - 1,
                   base_itl, m["itl_ms"], m["itl_ms"] / base_itl - 1)
            res.setdefault("table", []).append(row)
            print("| {} | {} | {:.2f} | {:.2f} | {:+.1%} | {:.2f} | {:.2f} | {:+.1%} |".format(*row))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
