"""ringserve.batch without a model: input parsing, the resumable results file, progress/ETA,
and the prompt split on a real tokenizer. The end-to-end job (ray job submit) is test_batch.py."""
from __future__ import annotations

import json
import random
import string

import pytest

from ringserve import batch
from ringserve.errors import CapacityError


def _rand_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_letters + " \n.,é日") for _ in range(n))


# ------------------------------------------------------------------------------ parse_line


@pytest.mark.parametrize("raw,expect_id,expect_err", [
    (b'{"id": "a", "text": "t", "task": "summary"}', "a", None),
    (b'{"id": 7, "text": "t", "task": "loglik"}', 7, None),
    (b'{"id": "q", "path": "x.txt", "task": "qa", "questions": ["why?"]}', "q", None),
    (b'{"id": "a", "text": "t", "task": "transl', "<input line 3>", "not valid JSON"),
    (b'[1, 2]', "<input line 3>", "not a JSON object"),
    (b'{"text": "t", "task": "summary"}', "<input line 3>", "'id' must be"),
    (b'{"id": true, "text": "t", "task": "summary"}', "<input line 3>", "'id' must be"),
    (b'{"id": "b", "text": "t", "task": "translate"}', "b", "task ('translate') must be"),
    (b'{"id": "b", "text": "t", "path": "p", "task": "summary"}', "b", "exactly one of"),
    (b'{"id": "b", "task": "summary"}', "b", "exactly one of"),
    (b'{"id": "b", "text": "t", "task": "qa"}', "b", "needs 'questions'"),
    (b'{"id": "b", "text": "t", "task": "qa", "questions": ["", "x"]}', "b", "needs 'questions'"),
    (b'{"id": "b", "text": "t", "task": "summary", "max_tokens": 0}', "b", "max_tokens (0)"),
    (b'{"id": "b", "text": "t", "task": "summary", "colour": 1}', "b", "unknown field"),
    (b'{"id": "b", "text": 5, "task": "summary"}', "b", "'text' must be a string"),
    (b'\xff{"id": "b"}', "<input line 3>", "not valid JSON"),
])
def test_parse_line(raw, expect_id, expect_err):
    rid, rec, err = batch.parse_line(raw, 3)
    assert rid == expect_id
    if expect_err is None:
        assert err is None and rec is not None and rec.id == expect_id
    else:
        assert rec is None and isinstance(err, batch.RecordError)
        assert expect_err in str(err), str(err)


def test_id_key_distinguishes_types():
    assert batch.id_key(7) != batch.id_key("7")
    assert batch.id_key("a") == batch.id_key("a")


# ---------------------------------------------------------------------------- ResultsFile


def _lines(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_results_file_appends_and_resumes(tmp_path):
    rng = random.Random(1234)
    out = tmp_path / "sub" / "results.jsonl"
    r = batch.ResultsFile(out)
    written = []
    for i in range(rng.randint(3, 8)):
        rec = {"id": rng.choice([i, f"doc-{i}"]), "task": "summary", "ok": True,
               "summary": _rand_text(rng, rng.randint(0, 50))}
        r.write(rec)
        written.append(rec)
    with pytest.raises(AssertionError, match="written twice"):
        r.write(dict(written[0]))
    r.close()
    assert _lines(out) == written  # durable and in order, nothing doubled

    r2 = batch.ResultsFile(out)
    assert r2.repaired_bytes == 0
    for rec in written:
        assert rec["id"] in r2
    assert "never-written" not in r2
    r2.close()


@pytest.mark.parametrize("cut", ["no-newline", "bad-json", "empty-newline-at-end"])
def test_results_file_repairs_a_torn_last_line(tmp_path, cut):
    rng = random.Random(sum(map(ord, cut)))
    out = tmp_path / "results.jsonl"
    good = [{"id": f"d{i}", "task": "loglik", "ok": True, "sum_logprob": rng.random()}
            for i in range(4)]
    torn_rec = json.dumps({"id": "d4", "task": "qa", "ok": True, "answers": []})
    body = "".join(json.dumps(g) + "\n" for g in good)
    tail = {"no-newline": torn_rec[: rng.randint(1, len(torn_rec) - 1)],
            "bad-json": torn_rec[:10] + "\n",
            "empty-newline-at-end": ""}[cut]
    out.write_text(body + tail, encoding="utf-8")

    r = batch.ResultsFile(out)
    assert r.repaired_bytes == len(tail.encode())
    assert "d4" not in r and all(g["id"] in r for g in good)
    r.write({"id": "d4", "task": "qa", "ok": True, "answers": ["x"]})
    r.close()
    got = _lines(out)
    assert [g["id"] for g in got] == ["d0", "d1", "d2", "d3", "d4"]  # d4 exactly once
    assert got[-1]["answers"] == ["x"]


def test_results_file_retry_errors_drops_error_records(tmp_path):
    out = tmp_path / "results.jsonl"
    r = batch.ResultsFile(out)
    r.write({"id": "ok1", "task": "summary", "ok": True, "summary": "s"})
    r.write(batch.error_result("bad", "summary", CapacityError(5000, 1024)))
    r.write({"id": 3, "task": "loglik", "ok": True, "perplexity": 2.0})
    r.close()
    err = _lines(out)[1]
    assert err["ok"] is False and err["error"]["type"] == "CapacityError"
    assert (err["error"]["requested"], err["error"]["capacity"]) == (5000, 1024)

    r = batch.ResultsFile(out, drop_errors=True)
    assert r.dropped_errors == 1 and "bad" not in r and "ok1" in r and 3 in r
    r.write({"id": "bad", "task": "summary", "ok": True, "summary": "now fine"})
    r.close()
    assert [x["id"] for x in _lines(out)] == ["ok1", 3, "bad"]
    assert not (tmp_path / "results.jsonl.tmp").exists()


def test_results_file_refuses_nan(tmp_path):
    r = batch.ResultsFile(tmp_path / "o.jsonl")
    with pytest.raises(ValueError):
        r.write({"id": "x", "ok": True, "perplexity": float("nan")})
    r.close()
    assert (tmp_path / "o.jsonl").read_bytes() == b""  # nothing half-written


# ------------------------------------------------------------------------------- progress


def test_progress_line_rates_and_eta():
    now = [100.0]
    p = batch.Progress(total_docs=4, total_size=1000, skipped=3, clock=lambda: now[0])
    assert "ETA ?" in p.line()
    now[0] = 110.0
    p.add(ok=True, tokens=500, size=250)       # a quarter of the characters in 10 s
    line = p.line()
    assert "1/4 documents done" in line and "3 already in output" in line
    assert "50.0 tokens/s" in line and "elapsed 10s" in line and "ETA 30s" in line
    now[0] = 130.0
    p.add(ok=False, tokens=0, size=750)
    p.add(ok=True, tokens=100, size=0)
    p.add(ok=True, tokens=0, size=0)
    line = p.line()
    assert "4/4 documents done (1 errors" in line and "ETA 0s" in line


# ---------------------------------------------------------------------- documents, prompts


def test_document_text_errors(tmp_path):
    (tmp_path / "good.txt").write_text("héllo", encoding="utf-8")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 \xff\xfe")
    rec = lambda p: batch.Record(id="x", task="summary", line=1, path=p)  # noqa: E731
    assert batch.document_text(rec("good.txt"), tmp_path) == "héllo"
    assert batch.document_text(rec(str(tmp_path / "good.txt")), tmp_path / "elsewhere") == "héllo"
    with pytest.raises(UnicodeDecodeError):
        batch.document_text(rec("bad.txt"), tmp_path)
    with pytest.raises(FileNotFoundError):
        batch.document_text(rec("missing.txt"), tmp_path)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from tinymodels import build_tokenizer

    from ringserve.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("batch-tok")
    build_tokenizer(path, "bytelevel-llama3", seed=3)
    return Tokenizer.from_dir(path)


def test_prompts_share_the_document_prefix(tiny_tokenizer):
    tok = tiny_tokenizer
    rng = random.Random(99)
    text = " ".join(rng.choice(["ship", "harbour", "storm", "Zürich", "crew", "日本"])
                    for _ in range(rng.randint(40, 90)))
    qs = ["Who sailed?", "Where is the harbour, and why?"]
    for fmt in ("plain", "chat"):
        pr = batch.Prompter(tok, fmt)
        doc, sfx = pr.qa(text, qs)
        assert doc == pr.document_ids(text) and len(sfx) == 2 and sfx[0] != sfx[1]
        if fmt == "plain":
            assert doc == tok.encode(text)
            for q, s in zip(qs, sfx):
                assert tok.decode(s) == batch.QA_PLAIN.format(question=q)
        else:
            for q, s in zip(qs, sfx):
                want = tok.apply_chat_template(
                    [{"role": "user", "content": text + "\n\n" + batch.QA_CHAT.format(question=q)}],
                    add_generation_prompt=True)
                # same text as the whole rendered template, special tokens included
                assert tok.decode(doc + s, skip_special_tokens=False) == want
    assert batch.Prompter(tok, "auto").format == "chat"  # the checkpoint has a template


def test_entrypoint_in_rayjob_parses():
    import shlex
    from pathlib import Path

    import yaml

    m = yaml.safe_load((Path(__file__).resolve().parents[1] / "k8s" / "rayjob.yaml").read_text())
    argv = shlex.split(m["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "ringserve.batch"]
    a = batch.build_parser().parse_args(argv[3:])
    assert (a.world_size or a.context_parallel_size, a.tensor_parallel_size or 1, a.device,
            a.layout) == (2, 1, "cuda", "striped")
    assert str(a.input).startswith("/data/") and str(a.output).startswith("/data/")


def test_cli_forwards_to_batch(capsys):
    from ringserve import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["batch", "--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    assert "--retry-errors" in help_text and '"task": "qa"' in help_text
    with pytest.raises(SystemExit) as e:  # required arguments are enforced
        cli.main(["batch", "--model", "m"])
    assert e.value.code == 2
