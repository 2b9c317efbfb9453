"""The model on a CUDA GPU: weights straight to the device, bf16 accuracy with the Triton
attention kernel (flash-attention's rule), and bounded activation memory with chunk_tokens.

Reference: the same checkpoint in float32 on the GPU with the float32 torch attention path.
A bf16 result passes when its max logit error is at most 2x that of a plain PyTorch bf16
computation (the same bf16 model with torch SDPA attention), plus a small floor.
"""
from __future__ import annotations

import pytest
import torch

from ringserve.config import ModelConfig
from ringserve.model import CausalLM, local_attention_fn

pytestmark = pytest.mark.gpu


def sdpa_attention_fn(window_size=None):
    """Plain PyTorch attention in the activations' dtype (the baseline of the bf16 rule)."""
    import torch.nn.functional as F

    def fn(layer_idx, q, k, v):
        T, hq, hkv = q.shape[1], q.shape[2], k.shape[2]
        i = torch.arange(T, device=q.device)
        mask = i[:, None] >= i[None, :]
        if window_size is not None:
            mask &= (i[:, None] - i[None, :]) <= window_size
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.repeat_interleave(hq // hkv, 2).transpose(1, 2),
            v.repeat_interleave(hq // hkv, 2).transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)

    return fn


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    pytest.importorskip("tokenizers")
    from ringserve.demo_model import DemoSpec, make_demo_model

    spec = DemoSpec(hidden_size=512, intermediate_size=1408, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                    vocab_size=2048, tokenizer_words=6000)
    return make_demo_model(tmp_path_factory.mktemp("gpu") / "m", seed=3, spec=spec)


def test_weights_load_to_gpu_in_bf16(ckpt):
    from safetensors.torch import load_file

    m = CausalLM.from_pretrained(ckpt, device="cuda")
    assert m.dtype == torch.bfloat16 and m.device.type == "cuda"   # None -> bf16 on CUDA
    file = load_file(str(ckpt / "model.safetensors"))
    for name, p in m.named_parameters():
        assert p.device.type == "cuda"
        assert torch.equal(p.cpu(), file[name].to(torch.bfloat16)), name


@pytest.mark.parametrize("T", [8192, 20011])
def test_bf16_triton_logits_within_flash_rule(ckpt, T):
    ref_model = CausalLM.from_pretrained(ckpt, dtype=torch.float32, device="cuda")
    g = torch.Generator().manual_seed(T)
    ids = torch.randint(0, ref_model.config.vocab_size, (T,), generator=g).cuda()
    pos = torch.arange(T, device="cuda") + 7   # a shard that does not start at 0
    last = slice(T - 512, T)                   # the rows that attend over the longest context
    ref = ref_model.logits(ref_model(ids, pos, local_attention_fn(backend="torch"))[last])
    del ref_model
    m = CausalLM.from_pretrained(ckpt, device="cuda")
    got = m.logits(m(ids, pos, local_attention_fn(backend="triton"), chunk_tokens=4096)[last])
    plain = m.logits(m(ids, pos, sdpa_attention_fn())[last])
    err = (got - ref).abs().max().item()
    base = (plain - ref).abs().max().item()
    assert err <= 2 * base + 1e-2, f"T={T}: triton bf16 error {err:.4g}, plain bf16 {base:.4g}"
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree > 0.9, agree


def _peak_extra(model, ids, pos, chunk):
    fn = local_attention_fn(backend="triton")
    model(ids[:64], pos[:64], fn)  # compile / warm up outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    h = model(ids, pos, fn, chunk_tokens=chunk)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del h
    return peak


def test_chunk_tokens_bounds_mlp_memory():
    """Peak activation memory with chunking does not grow with T * intermediate_size."""
    T, chunk = 32768, 1024
    peaks = {}
    for inter in (1024, 8192):
        cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=256, hidden_size=256,
                          intermediate_size=inter, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=1, head_dim=64)
        m = CausalLM(cfg, dtype=torch.bfloat16, device="cuda").eval()
        ids = torch.randint(0, 256, (T,), device="cuda")
        pos = torch.arange(T, device="cuda")
        peaks[inter] = (_peak_extra(m, ids, pos, None), _peak_extra(m, ids, pos, chunk))
        del m
    grow_full = peaks[8192][0] - peaks[1024][0]
    grow_chunked = peaks[8192][1] - peaks[1024][1]
    # unchunked: gate, up and their product over all T tokens, 7168 more columns of bf16 each
    assert grow_full >= 2 * T * 7168 * 2, peaks
    # chunked: the same growth but over `chunk` tokens only (x4 slack for the float32 SiLU)
    assert grow_chunked <= 4 * 3 * chunk * 7168 * 2, peaks
    assert peaks[8192][1] < peaks[8192][0] / 4, peaks


def test_matches_transformers_on_gpu(ckpt):
    """fp32: ours == HF (sdpa) at 8K tokens; bf16: ours (Triton) within the rule of HF bf16."""
    transformers = pytest.importorskip("transformers")
    T = 8192
    ids = torch.randint(0, 1000, (T,), generator=torch.Generator().manual_seed(1)).cuda()
    pos = torch.arange(T, device="cuda")
    last = slice(T - 256, T)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(ckpt), dtype=torch.float32, attn_implementation="sdpa").cuda().eval()
    with torch.no_grad():
        ref = hf(ids[None]).logits[0, last].float()
    hf = hf.to(torch.bfloat16)
    with torch.no_grad():
        hf16 = hf(ids[None]).logits[0, last].float()
    del hf
    m32 = CausalLM.from_pretrained(ckpt, dtype=torch.float32, device="cuda")
    ours32 = m32.logits(m32(ids, pos, local_attention_fn(backend="torch"))[last])
    assert (ours32 - ref).abs().max().item() <= 2e-3
    del m32
    m = CausalLM.from_pretrained(ckpt, device="cuda")
    ours16 = m.logits(m(ids, pos, local_attention_fn(backend="triton"))[last])
    err, base = (ours16 - ref).abs().max().item(), (hf16 - ref).abs().max().item()
    assert err <= 2 * base + 1e-2, f"ours bf16 {err:.4g} vs transformers bf16 {base:.4g}"
