"""How a document and a question become one prompt whose first part (the document) stays the same,
so the engine can serve it from the KV it cached at upload.

plain  document tokens (with the tokenizer's BOS) + "\\n\\nQuestion: {question}\\nAnswer:";
       works for base and chat models alike
chat   the checkpoint's chat template around one user turn "<document>\\n\\nQuestion: <question>"
       (and an optional system turn): the template is rendered once with a marker where the
       question goes; the text before the marker is the cached document, the text after it
       (the end of the turn and the assistant header) follows every question

The cut sits after the document's text, where pre-tokenizers split anyway, and the question part
is encoded as a continuation (no SentencePiece dummy prefix), so the document's tokens plus the
question's tokens equal the tokens of the whole prompt (checked on Llama-3, Llama-2/Mistral and
Qwen2 style tokenizers).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

PLAIN_QUESTION = "\n\nQuestion: {question}\nAnswer:"
# invisible separators around a name: never in real text, untouched by templates' trim filters
_MARKER = "\u2063RINGSERVE_QUESTION\u2063"
FORMATS = ("plain", "chat")


def chat_document(tokenizer, text: str, system: Optional[str] = None) -> Tuple[str, str]:
    """(document prefix text, question template with "{question}") for the chat format."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": text + "\n\n" + _MARKER})
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if rendered.count(_MARKER) != 1:
        raise ValueError("the chat template does not keep the user's text as it is; use "
                         "prompt_format 'plain'")
    head, tail = rendered.split(_MARKER)
    return head, "Question: {question}" + tail


def encode_continuation(tokenizer, text: str) -> List[int]:
    """The tokens `text` gets when it follows other text, not when it starts one.

    SentencePiece-style tokenizers (Metaspace) put a dummy "▁" before the first word of every
    encode() call; the question part follows the document, so it must not get one. Encode it
    behind an anchor ("." ends most documents) and drop the anchor's tokens, if they are a
    clean prefix; byte-level BPE gives the same as a plain encode either way.
    """
    for anchor in (".", "\n"):
        head = tokenizer.encode(anchor, add_special_tokens=False)
        both = tokenizer.encode(anchor + text, add_special_tokens=False)
        if head and both[:len(head)] == head:
            return both[len(head):]
    return tokenizer.encode(text, add_special_tokens=False)


def question_text(template: str, question: str) -> str:
    # str.replace, not str.format: the template's tail may contain braces
    return template.replace("{question}", question, 1)


__all__ = ["PLAIN_QUESTION", "FORMATS", "chat_document", "question_text", "encode_continuation"]
