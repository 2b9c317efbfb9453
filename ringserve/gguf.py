"""GGUF checkpoints (llama.cpp's one-file format): config, weights and tokenizer from the file.

A `.gguf` path works wherever a HuggingFace checkpoint directory does (`LLM("m.gguf")`,
`ringserve serve --model m.gguf`); `ringserve convert m.gguf OUT_DIR` writes the equivalent HF
directory. The file is read with the `gguf` package (llama.cpp's own reader, memory-mapped), and
turned into what the rest of ringserve already understands:

- metadata (`llama.block_count`, `llama.attention.head_count`, ...) -> a HF `config.json` dict
  -> `ModelConfig`. Architectures: `llama` (Llama 1-3, and Mistral, which llama.cpp stores as
  llama) and `qwen2`.
- tensors (`blk.0.attn_q.weight`, ...) -> HF parameter names, dequantized to float32 by
  `gguf_quants` (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) on the target
  device, then cast to the serving dtype as they are copied into the model.
- llama.cpp's converter reorders the rows of Llama's q/k projections (per head, it interleaves
  the two rotary halves, for its GPT-J-style RoPE); `_unpermute` puts them back in HF's order.
  Qwen2 files use NeoX-style RoPE and are stored unpermuted.
- `tokenizer.ggml.*` -> a `tokenizers` tokenizer (see gguf_tokenizer.py).

Every failure is a `GGUFError` (a ValueError) naming the file and what is wrong: not GGUF,
truncated, an unsupported architecture or tensor type, a missing or unknown tensor.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch

from .gguf_quants import DEQUANTIZERS, dequantize

MAGIC = b"GGUF"
# general.architecture -> HF architecture (Mistral files say "llama": see _hf_architecture)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# tensors that differ per layer: GGUF short name -> HF name under model.layers.N.
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# GGUF file types that state a float checkpoint dtype (general.file_type)
_FILE_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}


class GGUFError(ValueError):
    """A GGUF file ringserve cannot load; the message names the file and the reason."""


def is_gguf(path: Union[str, Path]) -> bool:
    """True for an existing file named *.gguf or starting with the GGUF magic bytes."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() == ".gguf":
        return True
    with open(p, "rb") as f:
        return f.read(4) == MAGIC


def hf_name(gguf_name: str) -> Optional[str]:
    """The HF parameter name of a GGUF tensor name, None if it has none."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() \
            and parts[2] in _LAYER_TENSORS and parts[3] in ("weight", "bias"):
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
    return None


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: per head, rows (pair, half) -> HF's (half, pair)."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
            .transpose(1, 2).reshape(w.shape))


class GGUFCheckpoint:
    """One GGUF file: its metadata as a HF config, its tensors under HF names."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file {self.path} does not exist")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if len(magic) < len(MAGIC) and MAGIC.startswith(magic):
            raise GGUFError(f"{self.path} is truncated: {size} bytes, not even a GGUF header")
        if magic != MAGIC:
            raise GGUFError(f"{self.path} is not a GGUF file (it starts with {magic!r}, not "
                            f"{MAGIC!r})")
        try:
            import gguf
        except ImportError as exc:  # a declared dependency; say so rather than a bare trace
            raise ImportError("reading GGUF checkpoints needs the 'gguf' package "
                              "(pip install gguf)") from exc
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as exc:  # the reader's errors are numpy reshapes/views of short data
            raise GGUFError(f"cannot read GGUF file {self.path} ({size:,} bytes): truncated or "
                            f"corrupt ({type(exc).__name__}: {exc})") from exc
        self.arch = str(self.field("general.architecture", ""))
        if self.arch not in ARCHITECTURES:
            raise GGUFError(f"{self.path}: unsupported GGUF architecture {self.arch!r}; "
                            f"supported: {', '.join(ARCHITECTURES)} (Mistral files are 'llama')")
        self.tensors = {t.name: t for t in self.reader.tensors}
        self._check_tensors(size)

    # ---- metadata -------------------------------------------------------------------------
    def field(self, key: str, default: Any = None) -> Any:
        """A metadata value as Python (str, int, float, bool or list), or `default`."""
        f = self.reader.fields.get(key)
        if f is None or not f.types:
            return default
        return f.contents()

    def _arch_field(self, key: str, default: Any = None) -> Any:
        return self.field(f"{self.arch}.{key}", default)

    def _require(self, key: str) -> Any:
        v = self._arch_field(key)
        if v is None:
            raise GGUFError(f"{self.path}: metadata key {self.arch}.{key} is missing")
        return v

    def hf_config(self) -> Dict[str, Any]:
        """The HuggingFace config.json dict this file's metadata describes."""
        hidden = int(self._require("embedding_length"))
        heads = int(self._require("attention.head_count"))
        if isinstance(self._arch_field("attention.head_count_kv"), list) or \
                isinstance(self._arch_field("feed_forward_length"), list):
            raise GGUFError(f"{self.path}: per-layer head counts or FFN sizes are not supported")
        kv_heads = int(self._arch_field("attention.head_count_kv", heads))
        head_dim = int(self._arch_field("attention.key_length", hidden // heads))
        rot = self._arch_field("rope.dimension_count")
        if rot is not None and int(rot) != head_dim:
            raise GGUFError(f"{self.path}: partial rotary embeddings ({self.arch}.rope."
                            f"dimension_count {rot} < head dim {head_dim}) are not supported")
        vocab = self._arch_field("vocab_size")
        if vocab is None:
            tokens = self.reader.fields.get("tokenizer.ggml.tokens")
            vocab = len(tokens.data) if tokens is not None else \
                int(self.tensors["token_embd.weight"].shape[1])
        cfg: Dict[str, Any] = {
            "architectures": [self._hf_architecture()],
            "model_type": self._hf_architecture()[:-len("ForCausalLM")].lower(),
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(self._require("feed_forward_length")),
            "num_hidden_layers": int(self._require("block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "max_position_embeddings": int(self._arch_field("context_length", 4096)),
            "rms_norm_eps": float(self._arch_field("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(self._arch_field("rope.freq_base", 10000.0)),
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "hidden_act": "silu",
            "bos_token_id": self.field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.field("tokenizer.ggml.eos_token_id"),
        }
        scaling = self._rope_scaling(cfg["rope_theta"], head_dim)
        if scaling is not None:
            cfg["rope_scaling"] = scaling
        if self.arch == "llama":
            bias = "blk.0.attn_q.bias" in self.tensors
            cfg["attention_bias"] = bias
            cfg["mlp_bias"] = "blk.0.ffn_up.bias" in self.tensors
        if cfg["model_type"] in ("mistral", "qwen2"):
            window = self._arch_field("attention.sliding_window")
            # HF's MistralConfig defaults to a 4096 window: say "none" explicitly
            cfg["sliding_window"] = int(window) if window else None
            if cfg["model_type"] == "qwen2" and window:
                cfg["use_sliding_window"] = True
        dtype = _FILE_DTYPES.get(self.field("general.file_type"))
        if dtype is not None:
            cfg["torch_dtype"] = dtype
        return cfg

    def _hf_architecture(self) -> str:
        # llama.cpp stores Mistral 7B as "llama" (same layers, same permuted q/k); name it as
        # transformers does, from general.name
        if self.arch == "llama" and "mistral" in str(self.field("general.name", "")).lower():
            return "MistralForCausalLM"
        return ARCHITECTURES[self.arch]

    def _rope_scaling(self, theta: float, head_dim: int) -> Optional[Dict[str, Any]]:
        kind = self._arch_field("rope.scaling.type")
        factor = self._arch_field("rope.scaling.factor")
        orig = self._arch_field("rope.scaling.original_context_length")
        if "rope_freqs.weight" in self.tensors:  # Llama 3.1+: per-frequency factors as a tensor
            return self._llama3_scaling(theta, head_dim)
        if kind in (None, "none") or (factor in (None, 0.0, 1.0) and kind != "yarn"):
            return None
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(factor)}
        if kind == "yarn":
            out = {"rope_type": "yarn", "factor": float(factor)}
            if orig:
                out["original_max_position_embeddings"] = int(orig)
            return out
        raise GGUFError(f"{self.path}: rope scaling type {kind!r} is not supported (linear, "
                        "yarn and Llama 3's rope_freqs are)")

    def _llama3_scaling(self, theta: float, head_dim: int) -> Dict[str, Any]:
        """llama.cpp stores Llama 3.1's rope scaling as the factor each frequency is divided by,
        not as its parameters. Recover them: the largest factor is `factor`; the Llama 3.x
        release values of the others are tried and checked against every stored factor."""
        stored = self.tensor("rope_freqs.weight").double().flatten()
        if stored.numel() != head_dim // 2:
            raise GGUFError(f"{self.path}: rope_freqs.weight has {stored.numel()} values, "
                            f"expected {head_dim // 2}")
        factor = float(stored.max())
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        wavelen = 2 * math.pi / inv_freq
        for low, high, orig in ((1.0, 4.0, 8192), (1.0, 4.0, 4096)):
            smooth = (orig / wavelen - low) / (high - low)
            want = torch.where(wavelen < orig / high, torch.ones_like(wavelen),
                               torch.where(wavelen > orig / low, torch.full_like(wavelen, factor),
                                           1 / ((1 - smooth) / factor + smooth)))
            if torch.allclose(want, stored, rtol=1e-3, atol=1e-4):
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                        "high_freq_factor": high, "original_max_position_embeddings": orig}
        raise GGUFError(f"{self.path}: rope_freqs.weight does not match Llama 3's rope scaling "
                        "with its usual parameters; not supported")

    # ---- tensors ----------------------------------------------------------------------------
    def _check_tensors(self, size: int) -> None:
        unknown = [n for n in self.tensors if hf_name(n) is None and n != "rope_freqs.weight"]
        if unknown:
            more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
            raise GGUFError(f"{self.path}: tensor(s) a {self.arch} model does not have: "
                            f"{', '.join(unknown[:5])}{more}")
        for t in self.tensors.values():
            if t.tensor_type.name not in DEQUANTIZERS:
                raise GGUFError(f"{self.path}: tensor {t.name} has type {t.tensor_type.name}, "
                                f"which ringserve cannot dequantize; supported types: "
                                f"{', '.join(DEQUANTIZERS)}")
            if t.data_offset + t.n_bytes > size:
                raise GGUFError(f"{self.path} is truncated: tensor {t.name} ends at byte "
                                f"{t.data_offset + t.n_bytes:,}, the file has {size:,}")

    def tensor(self, name: str, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
        """GGUF tensor `name` dequantized to float32 on `device`, in PyTorch's shape order,
        q/k rows unpermuted."""
        t = self.tensors[name]
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists dimensions fastest first
        # a copy of the (compact) stored bytes: the memory map is read-only
        raw = torch.from_numpy(t.data.reshape(-1).view("uint8").copy()).to(device)
        w = dequantize(raw, t.tensor_type.name, shape)
        if self.arch == "llama":  # qwen2 keeps HF's order (NeoX rope in llama.cpp too)
            kind = name.split(".")[2] if name.startswith("blk.") else ""
            if kind == "attn_q":
                w = _unpermute(w, int(self._require("attention.head_count")))
            elif kind == "attn_k":
                heads = int(self._require("attention.head_count"))
                w = _unpermute(w, int(self._arch_field("attention.head_count_kv", heads)))
        return w

    def hf_names(self) -> Dict[str, str]:
        """HF parameter name -> GGUF tensor name, for every weight the file holds."""
        return {hf_name(n): n for n in self.tensors if hf_name(n) is not None}

    def hf_tensors(self, device: Union[str, torch.device] = "cpu"
                   ) -> Iterator[Tuple[str, torch.Tensor]]:
        """(HF name, float32 tensor) for every weight, one at a time."""
        for hf, g in self.hf_names().items():
            yield hf, self.tensor(g, device)


_OPEN: Dict[tuple, GGUFCheckpoint] = {}


def open_gguf(path: Union[str, Path]) -> GGUFCheckpoint:
    """A GGUFCheckpoint for `path`, reused while the file is unchanged: parsing the header of a
    real file takes seconds (tens of thousands of vocabulary strings), and a load reads config,
    weights and tokenizer from it one after the other."""
    p = Path(path).resolve()
    st = p.stat() if p.is_file() else None
    key = (str(p), st.st_size, st.st_mtime_ns) if st else None
    if key is not None and key in _OPEN:
        return _OPEN[key]
    ckpt = GGUFCheckpoint(p)
    _OPEN.clear()  # one file at a time: a process serves one model
    _OPEN[key] = ckpt
    return ckpt


def load_gguf_config(path: Union[str, Path]):
    from .config import ModelConfig

    ckpt = open_gguf(path)
    try:
        return ModelConfig.from_hf_dict(ckpt.hf_config())
    except ValueError as exc:
        if isinstance(exc, GGUFError):
            raise
        raise GGUFError(f"{ckpt.path}: {exc}") from exc


def load_gguf_weights(model: torch.nn.Module, path: Union[str, Path]) -> None:
    """Fill every parameter of `model` from the GGUF file, dequantizing on the model's device
    and converting to its dtype; raises naming missing, unexpected or mis-shaped tensors."""
    ckpt = open_gguf(path)
    names = ckpt.hf_names()
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    wanted = {n for n in params if not (tied and n == "lm_head.weight")}
    missing = sorted(wanted - set(names))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise GGUFError(f"{ckpt.path} lacks tensor(s) for {', '.join(missing[:5])}{more}")
    unexpected = sorted(names[n] for n in names if n not in params)
    if unexpected:
        raise GGUFError(f"{ckpt.path} has tensor(s) the model does not use: "
                        f"{', '.join(unexpected[:5])}")
    device = next(iter(params.values())).device
    tp = getattr(model, "tp", None)    # tensor parallelism: keep this rank's slice
    with torch.no_grad():
        for n in sorted(wanted):
            t = ckpt.tensor(names[n], device)
            if tp is not None and tp.shard(n) is not None:
                t = tp.shard(n).take(t)
            p = params[n]
            if tuple(t.shape) != tuple(p.shape):
                raise GGUFError(f"{ckpt.path}: tensor {names[n]} has shape {tuple(t.shape)}, "
                                f"the model expects {tuple(p.shape)} for {n}")
            p.copy_(t)
            del t


def check_gguf(path: Union[str, Path]) -> List[str]:
    """Read the header, config and tokenizer metadata (no weights): raise on a bad file before a
    service starts. Returns the file's tensor types, for a message."""
    ckpt = open_gguf(path)
    from .config import ModelConfig

    try:
        ModelConfig.from_hf_dict(ckpt.hf_config())
    except ValueError as exc:
        raise GGUFError(f"{ckpt.path}: {exc}") from exc
    from .gguf_tokenizer import check_tokenizer_metadata

    check_tokenizer_metadata(ckpt)
    return sorted({t.tensor_type.name for t in ckpt.tensors.values()})


def convert_gguf(path: Union[str, Path], out_dir: Union[str, Path], dtype: str = "bfloat16",
                 shard_bytes: int = 5 << 30) -> Path:
    """Write the GGUF file as a HF checkpoint directory: config.json, safetensors (sharded with
    an index past `shard_bytes`), tokenizer.json, tokenizer_config.json (with the chat template)
    and generation_config.json. Weights are dequantized and stored as `dtype`."""
    import json

    from safetensors.torch import save_file

    from .config import ModelConfig
    from .gguf_tokenizer import build_tokenizer

    dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {', '.join(dtypes)}, got {dtype!r}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory")
    ckpt = open_gguf(path)
    cfg = dict(ckpt.hf_config(), torch_dtype=dtype)
    try:
        ModelConfig.from_hf_dict(cfg)
    except ValueError as exc:
        raise GGUFError(f"{ckpt.path}: {exc}") from exc
    tok, tok_cfg, template, gen = build_tokenizer(ckpt)
    out.mkdir(parents=True, exist_ok=True)

    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in ckpt.hf_tensors():
        t = t.to(dtypes[dtype]).contiguous()
        if size and size + t.numel() * t.element_size() > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.numel() * t.element_size()
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in shard})
        total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))

    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = dict(tok_cfg, tokenizer_class="PreTrainedTokenizerFast",
                   model_max_length=cfg["max_position_embeddings"],
                   clean_up_tokenization_spaces=False)
    if template:
        tok_cfg["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=1, ensure_ascii=False))
    (out / "generation_config.json").write_text(json.dumps(
        {k: v for k, v in gen.items() if v is not None}, indent=1))
    return out
