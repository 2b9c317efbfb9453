"""Tiny random-weight HF checkpoints for tests, built with `transformers` and `tokenizers`.

Usage from any test file:

    from tinymodels import tiny_model, TINY_MODELS
    def test_x(tmp_path_factory):
        path = tiny_model(tmp_path_factory, "llama")     # built once per pytest session

Each directory holds config.json, safetensors weights (sharded with an index for
"llama-sharded"), tokenizer.json (trained here on ringserve.sample_document text),
tokenizer_config.json with a chat template and generation_config.json. Names:

  llama          Llama 3 style: GQA 4/2, rope_type llama3, byte-level BPE, BOS by post-processor,
                 eos ids from generation_config ([<|end_of_text|>, <|eot_id|>])
  llama-mha      Llama 2 style: MHA 4/4, linear rope scaling, attention_bias (q/k/v/o biases),
                 SentencePiece-like (Metaspace + byte fallback) BPE, [INST] template
  mistral        MQA 4/1, sliding_window 16 (kernels' window_size 15), Metaspace tokenizer
  qwen2          GQA 4/2, QKV bias, tied embeddings, ChatML template, no BOS
  qwen2-yarn     qwen2 untied, with YaRN rope scaling (factor 4 over 64 original positions)
  llama-sharded  "llama" saved in several safetensors shards with model.safetensors.index.json
  qwen3          q/k RMSNorm, head_dim 32 != hidden / heads, GQA 4/2, tied embeddings
  phi3           fused qkv_proj / gate_up_proj, longrope (short/long factors, 64 original
                 positions: prompts below, continuations across), GQA 4/2
  phi3-window    phi3 with sliding_window 24
  mixtral        4 experts, top-2 (renormalised), GQA 4/2
  qwen3-moe      8 experts, top-2 with norm_topk_prob, q/k norm, layer 1 a dense MLP
  qwen3-moe-raw  qwen3-moe without norm_topk_prob, MoE every 2nd layer (decoder_sparse_step 2)
  gemma2         3 layers sliding (window 16) / global / sliding, attention soft-cap 2 and
                 final soft-cap 20 (small, so that they bite on random weights), query scalar 24,
                 GeGLU, GQA 4/2, tied embeddings
  gemma3         4 layers (global third), q/k norm, RoPE 10K on sliding layers and 1M with
                 linear factor 4 on the global one, final soft-cap 20, window 16
  deepseek-v2-lite  MLA (kv_lora_rank 32 + rope 8 = a 40-wide latent; q_proj direct), YaRN
                 factor 4 with mscale 1 / mscale_all_dim 0.8, 8 experts top-2 + 2 shared
                 experts, layer 0 dense
  deepseek-v2    MLA with q_lora_rank 24, group-limited routing (4 groups, the best 2 compete),
                 top-3 of 8 experts x routed_scaling_factor 2.5, 3 layers, layer 0 dense

Weights are re-drawn after HF's initialisation (seeded) with scales that make attention
non-uniform and norms/biases non-trivial, so the comparisons have something to catch.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List

import torch

from ringserve.sample_document import sample_document

# extra text so the tokenizers meet accents, CJK and emoji (multi-byte UTF-8 for the streaming
# decoder tests)
UNICODE_LINES = [
    "Café au lait, naïve façade, Zürich, São Paulo, Ærø, smörgåsbord.",
    "日本語のテキスト、中文文本，한국어 텍스트。",
    "Emoji: 🚢⚓🌊 and symbols: € £ ¥ © ° ± µ → ✓.",
]

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% endif %}")
INST_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
    "{% endif %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant."
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# the split pattern of Qwen2's tokenizer.json: contractions, letter runs, single digits,
# punctuation runs, newlines, spaces
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

COMMON = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
              head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=4096)

TINY_MODELS: Dict[str, dict] = {
    "llama": dict(arch="llama", tokenizer="bytelevel-llama3", num_key_value_heads=2,
                  rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "llama-mha": dict(arch="llama", tokenizer="metaspace-inst", num_key_value_heads=4,
                      rope_theta=10000.0, attention_bias=True,
                      rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral": dict(arch="mistral", tokenizer="metaspace-inst", num_key_value_heads=1,
                    rope_theta=10000.0, sliding_window=16),
    "qwen2": dict(arch="qwen2", tokenizer="bytelevel-chatml", num_key_value_heads=2,
                  rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen2-yarn": dict(arch="qwen2", tokenizer="bytelevel-chatml", num_key_value_heads=2,
                       rope_theta=1000000.0, tie_word_embeddings=False,
                       rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                     "original_max_position_embeddings": 64}),
    "llama-sharded": dict(arch="llama", tokenizer="bytelevel-llama3", num_key_value_heads=2,
                          rope_theta=500000.0, shard="64KB",
                          rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 64}),
    "qwen3": dict(arch="qwen3", tokenizer="bytelevel-chatml", num_key_value_heads=2,
                  head_dim=32, rope_theta=1000000.0, tie_word_embeddings=True),
    "phi3": dict(arch="phi3", tokenizer="metaspace-inst", num_key_value_heads=2, pad_token_id=None,
                 original_max_position_embeddings=64, sliding_window=None,
                 rope_scaling={"rope_type": "longrope",
                               "short_factor": [1.0 + 0.15 * i for i in range(8)],
                               "long_factor": [1.5 + 2.0 * i for i in range(8)]}),
    "phi3-window": dict(arch="phi3", tokenizer="metaspace-inst", num_key_value_heads=2,
                        pad_token_id=None,
                        original_max_position_embeddings=64, sliding_window=24,
                        rope_scaling={"rope_type": "longrope",
                                      "short_factor": [1.0 + 0.15 * i for i in range(8)],
                                      "long_factor": [1.5 + 2.0 * i for i in range(8)]}),
    "mixtral": dict(arch="mixtral", tokenizer="metaspace-inst", num_key_value_heads=2,
                    rope_theta=1000000.0, num_local_experts=4, num_experts_per_tok=2,
                    intermediate_size=96),
    "qwen3-moe": dict(arch="qwen3_moe", tokenizer="bytelevel-chatml", num_key_value_heads=2,
                      rope_theta=1000000.0, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=48, norm_topk_prob=True, mlp_only_layers=[1]),
    "qwen3-moe-raw": dict(arch="qwen3_moe", tokenizer="bytelevel-chatml", num_key_value_heads=2,
                          rope_theta=1000000.0, num_experts=8, num_experts_per_tok=3,
                          moe_intermediate_size=48, norm_topk_prob=False,
                          decoder_sparse_step=2),
    "deepseek-v2-lite": dict(
        arch="deepseek_v2", tokenizer="bytelevel-llama3", num_key_value_heads=4,
        max_position_embeddings=256,
        q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2,
        moe_intermediate_size=32, first_k_dense_replace=1, topk_method="greedy",
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                         "original_max_position_embeddings": 64, "mscale": 1.0,
                         "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}),
    "deepseek-v2": dict(
        arch="deepseek_v2", tokenizer="bytelevel-llama3", num_key_value_heads=4,
        max_position_embeddings=256,
        num_hidden_layers=3, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=3,
        n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=1,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=2.5,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                         "original_max_position_embeddings": 64, "mscale": 0.707,
                         "mscale_all_dim": 0.707}),
    "gemma2": dict(arch="gemma2", tokenizer="metaspace-inst", num_key_value_heads=2,
                   num_hidden_layers=3, sliding_window=16, attn_logit_softcapping=2.0,
                   final_logit_softcapping=20.0, query_pre_attn_scalar=24,
                   hidden_activation="gelu_pytorch_tanh", pad_token_id=0),
    "gemma3": dict(arch="gemma3_text", tokenizer="metaspace-inst", num_key_value_heads=2,
                   num_hidden_layers=4, sliding_window=16, final_logit_softcapping=20.0,
                   query_pre_attn_scalar=24, pad_token_id=0,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                "sliding_attention"],
                   rope_parameters={
                       "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                       "full_attention": {"rope_type": "linear", "factor": 4.0,
                                          "rope_theta": 1000000.0}}),
}


def _corpus(seed: int) -> List[str]:
    text = sample_document(n_words=12000, seed=seed)
    return text.split("\n") + UNICODE_LINES * 20


def build_tokenizer(path: Path, kind: str, seed: int = 0) -> int:
    """Train a small BPE tokenizer of `kind`, write tokenizer files; return its vocab size."""
    from tokenizers import (Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                            processors, trainers)

    path.mkdir(parents=True, exist_ok=True)
    corpus = _corpus(seed)
    if kind.startswith("bytelevel"):
        if kind == "bytelevel-llama3":
            specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                        "<|end_header_id|>", "<|eot_id|>"]
        else:
            specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tok = Tokenizer(models.BPE())
        if kind == "bytelevel-chatml":
            # as in Qwen2's tokenizer.json (transformers 5 rebuilds a Qwen2 tokenizer with these
            # whatever the file says): NFC, then a regex split (digits one by one), then bytes
            tok.normalizer = normalizers.NFC()
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(corpus, trainer)
        if kind == "bytelevel-llama3":
            bos = tok.token_to_id("<|begin_of_text|>")
            tok.post_processor = processors.Sequence([
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                              pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                              special_tokens=[("<|begin_of_text|>", bos)])])
            cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
                   "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE,
                   "clean_up_tokenization_spaces": False, "model_max_length": 4096}
            gen = {"bos_token_id": bos, "eos_token_id": [tok.token_to_id("<|end_of_text|>"),
                                                          tok.token_to_id("<|eot_id|>")]}
        else:
            tok.post_processor = processors.ByteLevel(trim_offsets=False)
            cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
                   "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "chat_template": CHATML_TEMPLATE, "clean_up_tokenization_spaces": False,
                   "model_max_length": 4096}
            gen = {"eos_token_id": [tok.token_to_id("<|im_end|>"),
                                    tok.token_to_id("<|endoftext|>")]}
    elif kind == "metaspace-inst":
        # SentencePiece-like: "▁" for spaces, unknown characters fall back to <0xNN> byte tokens
        specials = ["<unk>", "<s>", "</s>"]
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials,
                                      limit_alphabet=80, show_progress=False)
        tok.train_from_iterator(corpus, trainer)
        # byte tokens at ids 3..258 as in Llama 2's vocabulary; merges are by string, so the
        # renumbering keeps the trained merges valid
        spec = json.loads(tok.to_str())
        vocab = spec["model"]["vocab"]
        ordered = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        byte_toks = [f"<0x{i:02X}>" for i in range(256)]
        ordered = ordered[:3] + byte_toks + [t for t in ordered[3:] if t not in byte_toks]
        spec["model"]["vocab"] = {t: i for i, t in enumerate(ordered)}
        for at in spec["added_tokens"]:
            at["id"] = spec["model"]["vocab"][at["content"]]
        tok = Tokenizer.from_str(json.dumps(spec))
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Metaspace(replacement="▁",
                                                            prepend_scheme="first")])
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
               "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
               "add_eos_token": False, "chat_template": INST_TEMPLATE,
               "clean_up_tokenization_spaces": False, "model_max_length": 4096}
        gen = {"bos_token_id": 1, "eos_token_id": 2}
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    tok.save(str(path / "tokenizer.json"))
    with open(path / "tokenizer_config.json", "w") as f:
        json.dump(cfg, f, indent=1)
    with open(path / "generation_config.json", "w") as f:
        json.dump(gen, f, indent=1)
    return tok.get_vocab_size(with_added_tokens=True)


def hf_config(name: str, vocab_size: int, bos: int = None, eos=None):
    """The transformers config object for a TINY_MODELS entry."""
    import transformers

    spec = dict(TINY_MODELS[name])
    arch = spec.pop("arch")
    for k in ("tokenizer", "shard"):
        spec.pop(k, None)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
           "phi3": transformers.Phi3Config, "mixtral": transformers.MixtralConfig,
           "qwen3_moe": transformers.Qwen3MoeConfig, "gemma2": transformers.Gemma2Config,
           "gemma3_text": transformers.Gemma3TextConfig,
           "deepseek_v2": transformers.DeepseekV2Config}[arch]
    kw = dict(COMMON, **spec)
    if arch in ("qwen2", "phi3"):
        kw.pop("head_dim")  # derived: 64 / 4 = 16
    return cls(vocab_size=vocab_size, bos_token_id=bos, eos_token_id=eos, **kw)


def _redraw(model: torch.nn.Module, seed: int) -> None:
    """Seeded weights with O(1) activations: attention scores of order one, norms and biases
    visibly different from their HF defaults (ones / zeros)."""
    g = torch.Generator().manual_seed(seed)
    # Gemma's norms scale by (1 + w): w near 0 there
    one = 0.0 if model.config.model_type.startswith("gemma") else 1.0
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                p.copy_(one + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def build_tiny_model(path: Path, name: str, seed: int = 0) -> Path:
    """Write the checkpoint `name` (a TINY_MODELS key) into `path`; returns `path`."""
    import transformers

    path = Path(path)
    n_tok = build_tokenizer(path, TINY_MODELS[name]["tokenizer"], seed=seed)
    gen = json.loads((path / "generation_config.json").read_text())
    vocab = 64 * math.ceil((n_tok + 1) / 64)  # padded past the tokenizer, as real models are
    cfg = hf_config(name, vocab, gen.get("bos_token_id"), gen.get("eos_token_id"))
    torch.manual_seed(seed)
    model = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
             "qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM,
             "phi3": transformers.Phi3ForCausalLM, "mixtral": transformers.MixtralForCausalLM,
             "qwen3_moe": transformers.Qwen3MoeForCausalLM, "gemma2": transformers.Gemma2ForCausalLM,
             "gemma3_text": transformers.Gemma3ForCausalLM,
             "deepseek_v2": transformers.DeepseekV2ForCausalLM}[TINY_MODELS[name]["arch"]](cfg)
    _redraw(model, seed)
    model.eval()
    kw = {}
    if TINY_MODELS[name].get("shard"):
        kw["max_shard_size"] = TINY_MODELS[name]["shard"]
    model.save_pretrained(str(path), **kw)
    # save_pretrained may rewrite generation_config.json from the model config: restore ours
    with open(path / "generation_config.json", "w") as f:
        json.dump(gen, f, indent=1)
    return path


_CACHE: Dict[str, Path] = {}


def tiny_model(tmp_path_factory, name: str) -> Path:
    """The checkpoint directory for `name`, built on first use in this pytest session."""
    if name not in _CACHE:
        root = tmp_path_factory.mktemp(f"tiny-{name}")
        _CACHE[name] = build_tiny_model(root, name, seed=sum(map(ord, name)))
    return _CACHE[name]


def load_hf(path: Path, attn_implementation: str = "eager"):
    """The transformers model for a tiny checkpoint, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                attn_implementation=attn_implementation).eval()


def hf_greedy(hf, ids, n, full_forward=False):
    """HF greedy continuation of `ids`: `generate(do_sample=False)`, or greedy decoding by full
    forward passes for sliding-window models and wherever `full_forward` is asked: transformers
    5.24's cached generate drifts from its own full forward for Mistral once the sequence passes
    the window, and for the llama3-RoPE checkpoint past position ~500 (logit differences of 0.03
    flip a token); the full forward is the model's definition."""
    with torch.no_grad():
        if not full_forward and getattr(hf.config, "sliding_window", None) is None:
            return hf.generate(torch.tensor([ids]), max_new_tokens=n,
                               do_sample=False)[0, len(ids):].tolist()
        x = list(ids)
        for _ in range(n):
            x.append(int(hf(torch.tensor([x])).logits[0, -1].argmax()))
        return x[len(ids):]


def hf_reference(hf, seed: int, prompt_lens, new_tokens: int):
    """Random prompts of `prompt_lens` tokens (a generator seeded with `seed`) and, for each,
    transformers' float64 log-probs of its tokens and its `new_tokens` greedy continuation
    (no EOS: exactly that many): [(ids, logprobs (len - 1,), greedy ids)]."""
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, hf.config.vocab_size, (n,), generator=g).tolist()
               for n in prompt_lens]
    out = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            lp = torch.log_softmax(hf(x).logits[0].double(), -1)[:-1]
            out.append((ids, lp.gather(1, x[0, 1:, None])[:, 0], hf_greedy(hf, ids, new_tokens)))
    return out
