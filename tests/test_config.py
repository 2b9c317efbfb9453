"""ModelConfig parsing: both RoPE spellings, head_dim rules, windows, and clear errors."""
from __future__ import annotations

import json

import pytest

from ringserve.config import ModelConfig, RopeConfig
from tinymodels import TINY_MODELS, hf_config

BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1000,
        "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 8, "num_key_value_heads": 2, "rms_norm_eps": 1e-5}


def _cfg(**over):
    d = dict(BASE)
    d.update(over)
    return ModelConfig.from_hf_dict({k: v for k, v in d.items() if v is not None})


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_reads_what_transformers_writes(tmp_path, name):
    """Configs saved by the installed transformers (5.x writes rope_parameters) parse fully."""
    hf = hf_config(name, vocab_size=320)
    hf.save_pretrained(str(tmp_path))
    raw = json.loads((tmp_path / "config.json").read_text())
    cfg = ModelConfig.from_dir(tmp_path)
    spec = TINY_MODELS[name]
    assert cfg.model_type == spec["arch"]
    gemma = spec["arch"].startswith("gemma")
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (
        320, 64, spec.get("num_hidden_layers", 2))
    if spec["arch"] == "deepseek_v2":   # MLA: the kernels see one KV head of the latent
        assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (
            4, 1, spec["kv_lora_rank"] + spec["qk_rope_head_dim"])
        assert cfg.mla.q_lora_rank == spec["q_lora_rank"] and cfg.values_are_keys
    else:
        assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (
            4, spec["num_key_value_heads"], spec.get("head_dim", 16))
    if "rope_parameters" in spec and spec["arch"] == "deepseek_v2":
        rp = spec["rope_parameters"]
        assert (cfg.rope.rope_type, cfg.rope.factor, cfg.rope.mscale, cfg.rope.mscale_all_dim) == (
            "yarn", rp["factor"], rp["mscale"], rp["mscale_all_dim"])
    elif "rope_parameters" in spec:   # Gemma 3: one RoPE per layer type
        glob, loc = spec["rope_parameters"]["full_attention"], spec["rope_parameters"][
            "sliding_attention"]
        assert (cfg.rope.theta, cfg.rope.rope_type, cfg.rope.factor) == (
            glob["rope_theta"], glob["rope_type"], glob["factor"])
        assert (cfg.local_rope.theta, cfg.local_rope.rope_type) == (loc["rope_theta"], "default")
        assert cfg.layer_types == tuple(spec["layer_types"])
    else:
        assert cfg.rope.theta == spec.get("rope_theta", 10000.0)
    scaling = spec.get("rope_scaling")
    if "rope_parameters" not in spec:
        assert cfg.rope.rope_type == (scaling["rope_type"] if scaling else "default")
    if scaling and "factor" in scaling:
        assert cfg.rope.factor == scaling["factor"]
    if cfg.rope.rope_type == "longrope":   # no factor: max / original positions, as HF does
        assert cfg.rope.factor == 4096 / 64 and cfg.rope.long_factor == tuple(
            scaling["long_factor"])
    assert (cfg.moe is not None) == (spec["arch"] in ("mixtral", "qwen3_moe", "deepseek_v2"))
    assert cfg.qk_norm == (spec["arch"] in ("qwen3", "qwen3_moe", "gemma3_text"))
    assert cfg.sliding_window == spec.get("sliding_window")
    assert cfg.tie_word_embeddings == bool(spec.get("tie_word_embeddings", gemma))
    assert cfg.qkv_bias == (spec["arch"] == "qwen2" or bool(spec.get("attention_bias")))
    assert cfg.o_bias == bool(spec.get("attention_bias"))
    assert cfg.rms_norm_eps == raw["rms_norm_eps"]


def test_old_rope_spelling_and_llama3_values():
    cfg = _cfg(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}, max_position_embeddings=131072)
    assert cfg.rope == RopeConfig(theta=500000.0, rope_type="llama3", factor=32.0,
                                  low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192)
    # Llama 2 era: "type" instead of "rope_type"
    cfg = _cfg(rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 4.0})
    assert (cfg.rope.rope_type, cfg.rope.factor) == ("linear", 4.0)
    # new spelling wins over nothing; defaults when absent
    cfg = _cfg(rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    assert (cfg.rope.rope_type, cfg.rope.theta) == ("default", 1e6)
    assert _cfg().rope == RopeConfig()


def test_head_dim_kv_heads_and_window():
    cfg = _cfg()
    assert cfg.head_dim == 256 // 8 and cfg.num_queries_per_kv == 4
    assert _cfg(head_dim=64).head_dim == 64          # explicit head_dim (e.g. Mistral Nemo)
    assert _cfg(num_key_value_heads=None).num_key_value_heads == 8   # absent -> MHA
    assert _cfg(num_key_value_heads=1).num_queries_per_kv == 8       # MQA
    m = _cfg(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=4096)
    assert (m.sliding_window, m.window_size) == (4096, 4095)
    assert _cfg(architectures=["MistralForCausalLM"], sliding_window=None).window_size is None
    # Llama ignores a stray sliding_window; Qwen2 uses one only with use_sliding_window
    assert _cfg(sliding_window=128).window_size is None
    q = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", sliding_window=4096)
    assert _cfg(**q, use_sliding_window=False).window_size is None
    assert _cfg(**q, use_sliding_window=True, max_window_layers=0).window_size == 4095
    assert _cfg(**q, use_sliding_window=True, max_window_layers=2).window_size is None
    with pytest.raises(ValueError, match=r"max_window_layers \(1\) < num_hidden_layers \(2\)"):
        _cfg(**q, use_sliding_window=True, max_window_layers=1)


def test_model_type_fallback_without_architectures():
    cfg = _cfg(architectures=None, model_type="qwen2")
    assert cfg.architecture == "Qwen2ForCausalLM" and cfg.qkv_bias and not cfg.o_bias


def test_errors_show_the_numbers():
    with pytest.raises(ValueError, match=r"unsupported architecture 'GPT2LMHeadModel'; supported: "
                                         r"LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        _cfg(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'"):
        _cfg(architectures=None, model_type="gpt2")
    with pytest.raises(ValueError, match=r"num_attention_heads \(8\) must be a multiple of "
                                         r"num_key_value_heads \(3\)"):
        _cfg(num_key_value_heads=3)
    with pytest.raises(ValueError, match=r"head_dim \(15\) must be even"):
        _cfg(head_dim=15)
    with pytest.raises(ValueError, match=r"rope_type 'dynamic' is not supported"):
        _cfg(rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match=r"longrope needs short_factor and long_factor"):
        _cfg(rope_scaling={"type": "su", "factor": 2.0})   # Phi-3's early name for longrope
    with pytest.raises(ValueError, match=r"needs original_max_position_embeddings"):
        _cfg(rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match=r"hidden_act 'gelu' is not supported"):
        _cfg(hidden_act="gelu")
    with pytest.raises(ValueError, match=r"lacks required keys: intermediate_size"):
        _cfg(intermediate_size=None)
    with pytest.raises(ValueError, match=r"sliding_window \(0\) must be >= 1"):
        _cfg(architectures=["MistralForCausalLM"], sliding_window=0)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no config.json in model directory {tmp_path}"):
        ModelConfig.from_dir(tmp_path)
