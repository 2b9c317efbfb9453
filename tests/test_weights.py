"""Safetensors loading: single and sharded files, tied embeddings, dtypes, clear errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ringserve.model import CausalLM
from ringserve.weights import checkpoint_files
from tinymodels import tiny_model


def _copy(tmp_path, src, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_equals_single(tmp_path_factory):
    single = tiny_model(tmp_path_factory, "llama")
    sharded = tiny_model(tmp_path_factory, "llama-sharded")
    files = set(checkpoint_files(sharded).values())
    assert len(files) > 1 and (sharded / "model.safetensors.index.json").is_file()
    a = CausalLM.from_pretrained(single)
    b = CausalLM.from_pretrained(sharded)
    # the two checkpoints were drawn from different seeds: compare each with its own file
    for model, path in ((a, single), (b, sharded)):
        where = checkpoint_files(path)
        for name, p in model.named_parameters():
            with safe_open(str(where[name]), framework="pt") as f:
                assert torch.equal(p, f.get_tensor(name).to(p.dtype)), name


def test_tied_embeddings_share_storage(tmp_path_factory):
    path = tiny_model(tmp_path_factory, "qwen2")
    assert "lm_head.weight" not in checkpoint_files(path)   # HF drops the tied copy
    m = CausalLM.from_pretrained(path)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(m.lm_head.weight, load_file(path / "model.safetensors")[
        "model.embed_tokens.weight"])


def test_bf16_file_loads_as_fp32_on_cpu(tmp_path_factory, tmp_path):
    src = tiny_model(tmp_path_factory, "mistral")
    dst = _copy(tmp_path, src)
    tensors = load_file(dst / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, dst / "model.safetensors")
    m = CausalLM.from_pretrained(dst)   # dtype=None on CPU -> float32
    assert m.dtype == torch.float32
    w = m.model.layers[1].mlp.down_proj.weight
    assert torch.equal(w, tensors["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16).float())
    m16 = CausalLM.from_pretrained(dst, dtype=torch.float16)
    assert m16.model.layers[0].self_attn.q_proj.weight.dtype == torch.float16


def test_missing_tensor_is_named(tmp_path_factory, tmp_path):
    dst = _copy(tmp_path, tiny_model(tmp_path_factory, "llama"))
    tensors = load_file(dst / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, dst / "model.safetensors")
    with pytest.raises(KeyError, match=r"lacks tensor\(s\) model\.layers\.1\.self_attn\.k_proj"):
        CausalLM.from_pretrained(dst)


def test_unexpected_and_misshapen_tensors(tmp_path_factory, tmp_path):
    src = tiny_model(tmp_path_factory, "llama")
    dst = _copy(tmp_path, src, "extra")
    tensors = load_file(dst / "model.safetensors")
    extra = dict(tensors)
    extra["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)   # Qwen3's, not Llama's
    extra["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # tolerated
    save_file(extra, dst / "model.safetensors")
    with pytest.raises(KeyError, match=r"does not use: model\.layers\.0\.self_attn\.q_norm"):
        CausalLM.from_pretrained(dst)
    bad = dict(tensors)
    bad["model.norm.weight"] = torch.ones(65)
    save_file(bad, dst / "model.safetensors")
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' in model\.safetensors has shape "
                                         r"\(65,\), the model expects \(64,\)"):
        CausalLM.from_pretrained(dst)


def test_missing_files_are_named(tmp_path_factory, tmp_path):
    src = tiny_model(tmp_path_factory, "llama-sharded")
    dst = _copy(tmp_path, src)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (dst / victim).unlink()
    with pytest.raises(FileNotFoundError, match=f"to {victim}, which is missing"):
        CausalLM.from_pretrained(dst)
    for f in dst.glob("*.safetensors*"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors, model\.safetensors"
                                                r"\.index\.json or other \*\.safetensors"):
        CausalLM.from_pretrained(dst)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        CausalLM.from_pretrained(tmp_path / "nowhere")


def test_unsupported_architecture_lists_supported(tmp_path_factory, tmp_path):
    dst = _copy(tmp_path, tiny_model(tmp_path_factory, "llama"))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"] = ["GemmaForCausalLM"]
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unsupported architecture 'GemmaForCausalLM'; "
                                         r"supported: LlamaForCausalLM, MistralForCausalLM, "
                                         r"Qwen2ForCausalLM, Qwen3ForCausalLM, Phi3ForCausalLM, "
                                         r"MixtralForCausalLM, Qwen3MoeForCausalLM"):
        CausalLM.from_pretrained(dst)
