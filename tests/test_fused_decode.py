"""The model's fused path for few-token steps (kernels/fused.py: norm with the residual add,
RoPE + q/k norm + KV store, act * up) against its torch path, every family, under
TRITON_INTERPRET=1 on CPU: the same hidden states (fp32 to 1e-5; fp16 within twice the torch
path's own fp16 error), the same KV in the pool, the same greedy tokens through the worker's
eager step and its emulated CUDA-graph body. bf16 on the GPU: test_kernels_gpu.py."""
from __future__ import annotations

import os

import pytest
import torch

from ringserve.config import ModelConfig
from ringserve.model import CausalLM, model_attention_fn
from tinymodels import _redraw, hf_config

# CPU tensors throughout: Triton runs them only interpreted (GPU: test_kernels_gpu.py)
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton on CPU needs TRITON_INTERPRET=1 (`bash dev test`)")

FAMILIES = ["llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "mixtral", "qwen3-moe",
            "deepseek-v2-lite",
            "deepseek-v2"]


def _model(name: str, dtype=torch.float32) -> CausalLM:
    cfg = ModelConfig.from_hf_dict(hf_config(name, 128).to_dict())
    m = CausalLM(cfg, dtype=torch.float32)
    _redraw(m, 3)
    return m.to(dtype).eval()


def _hidden(m: CausalLM, backend: str, ids, pos) -> torch.Tensor:
    from ringserve.moe import MoE
    m.backend = backend
    for mod in m.modules():   # MoE: grouped GEMMs and SiLU(gate) * up by the same backend
        if isinstance(mod, MoE):
            mod.backend = backend
    # the attention on the torch path in both runs: only the fused kernels differ
    return m(ids, pos, model_attention_fn(m, backend="torch"))


@pytest.mark.parametrize("name", FAMILIES)
def test_fused_equals_torch_fp32(name):
    m = _model(name)
    ids = torch.tensor([5, 17, 99, 3, 64, 120, 7])
    pos = torch.arange(60, 67)                 # phi3: across its 64 original positions
    want = _hidden(m, "torch", ids, pos)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.join_weights()             # q|k|v and gate|up as single GEMMs: same names, same values
    after = m.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    got = _hidden(m, "triton", ids, pos)
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 1e-5, rel
    assert torch.equal(_hidden(m, "torch", ids, pos), want)
    from ringserve.moe import SharedExperts
    shared = [mod for mod in m.modules() if isinstance(mod, SharedExperts)]
    assert bool(shared) == name.startswith("deepseek")   # DeepSeek's: one GEMM for gate|up
    assert all(sh.joined.holds(sh.gate_proj, sh.up_proj) for sh in shared)
    from ringserve.model import MLAttention      # and MLA's q (or q_a) with kv_a: one GEMM
    mla = [mod for mod in m.modules() if isinstance(mod, MLAttention)]
    assert bool(mla) == name.startswith("deepseek")
    assert all(at.joined.holds(*at._x_projs()) for at in mla)
    if name == "llama":
        at = m.model.layers[0].self_attn
        assert at.joined.holds(at.q_proj, at.k_proj, at.v_proj)
        # new parameter tensors unjoin: the modules run one by one, still right
        m.to(torch.float64).to(torch.float32)
        assert not at.joined.holds(at.q_proj, at.k_proj, at.v_proj)
        got = _hidden(m, "triton", ids, pos)
        assert ((got - want).norm() / want.norm()).item() < 1e-5


@pytest.mark.parametrize("name", ["llama", "phi3", "qwen3-moe", "deepseek-v2-lite"])
def test_few_rows_take_the_tensor_core_gemm(name, monkeypatch):
    """A 7-token few-token step with RINGSERVE_GEMM_FEW_ROWS=16 (off by default:
    kernels/gemv.py): q|k|v (Phi-3: qkv_proj; MLA: q|kv_a), o_proj, gate|up and down run as
    `gemm_few` launches, and the hidden state equals the torch path's (fp32 to 1e-5)."""
    from ringserve.kernels import gemv as gemv_mod
    monkeypatch.setattr(gemv_mod, "FEW_ROWS_MAX", 16)
    ids, pos = torch.tensor([5, 17, 99, 3, 64, 120, 7]), torch.arange(60, 67)
    m = _model(name)
    want = _hidden(m, "torch", ids, pos)
    m.join_weights()
    got, seen = _launches(lambda: _hidden(m, "triton", ids, pos))
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    few = [k for k, _ in seen].count("_gemm_few_kernel")
    # a layer: the attention's input and output projections, and a dense MLP's (or the
    # shared experts') gate|up and down
    assert few >= 2 * len(m.model.layers), (few, [k for k, _ in seen][:40])


@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_folds_norms_and_adds(name, monkeypatch):
    """A decode token on the fused path with the folds on (RINGSERVE_FOLD_ROWS=1; off by
    default: kernels/gemv.py): the input norm inside the q|k|v (MLA: q|kv_a) GEMV,
    and in MoE layers the o_proj's residual add, the MLP's norm and its add inside the
    router's and experts' launches (gemv / moe_gemv norm= and residual=). The hidden state
    equals the torch path's (fp32 to 1e-5; fp16 within 2x the torch path's error of float64),
    and the norms' own launches are gone: one a layer where the MLP is dense (its norm with the
    residual add), none in a MoE layer, Gemma's sandwich norms untouched, the final norm."""
    from ringserve.kernels import gemv as gemv_mod
    from ringserve.moe import MoE
    monkeypatch.setattr(gemv_mod, "FOLD_MAX_ROWS", 1)
    ids, pos = torch.tensor([77]), torch.tensor([41])
    m = _model(name)
    want = _hidden(m, "torch", ids, pos)
    m.join_weights()
    got, seen = _launches(lambda: _hidden(m, "triton", ids, pos))
    launches = [kernel for kernel, _ in seen]
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    # Gemma's four norms a layer as before (two launches: one with each residual add); else
    # an input norm launch only after a dense MLP (with its residual add), the MLP's norm
    # launch only where it is dense; DeepSeek-V2's q LoRA norm; the final norm
    norms, pending = 1, False
    for layer in m.model.layers:
        dense = not isinstance(layer.ffn(), MoE)
        norms += 2 if layer.sandwich else int(pending) + int(dense)
        mla = getattr(layer.self_attn, "mla", None)
        norms += int(mla is not None and mla.q_lora_rank is not None)
        pending = dense
    assert launches.count("_rms_norm_kernel") == norms, (launches.count("_rms_norm_kernel"),
                                                         norms)
    if name in ("llama", "qwen3-moe", "deepseek-v2-lite"):    # fp16: the folds' roundings
        ref = _hidden(_model(name, torch.float64), "torch", ids, pos)
        m16 = _model(name, torch.float16)
        base = (_hidden(m16, "torch", ids, pos).double() - ref).abs().max().item()
        m16.join_weights()
        err = (_hidden(m16, "triton", ids, pos).double() - ref).abs().max().item()
        assert err <= 2 * base + 1e-3, (err, base)


@pytest.mark.parametrize("name", ["llama", "gemma2", "deepseek-v2-lite"])
def test_fused_fp16_error(name):
    """The fused path in fp16, joined weights (DeepSeek: the router's float32 copy, the shared
    experts' down GEMM adding into the routed output) within 2x the torch path's error."""
    from ringserve.moe import MoE
    ids = torch.tensor([5, 17, 99, 3, 64])
    pos = torch.arange(100, 105)
    ref = _hidden(_model(name, torch.float64), "torch", ids, pos)
    m = _model(name, torch.float16)
    base = (_hidden(m, "torch", ids, pos).double() - ref).abs().max().item()
    m.join_weights()
    moes = [mod for mod in m.modules() if isinstance(mod, MoE)]
    assert all(mod.gate_f32 is not None and mod.gate_f32.dtype == torch.float32
               for mod in moes) and bool(moes) == name.startswith("deepseek")
    err = (_hidden(m, "triton", ids, pos).double() - ref).abs().max().item()
    assert err <= 2 * base + 1e-3, (err, base)


def _fused_engine(name: str, backend: str, graphs):
    """(group, its worker, an engine) at world size 1 over the family's tiny random model
    (float32, fused kernels on, the backend's kernels, graphs as asked)."""
    from threadgroup import ThreadGroup
    from ringserve.engine import Engine, EngineConfig

    group = ThreadGroup(1, model={"config": hf_config(name, 128).to_dict(), "seed": 0},
                        dtype="float32", page_size=16, kv_tokens=512, backend=backend,
                        cuda_graphs=graphs, fused_kernels=True)
    w = group.workers[0]
    _redraw(w.model, 5)
    eng = Engine(group, None, (), EngineConfig(max_num_batched_tokens=4096,
                                               cuda_graphs=bool(graphs)))
    return group, w, eng


def _generate(name: str, backend: str, graphs):
    from ringserve.sampling import SamplingParams

    group, w, eng = _fused_engine(name, backend, graphs)
    p = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=4, logprobs=True)
    hs = [eng.submit("generate", [(7 * i + 3 * j) % 128 for j in range(21 + 5 * i)], p)
          for i in range(3)]
    out = [h.result() for h in hs]
    kv = w.pool.k.clone()
    eng.shutdown()
    group.shutdown()
    return [o.token_ids for o in out], [o.logprobs for o in out], kv


@pytest.mark.parametrize("name", ["llama", "qwen3", "deepseek-v2-lite"])
def test_worker_steps_fused(name):
    """Three requests (prompts, then decode batches) through the worker: the fused path's
    tokens, log-probs and KV pool equal the torch path's, eager and emulated graphs (DeepSeek:
    the latent key normed and stored into the pool by the fused prologue's launch)."""
    tok, lp, kv = _generate(name, "torch", False)
    for graphs in (False, "emulate"):
        t2, lp2, kv2 = _generate(name, "triton", graphs)
        assert t2 == tok
        for a, b in zip(lp, lp2):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)
        # the graph path keeps page 0 as its scratch (padding rows): its pages are one up
        assert torch.allclose(kv2[:, 1:] if graphs else kv2, kv, atol=1e-5)


def _questions_on_a_document(backend: str, graphs, name: str = "llama"):
    """Three questions on one cached document, decoding together (the first step waits until
    all are queued): their tokens, log-probs, and the worker's graph keys."""
    from threadgroup import submit_together
    from ringserve.sampling import SamplingParams

    group, w, eng = _fused_engine(name, backend, graphs)
    p = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=5, logprobs=True)
    doc = [(11 * j + 5) % 128 for j in range(70)]
    try:
        eng.submit("cache_document", doc).result(120)
        hs = submit_together(eng, [("generate", doc + [3 + i] * (1 + i), p) for i in range(3)])
        out = [h.result(120) for h in hs]
        return [o.token_ids for o in out], [o.logprobs for o in out], set(w._graphs)
    finally:
        eng.shutdown()
        group.shutdown()


@pytest.mark.parametrize("name", ["llama", "gemma2", "deepseek-v2-lite"])
def test_shared_document_graph_merges_in_one_launch(name):
    """Questions on one cached document through the emulated graph body at world size 1 with
    the Triton kernels: its attention leaves both parts (each row's own pages, the document's
    pages read once) as split partials merged by one merge_splits launch a layer into the
    output, and the tokens and log-probs equal the torch path's eager cascade (Gemma 2: its
    windowed layers and soft-cap; DeepSeek: the latent cache's 576-wide partials)."""
    tok, lp, _ = _questions_on_a_document("torch", False, name)
    (t2, lp2, keys), seen = _launches(lambda: _questions_on_a_document("triton", "emulate",
                                                                       name))
    assert any(k[2] > 0 for k in keys), keys          # the shared-prefix graph ran
    assert t2 == tok
    for a, b in zip(lp, lp2):
        assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-4)
    names = [k for k, _ in seen]
    assert ("_merge_splits_kernel", True) in seen and "_merge_kernel" not in names


def _generate_ranks(backend: str, graphs, ws: int = 2, **worker_kw):
    from threadgroup import ThreadGroup
    from ringserve.engine import Engine, EngineConfig
    from ringserve.sampling import SamplingParams

    group = ThreadGroup(ws, model={"config": hf_config("qwen3", 128).to_dict(), "seed": 0},
                        dtype="float32", page_size=8, kv_tokens=512, backend=backend,
                        cuda_graphs=graphs, fused_kernels=True, **worker_kw)
    for w in group.workers:
        _redraw(w.model, 5)
    eng = Engine(group, None, (), EngineConfig(max_num_batched_tokens=16, passq_max_tokens=4,
                                               cuda_graphs=bool(graphs)))
    p = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=4, logprobs=True)
    try:
        hs = [eng.submit("generate", [(5 * i + 3 * j) % 128 for j in range(19 + 6 * i)], p)
              for i in range(2)]
        return [h.result(120) for h in hs]
    finally:
        eng.shutdown()
        group.shutdown()


@pytest.fixture
def one_launch_at_a_time(monkeypatch):
    """The interpreter patches triton.language while a launch runs: ranks on threads launch
    one at a time (a launch holds no collective, so they cannot deadlock on it)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        import threading
        from triton.runtime import interpreter
        lock, real = threading.Lock(), interpreter.InterpretedFunction.run

        def run(self, *args, **kwargs):
            with lock:
                return real(self, *args, **kwargs)
        monkeypatch.setattr(interpreter.InterpretedFunction, "run", run)


@pytest.mark.parametrize("name,t", [("llama", 4), ("qwen3", 2)])
def test_tensor_parallel_fused(name, t, one_launch_at_a_time):
    """TP slices (llama 4/2 at t=4: KV heads replicated) on the fused path with joined
    weights (split by the slices' sizes) equal the whole model's torch path."""
    from ringserve.actors.model_worker import build_model
    from test_tp import _tp_run

    spec = {"config": hf_config(name, 128).to_dict(), "seed": 0}
    whole = build_model(spec, torch.float32, torch.device("cpu"))
    ids, pos = torch.tensor([5, 17, 99, 3, 64]), torch.arange(30, 35)
    want = _hidden(whole, "torch", ids, pos)

    def run(r, comm):
        m = build_model(spec, torch.float32, torch.device("cpu"), r, t, comm)
        m.join_weights()
        return _hidden(m, "triton", ids, pos)

    for got in _tp_run(t, run):
        assert ((got - want).norm() / want.norm()).item() < 1e-5


def test_two_ranks_fused(one_launch_at_a_time):
    """Two in-process ranks, prompts in 16-token chunks (ring chunks and pass-Q extensions:
    rows a rank does not own are not stored, slot -1), then decode batches merged across the
    ranks: the fused path's tokens and log-probs equal the torch path's."""
    want = _generate_ranks("torch", False)
    got = _generate_ranks("triton", False)
    for a, b in zip(want, got):
        assert a.token_ids == b.token_ids
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)


def test_warm_fused_compiles_and_stores_nothing():
    """The worker's warm-up of the fused kernels runs them once (every kernel launched) and
    leaves the KV pool as it was."""
    from ringserve.actors.model_worker import ModelShardWorker
    from triton.runtime import interpreter

    w = ModelShardWorker(0, 1, "cpu", model={"config": hf_config("qwen3", 128).to_dict(),
                                             "seed": 0}, dtype="float32", page_size=16,
                         kv_tokens=64, backend="triton", fused_kernels=True)
    seen = set()
    real = interpreter.InterpretedFunction.run

    def run(self, *args, **kwargs):
        seen.add(self.fn.__name__)
        return real(self, *args, **kwargs)

    interpreter.InterpretedFunction.run = run
    try:
        w.warm_fused()
    finally:
        interpreter.InterpretedFunction.run = real
    # the one-row GEMV: q|k|v, o_proj, the MLP's gate|up and down (any width since session 21)
    assert seen == {"_rms_norm_kernel", "_rope_store_kernel", "_act_mul_kernel", "_gemv_kernel"}
    assert not w.pool.k.any() and not w.pool.v.any()
    w.shutdown()



def test_long_or_chunked_steps_take_the_span_path(monkeypatch):
    """One-span steps of at most FUSED_MAX_TOKENS take the few-token fused path; longer or
    chunked ones its span-by-span form (the same kernels, no GEMVs); MLA keeps the torch
    path for long steps, and the torch backend never launches Triton."""
    from ringserve import model as model_mod
    from triton.runtime import interpreter

    m = _model("llama")
    launches = []
    real = interpreter.InterpretedFunction.run

    def run(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", run)
    monkeypatch.setattr(model_mod, "FUSED_MAX_TOKENS", 4)
    spans = []
    monkeypatch.setattr(m, "_forward_spans_fused",
                        lambda *a, real=m._forward_spans_fused: spans.append(a[-1]) or real(*a))
    m.backend = "triton"
    attn = model_attention_fn(m, backend="torch")
    m(torch.arange(4), torch.arange(4), attn)
    assert "_rms_norm_kernel" in launches and spans == []
    launches.clear()
    m(torch.arange(5), torch.arange(5), attn)                    # longer than the bound
    m(torch.arange(4), torch.arange(4), attn, chunk_tokens=3)    # two spans
    assert spans == [[(0, 5)], [(0, 3), (3, 4)]]
    assert {"_rms_norm_kernel", "_rope_store_kernel", "_act_mul_kernel"} <= set(launches)
    m.backend = "torch"
    launches.clear()
    m(torch.arange(9), torch.arange(9), attn, chunk_tokens=4)
    assert launches == [] and len(spans) == 2
    mla = _model("deepseek-v2-lite")
    mla.backend = "triton"
    mla(torch.arange(5), torch.arange(5), model_attention_fn(mla, backend="torch"))
    assert launches == []


@pytest.mark.parametrize("name", [f for f in FAMILIES if not f.startswith("deepseek")])
def test_span_path_equals_torch_fp32(name, monkeypatch):
    """A long step on the fused span path (three spans, odd lengths, positions past Phi-3's
    original 64 and every window) gives the torch path's hidden states (fp32 to 1e-5)."""
    from ringserve import model as model_mod
    monkeypatch.setattr(model_mod, "FUSED_MAX_TOKENS", 4)
    m = _model(name)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 128, (23,), generator=g)
    pos = torch.arange(50, 73)
    m.backend = "torch"
    want = m(ids, pos, model_attention_fn(m, backend="torch"), chunk_tokens=9)
    m.join_weights()
    for chunk in (9, None):
        got = _hidden_chunked(m, ids, pos, chunk)
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 1e-5, (chunk, rel)


def _hidden_chunked(m, ids, pos, chunk):
    from ringserve.moe import MoE
    m.backend = "triton"
    for mod in m.modules():
        if isinstance(mod, MoE):
            mod.backend = "triton"
    return m(ids, pos, model_attention_fn(m, backend="torch"), chunk_tokens=chunk)


@pytest.mark.parametrize("ws", [1, 2])
def test_engine_span_path_stores_each_span(ws, monkeypatch, one_launch_at_a_time):
    """Prompts run in chunks longer than FUSED_MAX_TOKENS, projected in spans of 5 rows: each
    span's keys and values reach the pool in its RoPE launch (`rope_store_rows`, the layer's
    call then stores nothing), at world sizes 1 and 2; greedy tokens and log-probs equal the
    torch path's."""
    from ringserve import model as model_mod
    from ringserve.parallel.step_attention import StepAttention
    monkeypatch.setattr(model_mod, "FUSED_MAX_TOKENS", 4)
    rows = []
    real = StepAttention.rope_store_rows

    def spy(self, layer, r, *a, **kw):
        rows.append((r.start, r.stop))
        return real(self, layer, r, *a, **kw)

    monkeypatch.setattr(StepAttention, "rope_store_rows", spy)
    want = _generate_ranks("torch", False, ws=ws, chunk_tokens=5)
    assert rows == []
    got = _generate_ranks("triton", False, ws=ws, chunk_tokens=5)
    assert (0, 5) in rows and (5, 10) in rows
    for a, b in zip(want, got):
        assert a.token_ids == b.token_ids
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)


def test_fused_kernels_only_when_asked_for():
    """A worker takes the fused path only when told (the LLM tells it by default on CUDA): on
    the Triton backend without it, the model keeps its torch path and unjoined weights."""
    from ringserve.actors.model_worker import ModelShardWorker

    spec = {"config": hf_config("qwen3", 128).to_dict(), "seed": 0}
    plain = ModelShardWorker(0, 1, "cpu", model=spec, dtype="float32", kv_tokens=64,
                             backend="triton")
    fused = ModelShardWorker(0, 1, "cpu", model=spec, dtype="float32", kv_tokens=64,
                             backend="triton", fused_kernels=True)
    assert (plain.fused, plain.model.backend) == (False, "torch")
    assert (fused.fused, fused.model.backend) == (True, "triton")
    joined = [n for n, _ in fused.model.named_parameters()]
    assert joined == [n for n, _ in plain.model.named_parameters()]   # same names either way


def _launches(run_path):
    """run_path() under the interpreter with every Triton launch recorded as (kernel name,
    for merge_splits' kernel whether it merged extra parts (its NE argument > 0), else None):
    (its result, the launches)."""
    from triton.runtime import interpreter
    seen = []
    real = interpreter.InterpretedFunction.run

    def run(self, *args, **kwargs):
        name = self.fn.__name__
        seen.append((name, args[7] > 0 if name == "_merge_splits_kernel" else None))
        return real(self, *args, **kwargs)

    interpreter.InterpretedFunction.run = run
    try:
        return run_path(), seen
    finally:
        interpreter.InterpretedFunction.run = real


def _assert_merged_in_one_launch_like_torch(ref, run_triton):
    got, seen = _launches(run_triton)
    assert ("_merge_splits_kernel", True) in seen
    for a, b in zip(ref, got):
        assert a.token_ids == b.token_ids
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)


def test_chunk_merge_in_one_launch_equals_the_torch_path(monkeypatch):
    """A prompt run in chunks at world size 1 on the Triton path, its pages not read as one
    run (WHOLE_RUN_CHUNKS off): each later chunk's cached prefix (its splits) and its own part
    merge in one launch straight into the step's output (merge_splits with extra and dest);
    tokens and log-probs equal the torch path's."""
    from ringserve.parallel import step_attention
    monkeypatch.setattr(step_attention, "WHOLE_RUN_CHUNKS", False)
    _assert_merged_in_one_launch_like_torch(_generate_ranks("torch", False, ws=1),
                                            lambda: _generate_ranks("triton", False, ws=1))


def test_chunk_over_one_run_of_pages_attends_in_one_launch(monkeypatch):
    """A later chunk whose prefix and own tokens are one run of pages attends in one causal
    launch with its queries offset by the prefix (no prefix launch, no merge): greedy tokens
    and log-probs equal the split-and-merge path's, on the Triton and the torch backends."""
    from ringserve import kernels
    from ringserve.parallel import step_attention
    offsets = []
    real = kernels.attention

    def spy(q, k, v, *a, q_offset=0, **kw):
        offsets.append(int(q_offset))
        return real(q, k, v, *a, q_offset=q_offset, **kw)

    monkeypatch.setattr(kernels, "attention", spy)
    for backend in ("triton", "torch"):
        monkeypatch.setattr(step_attention, "WHOLE_RUN_CHUNKS", False)
        want = _generate_ranks(backend, False, ws=1)
        assert not any(offsets)
        monkeypatch.setattr(step_attention, "WHOLE_RUN_CHUNKS", True)
        got, seen = _launches(lambda b=backend: _generate_ranks(b, False, ws=1))
        assert any(o > 0 for o in offsets), backend        # a later chunk, offset by its prefix
        assert ("_merge_splits_kernel", True) not in seen
        offsets.clear()
        for a, b in zip(want, got):
            assert a.token_ids == b.token_ids
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs),
                                  atol=1e-4)


def _questions(backend: str):
    from threadgroup import ThreadGroup
    from ringserve.engine import Engine, EngineConfig
    from ringserve.sampling import SamplingParams

    group = ThreadGroup(1, model={"config": hf_config("llama", 128).to_dict(), "seed": 0},
                        dtype="float32", page_size=8, kv_tokens=512, backend=backend,
                        fused_kernels=True)
    _redraw(group.workers[0].model, 5)
    eng = Engine(group, None, (), EngineConfig(max_num_batched_tokens=4096))
    p = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=5, logprobs=True)
    doc = [(3 * j + 1) % 128 for j in range(45)]
    try:
        eng.submit("cache_document", doc).result(120)
        hs = [eng.submit("generate", doc + [(i + 7) % 128, 9], p) for i in range(3)]
        return [h.result(120) for h in hs]
    finally:
        eng.shutdown()
        group.shutdown()


def test_cascade_decode_merge_in_one_launch_equals_the_torch_path():
    """Three questions on one cached document, one rank, Triton path: the decode rows' own
    pages and the document's, merged in one launch into the step's output, give the torch
    path's tokens and log-probs."""
    _assert_merged_in_one_launch_like_torch(_questions("torch"), lambda: _questions("triton"))


def test_deepseek_decode_layer_launches(monkeypatch):
    """benchmarks/count_decode_ops.py's count of a DeepSeek (MLA + MoE with shared experts)
    decode layer on the fused path: 12 GPU launches (22 before session 16, 17 before 17, 16
    before 18): the latent's norm and cache store and W_UK's absorption inside the RoPE
    launch (no norm launch of its own, no index_copy_, no batched GEMM), q and kv_a one GEMV,
    the router's weight not cast each step; one-row GEMVs (o_proj, the router reading the
    bf16 activation as it is: no cast launch), W_UV's per-head products in one launch
    (head_gemv), the shared experts inside the routed experts' two launches (no GEMM,
    activation or down GEMV of their own). With the folds on (RINGSERVE_FOLD_ROWS=1): 10, no
    norm launch (the input norm inside the q|kv_a GEMV, the MLP's inside the router's and
    experts' launches, the residual adds inside o_proj's and the down launch)."""
    import importlib.util
    from pathlib import Path
    from triton.runtime import interpreter
    # the script wraps the interpreter's launch to count: unwrapped again after this test
    monkeypatch.setattr(interpreter.InterpretedFunction, "run",
                        interpreter.InterpretedFunction.run)
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "count_decode_ops.py"
    spec = importlib.util.spec_from_file_location("count_decode_ops", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    full = mod.count_step(3, "triton", False, 1, "deepseek")   # layer 0 dense: 3 and 2
    half = mod.count_step(2, "triton", False, 1, "deepseek")   # layers differ by a MoE layer
    triton = mod._per_layer(full["by_kernel"], half["by_kernel"], 1)
    torch_ops = mod._per_layer(full["kernel_names"], half["kernel_names"], 1)
    assert triton == {"_rms_norm_kernel": 2, "_latent_rope_kernel": 1, "_decode_split_kernel": 1,
                      "_decode_reduce_kernel": 1, "_moe_route_kernel": 1,
                      "_moe_gate_up_kernel": 1, "_moe_down_kernel": 1,
                      # q|kv_a (session 21: the GEMV at any width), o_proj, the router (no
                      # cast), W_UV (head_gemv); W_UK inside the latent RoPE launch
                      "_gemv_kernel": 4}
    # min / max: the CPU-only check of the decode kernel's lengths (a GPU skips it)
    gpu_ops = {k: v for k, v in torch_ops.items() if k not in ("aten::min", "aten::max")}
    assert gpu_ops == {}
    assert sum(triton.values()) + sum(gpu_ops.values()) == 12
    # the folds on: no norm launch, q|kv_a a GEMV with the norm inside it
    from ringserve.kernels import gemv as gemv_mod
    monkeypatch.setattr(gemv_mod, "FOLD_MAX_ROWS", 1)
    full = mod.count_step(3, "triton", False, 1, "deepseek")   # layer 0 dense: 3 and 2
    half = mod.count_step(2, "triton", False, 1, "deepseek")   # layers differ by a MoE layer
    folded = mod._per_layer(full["by_kernel"], half["by_kernel"], 1)
    assert folded == {k: v for k, v in triton.items() if k != "_rms_norm_kernel"}  # q|kv_a
    # normed inside its GEMV
    assert {k: v for k, v in mod._per_layer(full["kernel_names"], half["kernel_names"],
                                            1).items()
            if k not in ("aten::min", "aten::max")} == {}
    monkeypatch.setattr(gemv_mod, "FOLD_MAX_ROWS", 0)
    # RINGSERVE_ABSORB_ROWS=0 (an A/B's other side): W_UK by einsum again, 13 launches
    from ringserve.kernels import fused
    monkeypatch.setattr(fused, "ABSORB_MAX_ROWS", 0)
    full = mod.count_step(3, "triton", False, 1, "deepseek")   # layer 0 dense: 3 and 2
    half = mod.count_step(2, "triton", False, 1, "deepseek")   # layers differ by a MoE layer
    ops = mod._per_layer(full["kernel_names"], half["kernel_names"], 1)
    assert {k: v for k, v in ops.items() if k not in ("aten::min", "aten::max")} == \
        {"aten::einsum": 1}
