"""Tokenizer for HF-format model directories: tokenizer.json + tokenizer_config.json.

Built on the `tokenizers` library (no transformers at run time). Chat templates are rendered with
jinja2's ImmutableSandboxedEnvironment (templates ship with checkpoints: untrusted code), using the
same environment options and helpers chat templates expect (trim_blocks, lstrip_blocks,
raise_exception, tojson, strftime_now).
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from tokenizers import Tokenizer as _HFTokenizer


def _token_str(v: Any) -> Optional[str]:
    """tokenizer_config writes special tokens as strings or as AddedToken dicts."""
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def _read_json(p: Path) -> Dict[str, Any]:
    if not p.is_file():
        return {}
    with open(p, encoding="utf-8") as f:
        return json.load(f)


class Tokenizer:
    """encode / decode / apply_chat_template over a tokenizer.json, HF-compatible."""

    def __init__(self, tok: _HFTokenizer, config: Optional[Dict[str, Any]] = None,
                 chat_template: Optional[str] = None, generation_config: Optional[dict] = None):
        config = config or {}
        self._tok = tok
        self.config = config
        self.bos_token = _token_str(config.get("bos_token"))
        self.eos_token = _token_str(config.get("eos_token"))
        self.unk_token = _token_str(config.get("unk_token"))
        self.pad_token = _token_str(config.get("pad_token"))
        self.bos_token_id = self._id(self.bos_token)
        self.eos_token_id = self._id(self.eos_token)
        self.chat_template = chat_template
        eos = [] if self.eos_token_id is None else [self.eos_token_id]
        gen_eos = (generation_config or {}).get("eos_token_id")
        for e in (gen_eos if isinstance(gen_eos, list) else [gen_eos]):
            if isinstance(e, int) and e not in eos:
                eos.append(e)
        self.eos_token_ids: List[int] = eos
        self._special_ids = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self._template = None

    @classmethod
    def from_dir(cls, path: Union[str, Path]) -> "Tokenizer":
        root = Path(path)
        from .gguf import is_gguf
        if is_gguf(root):  # vocabulary, merges and chat template from the file's metadata
            from .gguf_tokenizer import gguf_tokenizer
            return gguf_tokenizer(root)
        tj = root / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(f"no tokenizer.json in model directory {root}")
        tok = _HFTokenizer.from_file(str(tj))
        config = _read_json(root / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = root / "chat_template.jinja"  # where transformers >= 4.50 saves it
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        if template is None:
            template = _read_json(root / "chat_template.json").get("chat_template")
        gen = _read_json(root / "generation_config.json")
        return cls(tok, config, template, gen)

    def _id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (added tokens included)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        # BOS/EOS come from tokenizer.json's post-processor, as in transformers 5, which
        # ignores tokenizer_config's add_bos_token (real Llama/Mistral tokenizer.json files carry
        # a post-processor that adds BOS)
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        # no clean_up_tokenization_spaces: transformers 5 ignores it for BPE models (it
        # corrupts text such as " ." in code), and every supported family is BPE
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def _compiled_template(self):
        if self._template is None:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise TemplateError(message)

            def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
                return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                                  separators=separators, sort_keys=sort_keys)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        return self._template

    def apply_chat_template(self, messages: Sequence[Dict[str, Any]],
                            add_generation_prompt: bool = True, **kwargs) -> str:
        """Render the checkpoint's chat template; raises ValueError if it has none."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json, "
                             "chat_template.jinja or chat_template.json)")
        ctx = {"bos_token": self.bos_token, "eos_token": self.eos_token,
               "unk_token": self.unk_token, "pad_token": self.pad_token}
        ctx.update(kwargs)
        return self._compiled_template().render(messages=list(messages),
                                                add_generation_prompt=add_generation_prompt, **ctx)


class IncrementalDecoder:
    """Streams text as tokens arrive: `push(id)` returns the new text, never half a character.

    Decodes a short window of recent tokens twice (with and without the new ones) and emits the
    difference, the way a whole-sequence decode would print it; a window ending in U+FFFD (an
    incomplete UTF-8 sequence of byte tokens) is held back until the character completes.
    Concatenated pushes plus `flush()` equal `tokenizer.decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True,
                 prompt_ids: Sequence[int] = ()):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: List[int] = list(prompt_ids)
        # text of ids[prefix:read] has been emitted; ids[read:] are pending
        self.prefix = max(0, len(self.ids) - 5)
        self.read = len(self.ids)

    def _decode(self, ids: List[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if after.endswith("\ufffd") or len(after) < len(before):
            return ""  # an unfinished multi-byte character: wait for more bytes
        delta = after[len(before):]
        # keep a few tokens of left context so decoders that depend on it (Metaspace's leading
        # space, byte fallback) see the same neighbourhood as a full decode
        self.prefix, self.read = self.read, len(self.ids)
        return delta

    def flush(self) -> str:
        """Whatever is still held back (e.g. a truncated character at the end of a stream)."""
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]
