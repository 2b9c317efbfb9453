"""Batch-job test cases shared by tests/test_batch.py (CPU, CI) and tests/batch_gpu_check.py
(the same job on GPUs): the input documents, and the check of the results against `LLM` run
directly (greedy, the documented plain prompt format)."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

from pytest import approx

from ringserve.sample_document import sample_document

MAX_TOKENS = 16
MAX_KV = 4096
# the documented plain prompt format (ringserve/batch.py's docstring)
QA = "\n\nQuestion: {q}\nAnswer:"
SUMMARY = "\n\nSummary of the document above:\n"


def make_inputs(work: Path, rng: random.Random):
    """Good documents of every task (text and path), and records that must fail."""
    good, n = [], 12
    for i in range(n):
        text = sample_document(n_words=rng.randint(50, 140), seed=rng.randrange(1 << 30))
        task = ["qa", "qa", "summary", "loglik"][i % 4]
        rec = {"id": f"doc-{i}" if i % 5 else i, "task": task}
        if i % 3 == 2:  # read from a file, relative to the input file
            (work / f"doc{i}.txt").write_text(text, encoding="utf-8")
            rec["path"] = f"doc{i}.txt"
        else:
            rec["text"] = text
        if task == "qa":
            rec["questions"] = rng.sample(["Who is named first?", "What happened at the end?",
                                           "Where does it take place?", "Why?"], k=1 + i % 2)
        if i >= 2 and task != "loglik":
            # longer answers after the first two documents: run 1 must still be busy when
            # `ray job stop` (a CLI start-up of a few seconds) lands; also the per-record override
            rec["max_tokens"] = rng.randint(64, 96)
        good.append(rec)
    (work / "bad-encoding.txt").write_bytes(b"Caf\xe9 au lait \xff\xfe, na\xefve.")
    long_text = sample_document(n_words=4000, seed=rng.randrange(1 << 30))
    bad = {
        "missing": ({"id": "missing", "task": "summary", "path": "no-such-file.txt"},
                    "FileNotFoundError"),
        "bad-encoding": ({"id": "bad-encoding", "task": "qa", "path": "bad-encoding.txt",
                          "questions": ["What?"]}, "UnicodeDecodeError"),
        "too-long": ({"id": "too-long", "task": "summary", "text": long_text}, "CapacityError"),
        "weird-task": ({"id": "weird-task", "task": "translate", "text": "x"}, "RecordError"),
    }
    lines = [json.dumps(r) for r in good[:2]]  # two quick good ones first: run 1 shows progress
    rest = [json.dumps(r) for r in good[2:]] + [json.dumps(r) for r, _ in bad.values()]
    rest.append('{"id": "truncated-json", "text": "abc", "tas')
    rest.append(json.dumps({**good[0], "text": "a different text, same id: must be ignored"}))
    rng.shuffle(rest)
    lines += rest
    (work / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    broken_line = lines.index('{"id": "truncated-json", "text": "abc", "tas') + 1
    errors = {k: v for k, (_, v) in bad.items()}
    errors[f"<input line {broken_line}>"] = "RecordError"
    return good, errors


def check_against_llm(llm, by_id: dict, good: list, work: Path, atol=1e-4, rtol=1e-4) -> None:
    """Every good record's result equals what `llm` computes directly (greedy)."""
    from ringserve.sampling import SamplingParams

    tok = llm.tokenizer
    good_by_key = {json.dumps(rec["id"]): rec for rec in good}
    assert set(good_by_key) <= set(by_id)
    # in the job's order: the engine's prefix reuse then sees the same history of requests, so
    # the same prefill chunks run (low-precision results depend on the chunking)
    for key, res in by_id.items():
        if key not in good_by_key:
            continue
        rec = good_by_key[key]
        assert res["ok"] is True and res["task"] == rec["task"], res
        text = rec.get("text") or (work / rec["path"]).read_text(encoding="utf-8")
        if rec["task"] == "loglik":
            (sc,) = llm.score([text])
            assert res["num_tokens"] == len(sc.token_ids)
            assert res["logprobs"][0] is None
            worst = max(abs(a - b) for a, b in zip(res["logprobs"][1:], sc.logprobs[1:]))
            assert res["logprobs"][1:] == approx(sc.logprobs[1:], abs=atol), worst
            mean = sum(sc.logprobs[1:]) / (len(sc.logprobs) - 1)
            assert res["perplexity"] == approx(math.exp(-mean), rel=rtol)
            continue
        doc = tok.encode(text)
        assert res["num_document_tokens"] == len(doc)
        greedy = SamplingParams(max_tokens=rec.get("max_tokens", MAX_TOKENS), temperature=0)
        if rec["task"] == "summary":
            (o,) = llm.generate([doc + tok.encode(SUMMARY, add_special_tokens=False)], greedy)
            assert (res["summary"], res["num_generated_tokens"]) == (o.text, len(o.token_ids))
            continue
        prompts = [doc + tok.encode(QA.format(q=q), add_special_tokens=False)
                   for q in rec["questions"]]
        key = llm.cache_document(doc) if len(prompts) > 1 else None
        outs = llm.generate(prompts, greedy)
        if key:
            llm.drop_document(key)
        assert [a["question"] for a in res["answers"]] == rec["questions"]
        assert [a["answer"] for a in res["answers"]] == [o.text for o in outs]
        assert [a["num_generated_tokens"] for a in res["answers"]] == \
            [len(o.token_ids) for o in outs]
        if key:  # the document was prefilled once and reused by every question (the
            # engine may also reuse a previous question's common tokens: >=)
            assert all(a["num_cached_tokens"] >= len(doc) for a in res["answers"]), res
