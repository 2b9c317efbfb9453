"""Our model against HuggingFace transformers on tiny random-weight checkpoints (CPU, fp32)."""
from __future__ import annotations

import pytest
import torch

from ringserve.model import CausalLM, local_attention_fn
from ringserve.rope import Rotary
from tinymodels import load_hf, tiny_model

FAMILIES = ["llama", "llama-mha", "mistral", "qwen2", "qwen2-yarn"]


def _ids(vocab: int, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _ours(model: CausalLM, ids: torch.Tensor, positions=None, chunk_tokens=None) -> torch.Tensor:
    if positions is None:
        positions = torch.arange(ids.shape[0])
    fn = local_attention_fn(causal=True, window_size=model.window_size, backend="torch")
    return model.logits(model(ids, positions, fn, chunk_tokens=chunk_tokens))


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_equal_transformers(tmp_path_factory, name):
    path = tiny_model(tmp_path_factory, name)
    ours = CausalLM.from_pretrained(path)
    hf = load_hf(path, "eager")
    assert ours.dtype == torch.float32
    # odd lengths; 77 and 131 exceed Mistral's 16-token window and yarn's 64 original positions
    for n, seed in ((1, 1), (37, 2), (77, 3), (131, 4)):
        ids = _ids(ours.config.vocab_size, n, seed)
        with torch.no_grad():
            ref = hf(ids[None]).logits[0].float()
        got = _ours(ours, ids)
        assert got.dtype == torch.float32 and got.shape == ref.shape
        err = (got - ref).abs().max().item()
        assert err <= 1e-4, f"{name} T={n}: max |ours - HF| = {err}"
        assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_sdpa_and_offset_positions_equal_transformers(tmp_path_factory):
    """HF with position_ids starting at an offset == ours at the same global positions."""
    path = tiny_model(tmp_path_factory, "llama")
    ours = CausalLM.from_pretrained(path)
    hf = load_hf(path, "sdpa")
    ids = _ids(ours.config.vocab_size, 53, 11)
    pos = torch.arange(53) + 1000  # beyond llama3-scaling's 64 original positions
    with torch.no_grad():
        ref = hf(ids[None], position_ids=pos[None]).logits[0]
    err = (_ours(ours, ids, pos) - ref).abs().max().item()
    assert err <= 1e-4, err


def test_mistral_window_matters(tmp_path_factory):
    """Sanity of the window plumbing: without the window the logits past token 16 change."""
    path = tiny_model(tmp_path_factory, "mistral")
    ours = CausalLM.from_pretrained(path)
    assert ours.config.sliding_window == 16 and ours.window_size == 15
    ids = _ids(ours.config.vocab_size, 40, 5)
    windowed = _ours(ours, ids)
    full = ours.logits(ours(ids, torch.arange(40), local_attention_fn(window_size=None)))
    assert torch.allclose(windowed[:16], full[:16], atol=1e-5)
    assert (windowed[16:] - full[16:]).abs().max() > 1e-3


def test_rope_at_offset_equals_slicing():
    from ringserve.config import RopeConfig

    g = torch.Generator().manual_seed(7)
    for rope in (RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0,
                            original_max_position_embeddings=64),
                 RopeConfig(theta=10000.0, rope_type="yarn", factor=4.0,
                            original_max_position_embeddings=64),
                 RopeConfig(theta=10000.0)):
        rot = Rotary(rope, 16)
        x = torch.randn(300, 3, 16, generator=g)
        full = Rotary.apply(x, *rot.cos_sin(torch.arange(300)))
        # contiguous shard at offset 123, and a round-robin stripe (offset 2, stride 3)
        pos = torch.arange(123, 211)
        part = Rotary.apply(x[123:211], *rot.cos_sin(pos))
        assert torch.allclose(part, full[123:211], atol=1e-6, rtol=0)
        stripe = torch.arange(2, 300, 3)
        part = Rotary.apply(x[stripe], *rot.cos_sin(stripe))
        assert torch.allclose(part, full[stripe], atol=1e-6, rtol=0)
        # rotation preserves norms and relative-position dot products
        assert torch.allclose(full.norm(dim=-1), x.norm(dim=-1) * rot.scale, rtol=1e-5)


def test_chunked_forward_equals_unchunked(tmp_path_factory):
    path = tiny_model(tmp_path_factory, "qwen2")
    ours = CausalLM.from_pretrained(path)
    ids = _ids(ours.config.vocab_size, 97, 21)
    whole = _ours(ours, ids)
    for chunk in (1, 10, 32, 500):
        got = _ours(ours, ids, chunk_tokens=chunk)
        # not bitwise: a 1-row matmul may take another BLAS kernel than a 97-row one
        err = (got - whole).abs().max().item()
        assert err <= 1e-4, (chunk, err)


def test_attn_fn_sees_unrepeated_gqa_heads_and_global_positions(tmp_path_factory):
    """The engine's hook: per layer, q (1,T,Hq,D) and k/v with only Hkv heads, rotated at the
    positions given, and its output is what the model uses."""
    path = tiny_model(tmp_path_factory, "mistral")  # MQA: 4 query heads, 1 kv head
    ours = CausalLM.from_pretrained(path)
    cfg = ours.config
    ids = _ids(cfg.vocab_size, 29, 3)
    seen = []
    local = local_attention_fn(window_size=ours.window_size)

    def spy(layer_idx, q, k, v):
        seen.append((layer_idx, tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        return local(layer_idx, q, k, v)

    ours(ids, torch.arange(29), spy)
    assert seen == [(i, (1, 29, 4, 16), (1, 29, 1, 16), (1, 29, 1, 16))
                    for i in range(cfg.num_hidden_layers)]

    def zeros(layer_idx, q, k, v):
        return torch.zeros_like(q)

    # with attention removed the output differs: the hook's result is really used
    a = ours.logits(ours(ids, torch.arange(29), zeros))
    b = ours.logits(ours(ids, torch.arange(29), local))
    assert (a - b).abs().max() > 1e-2
    with pytest.raises(ValueError, match=r"attn_fn returned shape \(1, 29, 1, 16\)"):
        ours(ids, torch.arange(29), lambda i, q, k, v: k)


def test_bf16_close_to_fp32(tmp_path_factory):
    """Loading converts dtypes; bf16 logits stay near the fp32 ones (loose, bf16 rounding)."""
    path = tiny_model(tmp_path_factory, "llama")
    m32 = CausalLM.from_pretrained(path)
    m16 = CausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert m16.dtype == torch.bfloat16
    ids = _ids(m32.config.vocab_size, 33, 9)
    a, b = _ours(m32, ids), _ours(m16, ids)
    assert b.dtype == torch.float32
    rel = ((a - b).norm() / a.norm()).item()
    assert rel < 0.05, rel


def test_forward_rejects_bad_shapes(tmp_path_factory):
    ours = CausalLM.from_pretrained(tiny_model(tmp_path_factory, "llama"))
    fn = local_attention_fn()
    with pytest.raises(ValueError, match="must be equal 1-D shapes"):
        ours(torch.zeros(5, dtype=torch.long), torch.arange(4), fn)
    with pytest.raises(ValueError, match=r"chunk_tokens \(0\)"):
        ours(torch.zeros(5, dtype=torch.long), torch.arange(5), fn, chunk_tokens=0)
