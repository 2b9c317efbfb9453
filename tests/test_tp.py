"""Tensor parallelism inside each sequence shard (TP x CP, issue 18).

- The TP model (ringserve.parallel.tp applied from outside) against the whole model, in one
  process with a thread transport: every family's layer kinds, t equal to and greater than the
  KV heads, checkpoint loading by slices, a vocabulary that t does not divide.
- Through `ringserve.LLM` on gloo actors, (t, c) = (2, 1), (1, 2), (2, 2), (2, 3), both layouts
  where c > 1, against transformers (fp32): prompt log-probs, greedy tokens of prompts decoded
  together, a chunked document cached and then questioned (cascade decode under TP).
- Placement on a three-node `ray.cluster_utils.Cluster` (its own process).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from ringserve import LLM, SamplingParams
from ringserve.config import ModelConfig
from ringserve.model import CausalLM, local_attention_fn
from ringserve.parallel.tp import TPComm, TPGrid, apply_tp, check_tp, parallel_sizes
from ringserve.parallel.transport import ThreadHub
from tinymodels import hf_greedy, load_hf, tiny_model

pytestmark = pytest.mark.timeout(600)


def _logits(model, ids):
    fn = local_attention_fn(window_size=model.window_size, backend="torch",
                            softmax_scale=model.softmax_scale)
    # chunk_tokens: the row-parallel all-reduces run per activation chunk
    return model.logits(model(ids, torch.arange(ids.shape[0]), fn, chunk_tokens=16))


def _tp_run(t: int, make):
    """make(rank, comm) -> model, on t threads joined by a ThreadTransport; logits of each."""
    hub, outs, errs = ThreadHub(t), [None] * t, []

    def work(r):
        try:
            outs[r] = make(r, TPComm(hub.transport(r, 60.0)))
        except BaseException as e:  # noqa: BLE001 - reported below
            errs.append(e)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(t)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errs:
        raise errs[0]
    return outs


# (family, t): t == KV heads (llama, qwen2, phi3, qwen3, the MoEs: 2), t > KV heads (llama 4/2,
# mistral 4/1 and 2/1: KV heads replicated), biases on q/k/v/o (llama-mha), tied embeddings
# (qwen2, qwen3), fused projections (phi3), q/k norms (qwen3), experts (mixtral, qwen3-moe),
# soft-caps, GeGLU and windowed layers between global ones (gemma2, gemma3)
FAMILIES = [("llama", 2), ("llama", 4), ("mistral", 2), ("llama-mha", 4), ("qwen2", 2),
            ("qwen3", 2), ("phi3", 2), ("mixtral", 2), ("qwen3-moe", 2), ("gemma2", 2),
            ("gemma3", 2)]


@pytest.mark.parametrize("family,t", FAMILIES, ids=lambda x: str(x))
def test_tp_model_equals_whole_model(tmp_path_factory, family, t):
    from ringserve.actors.model_worker import build_model

    path = tiny_model(tmp_path_factory, family)
    whole = CausalLM.from_pretrained(path)
    ids = torch.randint(0, whole.config.vocab_size, (53,),
                        generator=torch.Generator().manual_seed(t))
    ref = _logits(whole, ids)

    # what the workers do: build on meta, apply, read this rank's slices from the checkpoint
    def loaded(r, comm):
        m = build_model(str(path), torch.float32, torch.device("cpu"), r, t, comm)
        assert m.config.num_attention_heads == whole.config.num_attention_heads // t
        assert m.config.num_key_value_heads == max(1, whole.config.num_key_value_heads // t)
        assert m.tp.full_config.vocab_size == whole.config.vocab_size
        return _logits(m, ids)

    for r, got in enumerate(_tp_run(t, loaded)):
        err = (got - ref).abs().max().item()
        assert err <= 1e-4, f"{family} t={t} rank {r}: max |TP - whole| = {err}"
    if family in ("llama", "phi3"):   # a loaded model sliced in place gives the same
        outs = _tp_run(t, lambda r, c: _logits(apply_tp(copy.deepcopy(whole), r, t, c), ids))
        assert all((o - ref).abs().max() <= 1e-4 for o in outs)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "qwen3-moe"])
def test_tp_model_on_the_fused_path_equals_whole_model(tmp_path_factory, monkeypatch, family):
    """The fused few-token kernels (the CUDA default) under TP: joined q|k|v and gate|up
    shards, fused norms and RoPE (q/k norm, Gemma's (1 + w) sandwich norms), with the
    row-parallel all-reduces, experts' act * up (Qwen3-MoE): the logits of a 37-token step
    equal the whole model's (the interpreted Triton kernels; fp32)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the fused kernels run interpreted on CPU (TRITON_INTERPRET=1)")
    from triton.runtime.interpreter import InterpretedFunction

    from ringserve.actors.model_worker import build_model

    # the interpreter patches module state while a kernel runs: one kernel at a time over the
    # test's threads (the ranks' collectives happen between kernels, never inside one)
    lock, run = threading.Lock(), InterpretedFunction.run

    def one_at_a_time(self, *a, **k):
        with lock:
            return run(self, *a, **k)

    monkeypatch.setattr(InterpretedFunction, "run", one_at_a_time)

    path = tiny_model(tmp_path_factory, family)
    whole = CausalLM.from_pretrained(path)
    ids = torch.randint(0, whole.config.vocab_size, (37,),
                        generator=torch.Generator().manual_seed(5))
    ref = _logits(whole, ids)

    ran = []

    def fused(r, comm):
        m = build_model(str(path), torch.float32, torch.device("cpu"), r, 2, comm)
        m.backend = "triton"
        m.join_weights()
        real = m._forward_fused
        m._forward_fused = lambda *a: ran.append(r) or real(*a)
        fn = local_attention_fn(window_size=m.window_size, backend="torch",
                                softmax_scale=m.softmax_scale)
        return m.logits(m(ids, torch.arange(ids.shape[0]), fn))   # one span: the fused path

    for r, got in enumerate(_tp_run(2, fused)):
        err = (got - ref).abs().max().item()
        assert err <= 1e-4, f"{family} fused t=2 rank {r}: max |TP - whole| = {err}"
    assert sorted(ran) == [0, 1]


def test_tp_slices_differ_and_replicate_as_vllm(tmp_path_factory):
    """The comparison above can fail: ranks hold different heads; with t > KV heads the ranks
    that share a KV head hold the same K/V weights; a rank alone (no all-reduce) is wrong."""
    whole = CausalLM.from_pretrained(tiny_model(tmp_path_factory, "llama"))   # 4 q, 2 KV heads
    ranks = [apply_tp(copy.deepcopy(whole), r, 4, TPComm()) for r in range(4)]
    k = [m.model.layers[0].self_attn.k_proj.weight for m in ranks]
    q = [m.model.layers[0].self_attn.q_proj.weight for m in ranks]
    assert torch.equal(k[0], k[1]) and torch.equal(k[2], k[3]) and not torch.equal(k[1], k[2])
    assert torch.equal(k[2], whole.model.layers[0].self_attn.k_proj.weight[16:32])
    assert all(not torch.equal(q[i], q[j]) for i in range(4) for j in range(i))

    class Alone:   # a "group" whose all-reduce is the identity: the rank's partial sums only
        def all_reduce(self, x, timeout_s=None, blocking=True):
            return x

        def all_gather(self, x, timeout_s=None, blocking=True):
            return [x, x]

    one = apply_tp(copy.deepcopy(whole), 0, 2, TPComm(Alone()))
    ids = torch.arange(20)
    assert (_logits(one, ids)[:, :whole.config.vocab_size // 2]
            - _logits(whole, ids)[:, :whole.config.vocab_size // 2]).abs().max() > 1e-2


def test_random_weights_are_one_model_for_any_t():
    """{"config", "seed"} weights (benchmarks) are drawn full size and sliced: t = 2 serves the
    model t = 1 serves, here with a vocabulary of 77 that 2 does not divide (padded rows)."""
    from ringserve.actors.model_worker import build_model

    hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": 77, "hidden_size": 32,
          "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 8, "rms_norm_eps": 1e-5,
          "tie_word_embeddings": False}
    spec = {"config": hf, "seed": 3}
    cpu = torch.device("cpu")
    whole = build_model(spec, torch.float32, cpu)
    ids = torch.tensor([0, 76, 38, 39, 5, 70, 1])
    ref = _logits(whole, ids)
    outs = _tp_run(2, lambda r, c: _logits(build_model(spec, torch.float32, cpu, r, 2, c), ids))
    for got in outs:
        assert got.shape == ref.shape == (7, 77)
        assert (got - ref).abs().max() <= 1e-5


def test_validation_names_the_arithmetic(tmp_path_factory):
    cfg = ModelConfig.from_dir(tiny_model(tmp_path_factory, "llama"))   # 4 heads, 2 KV heads
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(3\) must divide "
                                         r"num_attention_heads \(4\): 4 % 3 = 1"):
        check_tp(cfg, 3)
    six = dataclasses.replace(cfg, num_attention_heads=24, num_key_value_heads=6,
                              intermediate_size=192)
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(4\) must divide "
                                         r"num_key_value_heads \(6\) or be a multiple of it"):
        check_tp(six, 4)
    check_tp(six, 2), check_tp(six, 12)   # divides; a multiple (each KV head on 2 ranks)
    with pytest.raises(ValueError, match=r"must divide intermediate_size \(176\): 176 % 32"):
        check_tp(dataclasses.replace(cfg, num_attention_heads=32, num_key_value_heads=32), 32)
    assert parallel_sizes(2, None, None) == (2, 1)
    assert parallel_sizes(None, 3, 2) == (3, 2) and parallel_sizes(3, 3, 2) == (3, 2)
    with pytest.raises(ValueError, match=r"world_size \(2\) is another name for "
                                         r"context_parallel_size \(4\)"):
        parallel_sizes(2, 4, 1)
    with pytest.raises(ValueError, match=r"world_size \(4\) with tensor_parallel_size \(2\) is "
                                         r"ambiguous"):
        parallel_sizes(4, None, 2)
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(0\) must be an integer"):
        parallel_sizes(None, 2, 0)
    mla = ModelConfig.from_dir(tiny_model(tmp_path_factory, "deepseek-v2-lite"))
    with pytest.raises(ValueError, match=r"DeepseekV2ForCausalLM attention \(MLA"):
        check_tp(mla, 2)
    check_tp(mla, 1)
    # refused before any actor starts
    with pytest.raises(ValueError, match=r"must divide num_attention_heads \(4\)"):
        LLM(str(tiny_model(tmp_path_factory, "llama")), context_parallel_size=2,
            tensor_parallel_size=3)
    # the same rule at the other edges: the serve config and the batch command
    from ringserve.batch import main as batch_main
    from ringserve.serve.config import ServeArgs

    a = ServeArgs.from_dict({"model": "m", "context_parallel_size": 2, "tensor_parallel_size": 4})
    assert (a.world_size, a.context_parallel_size, a.tensor_parallel_size) == (2, 2, 4)
    assert ServeArgs.from_dict({"model": "m", "world_size": 3}).context_parallel_size == 3
    with pytest.raises(ValueError, match=r"world_size \(2\) is another name"):
        ServeArgs.from_dict({"model": "m", "world_size": 2, "context_parallel_size": 4})
    with pytest.raises(SystemExit, match=r"world_size \(2\) with tensor_parallel_size \(2\)"):
        batch_main(["--model", "m", "--input", "x", "--output", "y", "--world-size", "2",
                    "--tp", "2"])
    from ringserve.serve import run
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(3\) must divide "
                                         r"num_attention_heads \(4\)"):
        run(str(tiny_model(tmp_path_factory, "llama")), context_parallel_size=1,
            tensor_parallel_size=3, blocking=False)   # before Ray or Serve start
    grid = TPGrid(3, 2)
    assert grid.rings() == [[0, 2, 4], [1, 3, 5]] and grid.tp_groups() == [[0, 1], [2, 3], [4, 5]]


def test_tp_ranks_agree_on_their_pages(tmp_path_factory):
    """A shard's TP ranks share the driver's page table: a rank that could allocate more
    pages than another keeps only as many as the fewest (each its own heads)."""
    from ringserve.actors.model_worker import ModelShardWorker

    path = str(tiny_model(tmp_path_factory, "llama"))
    workers = [ModelShardWorker(0, 1, "cpu", tp_rank=r, tp_size=2, model=path, page_size=16,
                                kv_tokens=n) for r, n in enumerate((1000, 640))]
    assert [w.pool.num_pages for w in workers] == [63, 40]
    assert workers[0].pool.k.shape[-2] == 1                  # one of the two KV heads each
    hub = ThreadHub(2)
    for r, w in enumerate(workers):
        w.tp_comm.transport = hub.transport(r, 30.0)
    _tp_run(2, lambda r, c: workers[r]._agree_pages())
    assert [w.pool.num_pages for w in workers] == [40, 40]
    assert [w.kv_info()["capacity_tokens"] for w in workers] == [640, 640]


# ---- through ringserve.LLM: gloo actors, paged KV, the continuous-batching engine ----

NEW = 12
# (family, t, c): (2, 2) llama is GQA with t = KV heads; (2, 3) mistral is MQA with t > KV
# heads (replicated) and a 16-token window; (2, 1) qwen2 has tied embeddings and q/k/v biases
CONFIGS = [("qwen2", 2, 1), ("llama-mha", 1, 2), ("llama", 2, 2), ("mistral", 2, 3)]
_REFS = {}


def _reference(tmp_path_factory, family):
    """Prompts and transformers' answers: two prompts (log-probs, greedy), and a 230-token
    document with two questions (greedy of document + question)."""
    if family not in _REFS:
        path = tiny_model(tmp_path_factory, family)
        hf = load_hf(path)
        g = torch.Generator().manual_seed(sum(map(ord, family)))
        rand = lambda n: torch.randint(3, hf.config.vocab_size, (n,), generator=g).tolist()  # noqa: E731
        prompts = [rand(45), rand(29)]
        doc = rand(230)
        questions = [doc + rand(9), doc + rand(13)]
        with torch.no_grad():
            lps = []
            for ids in prompts:
                x = torch.tensor([ids])
                lp = torch.log_softmax(hf(x).logits[0].double(), -1)
                lps.append(lp[:-1].gather(1, x[0, 1:, None])[:, 0])
        greedy = [hf_greedy(hf, ids, NEW, full_forward=True) for ids in prompts + questions]
        _REFS[family] = (path, prompts, lps, doc, questions, greedy)
    return _REFS[family]


def _relayout(llm: LLM, layout: str) -> None:
    """The same actor group under a new engine with the other layout (cheaper than a second
    group of up to six actors; the workers keep no per-engine state but page tables that the
    new engine's sequences replace)."""
    from ringserve.engine import Engine

    eos = llm._engine.eos_token_ids
    llm._engine.shutdown()
    llm.config = dataclasses.replace(llm.config, layout=layout)
    llm.layout = layout
    llm._engine = Engine(llm._group, llm.tokenizer, eos, llm.config)


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: f"{c[0]}-t{c[1]}-c{c[2]}")
def served(request, ray_session, tmp_path_factory):
    family, t, c = request.param
    ref = _reference(tmp_path_factory, family)
    # small steps: the document's prefill (alone: 4x the budget) runs as chunks of 64 tokens
    # per rank, the last one a ring chunk over the cached ones (pass-Q of its queries against
    # them); prompts run together go in 16-token pass-Q extensions
    llm = LLM(str(ref[0]), context_parallel_size=c, tensor_parallel_size=t, layout="striped",
              max_kv_tokens=4096, num_cpus_per_worker=0.25, max_num_batched_tokens=16 * c,
              passq_max_tokens=16, cuda_graphs="emulate" if (t, c) == (2, 2) else False)
    yield llm, (t, c), ref
    llm.shutdown()


def test_tp_cp_equals_transformers(served):
    llm, (t, c), (path, prompts, lps, doc, questions, greedy) = served
    assert llm.tensor_parallel_size == t and llm.context_parallel_size == c
    st = llm.stats()
    assert st["world_size"] == c                   # the engine sees c ranks
    assert (st["context_parallel_size"], st["tensor_parallel_size"]) == (c, t)
    info = llm._group.health()
    assert [(h["rank"], h["tp_rank"]) for h in info] == [(i, r) for i in range(c)
                                                          for r in range(t)]
    params = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)
    for layout in (("striped", "ring") if c > 1 else ("striped",)):
        if layout != llm.layout:
            _relayout(llm, layout)
        for out, ref in zip(llm.score(prompts), lps):
            got = torch.tensor(out.logprobs[1:], dtype=torch.float64)
            torch.testing.assert_close(got, ref, rtol=0, atol=5e-5)
        outs = llm.generate(prompts, params)        # decoded together
        assert [o.token_ids for o in outs] == greedy[:2], layout
        steps = llm.stats()["steps"]
        key = llm.cache_document(doc)
        assert llm.stats()["steps"] - steps >= 2          # the document went in chunks
        outs = llm.generate(questions, params)      # both fork the cached document
        assert [o.token_ids for o in outs] == greedy[2:], layout
        assert all(o.num_cached_tokens >= len(doc) for o in outs), \
            [o.num_cached_tokens for o in outs]
        assert llm.drop_document(key)
    if (t, c) == (2, 1):
        # a dead TP rank (not the one that answers the driver) fails the step: the whole group
        # is rebuilt, TP communicators included, and the request recomputes to the same tokens
        import ray

        ray.kill(llm._group.actors[1])
        out = llm.generate([prompts[0]], params)[0]
        assert out.token_ids == greedy[0] and out.timings["recoveries"] == 1
        assert llm.stats()["worker_failures"] == 1


def test_missing_resources_name_the_arithmetic(ray_session):
    from ringserve.actors import ActorGroup
    from ringserve.actors.group import GroupSetupError

    with pytest.raises(GroupSetupError, match=r"2 bundles \{'CPU': 200.0\} \(SPREAD\) \("
                                              r"context_parallel_size 2 x tensor_parallel_size 2 "
                                              r"= 4 actors; each bundle's 2 on one node\)"):
        ActorGroup(2, placement_strategy="SPREAD", num_cpus_per_worker=100.0, tp_size=2,
                   placement_timeout_s=1)


def test_placement_three_nodes():
    """Each TP group on one node, the groups spread over three nodes (one Ray placement group:
    a bundle of t GPUs/CPUs per shard, SPREAD), the rings joining equal TP indices."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["TRITON_INTERPRET"] = "1"
    script = Path(__file__).with_name("tp_placement_main.py")
    # its own process: a Cluster cannot share the session's ray.init
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT "):])
    assert res["cluster_nodes"] == 4
    nodes, pids = res["nodes"], res["pids"]
    assert res["ranks"] == [[i, r] for i in range(3) for r in range(2)]
    groups = [nodes[2 * i: 2 * i + 2] for i in range(3)]
    assert all(a == b for a, b in groups), groups            # a TP group shares a node
    assert len({a for a, _ in groups}) == 3, groups           # the groups spread
    for a, ring in enumerate(res["ring"]):                    # ring of TP index a % 2
        assert ring == [[j, pids[2 * j + a % 2]] for j in range(3)], (a, ring)
    for a, (members, total) in enumerate(res["tp"]):          # TP group of shard a // 2
        j = a // 2
        assert members == [[j, r, pids[2 * j + r]] for r in range(2)] and total == 1.0


# ---- ringserve plan ----


def test_planner_matches_the_worker_and_the_measurements():
    """The planner's capacity rule is the worker's: one H200 and the 8B shape give the measured
    588,864 KV tokens (bench_e2e's 16K activation chunk); its prefill model gives the measured
    12.3 s at 128K; weights per GPU are the TP rank's exact parameters."""
    from ringserve.planner import GPUS, layer_params, load_config, plan

    cfg = load_config("llama-3.1-8b")
    (row,) = plan(cfg, 1, GPUS["h200"], lengths=(131072,), chunk_tokens=16384)
    assert (row.t, row.c, row.kv_tokens) == (1, 1, 588864)
    assert abs(row.prefill_s[0] - 12.3) / 12.3 <= 0.03, row.prefill_s
    full = 8030261248 * 2                         # Llama-3.1-8B: 8.03e9 parameters, bf16
    assert abs(row.weights_gib * (1 << 30) - full) <= 1 << 20
    norms = (2 * 32 + 1) * 4096
    assert layer_params(cfg) == full // 2 - 2 * 128256 * 4096 - norms

    big = load_config("llama-3.1-70b")
    rows = {(r.t, r.c): r for r in plan(big, 16, GPUS["h200"])}
    assert sorted(rows) == [(1, 16), (2, 8), (4, 4), (8, 2)]
    # sharded evenly but for the replicated norms
    w1, w8 = rows[(1, 16)].weights_gib, rows[(8, 2)].weights_gib
    assert w1 / 8 < w8 < w1 / 8 * 1.001
    assert rows[(2, 8)].kv_bytes_per_token == 80 * 4 * 128 * 2 * 2 + 4
    huge = load_config("llama-3.1-405b")
    rows = {(r.t, r.c): r for r in plan(huge, 16, GPUS["h200"])}
    assert rows[(4, 4)].kv_tokens == 0 and rows[(8, 2)].kv_tokens > 500_000   # 756 GiB / t


def test_plan_command_lists_every_valid_split(tmp_path):
    from ringserve.cli import main

    cfg = dict(architectures=["LlamaForCausalLM"], vocab_size=32000, hidden_size=1536,
               intermediate_size=4608, num_hidden_layers=4, num_attention_heads=12,
               num_key_value_heads=6, head_dim=128)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["plan", "--model", str(path), "--gpus", "12", "--gpu-memory", "80GB",
                     "--json"]) == 0
    rows = json.loads(buf.getvalue())
    # t must divide 12 GPUs and 12 heads, divide 6 KV heads or be a multiple of them, and stay
    # within a node: 1, 2, 3, 6 (4: 6 % 4 and 4 % 6; 12: more than 8 GPUs per node)
    assert [(r["t"], r["c"]) for r in rows] == [(1, 12), (2, 6), (3, 4), (6, 2)]
    assert all(r["kv_tokens"] > 0 and len(r["prefill_s"]) == 2 for r in rows)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["plan", "--model", "llama-3.1-70b", "--gpus", "8", "--gpu-memory", "141GB"])
    text = buf.getvalue()
    assert "T(S) = F(S) / (N * peak * u * e) + T_tp(S)" in text and "131.3 GiB" in text
