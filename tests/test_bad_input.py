"""Bad input against the running service (Serve, tiny Llama on a CPU shard actor), with hypothesis.

Bodies are drawn from strategies that mix valid values with arbitrary JSON (wrong types, nested
junk, huge and negative integers, NaN and infinities, empty strings, lone surrogates), unknown
fields, raw bytes (malformed JSON or msgpack, non-UTF-8), and oversize bodies (declared and
chunked). Every answer must be a 2xx or a 4xx carrying OpenAI's error shape with a message; never
a 5xx, never an in-band error from a stream that reports an internal failure, and never a shard
worker failure (bad input must be refused before it reaches the actors, not crash them). After
all of it the service still answers a known request with the same tokens as before.

Unknown fields are ignored by design (OpenAI-compatible clients send extras): the test asserts
they change nothing rather than expecting a 4xx.
"""
from __future__ import annotations

import json
import random
from types import SimpleNamespace

import httpx
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tinymodels import tiny_model
from servehelpers import start_serve

pytestmark = pytest.mark.timeout(600)

MAX_BODY_MB = 0.0625          # 64 KiB: oversize bodies are cheap to make
MAX_BODY = int(MAX_BODY_MB * 1024 * 1024)
EXAMPLES = 30                 # per property; CI time is shared by everything
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
SEED = random.SystemRandom().randrange(1 << 30)



@pytest.fixture(scope="module")
def svc(ray_session, tmp_path_factory):
    from ray import serve

    from ringserve.serve import build_app, wait_ready

    model_dir = str(tiny_model(tmp_path_factory, "llama"))
    base = start_serve()
    serve.run(build_app({"model": model_dir, "world_size": 1, "max_kv_tokens": 2048,
                         "max_queue": 16, "request_timeout_s": 60, "max_body_mb": MAX_BODY_MB,
                         "model_name": "llama", "default_max_tokens": 4}),
              name="rs-bad", route_prefix="/")
    try:
        wait_ready(base, 300)
        http = httpx.Client(base_url=base, timeout=90)
        known = {"model": "llama", "prompt": "ship cargo master owner", "max_tokens": 6,
                 "temperature": 0, "return_token_ids": True}
        r = http.post("/v1/completions", json=known)
        assert r.status_code == 200, r.text
        doc = http.post("/v1/documents", json={"text": "the ship sailed with cargo " * 8})
        assert doc.status_code == 200, doc.text
        yield SimpleNamespace(base=base, http=http, known=known, doc=doc.json()["id"],
                              known_ids=r.json()["choices"][0]["token_ids"], seen=set())
    finally:
        serve.delete("rs-bad")
        serve.shutdown()


# ------------------------------------------------------------------------------- strategies

_ints = st.one_of(st.integers(-3, 8), st.integers(-(2 ** 80), 2 ** 80))
_floats = st.floats(allow_nan=True, allow_infinity=True)
_text = st.text(max_size=24)   # includes lone surrogates, NUL, controls
_scalars = st.one_of(st.none(), st.booleans(), _ints, _floats, _text)
junk = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8)

_SAMPLING = {
    "max_tokens": st.one_of(st.integers(1, 4), _ints, junk),
    "temperature": st.one_of(st.floats(-1, 3), junk),
    "top_p": st.one_of(st.floats(-0.5, 1.5), junk),
    "top_k": st.one_of(_ints, junk),
    "seed": st.one_of(_ints, junk),
    "stop": st.one_of(_text, st.lists(_text, max_size=20), junk),
    "stop_token_ids": st.one_of(st.lists(_ints, max_size=4), junk),
    "n": st.one_of(_ints, junk),
    "stream": st.one_of(st.booleans(), junk),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), junk),
    "ignore_eos": st.one_of(st.booleans(), junk),
    "presence_penalty": st.one_of(_floats, junk),
    "logit_bias": junk,
}
KNOWN = set(_SAMPLING) | {"model", "prompt", "messages", "logprobs", "echo", "best_of",
                          "suffix", "question", "text", "token_ids", "name", "user",
                          "return_token_ids", "max_completion_tokens", "top_logprobs", "tools",
                          "response_format"}
unknown_fields = st.dictionaries(st.text(min_size=1, max_size=12).filter(lambda k: k not in KNOWN),
                                 junk, max_size=2)
_model = st.one_of(st.just("llama"), junk)
_prompt = st.one_of(_text, st.lists(st.integers(-(2 ** 70), 2 ** 70), max_size=5),
                    st.lists(st.integers(0, 600), min_size=1, max_size=5),
                    st.lists(_text, max_size=3), st.lists(st.lists(_ints, max_size=3), max_size=2),
                    junk)


def _body(required, optional):
    return st.tuples(st.fixed_dictionaries(required, optional=optional), unknown_fields).map(
        lambda t: {**t[1], **t[0]})


completion_bodies = _body({"model": _model}, {"prompt": _prompt, "logprobs": st.one_of(_ints, junk),
                                              "echo": junk, **_SAMPLING})
_content = st.one_of(_text, st.lists(st.fixed_dictionaries(
    {"type": st.one_of(st.just("text"), _text)}, optional={"text": st.one_of(_text, junk)}),
    max_size=2), junk)
_message = st.one_of(st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["system", "user", "assistant", "developer", "robot"]),
                       junk)}, optional={"content": _content}), junk)
chat_bodies = _body({"model": _model}, {"messages": st.one_of(st.lists(_message, max_size=3), junk),
                                        "logprobs": junk, "top_logprobs": junk, "tools": junk,
                                        "response_format": junk, **_SAMPLING})
document_bodies = _body({}, {"text": st.one_of(_text, junk),
                             "token_ids": st.one_of(st.lists(st.integers(-(2 ** 70), 2 ** 70),
                                                             max_size=5), junk),
                             "name": st.one_of(_text, junk), "model": _model})
ask_bodies = _body({}, {"question": st.one_of(_text, junk), "logprobs": junk, **_SAMPLING})
raw_bytes = st.one_of(st.binary(max_size=64), st.sampled_from([
    b"", b"{", b'{"model": "llama", "prompt": "\xff\xfe"}', b"[1, 2]", b"null", b'"text"',
    b'{"model": "llama", "prompt": "\\ud800"}', b"\x00" * 16, b"NaN", b'{"a": 1e999999}',
    b"{" * 5000 + b"}" * 5000]))
CONTENT_TYPES = ["application/json", "application/msgpack", "", "text/plain",
                 "multipart/form-data; boundary=x", "application/json; charset=latin-1"]


# ------------------------------------------------------------------------------- checks

def check(svc, r: httpx.Response, where: str) -> None:
    """A 2xx, or a 4xx in OpenAI's error shape; streams must not carry internal errors."""
    assert r.status_code < 500, f"{where}: {r.status_code} {r.text[:500]}"
    svc.seen.add(r.status_code)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"].strip(), err
        assert isinstance(err["type"], str) and err["type"], err
        assert "code" in err and "param" in err, err
        return
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        assert "internal_error" not in r.text and "worker_failed" not in r.text, r.text[-500:]


def post_json(svc, path: str, body) -> httpx.Response:
    # allow_nan: Python's json (the server's parser) accepts NaN/Infinity, so clients can send them
    data = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    return svc.http.post(path, content=data, headers={"content-type": "application/json"})


def _cleanup(svc, r: httpx.Response) -> None:
    if r.status_code == 200 and r.headers.get("content-type", "").startswith("application/json"):
        doc = r.json().get("id", "")
        if isinstance(doc, str) and doc.startswith("doc-") and doc != svc.doc:
            svc.http.delete(f"/v1/documents/{doc}")  # keep the KV cache free for the rest


# ------------------------------------------------------------------------------- properties

@FUZZ
@given(body=completion_bodies)
def test_completions_refuse_bad_bodies_cleanly(svc, body):
    check(svc, post_json(svc, "/v1/completions", body), f"completions {body!r}")


@FUZZ
@given(body=chat_bodies)
def test_chat_refuses_bad_bodies_cleanly(svc, body):
    check(svc, post_json(svc, "/v1/chat/completions", body), f"chat {body!r}")


@FUZZ
@given(body=document_bodies, as_msgpack=st.booleans())
def test_documents_refuse_bad_bodies_cleanly(svc, body, as_msgpack):
    if as_msgpack:
        try:
            data = msgpack.packb(body, use_bin_type=True)
        except (OverflowError, ValueError, TypeError):
            return  # msgpack can not carry it (ints beyond 64 bits): not a request
        r = svc.http.post("/v1/documents", content=data,
                          headers={"content-type": "application/msgpack"})
    else:
        r = post_json(svc, "/v1/documents", body)
    check(svc, r, f"documents {body!r}")
    _cleanup(svc, r)


@FUZZ
@given(body=ask_bodies, real_doc=st.booleans())
def test_ask_refuses_bad_bodies_cleanly(svc, body, real_doc):
    doc = svc.doc if real_doc else "doc-" + "0" * 24
    check(svc, post_json(svc, f"/v1/documents/{doc}/ask", body), f"ask {body!r}")


@FUZZ
@given(data=raw_bytes, ctype=st.sampled_from(CONTENT_TYPES),
       path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/documents",
                             "/v1/documents/DOC/ask"]))
def test_malformed_bytes_get_4xx(svc, data, ctype, path):
    path = path.replace("DOC", svc.doc)
    headers = {"content-type": ctype} if ctype else {}
    r = svc.http.post(path, content=data, headers=headers)
    check(svc, r, f"{path} {ctype} {data[:80]!r}")
    assert r.status_code >= 400 or path == "/v1/documents", r.text[:300]
    _cleanup(svc, r)


# ------------------------------------------------------------------------------- explicit cases

def test_specific_bad_values(svc):
    cases = [
        ({"model": "llama", "prompt": ""}, 400),                        # empty text
        ({"model": "llama", "prompt": []}, 400),
        ({"model": "llama", "prompt": "hi", "max_tokens": -1}, 400),    # negative
        ({"model": "llama", "prompt": "hi", "max_tokens": 10 ** 30}, 400),   # huge
        ({"model": "llama", "prompt": "hi", "max_tokens": 100000}, 400),     # over capacity
        ({"model": "llama", "prompt": "hi", "temperature": float("nan")}, 400),
        ({"model": "llama", "prompt": [10 ** 12]}, 400),                # id outside int32
        ({"model": "llama", "prompt": [2 ** 70]}, 400),                 # id outside int64
        ({"model": "llama", "prompt": [-1, 5]}, 400),                   # negative id
        ({"model": "llama", "prompt": [100000]}, 400),                  # id past the vocabulary
        ({"model": "llama", "prompt": "hi", "max_tokens": "4"}, None),  # lax, coerced or refused
        ({"model": "llama", "prompt": "hi", "max_tokens": 2, "seed": 2 ** 80}, None),
        ({"model": "llama", "prompt": "hi", "max_tokens": 2, "seed": -5}, None),
        ({"model": "llama", "prompt": "hi", "max_tokens": 2, "top_k": 10 ** 30}, None),
        ({"model": "llama", "prompt": "hi", "max_tokens": 2, "stop_token_ids": [2 ** 80]}, None),
        ({"model": "llama", "prompt": "hi", "max_tokens": 2, "stop": ["\ud800"]}, None),
        ({"model": "llama", "prompt": "\ud800 \x00"}, None),          # lone surrogate, NUL
        ({"model": 7, "prompt": "hi"}, 400),                            # wrong type
        ({"model": "nope", "prompt": "hi"}, 404),
    ]
    for body, status in cases:
        r = post_json(svc, "/v1/completions", body)
        check(svc, r, repr(body))
        if status is not None:
            assert r.status_code == status, (body, r.text)
    r = post_json(svc, "/v1/documents", {"token_ids": [2 ** 70]})
    check(svc, r, "document id beyond int64")
    assert r.status_code == 400
    r = svc.http.post("/v1/completions", content=b'{"model": "llama", "prompt": "\xff\xfe"}',
                      headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"], r.text


def test_oversize_bodies_get_413(svc):
    big = json.dumps({"model": "llama", "prompt": "x" * MAX_BODY}).encode()
    r = svc.http.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text

    def chunks():  # no Content-Length: the limit must hold on the bytes actually received
        yield b'{"model": "llama", "prompt": "'
        for _ in range(MAX_BODY // 4096 + 2):
            yield b"y" * 4096
        yield b'"}'
    r = svc.http.post("/v1/documents", content=chunks(),
                      headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text


def test_unknown_fields_change_nothing(svc):
    rng = random.Random(SEED)
    extra = {f"x_{rng.randrange(1 << 20)}": rng.choice([1, "a", None, [1, {"b": 2}]])
             for _ in range(3)}
    r = post_json(svc, "/v1/completions", {**svc.known, **extra})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == svc.known_ids


def test_service_still_answers_after_the_fuzzing(svc):
    """Runs last in this module: the same answer as before, and no worker was ever lost."""
    assert svc.http.get("/health").json() == {"status": "ok"}
    r = svc.http.post("/v1/completions", json=svc.known)
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == svc.known_ids
    stats = svc.http.get("/stats").json()
    assert stats["engine"]["worker_failures"] == 0, stats["engine"]
    assert not any(k.endswith("internal_error") for k in stats["requests"]), stats["requests"]
    print(f"statuses seen: {sorted(svc.seen)}; outcomes: {stats['requests']}")
