"""Document prompts (ringserve.serve.doc_prompts): the document's tokens plus the question's must
be the tokens of the whole prompt, or the cached document KV would not be what the model would
have computed; across tokenizer styles (byte-level BPE, SentencePiece-like Metaspace, ChatML)."""
from __future__ import annotations

import random

import pytest

from tinymodels import tiny_model

SEED = random.SystemRandom().randrange(1 << 30)
QUESTIONS = ["Who was the master?", "What cargo, and where to? ", "quelle cargaison, et où ?",
             "日本語で答えて。", "Why 🚢?"]


@pytest.fixture(scope="module", params=["llama", "mistral", "llama-mha", "qwen2"])
def tok(request, tmp_path_factory):
    from ringserve.tokenizer import Tokenizer
    return Tokenizer.from_dir(tiny_model(tmp_path_factory, request.param))


def _docs(rng, k=12):
    from ringserve.sample_document import sample_document
    for _ in range(k):
        doc = sample_document(n_words=rng.randint(10, 60), seed=rng.randrange(10_000))
        yield doc[:rng.randint(5, len(doc))]  # cut anywhere, mid-word included


def test_plain_question_continues_the_document(tok):
    from ringserve.serve.doc_prompts import PLAIN_QUESTION, encode_continuation, question_text

    rng = random.Random(SEED)
    for doc in _docs(rng):
        part = question_text(PLAIN_QUESTION, rng.choice(QUESTIONS))
        assert tok.encode(doc) + encode_continuation(tok, part) == tok.encode(doc + part), (
            SEED, doc[-40:], part)


def test_chat_question_continues_the_document(tok):
    from ringserve.serve.doc_prompts import chat_document, encode_continuation, question_text

    rng = random.Random(SEED + 1)
    for doc in _docs(rng, 6):
        q = rng.choice(QUESTIONS).strip()
        head, template = chat_document(tok, doc)
        assert "{question}" in template and doc.strip() in head
        whole = tok.apply_chat_template([{"role": "user", "content": doc + "\n\nQuestion: " + q}])
        got = (tok.encode(head, add_special_tokens=False)
               + encode_continuation(tok, question_text(template, q)))
        assert got == tok.encode(whole, add_special_tokens=False), (SEED, doc[-40:], q)


def test_question_text_leaves_braces_alone():
    from ringserve.serve.doc_prompts import question_text

    assert question_text("Q: {question} {json: 1}", "a {b}") == "Q: a {b} {json: 1}"
