"""The tokenizer and chat template stored in a GGUF file's metadata, as a `tokenizers` tokenizer.

A GGUF has no tokenizer.json; llama.cpp keeps `tokenizer.ggml.*` keys instead:
- `model`: "gpt2" (byte-level BPE: GPT-2, Llama 3, Qwen2, SmolLM) or "llama" (SentencePiece-style
  BPE with byte fallback: Llama 1/2, Mistral).
- `tokens`, `token_type` (1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte), `merges`
  (gpt2) or `scores` (llama: merges are rebuilt from them, higher score merges first).
- `pre`: the name of the pre-tokenizer (how text is split before BPE). The split regexes below are
  the ones of the models' own tokenizer.json files (llama.cpp hard-codes the same per name).
- bos/eos/unk/pad ids, `add_bos_token`, `add_space_prefix`, and `tokenizer.chat_template`.
Control tokens become special added tokens (matched whole, skipped by decode), user-defined ones
plain added tokens.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Tuple

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# pre-tokenizer name -> split regex used before byte-level BPE (None: GPT-2's own regex)
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
           "dbrx": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
           "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
           "gpt-2": None, "gpt2": None, "default": None}
# GPT-2's regex after splitting every digit on its own (SmolLM's and StarCoder's tokenizer.json)
_DIGIT_SPLITS = ("smollm", "starcoder", "refact")
TOKENIZER_MODELS = ("gpt2", "llama")
CONTROL, USER_DEFINED = 3, 4


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet byte-level vocabularies use)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def check_tokenizer_metadata(ckpt) -> None:
    model = ckpt.field("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in ckpt.reader.fields:
        raise _error(ckpt, "has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens)")
    if model not in TOKENIZER_MODELS:
        raise _error(ckpt, f"tokenizer model {model!r} is not supported; supported: "
                           f"{', '.join(TOKENIZER_MODELS)}")


def _error(ckpt, msg: str):
    from .gguf import GGUFError

    return GGUFError(f"{ckpt.path}: {msg}")


def _merges_from_scores(tokens: List[str], scores: List[float]) -> List[Tuple[str, str]]:
    """SentencePiece BPE keeps no merge list: every split of a vocabulary piece into two pieces
    also in the vocabulary is a merge, ranked by the merged piece's score (higher first)."""
    ids = {}
    for i, t in enumerate(tokens):
        ids.setdefault(t, i)
    found = []
    for t, i in ids.items():
        pairs = [(t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in ids and t[k:] in ids]
        pairs.sort(key=lambda p: (ids[p[0]], ids[p[1]]))
        found.extend((-scores[i], -len(left), -len(right), left, right)
                     for left, right in pairs)
    found.sort(key=lambda m: m[:3])  # stable: ties keep vocabulary order
    return [(m[3], m[4]) for m in found]


def build_tokenizer(ckpt) -> Tuple[HFTokenizer, Dict[str, Any], Optional[str], Dict[str, Any]]:
    """(tokenizers.Tokenizer, tokenizer_config dict, chat template, generation_config dict)."""
    check_tokenizer_metadata(ckpt)
    kind = ckpt.field("tokenizer.ggml.model")
    tokens: List[str] = list(ckpt.field("tokenizer.ggml.tokens"))
    types: List[int] = list(ckpt.field("tokenizer.ggml.token_type") or [1] * len(tokens))

    def token(key: str) -> Optional[str]:
        i = ckpt.field(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    if kind == "gpt2":
        alphabet = _bytes_to_unicode()
        allowed = set(alphabet.values())
        # byte-level vocabularies spell every byte with GPT-2's printable alphabet; respell a
        # token that slipped through raw (llama.cpp writes some added tokens that way)
        tokens = [t if set(t) <= allowed else "".join(alphabet[b] for b in t.encode())
                  for t in tokens]
        merges = []
        for m in ckpt.field("tokenizer.ggml.merges") or []:
            parts = m.split(" ")
            if len(parts) != 2:
                raise _error(ckpt, f"malformed merge {m!r} in tokenizer.ggml.merges")
            merges.append((parts[0], parts[1]))
        vocab = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)
        pre = ckpt.field("tokenizer.ggml.pre", "default")
        split = _SPLITS.get(pre)
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                     ignore_merges=split is _LLAMA3_SPLIT))
        if pre in _DIGIT_SPLITS:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        elif split is not None:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            if pre not in _SPLITS:
                warnings.warn(f"{ckpt.path}: pre-tokenizer {pre!r} is not known to ringserve; "
                              "using GPT-2's split (text may tokenize differently than in "
                              "llama.cpp)", stacklevel=2)
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        add_bos_default = False
    else:  # "llama": SentencePiece BPE
        scores = list(ckpt.field("tokenizer.ggml.scores") or [0.0] * len(tokens))
        vocab = {}
        for i, t in enumerate(tokens):
            vocab.setdefault(t, i)
        merges = _merges_from_scores(tokens, scores)
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=token("unknown_token_id"),
                                     fuse_unk=True, byte_fallback=True))
        prefix = bool(ckpt.field("tokenizer.ggml.add_space_prefix", True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False)
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
        tok.decoder = decoders.Sequence(steps)
        add_bos_default = True  # llama.cpp adds BOS to SentencePiece vocabularies by default

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = bool(ckpt.field("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
    add_eos = bool(ckpt.field("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        pre_t = f"{bos}:0 " if add_bos else ""
        post_t = f" {eos}:0" if add_eos else ""
        specials = ([(bos, vocab[bos])] if add_bos else []) + \
                   ([(eos, vocab[eos])] if add_eos and eos != bos else [])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{pre_t}$A:0{post_t}", pair=f"{pre_t}$A:0{post_t} $B:1{post_t}",
            special_tokens=specials)
    config = {"bos_token": bos, "eos_token": eos, "unk_token": token("unknown_token_id"),
              "pad_token": token("padding_token_id"), "add_bos_token": add_bos,
              "add_eos_token": add_eos}
    template = ckpt.field("tokenizer.chat_template")
    eos_ids = [i for i in (ckpt.field("tokenizer.ggml.eos_token_id"),
                           ckpt.field("tokenizer.ggml.eot_token_id"),
                           ckpt.field("tokenizer.ggml.eom_token_id")) if isinstance(i, int)]
    gen = {"bos_token_id": ckpt.field("tokenizer.ggml.bos_token_id"),
           "eos_token_id": list(dict.fromkeys(eos_ids)) or None}
    return tok, config, template, gen


def gguf_tokenizer(path):
    """ringserve's Tokenizer for the GGUF file at `path`."""
    from .gguf import open_gguf
    from .tokenizer import Tokenizer

    tok, config, template, gen = build_tokenizer(open_gguf(path))
    return Tokenizer(tok, config, template, gen)
