"""Tokenizer against transformers' AutoTokenizer on the same files; streaming detokenizer."""
from __future__ import annotations

import random

import pytest

from ringserve.sample_document import sample_document
from ringserve.tokenizer import IncrementalDecoder, Tokenizer
from tinymodels import UNICODE_LINES, tiny_model

KINDS = ["llama", "mistral", "qwen2"]   # byte-level + BOS, Metaspace + byte fallback, ChatML


def _texts(seed: int):
    r = random.Random(seed)
    doc = sample_document(n_words=400, seed=seed)
    words = doc.split(" ")
    out = ["", " ", "Hello", "  two  spaces and\ttabs\n\nnewlines ", "<|eot_id|> in text </s>"]
    out += UNICODE_LINES
    for _ in range(6):
        i = r.randrange(len(words) - 30)
        out.append(" ".join(words[i:i + r.randint(1, 30)]))
    out.append("".join(r.choice("aé日🚢 .,\n") for _ in range(40)))
    return out


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    from transformers import AutoTokenizer

    path = tiny_model(tmp_path_factory, request.param)
    return request.param, Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(str(path))


def test_encode_decode_equal_transformers(pair):
    name, ours, hf = pair
    for i, text in enumerate(_texts(seed=len(name))):
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == hf.encode(text, add_special_tokens=special), (name, text, special)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip), (name, text, skip)
    if ours.bos_token is not None:
        assert ours.encode("hi")[0] == ours.bos_token_id == hf.bos_token_id
    else:
        assert ours.bos_token_id is None and hf.bos_token_id is None
    assert ours.eos_token_id == hf.eos_token_id
    assert ours.vocab_size == len(hf)


def test_chat_template_equals_transformers(pair):
    name, ours, hf = pair
    convs = [
        [{"role": "user", "content": "Who is the master of the ship?"}],
        [{"role": "user", "content": "Summarise clause 3."},
         {"role": "assistant", "content": "  Freight is paid per ton. "},
         {"role": "user", "content": "And in São Paulo? 🚢"}],
    ]
    if name != "mistral":
        convs.append([{"role": "system", "content": "Answer briefly."},
                      {"role": "user", "content": "Which port?"}])
    for msgs in convs:
        for gen in (True, False):
            got = ours.apply_chat_template(msgs, add_generation_prompt=gen)
            want = hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
            assert got == want, (name, msgs, gen)
            assert ours.encode(got, add_special_tokens=False) == hf.encode(
                want, add_special_tokens=False)
    if name == "mistral":  # the template's raise_exception surfaces as an error
        bad = [{"role": "assistant", "content": "I speak first"}]
        with pytest.raises(Exception, match="Conversation roles must alternate"):
            ours.apply_chat_template(bad)
        with pytest.raises(Exception, match="Conversation roles must alternate"):
            hf.apply_chat_template(bad, tokenize=False)


def test_eos_ids_include_generation_config(tmp_path_factory):
    llama = Tokenizer.from_dir(tiny_model(tmp_path_factory, "llama"))
    assert llama.eos_token_ids == [llama.token_to_id("<|eot_id|>"),
                                   llama.token_to_id("<|end_of_text|>")]
    qwen = Tokenizer.from_dir(tiny_model(tmp_path_factory, "qwen2"))
    assert qwen.eos_token_ids == [qwen.token_to_id("<|im_end|>"),
                                  qwen.token_to_id("<|endoftext|>")]
    assert all(qwen.is_special(i) for i in qwen.eos_token_ids)


def _stream(tok: Tokenizer, ids, skip=True):
    dec = IncrementalDecoder(tok, skip_special_tokens=skip)
    deltas = [dec.push(i) for i in ids]
    return deltas, dec.flush()


def test_incremental_decoder_reproduces_decode(pair):
    name, ours, _ = pair
    r = random.Random(3)
    for text in _texts(seed=7) + [sample_document(n_words=300, seed=2)]:
        ids = ours.encode(text)
        for skip in (True, False):
            deltas, rest = _stream(ours, ids, skip)
            assert "".join(deltas) + rest == ours.decode(ids, skip_special_tokens=skip), text
            assert rest == ""   # valid text never leaves bytes pending at the end
            # never half a character: no delta shows a replacement character
            assert not any("\ufffd" in d for d in deltas), (name, text)
    # emoji and CJK are several byte tokens each in these small vocabularies: text is held
    # back until the character completes, then released whole
    ids = ours.encode("🚢⚓", add_special_tokens=False)
    deltas, _ = _stream(ours, ids)
    assert len(ids) > 2 and [d for d in deltas if d] == ["🚢", "⚓"]
    # arbitrary id sequences (broken UTF-8 included) still concatenate to decode(). Not for
    # byte fallback: its decoder turns a whole run of byte tokens into U+FFFD per byte when the
    # run is invalid, so valid bytes next to garbage print differently in a full decode
    if name == "mistral":
        return
    for _ in range(20):
        ids = [r.randrange(ours.vocab_size) for _ in range(r.randint(1, 40))]
        deltas, rest = _stream(ours, ids)
        assert "".join(deltas) + rest == ours.decode(ids), (name, ids)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no tokenizer.json in model directory {tmp_path}"):
        Tokenizer.from_dir(tmp_path)


def test_incremental_decoder_after_prompt(pair):
    """Streaming the continuation of a prompt prints what decoding the whole sequence adds."""
    name, ours, _ = pair
    r = random.Random(11)
    for seed in range(4):
        prompt = ours.encode(sample_document(n_words=40, seed=seed))
        gen = ours.encode(" " + sample_document(n_words=30, seed=seed + 10) + " 日本🚢",
                          add_special_tokens=False)
        dec = IncrementalDecoder(ours, prompt_ids=prompt[-r.randint(1, 8):])
        text = "".join(dec.push(t) for t in gen) + dec.flush()
        assert text == ours.decode(prompt + gen)[len(ours.decode(prompt)):], name


def test_template_file_list_form_and_cleanup(tmp_path_factory, tmp_path):
    """chat_template.jinja (where transformers >= 4.50 saves it), the list-of-named-templates
    form, and clean_up_tokenization_spaces, each checked against transformers."""
    import json
    import shutil

    from transformers import AutoTokenizer

    src = tiny_model(tmp_path_factory, "qwen2")
    msgs = [{"role": "user", "content": "Where is the ship ?"}]
    for form in ("jinja", "list"):
        d = tmp_path / form
        d.mkdir()
        for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            shutil.copy(src / f, d / f)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        template = cfg.pop("chat_template").replace("helpful", f"{form}-loaded")
        if form == "jinja":
            (d / "chat_template.jinja").write_text(template)
        else:
            cfg["chat_template"] = [{"name": "tool_use", "template": "{{ raise_exception('no') }}"},
                                    {"name": "default", "template": template}]
        cfg["clean_up_tokenization_spaces"] = form == "list"
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        ours, hf = Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(str(d))
        got = ours.apply_chat_template(msgs)
        assert f"{form}-loaded" in got
        assert got == hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        ids = ours.encode("Where is it ? He said : they 're here , I 'm sure .")
        assert ours.decode(ids) == hf.decode(ids)
        assert "it ?" in ours.decode(ids)   # transformers 5 never cleans up BPE output
    nothing = Tokenizer.from_dir(src)
    nothing.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        nothing.apply_chat_template(msgs)
