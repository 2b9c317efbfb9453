"""The demo checkpoint (written without transformers) and the sample document."""
from __future__ import annotations

import json

import pytest
import torch

from ringserve.config import ModelConfig
from ringserve.demo_model import FILES, MARKER, DemoSpec, make_demo_model
from ringserve.model import CausalLM, local_attention_fn
from ringserve.sample_document import sample_document
from ringserve.tokenizer import IncrementalDecoder, Tokenizer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_model(tmp_path_factory.mktemp("demo") / "model", seed=0)


def test_demo_model_config_and_idempotence(demo):
    assert all((demo / f).is_file() for f in FILES) and (demo / MARKER).is_file()
    cfg = ModelConfig.from_dir(demo)
    assert cfg.architecture == "LlamaForCausalLM"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.head_dim) == (256, 4, 8, 2, 32)
    assert cfg.max_position_embeddings >= 131072 and cfg.rope.theta == 500000.0
    tok = Tokenizer.from_dir(demo)
    assert 1000 < tok.vocab_size <= cfg.vocab_size <= 4096
    stamps = {f: (demo / f).stat().st_mtime_ns for f in FILES}
    assert make_demo_model(demo, seed=0) == demo
    assert stamps == {f: (demo / f).stat().st_mtime_ns for f in FILES}   # skipped: complete


def test_demo_model_rebuilds_when_incomplete_or_other_seed(tmp_path):
    small = DemoSpec(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                     vocab_size=600, tokenizer_words=3000)
    p = make_demo_model(tmp_path / "m", seed=1, spec=small)
    w1 = (p / "model.safetensors").read_bytes()
    (p / "tokenizer.json").unlink()                 # an interrupted earlier run
    make_demo_model(p, seed=1, spec=small)
    assert (p / "tokenizer.json").is_file() and (p / "model.safetensors").read_bytes() == w1
    make_demo_model(p, seed=2, spec=small)          # deterministic per seed, different across
    assert (p / "model.safetensors").read_bytes() != w1
    assert json.loads((p / MARKER).read_text())["seed"] == 2
    with pytest.raises(ValueError, match=r"num_attention_heads \(6\) must be a multiple of "
                                         r"num_key_value_heads \(4\)"):
        DemoSpec(num_attention_heads=6, num_key_value_heads=4)


def test_demo_model_runs_and_matches_transformers(demo):
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.from_dir(demo)
    model = CausalLM.from_pretrained(demo)
    doc = sample_document(n_words=60, seed=3)
    prompt = tok.apply_chat_template([{"role": "user", "content": doc + "\nWho is the master?"}])
    ids = torch.tensor(tok.encode(prompt, add_special_tokens=False))
    assert ids[0].item() == tok.bos_token_id
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == prompt
    fn = local_attention_fn(window_size=model.window_size)
    logits = model.logits(model(ids, torch.arange(len(ids)), fn, chunk_tokens=32))
    assert logits.shape == (len(ids), model.config.vocab_size) and torch.isfinite(logits).all()
    hf = AutoModelForCausalLM.from_pretrained(str(demo), dtype=torch.float32,
                                              attn_implementation="sdpa").eval()
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    assert (logits - ref).abs().max().item() <= 1e-4
    # a few greedy steps without a KV cache: the same tokens as transformers' greedy generate
    seq = ids.tolist()
    for _ in range(4):
        h = model(torch.tensor(seq), torch.arange(len(seq)), fn)
        seq.append(int(model.logits(h[-1:]).argmax(-1)))
    with torch.no_grad():
        want = hf.generate(ids[None], max_new_tokens=4, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0].tolist()
    assert seq == want
    dec = IncrementalDecoder(tok, prompt_ids=ids.tolist())
    assert "".join(dec.push(t) for t in seq[len(ids):]) + dec.flush() == \
        tok.decode(seq)[len(tok.decode(ids.tolist())):]


def test_sample_document_deterministic_and_sized():
    a = sample_document(n_words=3000, seed=5)
    assert a == sample_document(n_words=3000, seed=5)
    assert a != sample_document(n_words=3000, seed=6)
    assert 3000 <= len(a.split()) < 3200
    assert "Clause 1." in a and "Entry 1." in a and "pounds" in a
    big = sample_document(n_tokens=20000, seed=1)
    assert 14000 <= len(big.split()) < 14400
    with pytest.raises(ValueError, match=r"n_words \(0\) must be >= 1"):
        sample_document(n_words=0)
