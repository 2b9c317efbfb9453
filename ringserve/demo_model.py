"""Write a small random-weight Llama-architecture checkpoint for demos (no transformers needed).

The directory is a normal HuggingFace-format checkpoint (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json with a chat template, generation_config.json), so the rest of
ringserve, and transformers, load it like any downloaded model. The tokenizer is a byte-level BPE
trained on `sample_document` text. Random weights make the generated text meaningless; the demo
is about the machinery (long prompts sharded over actors, streaming, caching), not the prose.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Union

import torch

from .sample_document import sample_document

MARKER = "ringserve-demo.json"   # written last: its presence means the directory is complete
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "generation_config.json")
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{% endif %}")


@dataclass
class DemoSpec:
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 32
    vocab_size: int = 4096         # the most; the model gets the trained tokenizer's size
    max_position_embeddings: int = 1 << 20
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    tokenizer_words: int = 40000   # training text for the BPE

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a "
                             f"multiple of num_key_value_heads ({self.num_key_value_heads})")
        if self.vocab_size < 256 + len(SPECIALS):
            raise ValueError(f"vocab_size ({self.vocab_size}) must be >= "
                             f"{256 + len(SPECIALS)} (byte alphabet + special tokens)")
        if self.max_position_embeddings < 131072:
            raise ValueError(f"max_position_embeddings ({self.max_position_embeddings}) must be "
                             ">= 131072 for a long-context demo")


def _is_complete(path: Path, seed: int, spec: DemoSpec) -> bool:
    marker = path / MARKER
    if not marker.is_file() or not all((path / f).is_file() for f in FILES):
        return False
    try:
        info = json.loads(marker.read_text())
    except ValueError:
        return False
    return info.get("seed") == seed and info.get("spec") == asdict(spec)


def _train_tokenizer(path: Path, spec: DemoSpec, seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    text = sample_document(n_words=spec.tokenizer_words, seed=seed)
    tok.train_from_iterator(text.split("\n"), trainer)
    bos = tok.token_to_id(SPECIALS[0])
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{SPECIALS[0]} $A",
                                      pair=f"{SPECIALS[0]} $A {SPECIALS[0]} $B",
                                      special_tokens=[(SPECIALS[0], bos)])])
    tok.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIALS[0],
           "eos_token": "<|eot_id|>", "chat_template": CHAT_TEMPLATE,
           "clean_up_tokenization_spaces": False, "model_max_length": spec.max_position_embeddings}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return (bos, [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")],
            tok.get_vocab_size(with_added_tokens=True))


def _weights(spec: DemoSpec, vocab: int, seed: int):
    """name -> bf16 tensor, HF Llama names; scaled so activations stay of order one."""
    g = torch.Generator().manual_seed(seed)
    h, i, d = spec.hidden_size, spec.intermediate_size, spec.head_dim
    hq, hkv = spec.num_attention_heads, spec.num_key_value_heads

    def lin(out_f, in_f):
        return torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)

    def norm(n):
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    w = {"model.embed_tokens.weight": torch.randn(vocab, h, generator=g)}
    for li in range(spec.num_hidden_layers):
        p = f"model.layers.{li}."
        w[p + "input_layernorm.weight"] = norm(h)
        w[p + "self_attn.q_proj.weight"] = lin(hq * d, h)
        w[p + "self_attn.k_proj.weight"] = lin(hkv * d, h)
        w[p + "self_attn.v_proj.weight"] = lin(hkv * d, h)
        w[p + "self_attn.o_proj.weight"] = lin(h, hq * d) / math.sqrt(2 * spec.num_hidden_layers)
        w[p + "post_attention_layernorm.weight"] = norm(h)
        w[p + "mlp.gate_proj.weight"] = lin(i, h)
        w[p + "mlp.up_proj.weight"] = lin(i, h)
        w[p + "mlp.down_proj.weight"] = lin(h, i) / math.sqrt(2 * spec.num_hidden_layers)
    w["model.norm.weight"] = norm(h)
    w["lm_head.weight"] = lin(vocab, h)
    return {k: v.to(torch.bfloat16).contiguous() for k, v in w.items()}


def make_demo_model(path: Union[str, Path], seed: int = 0, spec: DemoSpec = None) -> Path:
    """Create the demo checkpoint in `path` (skipped if already complete); returns the path."""
    from safetensors.torch import save_file

    spec = spec or DemoSpec()
    path = Path(path)
    if _is_complete(path, seed, spec):
        return path
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).unlink(missing_ok=True)
    bos, eos, n_tok = _train_tokenizer(path, spec, seed)
    # the sample text's BPE runs out of merges below 4096; ids no token decodes to would only
    # make a random model print nothing, so the model's vocabulary follows the tokenizer's
    vocab = min(spec.vocab_size, n_tok)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads, "head_dim": spec.head_dim,
        "vocab_size": vocab, "max_position_embeddings": spec.max_position_embeddings,
        "rope_theta": spec.rope_theta, "rope_scaling": None, "rms_norm_eps": spec.rms_norm_eps,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": bos, "eos_token_id": eos,
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos, "eos_token_id": eos}, indent=1))
    tmp = path / "model.safetensors.partial"
    save_file(_weights(spec, vocab, seed), str(tmp), metadata={"format": "pt"})
    tmp.replace(path / "model.safetensors")  # never leave a half-written weights file in place
    (path / MARKER).write_text(json.dumps({"seed": seed, "spec": asdict(spec)}, indent=1))
    return path


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="write the ringserve demo model checkpoint")
    ap.add_argument("path")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(make_demo_model(args.path, seed=args.seed))


if __name__ == "__main__":
    main()
