"""Qwen3, Phi-3 (longrope, fused projections), Mixtral and Qwen3-MoE against transformers (CPU,
fp32): logits of the model alone, the MoE grouped GEMM against float64, refusals by name, and
through `ringserve.LLM` on 2-3 Ray actors: prompt log-probs, 32 greedy tokens, and a prompt that
extends a cached one (document-cache reuse) giving what a cold run gives."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from ringserve import LLM, SamplingParams
from ringserve.config import ModelConfig
from ringserve.kernels import grouped_linear
from ringserve.model import CausalLM, model_attention_fn
from tinymodels import hf_greedy, load_hf, tiny_model

FAMILIES = ["qwen3", "phi3", "phi3-window", "mixtral", "qwen3-moe", "qwen3-moe-raw", "gemma2",
            "gemma3", "deepseek-v2-lite", "deepseek-v2"]


def _ids(vocab: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, positions=None, **kw):
    positions = torch.arange(ids.shape[0]) if positions is None else positions
    return model.logits(model(ids, positions, model_attention_fn(model, "torch"), **kw))


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_equal_transformers(tmp_path_factory, name):
    path = tiny_model(tmp_path_factory, name)
    ours, hf = CausalLM.from_pretrained(path), load_hf(path)
    # 37 < 64 (longrope's original length: short factors) < 77, 131 (long factors); 77 and 131
    # pass phi3-window's 24-token window
    for n, seed in ((1, 1), (37, 2), (77, 3), (131, 4)):
        ids = _ids(ours.config.vocab_size, n, seed)
        with torch.no_grad():
            ref = hf(ids[None]).logits[0]
        got = _logits(ours, ids)
        err = (got - ref).abs().max().item()
        assert err <= 1e-4, f"{name} T={n}: max |ours - HF| = {err}"
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
    # activation chunks (the MoE routes each chunk on its own) change nothing
    ids = _ids(ours.config.vocab_size, 77, 5)
    assert (_logits(ours, ids, chunk_tokens=10) - _logits(ours, ids)).abs().max() <= 1e-4


def test_family_features_are_live(tmp_path_factory):
    """Each feature changes the answer, so the comparisons above can fail."""
    phi = CausalLM.from_pretrained(tiny_model(tmp_path_factory, "phi3"))
    assert phi.config.rope.rope_type == "longrope" and phi.rotary.long_after == 64
    ids = _ids(phi.config.vocab_size, 77, 6)
    # a shard told the sequence is 64 long uses the short factors: different logits
    assert (_logits(phi, ids) - _logits(phi, ids, seq_len=64)).abs().max() > 1e-2
    # the sequence length, not this call's positions, picks the factors on a shard: the
    # first 30 tokens of a 77-token sequence, alone, equal the whole sequence's first 30 only
    # when told the length (positions 0..29 alone pick the short factors)
    full = _logits(phi, ids)
    assert (_logits(phi, ids[:30], seq_len=77) - full[:30]).abs().max() <= 1e-4
    assert (_logits(phi, ids[:30]) - full[:30]).abs().max() > 1e-2
    moe = CausalLM.from_pretrained(tiny_model(tmp_path_factory, "qwen3-moe"))
    layers = moe.model.layers
    assert [la.ffn_name for la in layers] == ["mlp", "mlp"]
    assert hasattr(layers[0].mlp, "experts") and not hasattr(layers[1].mlp, "experts")
    mix = CausalLM.from_pretrained(tiny_model(tmp_path_factory, "mixtral"))
    blk = mix.model.layers[0].block_sparse_moe
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(1))
    w, idx = blk.route(x)
    assert torch.allclose(w.sum(-1), torch.ones(50)) and idx.shape == (50, 2)
    assert len(set(idx.flatten().tolist())) == 4   # every expert gets tokens
    # the GPU path (Triton grouped GEMM, interpreted here) gives the same layer output
    ref = blk(x)
    blk.backend = "triton"
    assert (blk(x) - ref).abs().max() <= 1e-5


def test_gemma_features_are_live(tmp_path_factory):
    """Every Gemma mechanism changes the logits, so test_logits_equal_transformers can fail on
    each: windows of the sliding layers (the 77-token prompt passes the 16-token window), the
    attention and final soft-caps, query pre-scaling, Gemma 3's local RoPE base."""
    ids = _ids(512, 77, 8)
    g2 = CausalLM.from_pretrained(tiny_model(tmp_path_factory, "gemma2"))
    assert g2.window_size == (15, None, 15) and g2.softcap == 2.0
    assert g2.softmax_scale == 24 ** -0.5 and g2.config.hidden_act == "gelu_pytorch_tanh"
    ids = ids % g2.config.vocab_size
    base = _logits(g2, ids)

    def differs(model, **attrs):
        old = {k: getattr(model, k) for k in attrs}
        for k, v in attrs.items():
            setattr(model, k, v)
        try:
            return (_logits(model, ids) - base).abs().max().item() > 1e-3
        finally:
            for k, v in old.items():
                setattr(model, k, v)

    assert differs(g2, window_size=None)                 # windows live
    assert differs(g2, window_size=(15, 15, 15))         # the global layer is global
    assert differs(g2, softcap=None)                     # attention soft-cap live
    assert differs(g2, softmax_scale=16 ** -0.5)         # query_pre_attn_scalar, not head_dim
    g2.config.final_logit_softcap = None
    try:
        assert (_logits(g2, ids) - base).abs().max().item() > 1e-2
    finally:
        g2.config.final_logit_softcap = 20.0
    # the scores of the window's edge: the torch path equals the Triton kernel (interpreted)
    got = g2.logits(g2(ids, torch.arange(77), model_attention_fn(g2, "triton")))
    assert (got - base).abs().max().item() <= 1e-4
    g3 = CausalLM.from_pretrained(tiny_model(tmp_path_factory, "gemma3"))
    assert g3.window_size == (15, 15, None, 15) and g3.softcap is None
    assert g3.layer_rotary == [True, True, False, True]
    assert g3.rotary.inv_freq[1] != g3.local_rotary.inv_freq[1]
    base = _logits(g3, ids)
    g3.layer_rotary = [False] * 4                        # every layer on the global RoPE
    try:
        assert (_logits(g3, ids) - base).abs().max().item() > 1e-3
    finally:
        g3.layer_rotary = [True, True, False, True]


def test_gemma3_multimodal_checkpoint_serves_its_text_model(tmp_path):
    """Gemma 3's released 4B-27B checkpoints are Gemma3ForConditionalGeneration: the text model
    under language_model., a vision tower beside it. ringserve loads the text model (the vision
    tensors skipped) and its logits on text equal transformers'."""
    import transformers
    from tinymodels import _redraw

    text = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                final_logit_softcapping=20.0, query_pre_attn_scalar=24)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    image_token_index=319, boi_token_index=317,
                                    eoi_token_index=318)
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(cfg)
    _redraw(hf, 5)
    hf.eval().save_pretrained(str(tmp_path))
    ours = CausalLM.from_pretrained(tmp_path)
    assert ours.config.window_size == (15, None, 15) and ours.config.checkpoint_prefix
    ids = _ids(300, 77, 10)
    with torch.no_grad():
        ref = hf(input_ids=ids[None]).logits[0]
    assert (_logits(ours, ids) - ref).abs().max().item() <= 1e-4


def test_deepseek_features_are_live(tmp_path_factory):
    """MLA's latent cache (40 values per token and layer where transformers' expanded K/V hold
    4 x (24 + 16) = 160), group-limited routing, shared experts, routed scaling and YaRN's
    mscale each change the logits; the KV pool keeps one tensor (values = keys)."""
    from ringserve.kv_cache import KVCacheConfig, KVPool

    ds = CausalLM.from_pretrained(tiny_model(tmp_path_factory, "deepseek-v2"))
    cfg = ds.config
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.values_are_keys) == (1, 40, True)
    assert cfg.mla.latent_dim == 40 and cfg.moe.n_group == 4 and cfg.moe.topk_group == 2
    m = 0.1 * 0.707 * math.log(4.0) + 1.0
    assert ds.softmax_scale == pytest.approx(24 ** -0.5 * m * m)
    assert ds.rotary.scale == pytest.approx(1.0)   # mscale == mscale_all_dim
    lite = CausalLM.from_pretrained(tiny_model(tmp_path_factory, "deepseek-v2-lite"))
    f = math.log(4.0)
    assert lite.rotary.scale == pytest.approx((0.1 * f + 1) / (0.08 * f + 1))
    ids = _ids(cfg.vocab_size, 77, 9)
    base = _logits(ds, ids)
    moe = ds.model.layers[1].mlp
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(2))
    w, idx = moe.route(x)
    groups = (idx // 2).tolist()           # 8 experts in 4 groups of 2
    assert all(len(set(g)) <= 2 for g in groups) and w.sum(-1).max() > 1.0   # scaled by 2.5

    def changed(fn, undo):
        fn()
        try:
            return (_logits(ds, ids) - base).abs().max().item() > 1e-3
        finally:
            undo()
    mc = moe.cfg
    assert changed(lambda: setattr(mc, "n_group", 1), lambda: setattr(mc, "n_group", 4))
    assert changed(lambda: setattr(mc, "routed_scale", 1.0),
                   lambda: setattr(mc, "routed_scale", 2.5))
    shared = moe.shared_experts.down_proj.weight
    keep = shared.detach().clone()
    assert changed(lambda: shared.data.zero_(), lambda: shared.data.copy_(keep))
    assert changed(lambda: setattr(ds, "softmax_scale", 24 ** -0.5),
                   lambda: setattr(ds, "softmax_scale", cfg.softmax_scale))
    pool = KVPool(KVCacheConfig(num_layers=3, num_kv_heads=1, head_dim=40, num_pages=4,
                                values_are_keys=True))
    assert pool.v is pool.k and pool.cfg.bytes_per_token == 3 * 40 * 4 + 4


def test_ring_passes_the_latent_once():
    """ring_attention with v given as k (MLA) sends one tensor per step, not two, and gives the
    same result as with a separate copy of the values."""
    from ringserve.parallel.ring import RingStats, ring_attention
    from ringserve.parallel.transport import ThreadHub
    from ringserve.parallel import layout as lay
    from concurrent.futures import ThreadPoolExecutor

    total, n = 77, 3
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, total, 4, 40, generator=g)
    kv = torch.randn(1, total, 1, 40, generator=g)

    def run(same):
        hub = ThreadHub(n)

        def rank(r):
            sh = lay.shard(total, n, r, "striped")
            idx = sh.offset + sh.stride * torch.arange(sh.length)
            k = kv[:, idx].contiguous()
            st = RingStats()
            o, _ = ring_attention(q[:, idx], k, k if same else k.clone(), total, "striped",
                                  hub.transport(r, timeout_s=60), causal=True, backend="torch",
                                  stats=st)
            return o, st.bytes_sent
        with ThreadPoolExecutor(n) as ex:
            return list(ex.map(rank, range(n)))
    one, two = run(True), run(False)
    for (o1, b1), (o2, b2) in zip(one, two):
        assert torch.equal(o1, o2) and b2 == 2 * b1 > 0


@pytest.mark.parametrize("tiles", ["", "large"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_grouped_linear_triton_equals_float64(dtype, tol, tiles, monkeypatch):
    """The MoE grouped GEMM (Triton, interpreted on CPU) and the torch path against float64:
    odd sizes, experts with no rows, one expert holding everything; with the small tiles and
    with the large ones a prefill takes on the GPU (RINGSERVE_MOE_TILES)."""
    from ringserve.kernels import grouped_gemm
    from ringserve.kernels.grouped_gemm import LARGE_TILES, SMALL_TILES, tiles_for
    monkeypatch.setattr(grouped_gemm, "FORCE_TILES", tiles)
    if not tiles:
        assert tiles_for(8, 128) == SMALL_TILES                  # a decode step
        assert tiles_for(128 * 1024 * 8, 128) == LARGE_TILES     # a 128K prefill, top-8
        assert tiles_for(128 * 1024 * 8, 128, on_gpu=False) == SMALL_TILES
        monkeypatch.setattr(grouped_gemm, "FORCE_TILES", "huge")
        with pytest.raises(ValueError, match="RINGSERVE_MOE_TILES"):
            tiles_for(8, 128)
        monkeypatch.setattr(grouped_gemm, "FORCE_TILES", "")
    g = torch.Generator().manual_seed(0)
    for E, M, N, K, counts in ((4, 37, 48, 32, None), (8, 130, 40, 72, None),
                               (5, 21, 17, 24, [0, 21, 0, 0, 0]), (3, 0, 16, 16, [0, 0, 0])):
        x = torch.randn(M, K, generator=g).to(dtype)
        w = (torch.randn(E, N, K, generator=g) / K ** 0.5).to(dtype)
        if counts is None:
            expert = torch.randint(0, E, (M,), generator=g).sort().values
            c = torch.bincount(expert, minlength=E)
        else:
            c = torch.tensor(counts)
            expert = torch.repeat_interleave(torch.arange(E), c)
        ref = torch.einsum("mk,mnk->mn", x.double(), w.double()[expert])
        for backend in ("triton", "torch"):
            if backend == "torch" and dtype == torch.float16:
                continue   # CPU half GEMMs are not the path under test
            out = grouped_linear(x, w, c, backend=backend)
            assert out.shape == (M, N) and out.dtype == dtype
            if M:
                err = (out.double() - ref).abs().max().item()
                assert err <= tol * max(1.0, ref.abs().max().item()), (backend, E, M, err)



def test_moe_route_equals_the_torch_router():
    """The few-token router (one Triton launch, interpreted on CPU): the softmax's top-k
    experts largest first, equal probabilities in expert order (a stable descending sort),
    renormalised or not, scaled; the same experts and weights as MoE.route's torch path."""
    from ringserve.config import MoeConfig
    from ringserve.kernels.grouped_gemm import moe_route
    from ringserve.moe import MoE
    g = torch.Generator().manual_seed(4)
    for E, k, T, renorm, scale in ((8, 2, 3, True, 1.0), (60, 6, 2, False, 2.5),
                                   (128, 8, 5, True, 1.0), (5, 1, 1, False, 1.0)):
        logits = torch.randn(T, E, generator=g) * 3
        logits[0, 1] = logits[0, 3] = logits[0].max() + 1      # a tie at the top
        w, idx = moe_route(logits, k, renorm, scale)
        p = torch.softmax(logits, -1)
        ref_w, ref_i = torch.sort(p, dim=-1, descending=True, stable=True)
        ref_w, ref_i = ref_w[:, :k], ref_i[:, :k]
        if renorm:
            ref_w = ref_w / ref_w.sum(-1, keepdim=True)
        assert idx.dtype == torch.int64 and torch.equal(idx, ref_i), (E, k, idx, ref_i)
        torch.testing.assert_close(w, ref_w * scale, rtol=1e-6, atol=1e-7)
        if k > 1:
            assert idx[0, 0] == 1 and idx[0, 1] == 3
    # MoE.route(fused=True) against its torch path on the layer's own router
    cfg = MoeConfig(num_experts=16, top_k=4, intermediate_size=8, renormalize=True,
                    routed_scale=1.5)
    moe = MoE(24, cfg, "qwen3_moe")
    x = torch.randn(3, 24, generator=g)
    (w1, i1), (w2, i2) = moe.route(x, fused=True), moe.route(x)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(w1, w2, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="top_k"):
        moe_route(x, 0, True)
    # a NaN row (an overflowed hidden state) gives NaN weights and expert ids still in range
    # (the experts' kernel would read out of bounds otherwise)
    bad = torch.randn(2, 12, generator=g)
    bad[1, 4] = float("nan")
    w, idx = moe_route(bad, 3, True)
    assert ((idx >= 0) & (idx < 12)).all() and torch.isnan(w[1]).all()
    assert torch.equal(idx[0], torch.sort(bad[0], descending=True, stable=True).indices[:3])
    assert moe_route(torch.zeros(0, 16), 4, True)[0].shape == (0, 4)

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
def test_moe_gemv_equals_float64_and_the_grouped_path(dtype, tol):
    """The few-token MoE layer (two Triton launches, interpreted on CPU) against float64 and
    against the grouped path it stands in for: odd sizes, a token whose experts repeat across
    tokens, renormalized and unnormalized router weights; MoE.forward takes it up to
    MOE_GEMV_MAX_COPIES token copies and the grouped GEMMs beyond, with the same outputs."""
    from ringserve.config import MoeConfig
    from ringserve.kernels.grouped_gemm import MOE_GEMV_MAX_COPIES, moe_gemv
    from ringserve.moe import MoE
    g = torch.Generator().manual_seed(1)
    for E, H, inter, T, k in ((6, 72, 40, 1, 2), (9, 48, 33, 3, 4), (4, 130, 20, 5, 3)):
        x = torch.randn(T, H, generator=g).to(dtype)
        gu = (torch.randn(E, 2 * inter, H, generator=g) / H ** 0.5).to(dtype)
        dn = (torch.randn(E, H, inter, generator=g) / inter ** 0.5).to(dtype)
        idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        w = torch.rand(T, k, generator=g)
        out = moe_gemv(x, gu, dn, idx, w)
        xd, gud, dnd = x.double(), gu.double(), dn.double()
        ref = torch.zeros(T, H, dtype=torch.float64)
        for t in range(T):
            for j in range(k):
                e = int(idx[t, j])
                h = gud[e] @ xd[t]
                a = torch.nn.functional.silu(h[:inter]) * h[inter:]
                ref[t] += w[t, j].double() * (dnd[e] @ a)
        assert out.shape == (T, H) and out.dtype == dtype
        err = (out.double() - ref).abs().max().item()
        assert err <= tol * max(1.0, ref.abs().max().item()), (E, T, k, err)
        # other tiles (K loops of several steps, a ragged last one) and gate/up's lazy sums
        for blocks in ((4, 32, 4, 2, 16, 4, True), (16, 64, 4, 8, 32, 2, False),
                       (4, 32, 4, 2, 16, 4, False, 3, 2)):     # (last: pipelined K loops)
            err = (moe_gemv(x, gu, dn, idx, w, blocks=blocks).double() - ref).abs().max()
            assert err.item() <= tol * max(1.0, ref.abs().max().item()), (blocks, err)
    with pytest.raises(ValueError, match="top_k"):
        moe_gemv(x, gu, dn, idx[:, :1], w)
    with pytest.raises(ValueError, match="stages"):
        moe_gemv(x, gu, dn, idx, w, blocks=(4, 32, 4, 2, 16, 4, False, 0, 1))
    # MoE.forward: the few-token path and the grouped one give the same layer output
    cfg = MoeConfig(num_experts=8, top_k=4, intermediate_size=24, renormalize=True)
    moe = MoE(32, cfg, "qwen3_moe")
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / 6)
    moe.backend = "triton"
    few = torch.randn(MOE_GEMV_MAX_COPIES // 4, 32, generator=g)     # 8 tokens: 32 copies
    many = torch.cat([few, torch.randn(3, 32, generator=g)])          # 44 copies: grouped
    a, b = moe(few), moe(many)[:len(few)]
    assert (a - b).abs().max().item() <= 1e-5 * max(1.0, a.abs().max().item())
    moe.backend = "torch"
    assert (moe(few) - a).abs().max().item() <= 1e-5 * max(1.0, a.abs().max().item())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
def test_moe_gemv_with_shared_experts_as_experts(dtype, tol):
    """DeepSeek's shared experts in moe_gemv's two launches (n more experts of the routed width,
    weight 1, read in place from the shared MLP's joined gate|up and its down weight): equal to
    float64's routed sum plus the whole shared MLP, 1-4 tokens, 1 and 2 shared slices, a top-k
    whose copies fill the power-of-two tile exactly and one that does not; MoE.forward takes it
    (no shared launches of its own: mutation-checked by breaking the joined weight's hold) with
    the outputs of the grouped path; bad shapes are refused."""
    from ringserve.config import MoeConfig
    from ringserve.kernels.grouped_gemm import moe_gemv
    from ringserve.moe import MoE
    g = torch.Generator().manual_seed(2)
    for E, H, inter, T, k, n in ((8, 40, 24, 1, 6, 2), (6, 72, 20, 3, 2, 1), (5, 33, 16, 4, 3, 2)):
        x = torch.randn(T, H, generator=g).to(dtype)
        gu = (torch.randn(E, 2 * inter, H, generator=g) / H ** 0.5).to(dtype)
        dn = (torch.randn(E, H, inter, generator=g) / inter ** 0.5).to(dtype)
        S = n * inter
        sg, su = (torch.randn(S, H, generator=g) / H ** 0.5).to(dtype), \
            (torch.randn(S, H, generator=g) / H ** 0.5).to(dtype)
        sd = (torch.randn(H, S, generator=g) / S ** 0.5).to(dtype)
        idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        w = torch.rand(T, k, generator=g)
        out = moe_gemv(x, gu, dn, idx, w, shared=(torch.cat([sg, su]), sd, n))
        xd = x.double()
        ref = (torch.nn.functional.silu(xd @ sg.double().t()) * (xd @ su.double().t())) \
            @ sd.double().t()
        for t in range(T):
            for j in range(k):
                e = int(idx[t, j])
                h = gu[e].double() @ xd[t]
                a = torch.nn.functional.silu(h[:inter]) * h[inter:]
                ref[t] += w[t, j].double() * (dn[e].double() @ a)
        err = (out.double() - ref).abs().max().item()
        assert out.shape == (T, H) and err <= tol * max(1.0, ref.abs().max().item()), (n, T, err)
    with pytest.raises(ValueError, match="shared"):
        moe_gemv(x, gu, dn, idx, w, shared=(torch.cat([sg, su]), sd, n + 1))
    with pytest.raises(ValueError, match="shared"):
        moe_gemv(x, gu, dn, idx, w, shared=(torch.cat([sg, su]), sd.t().contiguous().t(), n))
    # MoE.forward: DeepSeek's layer on the few-token path, shared experts merged
    cfg = MoeConfig(num_experts=8, top_k=3, intermediate_size=12, renormalize=False,
                    shared_intermediate=24, router_fp32=True)
    moe = MoE(32, cfg, "deepseek_v2")
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / 6)
    moe.join_weights()
    assert moe.shared_as_experts() is not None and moe.shared_as_experts()[2] == 2
    moe.backend = "triton"
    xs = torch.randn(4, 32, generator=g)
    calls = []
    orig = moe.shared_experts.forward
    moe.shared_experts.forward = lambda *a, **kw: calls.append(1) or orig(*a, **kw)
    a = moe(xs)
    assert calls == []                   # the shared MLP ran inside moe_gemv's launches
    moe.backend = "torch"
    b = moe(xs)
    assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())
    # a gate|up replaced after joining: no longer held, the shared MLP runs on its own again
    moe.shared_experts.gate_proj.weight = torch.nn.Parameter(
        moe.shared_experts.gate_proj.weight.detach().clone())
    assert moe.shared_as_experts() is None
    moe.backend = "triton"
    calls.clear()
    assert (moe(xs) - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())
    assert calls == [1]

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 4e-3)])
def test_moe_gemv_folds_the_norm_and_the_residual_add(dtype, tol, monkeypatch):
    """moe_gemv(norm=, residual=): the MLP's RMSNorm inside the gate/up launch and h += y
    inside the down launch (h the input itself, as the model passes it), with and without
    shared experts, equal to the norm, moe_gemv and the add done apart; MoE.add_normed does
    that for a decode token when the folds are on (the router normalizing too) and refuses
    where it does not apply;
    a bad norm weight or residual is refused."""
    from ringserve.config import MoeConfig
    from ringserve.kernels.grouped_gemm import moe_gemv
    from ringserve.model import RMSNorm
    from ringserve.moe import MoE
    g = torch.Generator().manual_seed(4)
    for E, H, inter, T, k, n in ((8, 72, 24, 1, 3, 0), (6, 40, 20, 2, 2, 1)):
        h = (2 * torch.randn(T, H, generator=g)).to(dtype)
        gu = (torch.randn(E, 2 * inter, H, generator=g) / H ** 0.5).to(dtype)
        dn = (torch.randn(E, H, inter, generator=g) / inter ** 0.5).to(dtype)
        idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        w = torch.rand(T, k, generator=g)
        shared = None
        if n:
            shared = ((torch.randn(2 * n * inter, H, generator=g) / H ** 0.5).to(dtype),
                      (torch.randn(H, n * inter, generator=g) / inter ** 0.5).to(dtype), n)
        norm = RMSNorm(H, 1e-6).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(1 + torch.randn(H, generator=g) / 4)
        want = h + moe_gemv(norm(h), gu, dn, idx, w, shared=shared)
        got = h.clone()
        assert moe_gemv(got, gu, dn, idx, w, shared=shared, norm=(norm.weight.detach(), 1e-6),
                        residual=got) is got
        err = (got.double() - want.double()).abs().max().item()
        assert err <= tol * max(1.0, want.abs().max().item()), (T, n, err)
    with pytest.raises(ValueError, match="norm"):
        moe_gemv(h, gu, dn, idx, w, norm=(norm.weight.detach()[1:], 1e-6))
    with pytest.raises(ValueError, match="residual"):
        moe_gemv(h, gu, dn, idx, w, residual=h.float() if dtype != torch.float32 else h[:1])
    # the layer: router, experts and add for one token; refused for two
    cfg = MoeConfig(num_experts=8, top_k=2, intermediate_size=12, renormalize=True)
    moe = MoE(32, cfg, "qwen3_moe").to(dtype)
    norm = RMSNorm(32, 1e-6).to(dtype)
    with torch.no_grad():
        for p in list(moe.parameters()) + [norm.weight]:
            p.copy_(torch.randn(p.shape, generator=g) / 4 + (1 if p is norm.weight else 0))
    moe.backend = "triton"
    h = torch.randn(1, 32, generator=g).to(dtype)
    want = h + moe(norm(h))
    got = h.clone()
    assert not moe.can_add_normed(got, norm)            # off by default (kernels/gemv.py)
    from ringserve.kernels import gemv as gemv_mod
    monkeypatch.setattr(gemv_mod, "FOLD_MAX_ROWS", 1)   # RINGSERVE_FOLD_ROWS=1
    assert moe.can_add_normed(got, norm) and moe.add_normed(got, norm) is got
    err = (got.double() - want.double()).abs().max().item()
    assert err <= 2 * tol * max(1.0, want.abs().max().item()), err
    assert not moe.can_add_normed(torch.randn(2, 32).to(dtype), norm)
    with pytest.raises(ValueError, match="can_add_normed"):
        moe.add_normed(torch.randn(2, 32).to(dtype), norm)


def _edit_config(tmp_path, src, **changes):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unsupported_options_are_refused_by_name(tmp_path_factory, tmp_path):
    base = json.loads((tiny_model(tmp_path_factory, "qwen3") / "config.json").read_text())
    with pytest.raises(ValueError, match="max_window_layers"):
        ModelConfig.from_hf_dict(dict(base, use_sliding_window=True, sliding_window=16,
                                      max_window_layers=1))
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        ModelConfig.from_hf_dict(dict(base, hidden_act="gelu"))
    phi = json.loads((tiny_model(tmp_path_factory, "phi3") / "config.json").read_text())
    rp = dict(phi["rope_parameters"], long_factor=[1.0] * 3)
    with pytest.raises(ValueError, match="long_factor has 3 entries, head_dim 16 needs 8"):
        CausalLM(ModelConfig.from_hf_dict(dict(phi, rope_parameters=rp)))
    rp = {k: v for k, v in phi["rope_parameters"].items() if k != "short_factor"}
    with pytest.raises(ValueError, match="longrope needs short_factor and long_factor"):
        ModelConfig.from_hf_dict(dict(phi, rope_parameters=rp))
    moe = json.loads((tiny_model(tmp_path_factory, "mixtral") / "config.json").read_text())
    with pytest.raises(ValueError, match=r"num_experts_per_tok \(5\) must be in 1..num_experts "
                                         r"\(4\)"):
        ModelConfig.from_hf_dict(dict(moe, num_experts_per_tok=5))
    gemma = json.loads((tiny_model(tmp_path_factory, "gemma3") / "config.json").read_text())
    with pytest.raises(ValueError, match="use_bidirectional_attention is not supported"):
        ModelConfig.from_hf_dict(dict(gemma, use_bidirectional_attention=True))
    with pytest.raises(ValueError, match="layer type\\(s\\) 'chunked_attention' not supported"):
        ModelConfig.from_hf_dict(dict(gemma, layer_types=["chunked_attention"] * 4))
    with pytest.raises(ValueError, match="hidden_act 'gelu' is not supported"):
        ModelConfig.from_hf_dict(dict(gemma, hidden_activation="gelu"))
    rp = dict(gemma["rope_parameters"], full_attention={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="rope_type 'dynamic' is not supported"):
        ModelConfig.from_hf_dict(dict(gemma, rope_parameters=rp))
    ds = json.loads((tiny_model(tmp_path_factory, "deepseek-v2") / "config.json").read_text())
    with pytest.raises(ValueError, match="topk_method 'noaux_tc' is not supported"):
        ModelConfig.from_hf_dict(dict(ds, topk_method="noaux_tc"))
    with pytest.raises(ValueError, match="scoring_func 'sigmoid' is not supported"):
        ModelConfig.from_hf_dict(dict(ds, scoring_func="sigmoid"))
    with pytest.raises(ValueError, match=r"moe_layer_freq \(2\) != 1 is not supported"):
        ModelConfig.from_hf_dict(dict(ds, moe_layer_freq=2))
    with pytest.raises(ValueError, match="pretraining_tp"):
        ModelConfig.from_hf_dict(dict(ds, pretraining_tp=2))
    with pytest.raises(ValueError, match="mscale_all_dim is supported for deepseek_v2 only"):
        ModelConfig.from_hf_dict(dict(base, rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
            "rope_theta": 1e6, "mscale": 1.0, "mscale_all_dim": 1.0}))
    # transformers 4's spelling of Gemma 3's RoPE and layer pattern reads the same
    old = {k: v for k, v in gemma.items() if k not in ("rope_parameters", "layer_types")}
    old.update(rope_theta=1e6, rope_local_base_freq=1e4, sliding_window_pattern=3,
               rope_scaling={"rope_type": "linear", "factor": 4.0})
    new, got = ModelConfig.from_hf_dict(gemma), ModelConfig.from_hf_dict(old)
    assert got.layer_types == new.layer_types and got.window_size == (15, 15, None, 15)
    assert got.rope == new.rope and got.local_rope == new.local_rope
    assert new.rope.theta == 1e6 and new.rope.factor == 4.0 and new.local_rope.theta == 1e4
    dst = _edit_config(tmp_path, tiny_model(tmp_path_factory, "qwen3"),
                       architectures=["DeepseekV3ForCausalLM"])
    with pytest.raises(ValueError, match="unsupported architecture 'DeepseekV3ForCausalLM'"):
        CausalLM.from_pretrained(dst)


def test_moe_checkpoint_missing_expert_is_named(tmp_path_factory, tmp_path):
    from safetensors.torch import load_file, save_file

    dst = tmp_path / "moe"
    shutil.copytree(tiny_model(tmp_path_factory, "mixtral"), dst)
    tensors = load_file(dst / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    save_file(tensors, dst / "model.safetensors")
    with pytest.raises(KeyError, match=r"lacks tensor\(s\) model\.layers\.1\.block_sparse_moe\."
                                       r"experts\.3\.w3\.weight"):
        CausalLM.from_pretrained(dst)


# ---- through ringserve.LLM: Ray actors, gloo, paged KV cache ----

# (family, world size, layout): between them both layouts, 2 and 3 ranks. phi3 on contiguous
# shards: rank 0 holds positions 0..25 of the 77-token prompt and must still pick longrope's
# long factors (the worker passes each row's sequence length), while the 37-token prompt, scored
# in the same flat batch, keeps the short ones.
LLM_CONFIGS = [("qwen3", 3, "ring"), ("phi3", 3, "ring"), ("mixtral", 2, "striped"),
               ("qwen3-moe", 3, "striped"), ("gemma2", 2, "striped"), ("gemma3", 3, "ring"),
               ("deepseek-v2-lite", 3, "striped"), ("deepseek-v2", 2, "ring")]
NEW_TOKENS = 32
_REF = {}
# Phi-3 (longrope, 64 original positions here): transformers recomputes a sequence's whole cache
# with the long factors when it grows past the original length; so does ringserve (the
# scheduler recomputes the sequence, and never extends a cached prefix that short into a
# longer sequence). The fourth prompt (50 tokens + 32 generated) crosses during generation,
# the fifth extends its first 40 tokens (cached) to 70.


def _reference(tmp_path_factory, family):
    """Three prompts (the third extends the first and is asked after it is cached; Phi-3: two
    more that cross longrope's original length) with HF's log-probs and greedy continuations
    by full forward passes: the model's definition (cached generate drifts for the MoE
    checkpoints: a router near-tie flips an expert)."""
    if family not in _REF:
        path = tiny_model(tmp_path_factory, family)
        hf = load_hf(path)
        g = torch.Generator().manual_seed(sum(map(ord, family)))
        vocab = hf.config.vocab_size
        first, second, extra = (21, 77, 11) if family.startswith("phi3") else (37, 77, 19)
        p1 = torch.randint(0, vocab, (first,), generator=g).tolist()
        prompts = [p1, torch.randint(0, vocab, (second,), generator=g).tolist(),
                   p1 + torch.randint(0, vocab, (extra,), generator=g).tolist()]
        if family.startswith("phi3"):   # across the original length, see above
            p4 = torch.randint(0, vocab, (50,), generator=g).tolist()
            prompts += [p4, p4[:40] + torch.randint(0, vocab, (30,), generator=g).tolist()]
        out = []
        with torch.no_grad():
            for ids in prompts:
                x = torch.tensor([ids])
                lp = torch.log_softmax(hf(x).logits[0].double(), -1)
                lp = lp[:-1].gather(1, x[0, 1:, None])[:, 0]
                out.append((ids, lp, hf_greedy(hf, ids, NEW_TOKENS, full_forward=True)))
        _REF[family] = (path, out)
    return _REF[family]


@pytest.fixture(scope="module", params=LLM_CONFIGS, ids=lambda c: f"{c[0]}-ws{c[1]}-{c[2]}")
def served(request, ray_session, tmp_path_factory):
    family, ws, layout = request.param
    path, ref = _reference(tmp_path_factory, family)
    llm = LLM(str(path), world_size=ws, layout=layout, max_kv_tokens=2048,
              num_cpus_per_worker=0.5)
    yield llm, ref
    llm.shutdown()


def test_llm_score_and_greedy_equal_transformers(served):
    llm, ref = served
    outs = llm.score([ids for ids, _, _ in ref[:2]])
    for (ids, lp_ref, _), out in zip(ref, outs):
        got = torch.tensor(out.logprobs[1:], dtype=torch.float64)
        torch.testing.assert_close(got, lp_ref, rtol=0, atol=5e-5)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    for i, (ids, _, gen_ref) in enumerate(ref):   # one at a time: the third reuses the first
        out = llm.generate([ids], params)[0]
        assert out.token_ids == gen_ref, (len(ids), out.num_cached_tokens)
        if i == 2:
            assert out.num_cached_tokens >= len(ref[0][0])   # reused the cached prompt
        if i == 4:   # Phi-3: its 40 cached tokens were rotated with the short factors
            assert out.num_cached_tokens == 0


def test_llm_mla_expanded_prompts_equal_transformers(ray_session, tmp_path_factory):
    """LLM(mla_expand_min_tokens=8) reaches the Ray workers: DeepSeek-V2-Lite's prompts (one
    chunk each, 37-77 tokens) attend in the expanded form on two ranks, the latents passed
    around the ring; scores and greedy tokens still equal transformers'."""
    path, ref = _reference(tmp_path_factory, "deepseek-v2-lite")
    llm = LLM(str(path), world_size=2, layout="ring", max_kv_tokens=2048,
              num_cpus_per_worker=0.5, mla_expand_min_tokens=8)
    try:
        info = llm._group.call("kv_info")
        assert [i["mla_expand_min_tokens"] for i in info] == [8, 8]
        outs = llm.score([ids for ids, _, _ in ref[:2]])
        for (ids, lp_ref, _), out in zip(ref, outs):
            torch.testing.assert_close(torch.tensor(out.logprobs[1:], dtype=torch.float64),
                                       lp_ref, rtol=0, atol=5e-5)
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
        for ids, _, gen_ref in ref:
            assert llm.generate([ids], params)[0].token_ids == gen_ref
    finally:
        llm.shutdown()


# ---- chunked prefill and graph decode with per-layer windows (in-process ranks) ----

@pytest.mark.parametrize("family,ws,layout,backend", [
    ("gemma2", 3, "striped", "torch"), ("gemma3", 2, "ring", "torch"),
    ("gemma3", 1, "striped", "torch"), ("deepseek-v2-lite", 2, "ring", "torch"),
    ("deepseek-v2", 3, "striped", "torch"), ("phi3", 2, "ring", "torch"),
    ("deepseek-v2-lite", 1, "striped", "torch"),
    # the Triton kernels (interpreted): the paged kernel's window skip over the cache's sorted
    # positions (several ranks interpreted pass the transport's timeouts)
    ("gemma3", 1, "striped", "triton"),
    # MLA's expanded form (every 16-token chunk: the ring passing latents that each rank
    # expands, the cached prefix expanded piece by piece); the interpreted flash kernel at
    # qk_head_dim on one rank
    ("deepseek-v2-lite", 2, "ring", "torch-expand"), ("deepseek-v2", 3, "striped",
                                                       "torch-expand"),
    ("deepseek-v2-lite", 1, "striped", "triton-expand")])
def test_chunked_prefill_and_graph_decode_equal_transformers(tmp_path_factory, family, ws,
                                                             layout, backend):
    """Prompts cut into 16-token chunks (each chunk attends the prompt's earlier chunks through
    the cache: the paged kernel for windowed layers, the gathered keys for global ones) and
    decoded through the CUDA-graph path (emulated): log-probs and greedy tokens equal
    transformers'; the prompt extending a cached one reuses it. Phi-3: the first chunks of the
    77-token prompt end before longrope's 64 original positions and must still use the long
    factors (the whole prompt's length decides, as in transformers' one forward)."""
    from threadgroup import ThreadGroup
    from ringserve.engine import Engine, EngineConfig
    from ringserve.tokenizer import Tokenizer

    path, ref = _reference(tmp_path_factory, family)
    backend, _, expand = backend.partition("-")
    group = ThreadGroup(ws, model=str(path), kv_tokens=1024, page_size=8, cuda_graphs="emulate",
                        backend=backend, mla_expand_min_tokens=16 if expand else None)
    eng = Engine(group, Tokenizer.from_dir(path), (), EngineConfig(
        layout=layout, max_num_batched_tokens=16, passq_max_tokens=4, cuda_graphs=True))
    try:
        for ids, lp_ref, _ in ref[:2]:
            out = eng.submit("score", ids).result(120)
            torch.testing.assert_close(torch.tensor(out.logprobs[1:], dtype=torch.float64),
                                       lp_ref, rtol=0, atol=5e-5)
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
        for i, (ids, _, gen_ref) in enumerate(ref):
            out = eng.submit("generate", ids, params).result(120)
            assert out.token_ids == gen_ref, (len(ids), out.num_cached_tokens)
            assert i != 2 or out.num_cached_tokens >= len(ref[0][0])
        assert any(wk._graphs for wk in group.workers)      # decode went through the graphs
    finally:
        eng.shutdown()
        group.shutdown()


def test_every_windowed_paged_call_may_skip_the_keys_before_the_window(monkeypatch):
    """The engine's paged attention calls (prefill chunks against the cache, eager decode, the
    decode graph's body and its warm-up) say positions_sorted, so a windowed layer's kernel
    starts at the window instead of masking the whole cache (Gemma 3's 128K decode and prefill
    on an H200 in session 15: the graph body did not say it, and its decode read every key)."""
    from threadgroup import ThreadGroup
    from ringserve.engine import Engine, EngineConfig
    from ringserve.kernels import flash_decode

    real, calls = flash_decode.paged_decode_triton, []

    def spy(*a, **kw):
        calls.append((a[7] if len(a) > 7 else kw.get("window_size"), kw.get("positions_sorted")))
        return real(*a, **kw)
    monkeypatch.setattr(flash_decode, "paged_decode_triton", spy)
    cfg = dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", vocab_size=512,
               hidden_size=64, intermediate_size=128, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               query_pre_attn_scalar=16, sliding_window=32, sliding_window_pattern=3,
               hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
               rope_theta=1000000.0, rope_local_base_freq=10000.0,
               max_position_embeddings=4096, tie_word_embeddings=True)
    for graphs in (False, "emulate"):
        g = ThreadGroup(1, model={"config": cfg, "seed": 0}, dtype="float32", page_size=16,
                        kv_tokens=2048, backend="triton", cuda_graphs=graphs,
                        fused_kernels=True)
        eng = Engine(g, None, (), EngineConfig(max_num_batched_tokens=48,
                                               cuda_graphs=bool(graphs)))
        try:
            doc = [(7 * i) % 500 for i in range(90)]
            eng.submit("cache_document", doc).result(120)
            eng.submit("generate", doc + [3, 4], SamplingParams(
                max_tokens=2, temperature=0, ignore_eos=True)).result(120)
        finally:
            eng.shutdown()
            g.shutdown()
    windowed = [s for w, s in calls if w is not None]
    assert windowed and all(windowed), calls


@pytest.mark.parametrize("ws,layout", [(1, "striped"), (2, "ring")])
def test_mla_expanded_chunks_in_mixed_steps_equal_the_absorbed_engine(tmp_path_factory, ws,
                                                                      layout):
    """Requests in flight together (prompt chunks of 24 tokens sharing steps with other
    requests' decode rows and short extensions): with every prompt chunk in the expanded form
    (a one-token prompt too: at two ranks one rank holds none of it), the tokens and log-probs
    equal an engine that keeps every row absorbed; and the expanded form did run
    (StepAttention.mla was called with chunks to expand)."""
    from threadgroup import ThreadGroup
    from ringserve.engine import Engine, EngineConfig
    from ringserve.parallel.step_attention import StepAttention

    path = tiny_model(tmp_path_factory, "deepseek-v2-lite")
    real, expanded = StepAttention.mla, []

    def spy(self, layer, *a):
        expanded.append((len(self.expand), len(self.plan.seqs) - len(self.expand)))
        return real(self, layer, *a)

    def run(expand_min):
        group = ThreadGroup(ws, model=str(path), kv_tokens=1024, page_size=8,
                            backend="torch", mla_expand_min_tokens=expand_min)
        eng = Engine(group, None, (), EngineConfig(layout=layout, max_num_batched_tokens=24,
                                                   passq_max_tokens=4))
        p = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=True)
        try:
            hs = [eng.submit("generate", [(11 * i + 5 * j) % 200 + 3 for j in range(n)], p)
                  for i, n in enumerate((70, 9, 41, 3, 1))]
            return [(o.token_ids, o.logprobs) for o in (h.result(120) for h in hs)]
        finally:
            eng.shutdown()
            group.shutdown()

    StepAttention.mla = spy
    try:
        got = run(1)
    finally:
        StepAttention.mla = real
    assert expanded and all(e for e, _ in expanded)
    assert any(rest for _, rest in expanded)     # steps with absorbed rows beside a chunk
    want = run(None)
    for (t1, lp1), (t2, lp2) in zip(got, want):
        assert t1 == t2
        torch.testing.assert_close(torch.tensor(lp1), torch.tensor(lp2), rtol=0, atol=1e-4)


def test_mla_expanded_form_keeps_the_kv_capacity():
    """The expanded form's activations per chunk token stay under the absorbed form's count
    for DeepSeek-V2-Lite's and V2's shapes, so the per-token reserve (and the KV tokens that
    fit) is what it was (session 16 first added them on top: 23% fewer KV tokens on an
    H200); the cached prefix's expansion pieces are a fixed reserve."""
    import sys
    from pathlib import Path
    from ringserve.actors.model_worker import (activation_bytes_per_token, fixed_reserve_bytes,
                                               mla_expanded_bytes_per_token)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_e2e
    cfg = ModelConfig.from_hf_dict(bench_e2e.hf_config("deepseek-v2-lite", 1 << 17))
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    absorbed = 2 * (2 * cfg.hidden_size + 3 * hq * d + 6 * hkv * d) + 4 * hq * d + 8 * hq
    assert 0 < mla_expanded_bytes_per_token(cfg, 2) < absorbed
    assert activation_bytes_per_token(cfg, 2) == int(absorbed * 1.25)
    llama = ModelConfig.from_hf_dict(bench_e2e.hf_config("llama3-8b", 1 << 17))
    assert mla_expanded_bytes_per_token(llama, 2) == 0
    # the fixed reserve holds one expanded piece of the prefix (MLA only)
    from ringserve.parallel.step_attention import MLA_PIECE_TOKENS
    m = cfg.mla
    base = 3 * 2 ** 30 + 3 * 8192 * cfg.intermediate_size * 2
    assert fixed_reserve_bytes(cfg, 8192, 2) - base == (
        MLA_PIECE_TOKENS * hq * 2 * (2 * m.qk_head_dim + m.qk_nope_head_dim + m.v_head_dim))
    assert fixed_reserve_bytes(llama, 8192, 2) == 3 * 2 ** 30 + 3 * 8192 * llama.intermediate_size * 2
