"""Security of the HTTP service, against real Serve apps (tiny Llama on CPU shard actors):

- the API key is off by default (loopback development): no header needed, any header ignored;
- with `api_key` set: 401 with OpenAI's error shape and `WWW-Authenticate: Bearer` for a missing
  key, a wrong key, a prefix of the key, another scheme; 200 with the key; probes stay open; the
  key never appears in /stats; refusal comes before the body is parsed;
- body size limit: 413 on a declared and on a chunked body;
- no pickle or eval of client data: msgpack ext types (a pickle payload that would create a file
  when unpickled) stay inert and are refused with 400; a pickle body is a 415; the marker file
  never appears; the service code has no pickle/eval/exec call and decodes msgpack without hooks;
- Ray's token authentication is left as Ray sets it: nothing in the code or manifests turns it off.
"""
from __future__ import annotations

import ast
import pickle
import random
from pathlib import Path
from types import SimpleNamespace

import httpx
import msgpack
import pytest

from tinymodels import tiny_model
from servehelpers import start_serve

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parent.parent
SEED = random.SystemRandom().randrange(1 << 30)
KEY = f"sk-rs-{SEED:08x}{random.SystemRandom().randrange(1 << 64):016x}"
MAX_BODY_MB = 0.0625
MAX_BODY = int(MAX_BODY_MB * 1024 * 1024)



@pytest.fixture(scope="module")
def apps(ray_session, tmp_path_factory):
    from ray import serve

    from ringserve.serve import build_app, wait_ready

    model_dir = str(tiny_model(tmp_path_factory, "llama"))
    base = start_serve()
    common = {"model": model_dir, "world_size": 1, "max_kv_tokens": 1024, "model_name": "llama",
              "request_timeout_s": 60, "max_body_mb": MAX_BODY_MB}
    serve.run(build_app(common), name="rs-open", route_prefix="/open")
    serve.run(build_app({**common, "api_key": KEY}), name="rs-locked", route_prefix="/locked")
    try:
        wait_ready(base + "/open", 300)
        wait_ready(base + "/locked", 300)
        yield SimpleNamespace(open=httpx.Client(base_url=base + "/open", timeout=60),
                              locked=httpx.Client(base_url=base + "/locked", timeout=60))
    finally:
        for name in ("rs-open", "rs-locked"):
            serve.delete(name)
        serve.shutdown()


BODY = {"model": "llama", "prompt": "ship cargo", "max_tokens": 2, "temperature": 0}


def _assert_401(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_api_key" and err["type"] == "authentication_error", err
    assert "Bearer" in err["message"]
    assert r.headers.get("www-authenticate") == "Bearer"
    assert KEY not in r.text


def test_api_key_off_by_default(apps):
    assert apps.open.post("/v1/completions", json=BODY).status_code == 200
    r = apps.open.post("/v1/completions", json=BODY, headers={"Authorization": "Bearer whatever"})
    assert r.status_code == 200, r.text
    assert apps.open.get("/stats").json()["args"]["api_key"] is None


def test_api_key_required_when_set(apps):
    rng = random.Random(SEED)
    wrong = KEY[:-1] + ("0" if KEY[-1] != "0" else "1")
    bad_headers = [{}, {"Authorization": ""}, {"Authorization": "Bearer"},
                   {"Authorization": f"Bearer {wrong}"}, {"Authorization": f"Bearer {KEY[:-4]}"},
                   {"Authorization": f"Bearer {KEY}x"}, {"Authorization": f"Basic {KEY}"},
                   {"Authorization": KEY}, {"X-API-Key": KEY},
                   {"Authorization": f"Bearer {rng.randbytes(8).hex()}"}]
    for h in bad_headers:
        _assert_401(apps.locked.post("/v1/completions", json=BODY, headers=h))
    for method, path in (("GET", "/v1/models"), ("GET", "/v1/documents"), ("GET", "/stats"),
                         ("POST", "/v1/chat/completions"), ("POST", "/v1/documents"),
                         ("DELETE", "/v1/documents/doc-x"), ("POST", "/v1/documents/doc-x/ask")):
        _assert_401(apps.locked.request(method, path, json={}))
    # refused before the body is read or parsed: junk and oversize bodies still get 401
    _assert_401(apps.locked.post("/v1/completions", content=b"{not json",
                                 headers={"content-type": "application/json"}))
    _assert_401(apps.locked.post("/v1/documents", content=b"x" * (MAX_BODY + 10),
                                 headers={"content-type": "application/json"}))
    ok = {"Authorization": f"Bearer {KEY}"}
    r = apps.locked.post("/v1/completions", json=BODY, headers=ok)
    assert r.status_code == 200, r.text
    assert apps.locked.post("/v1/completions", json=BODY,
                            headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    # probes stay open for Kubernetes and load balancers
    assert apps.locked.get("/health").status_code == 200
    assert apps.locked.get("/ready").status_code == 200
    stats = apps.locked.get("/stats", headers=ok)
    assert stats.status_code == 200 and KEY not in stats.text
    assert stats.json()["args"]["api_key"] == "***"
    assert stats.json()["requests"].get("completions:invalid_api_key", 0) >= len(bad_headers)


def test_body_size_limit(apps):
    big = b'{"model": "llama", "prompt": "' + b"a" * MAX_BODY + b'"}'
    for client, h in ((apps.open, {}), (apps.locked, {"Authorization": f"Bearer {KEY}"})):
        r = client.post("/v1/completions", content=big,
                        headers={"content-type": "application/json", **h})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text
        assert str(MAX_BODY) in r.json()["error"]["message"]

        def chunked():
            for _ in range(MAX_BODY // 8192 + 2):
                yield b"b" * 8192
        r = client.post("/v1/documents", content=chunked(),
                        headers={"content-type": "application/msgpack", **h})
        assert r.status_code == 413, r.text


class _Marker:
    """Unpickling this creates a file: proof that the server unpickled client bytes."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_client_bytes_are_never_unpickled_or_evaluated(apps, tmp_path):
    marker = tmp_path / f"unpickled-{SEED}"
    payload = pickle.dumps(_Marker(str(marker)))
    ext = msgpack.ExtType(7, payload)
    msgpack_bodies = [
        ("/v1/completions", {"model": "llama", "prompt": ext, "max_tokens": 2}),
        ("/v1/completions", {"model": "llama", "prompt": "hi", "max_tokens": 2, "stop": ext}),
        ("/v1/documents", {"text": ext}),
        ("/v1/documents", {"token_ids": ext}),
        ("/v1/documents", {"token_ids": payload[: len(payload) // 4 * 4]}),  # bytes: uint32 ids
        ("/v1/chat/completions", {"model": "llama", "messages": [{"role": "user",
                                                                   "content": ext}]}),
    ]
    for path, body in msgpack_bodies:
        r = apps.open.post(path, content=msgpack.packb(body, use_bin_type=True),
                           headers={"content-type": "application/msgpack"})
        assert r.status_code == 400, (path, r.text)
        assert r.json()["error"]["message"]
    # a Python expression where text is expected is just text
    expr = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    r = apps.open.post("/v1/completions", json={**BODY, "prompt": expr})
    assert r.status_code == 200, r.text
    for ctype in ("application/python-pickle", "application/octet-stream"):
        r = apps.open.post("/v1/completions", content=payload, headers={"content-type": ctype})
        assert r.status_code == 415, r.text
    assert not marker.exists(), "client bytes were unpickled or evaluated"


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            f = node.func
            name = (f.id if isinstance(f, ast.Name) else
                    f"{getattr(f.value, 'id', '?')}.{f.attr}" if isinstance(f, ast.Attribute)
                    else "?")
            yield name, node


def test_service_code_has_no_unsafe_decoding():
    files = sorted((ROOT / "ringserve" / "serve").glob("*.py")) + [ROOT / "ringserve" / "batch.py"]
    assert len(files) > 5
    unpackers = 0
    for path in files:
        for name, node in _calls(path):
            assert name not in ("eval", "exec", "pickle.loads", "pickle.load", "marshal.loads",
                                "yaml.load", "cloudpickle.loads"), f"{path.name}: {name}"
            if name in ("msgpack.unpackb", "msgpack.Unpacker", "msgpack.unpack"):
                unpackers += 1
                kw = {k.arg for k in node.keywords}
                # hooks turn client data into arbitrary objects; only plain types may come out
                assert not kw & {"ext_hook", "object_hook", "object_pairs_hook", "list_hook"}, \
                    f"{path.name}: {name} with {kw}"
    assert unpackers >= 1  # the check looked at the real decoder


def test_ray_token_authentication_is_not_turned_off():
    texts = {}
    for pattern in ("ringserve/**/*.py", "actors/*.py", "deploy/*", "k8s/*.yaml", "dev"):
        for p in ROOT.glob(pattern):
            if p.is_file():
                texts[p] = p.read_text(errors="replace")
    assert any(p.parent.name == "k8s" for p in texts)
    for p, text in texts.items():
        for bad in ("RAY_AUTH_MODE=disabled", 'RAY_AUTH_MODE", "disabled',
                    "RAY_AUTH_MODE: disabled"):
            assert bad not in text, f"{p} turns Ray token authentication off"
    # every KubeRay manifest asks the operator for token authentication
    for p in (ROOT / "k8s").glob("*.yaml"):
        assert "authOptions" in texts[p] and "mode: token" in texts[p], p
