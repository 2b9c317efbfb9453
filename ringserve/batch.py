"""Batch document jobs: `python -m ringserve.batch` (for `ray job submit`) and `ringserve batch`.

    ray job submit --address http://HEAD:8265 --working-dir . -- python -m ringserve.batch \\
        --model /models/model --input /data/docs.jsonl --output /data/results.jsonl \\
        --world-size 2 --device cuda

Input: JSONL, one document per line:

    {"id": "a", "text": "...", "task": "qa", "questions": ["Who ...?", "When ...?"]}
    {"id": "b", "path": "docs/b.txt", "task": "summary"}
    {"id": 7, "text": "...", "task": "loglik"}
    {"id": "c", "path": "c.txt", "task": "extract", "schema": {"type": "object", ...}}

`path` is read as UTF-8 (relative paths are relative to the input file's folder). Optional per
record: `max_tokens`; `schema` (a JSON schema: required for `extract`, optional for `qa`, where
every answer is then JSON matching it), `instruction` (extract: what to pull out; the schema is
appended to it). Output with a schema is constrained by it (structured output): it parses and
validates unless `max_tokens` cut it off (finish_reason "length", data null). Output: JSONL, one line per input id, written as each document finishes
(flushed and fsynced): `{"id", "task", "ok": true, ...}` or `{"id", "task", "ok": false,
"error": {"type", "message", ...}}` (CapacityError adds `requested`, `capacity`), with `elapsed_s`:
  qa:      num_document_tokens, answers: [{question, answer, finish_reason,
           num_generated_tokens, num_cached_tokens}]
  summary: num_document_tokens, summary, finish_reason, num_generated_tokens
  loglik:  num_tokens, logprobs (per token, log p(token | previous); the first is null),
           sum_logprob, mean_logprob, perplexity = exp(-mean_logprob)
  extract: num_document_tokens, data (the parsed JSON, null when cut off), text,
           finish_reason, num_generated_tokens
  (qa with a schema: each answer also has data)
A line that is not valid JSON gets the id "<input line N>".

Resumable: ids already in the output are skipped, so rerunning the same command (after a crash,
`ray job stop`, a preempted pod) continues where the last run stopped. A half-written last line
left by a killed run is cut off before appending. `--retry-errors` drops the error records
first, so those documents are tried again.

Prompts (token ids, so that all questions on one document share the document's prefix and the
document is prefilled once, through `LLM.cache_document`):
  plain: encode(text) + encode("\\n\\nQuestion: {q}\\nAnswer:")           (no special tokens in the suffix)
  chat:  the tokenizer's chat template for one user message "{text}\\n\\n{instruction}", split
         right after the document text.
  auto (default): chat when the checkpoint has a chat template, else plain.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from ringserve.errors import CapacityError, InvalidRequestError

TASKS = ("qa", "summary", "loglik", "extract")
PROMPT_FORMATS = ("auto", "plain", "chat")
QA_PLAIN = "\n\nQuestion: {question}\nAnswer:"
SUMMARY_PLAIN = "\n\nSummary of the document above:\n"
QA_CHAT = "Answer this question about the document above: {question}"
SUMMARY_CHAT = "Summarize the document above in a few sentences."
EXTRACT_DEFAULT = "Extract the information of the document above"
EXTRACT_PLAIN = "\n\n{instruction}, as JSON matching this schema: {schema}\nJSON:"
EXTRACT_CHAT = "{instruction}, as JSON matching this schema: {schema}"
_SENTINEL = "\x00RINGSERVE-DOC-END\x00"


class RecordError(ValueError):
    """The input record itself is wrong (missing id/text, unknown task, ...)."""


# ------------------------------------------------------------------------------- records


@dataclass
class Record:
    id: Any
    task: str
    line: int
    text: Optional[str] = None
    path: Optional[str] = None
    questions: List[str] = field(default_factory=list)
    max_tokens: Optional[int] = None
    schema: Any = None
    instruction: Optional[str] = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise RecordError(f"task ({self.task!r}) must be one of {TASKS}")
        if (self.text is None) == (self.path is None):
            raise RecordError("give exactly one of 'text' and 'path'")
        if self.text is not None and not isinstance(self.text, str):
            raise RecordError(f"'text' must be a string, got {type(self.text).__name__}")
        if self.path is not None and (not isinstance(self.path, str) or not self.path):
            raise RecordError(f"'path' must be a non-empty string, got {self.path!r}")
        if self.task == "qa":
            if (not isinstance(self.questions, list) or not self.questions
                    or not all(isinstance(q, str) and q.strip() for q in self.questions)):
                raise RecordError(f"task 'qa' needs 'questions': a non-empty list of non-empty "
                                  f"strings, got {self.questions!r}")
        if self.task == "extract" and self.schema is None:
            raise RecordError("task 'extract' needs 'schema': the JSON schema of the output")
        if self.schema is not None:
            if self.task not in ("qa", "extract"):
                raise RecordError(f"'schema' is for the qa and extract tasks, not {self.task!r}")
            from .structured import grammar_for
            try:
                grammar_for(guided_json=self.schema)
            except ValueError as e:
                raise RecordError(f"'schema': {e}") from None
        if self.instruction is not None and (self.task != "extract"
                                             or not isinstance(self.instruction, str)
                                             or not self.instruction.strip()):
            raise RecordError("'instruction' is a non-empty string, for the extract task")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int)
                                            or isinstance(self.max_tokens, bool)
                                            or self.max_tokens < 1):
            raise RecordError(f"max_tokens ({self.max_tokens!r}) must be an integer >= 1")


def id_key(rid: Any) -> str:
    """Ids compare by JSON value: 7 and "7" are different documents."""
    return json.dumps(rid, sort_keys=True)


def line_id(line: int) -> str:
    """The id given to an input line that has no usable id (bad JSON), stable across runs."""
    return f"<input line {line}>"


def parse_line(raw: bytes, line: int) -> Tuple[Any, Optional[Record], Optional[Exception]]:
    """(id, record or None, error or None) for one input line."""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        return line_id(line), None, RecordError(f"line {line} is not valid JSON: {e}")
    if not isinstance(obj, dict):
        return line_id(line), None, RecordError(f"line {line} is not a JSON object")
    rid = obj.get("id")
    if rid is None or isinstance(rid, (bool, float, list, dict)) or rid == "":
        return line_id(line), None, RecordError(
            f"line {line}: 'id' must be a non-empty string or an integer, got {rid!r}")
    unknown = sorted(set(obj) - {"id", "task", "text", "path", "questions", "max_tokens",
                                 "schema", "instruction"})
    try:
        if unknown:
            raise RecordError(f"unknown field(s) {unknown}")
        rec = Record(id=rid, task=obj.get("task"), line=line, text=obj.get("text"),
                     path=obj.get("path"), questions=obj.get("questions") or [],
                     max_tokens=obj.get("max_tokens"), schema=obj.get("schema"),
                     instruction=obj.get("instruction"))
    except RecordError as e:
        return rid, None, e
    return rid, rec, None


def read_input(path: Path) -> Iterator[Tuple[int, bytes]]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if raw.strip():
                yield n, raw


def document_text(rec: Record, base: Path) -> str:
    if rec.text is not None:
        return rec.text
    p = Path(rec.path)
    p = p if p.is_absolute() else base / p
    data = p.read_bytes()          # FileNotFoundError etc. become the record's error
    return data.decode("utf-8")    # strict: a bad byte is the record's error, not mojibake


def size_hint(rec: Optional[Record], base: Path) -> int:
    """Characters (or bytes) of a pending document, for the ETA."""
    if rec is None:
        return 0
    if rec.text is not None:
        return len(rec.text)
    p = Path(rec.path)
    try:
        return (p if p.is_absolute() else base / p).stat().st_size
    except OSError:
        return 0


# -------------------------------------------------------------------------------- output


class ResultsFile:
    """Append-only JSONL of results, one line per id, durable line by line.

    Opening it repairs a torn tail: everything after the last complete, parseable line (the
    half-written record of a killed run) is truncated away, so that record is redone once.
    Only ids and ok flags are kept in memory (a loglik result can be megabytes).
    """

    def __init__(self, path: Path, drop_errors: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: Dict[str, bool] = {}   # id_key -> ok
        self.repaired_bytes = 0
        self.dropped_errors = 0
        self._scan()
        if drop_errors:
            self._drop_errors()
        self._f = open(self.path, "ab")

    @staticmethod
    def _parse(raw: bytes) -> Optional[Tuple[str, bool]]:
        if not raw.endswith(b"\n"):
            return None  # the last write never finished
        try:
            obj = json.loads(raw)
            return id_key(obj["id"]), bool(obj.get("ok", False))
        except (ValueError, KeyError, TypeError):
            return None

    def _scan(self) -> None:
        if not self.path.exists():
            return
        good_end = 0
        with open(self.path, "rb") as f:
            for raw in f:
                parsed = self._parse(raw)
                if parsed is None:
                    break
                self.done.setdefault(*parsed)
                good_end += len(raw)
            size = f.seek(0, os.SEEK_END)
        if good_end < size:
            self.repaired_bytes = size - good_end
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())

    def _drop_errors(self) -> None:
        self.dropped_errors = sum(not ok for ok in self.done.values())
        if not self.dropped_errors:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(self.path, "rb") as src, open(tmp, "wb") as dst:
            for raw in src:
                if self._parse(raw)[1]:
                    dst.write(raw)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, self.path)   # atomic: a crash leaves the old file or the new one
        self.done = {k: ok for k, ok in self.done.items() if ok}

    def __contains__(self, rid: Any) -> bool:
        return id_key(rid) in self.done

    def write(self, result: dict) -> None:
        key = id_key(result["id"])
        assert key not in self.done, f"id {result['id']!r} written twice"
        line = _dump(result)           # before writing: a NaN raises here, nothing is written
        self._f.write(line)            # one write per record: a crash tears at most this line
        self._f.flush()
        os.fsync(self._f.fileno())
        self.done[key] = bool(result.get("ok", False))

    def close(self) -> None:
        self._f.close()


def _dump(obj: dict) -> bytes:
    # allow_nan=False: a NaN would make the line unreadable to strict JSON parsers downstream
    return (json.dumps(obj, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def error_result(rid: Any, task: Any, err: BaseException) -> dict:
    e: Dict[str, Any] = {"type": type(err).__name__, "message": str(err)}
    if isinstance(err, CapacityError):
        e.update(requested=err.requested, capacity=err.capacity)
    return {"id": rid, "task": task if task in TASKS else None, "ok": False, "error": e}


# ------------------------------------------------------------------------------ progress


class Progress:
    def __init__(self, total_docs: int, total_size: int, skipped: int, clock=time.monotonic):
        self.total_docs, self.total_size, self.skipped = total_docs, total_size, skipped
        self.docs = self.errors = self.tokens = self.size = 0
        self.clock = clock
        self.t0 = clock()

    def add(self, ok: bool, tokens: int, size: int) -> None:
        self.docs += 1
        self.errors += 0 if ok else 1
        self.tokens += tokens
        self.size += size

    def line(self) -> str:
        dt = max(self.clock() - self.t0, 1e-9)
        left = self.total_size - self.size
        if self.docs >= self.total_docs:
            eta = "0s"
        elif self.size > 0:
            eta = _fmt_s(dt * left / self.size)   # long documents dominate: scale by size
        else:
            eta = "?"
        return (f"[ringserve.batch] {self.docs}/{self.total_docs} documents done "
                f"({self.errors} errors, {self.skipped} already in output) | "
                f"{self.tokens / dt:.1f} tokens/s | elapsed {_fmt_s(dt)} | ETA {eta}")


def _fmt_s(s: float) -> str:
    s = int(round(s))
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


# ------------------------------------------------------------------------------- prompts


class Prompter:
    """Token-id prompts with the document as a shared prefix (see the module docstring)."""

    def __init__(self, tokenizer, fmt: str):
        if fmt not in PROMPT_FORMATS:
            raise ValueError(f"prompt format ({fmt!r}) must be one of {PROMPT_FORMATS}")
        self.tok = tokenizer
        if fmt == "auto":
            fmt = "chat" if self._has_chat_template() else "plain"
        self.format = fmt

    def _has_chat_template(self) -> bool:
        try:
            self.tok.apply_chat_template([{"role": "user", "content": "x"}],
                                         add_generation_prompt=True)
            return True
        except Exception:  # no template in the checkpoint (or one that can't render)
            return False

    def split(self, text: str, instruction: str) -> Tuple[List[int], List[int]]:
        """(document prefix ids, instruction suffix ids)."""
        if self.format == "plain":
            return (list(self.tok.encode(text)),
                    list(self.tok.encode(instruction, add_special_tokens=False)))
        rendered = self.tok.apply_chat_template(
            [{"role": "user", "content": text + _SENTINEL + "\n\n" + instruction}],
            add_generation_prompt=True)
        head, sep, tail = rendered.partition(_SENTINEL)
        if not sep:
            raise InvalidRequestError("the chat template dropped the document text")
        # the rendered template already holds BOS and the role markers as text
        return (list(self.tok.encode(head, add_special_tokens=False)),
                list(self.tok.encode(tail, add_special_tokens=False)))

    def document_ids(self, text: str) -> List[int]:
        return self.split(text, "")[0]

    def qa(self, text: str, questions: Sequence[str]) -> Tuple[List[int], List[List[int]]]:
        tmpl = QA_PLAIN if self.format == "plain" else QA_CHAT
        instructions = [tmpl.format(question=q.strip()) for q in questions]
        doc, first = self.split(text, instructions[0])
        # the suffix doesn't depend on the document: don't tokenize a long text once per question
        return doc, [first] + [self.split("x", ins)[1] for ins in instructions[1:]]

    def summary(self, text: str) -> Tuple[List[int], List[int]]:
        return self.split(text, SUMMARY_PLAIN if self.format == "plain" else SUMMARY_CHAT)

    def extract(self, text: str, schema: Any, instruction: Optional[str] = None
                ) -> Tuple[List[int], List[int]]:
        tmpl = EXTRACT_PLAIN if self.format == "plain" else EXTRACT_CHAT
        schema_text = schema if isinstance(schema, str) else json.dumps(schema)
        return self.split(text, tmpl.format(instruction=(instruction or EXTRACT_DEFAULT).strip(),
                                            schema=schema_text))


# --------------------------------------------------------------------------------- tasks


def run_record(llm, prompter: Prompter, rec: Record, text: str, params) -> Tuple[dict, int]:
    """(result fields, tokens processed) for one document."""
    from dataclasses import replace

    if rec.max_tokens is not None:
        params = replace(params, max_tokens=rec.max_tokens)
    if rec.schema is not None:     # structured output: the answers follow the schema
        params = replace(params, guided_json=rec.schema)
    if rec.task == "loglik":
        (score,) = llm.score([text])
        lps = [None if x is None else float(x) for x in score.logprobs]
        vals = [x for x in lps[1:] if x is not None]
        if not vals:
            raise InvalidRequestError(
                f"log-likelihood needs at least 2 tokens, the document has {len(lps)}")
        total = math.fsum(vals)
        return ({"num_tokens": len(lps), "logprobs": lps, "sum_logprob": total,
                 "mean_logprob": total / len(vals), "perplexity": math.exp(-total / len(vals))},
                len(lps))
    if rec.task == "summary":
        doc, suffix = prompter.summary(text)
        (out,) = llm.generate([doc + suffix], params)
        return ({"num_document_tokens": len(doc), "summary": out.text,
                 "finish_reason": out.finish_reason, "num_generated_tokens": len(out.token_ids)},
                len(doc) + len(suffix) + len(out.token_ids))
    if rec.task == "extract":
        doc, suffix = prompter.extract(text, rec.schema, rec.instruction)
        (out,) = llm.generate([doc + suffix], params)
        return ({"num_document_tokens": len(doc), "data": _parsed(out), "text": out.text,
                 "finish_reason": out.finish_reason, "num_generated_tokens": len(out.token_ids)},
                len(doc) + len(suffix) + len(out.token_ids))
    doc, suffixes = prompter.qa(text, rec.questions)
    key = None
    if len(suffixes) > 1:
        # several questions: prefill the document once; each question then only prefills its
        # own few tokens on top of the cached document KV
        key = llm.cache_document(doc)
    try:
        outs = llm.generate([doc + s for s in suffixes], params)
    finally:
        if key is not None:
            llm.drop_document(key)
    answers = [{"question": q, "answer": o.text, "finish_reason": o.finish_reason,
                "num_generated_tokens": len(o.token_ids),
                "num_cached_tokens": int(o.num_cached_tokens or 0)}
               for q, o in zip(rec.questions, outs)]
    if rec.schema is not None:
        for a, o in zip(answers, outs):
            a["data"] = _parsed(o)
    # tokens actually run: the document once (cached) or per question, plus the rest
    prefilled = sum(len(doc) + len(sfx) - a["num_cached_tokens"]
                    for sfx, a in zip(suffixes, answers)) + (len(doc) if key else 0)
    return ({"num_document_tokens": len(doc), "answers": answers},
            prefilled + sum(a["num_generated_tokens"] for a in answers))


def _parsed(out) -> Any:
    """A constrained output's JSON (None when max_tokens cut it off)."""
    if out.finish_reason != "stop":
        return None
    try:
        return json.loads(out.text)
    except ValueError:   # a stop string cut it: the text is in the record
        return None


# Problems of the record itself: written as the record's error, no retry, the job goes on.
# (Not OSError in general: RequestTimeoutError is a TimeoutError, hence an OSError; files are
# read separately below.)
RECORD_ERRORS = (RecordError, InvalidRequestError)


def _attempt(llm, prompter, rec, base, params) -> Tuple[dict, int, bool]:
    """(result, tokens, system_error) for one try at one record."""
    try:
        text = document_text(rec, base)
    except (OSError, UnicodeError) as e:  # missing file, unreadable, not UTF-8
        return error_result(rec.id, rec.task, e), 0, False
    try:
        fields, tokens = run_record(llm, prompter, rec, text, params)
    except RECORD_ERRORS as e:  # too long (CapacityError), empty, ...
        return error_result(rec.id, rec.task, e), 0, False
    except Exception as e:  # a worker died, a timeout, cluster trouble: worth a retry
        return error_result(rec.id, rec.task, e), 0, True
    return {"id": rec.id, "task": rec.task, "ok": True, **fields}, tokens, False


def plan(records_path: Path, results: ResultsFile) -> Tuple[int, int, int]:
    """(documents left, their total size for the ETA, documents already in the output).
    Reads the input once; texts are not kept."""
    base = records_path.parent
    pending, total_size, skipped, seen = 0, 0, 0, set()
    for n, raw in read_input(records_path):
        rid, rec, _ = parse_line(raw, n)
        if id_key(rid) in seen:
            continue  # a repeated id is one document: the first line with it wins
        seen.add(id_key(rid))
        if rid in results:
            skipped += 1
        else:
            pending += 1
            total_size += size_hint(rec, base)
    return pending, total_size, skipped


def process(llm, records_path: Path, results: ResultsFile, prompter: Prompter, params,
            retries: int = 1, max_consecutive_failures: int = 10, out=sys.stdout) -> Progress:
    base = records_path.parent
    pending, total_size, skipped = plan(records_path, results)
    prog = Progress(pending, total_size, skipped)
    print(f"[ringserve.batch] {pending} documents to process, {skipped} already in "
          f"{results.path}" + (f" (cut {results.repaired_bytes} bytes of a torn last line)"
                               if results.repaired_bytes else ""), file=out, flush=True)

    failures = 0  # consecutive system errors
    for n, raw in read_input(records_path):
        rid, rec, err = parse_line(raw, n)
        if rid in results:
            continue
        t0 = time.monotonic()
        tokens, system_error = 0, False
        if err is not None:
            result = error_result(rid, rec.task if rec else None, err)
        else:
            for attempt in range(retries + 1):
                result, tokens, system_error = _attempt(llm, prompter, rec, base, params)
                if not system_error:
                    break
                e = result["error"]
                print(f"[ringserve.batch] id {rid!r}: {e['type']}: {e['message']}"
                      + (" (retrying)" if attempt < retries else ""), file=out, flush=True)
        failures = failures + 1 if system_error else 0
        result["elapsed_s"] = round(time.monotonic() - t0, 3)
        results.write(result)
        prog.add(result["ok"], tokens, size_hint(rec, base))
        if not result["ok"]:
            print(f"[ringserve.batch] id {rid!r} failed: {result['error']['type']}: "
                  f"{result['error']['message']}", file=out, flush=True)
        print(prog.line(), file=out, flush=True)
        if failures >= max_consecutive_failures:
            raise RuntimeError(
                f"{failures} documents in a row failed with system errors; stopping (rerun with "
                f"--retry-errors once the cluster is healthy)")
    return prog


# ---------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ringserve.batch", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF-format checkpoint directory or .gguf file")
    p.add_argument("--input", required=True, type=Path, help="input JSONL")
    p.add_argument("--output", required=True, type=Path, help="results JSONL (appended to)")
    p.add_argument("--world-size", type=int, default=None,
                   help="shards (GPUs) per actor group (another name for "
                        "--context-parallel-size, without tensor parallelism)")
    p.add_argument("--context-parallel-size", "--cp", type=int, default=None,
                   help="sequence shards per actor group (the ring); default 1")
    p.add_argument("--tensor-parallel-size", "--tp", type=int, default=None,
                   help="GPUs per shard splitting the model (one node each); cp x tp GPUs")
    p.add_argument("--layout", choices=("striped", "ring"), default=None,
                   help="shard layout of prompt chunks over the group (default striped)")
    p.add_argument("--schedule", choices=("striped", "ring"), default=None,
                   help=argparse.SUPPRESS)  # deprecated name of --layout
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when the Ray cluster has GPUs, else cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None)
    p.add_argument("--max-kv-tokens", type=int, default=None,
                   help="KV tokens per group (default: from free memory)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="generated tokens per answer / summary (a record's max_tokens wins)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (reproducible)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="auto")
    p.add_argument("--retry-errors", action="store_true",
                   help="drop error records from the output first, so they are tried again")
    p.add_argument("--retries", type=int, default=1,
                   help="extra attempts for a document that hits a system error")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (default: 'auto' inside a Ray job, else a new "
                        "local one)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    from ringserve.parallel.tp import parallel_sizes
    try:
        cp, tp = parallel_sizes(a.world_size, a.context_parallel_size, a.tensor_parallel_size)
    except ValueError as e:
        raise SystemExit(f"ringserve.batch: {e}") from None
    if not a.input.is_file():
        raise SystemExit(f"--input {a.input} is not a file")
    ray_address = a.ray_address
    if ray_address is None and os.environ.get("RAY_ADDRESS"):
        # inside `ray job submit` the job server sets RAY_ADDRESS: join that cluster
        ray_address = "auto"

    from ringserve.sampling import SamplingParams

    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, seed=a.seed)
    results = ResultsFile(a.output, drop_errors=a.retry_errors)
    try:
        if results.dropped_errors:
            print(f"[ringserve.batch] --retry-errors: {results.dropped_errors} error records "
                  f"dropped, retrying them", flush=True)
        if plan(a.input, results)[0] == 0:
            # a rerun of a finished job: don't start an actor group (GPUs) for nothing
            print(f"[ringserve.batch] nothing to do: every id is already in {a.output}",
                  flush=True)
            return 0
        import ray

        from ringserve.llm import LLM

        t0 = time.monotonic()
        if not ray.is_initialized():
            ray.init(address=ray_address)
        # the driver may sit on a CPU-only head (KubeRay): ask the cluster, not this machine
        device = a.device or ("cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu")
        if a.schedule is not None:
            print("[ringserve.batch] --schedule is deprecated, say --layout", file=sys.stderr)
        a.layout = a.layout or a.schedule or "striped"
        llm = LLM(a.model, context_parallel_size=cp, tensor_parallel_size=tp, layout=a.layout,
                  device=device, dtype=a.dtype, max_kv_tokens=a.max_kv_tokens,
                  ray_address=ray_address)
        try:
            print(f"[ringserve.batch] model {a.model} on {cp} x {tp} x {device} "
                  f"({a.layout}) ready in {time.monotonic() - t0:.1f}s; KV capacity "
                  f"{llm.capacity_tokens} tokens", flush=True)
            prompter = Prompter(llm.tokenizer, a.prompt_format)
            prog = process(llm, a.input, results, prompter, params, retries=a.retries)
        finally:
            llm.shutdown()
    finally:
        results.close()
    print(f"[ringserve.batch] finished: {prog.docs} documents ({prog.errors} errors), "
          f"{prog.skipped} skipped as already done; results in {a.output}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
