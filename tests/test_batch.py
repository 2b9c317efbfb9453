"""The batch job end to end, the way users run it: a real Ray head with the job server
(`ray start --head`, token authentication on), `ray job submit --working-dir <repo> -- python -m
ringserve.batch ...`, `ray job stop` midway, a resubmission that resumes, and the results
checked against `ringserve.LLM` run directly (greedy).

The head is started here (the session fixture has no dashboard / job server) with its own ports
and temp dir, so it neither collides with nor is picked up by the shared test cluster, and it is
stopped by its own process id at the end (never `ray stop`, which would stop every Ray on the
machine).
"""
from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from batch_cases import MAX_KV, MAX_TOKENS, check_against_llm, make_inputs
from tinymodels import tiny_model
from servehelpers import free_port

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")



@dataclass
class Head:
    url: str
    env: dict
    token: str
    proc: subprocess.Popen
    temp: str
    log: Path

    def api(self, path: str, auth: bool = True) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}"} if auth else {}
        return httpx.get(self.url + path, headers=headers, timeout=10)

    def status(self, sid: str) -> str:
        r = self.api(f"/api/jobs/{sid}")
        r.raise_for_status()
        return r.json()["status"]

    def ray(self, *args, timeout=120) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)


def _my_ray_pids(temp: str):
    """Processes of the head started here: their command lines name its temp dir."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in out.splitlines()
            if temp in line and int(line.split(None, 1)[0]) != os.getpid()]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    token = secrets.token_hex(24)
    # short: Ray puts unix sockets under it (108-byte path limit)
    temp = tempfile.mkdtemp(prefix="rsb", dir="/tmp")
    gcs, dash, client, agent = (free_port() for _ in range(4))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, TRITON_INTERPRET="1",
               PYTHONUNBUFFERED="1", RAY_USAGE_STATS_ENABLED="0",
               # the job's `python` must be this venv's (the job runs with the cluster's env)
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    log = tmp_path_factory.mktemp("ray-head") / "ray-start.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--port", str(gcs), "--dashboard-port", str(dash),
             "--dashboard-host", "127.0.0.1", "--ray-client-server-port", str(client),
             "--dashboard-agent-listen-port", str(agent), "--num-cpus", "4",
             "--temp-dir", temp, "--disable-usage-stats"],
            env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    h = Head(f"http://127.0.0.1:{dash}", env, token, proc, temp, log)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"ray start exited:\n{log.read_text()[-3000:]}"
            try:
                if h.api("/api/jobs/").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"job server not up:\n{log.read_text()[-3000:]}"
            time.sleep(1)
        yield h
    finally:
        proc.send_signal(signal.SIGTERM)  # --block: ray start stops its node's processes
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        time.sleep(1)
        for pid in _my_ray_pids(temp):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


def _wait_status(head: Head, sid: str, want, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        st = head.status(sid)
        if st in want:
            return st
        assert time.monotonic() < deadline, f"job {sid} is {st}, waited for {want}"
        time.sleep(0.5)


def _complete_lines(path: Path):
    if not path.exists():
        return []
    data = path.read_bytes()
    return data[: data.rfind(b"\n") + 1].decode("utf-8").splitlines()


def test_batch_job_submit_stop_resume(head, ray_session, tmp_path_factory):
    # Ray token auth is really on: the Jobs API refuses a request without the token
    assert head.api("/api/jobs/", auth=False).status_code == 401

    rng = random.Random(20261128)
    model = tiny_model(tmp_path_factory, "llama")
    work = tmp_path_factory.mktemp("batch-job")
    good, errors = make_inputs(work, rng)
    out = work / "out" / "results.jsonl"
    argv = ["python", "-m", "ringserve.batch", "--model", str(model),
            "--input", str(work / "docs.jsonl"), "--output", str(out), "--world-size", "2",
            "--schedule", "striped", "--device", "cpu", "--max-tokens", str(MAX_TOKENS),
            "--max-kv-tokens", str(MAX_KV), "--prompt-format", "plain"]
    all_ids = [r["id"] for r in good] + list(errors)

    def submit(sid, wait):
        return head.ray("job", "submit", "--address", head.url, "--submission-id", sid,
                        "--working-dir", str(ROOT), *([] if wait else ["--no-wait"]),
                        "--", *argv, timeout=400)

    # ---- run 1: stopped with `ray job stop` once a couple of documents are written
    r = submit("ringserve-batch-1", wait=False)
    assert r.returncode == 0, r.stdout + r.stderr
    deadline = time.monotonic() + 240
    while len(_complete_lines(out)) < 2:
        st = head.status("ringserve-batch-1")
        assert st in ("PENDING", "RUNNING"), (
            f"job 1 ended ({st}) early:\n" + head.ray("job", "logs", "--address", head.url,
                                                       "ringserve-batch-1").stdout[-4000:])
        assert time.monotonic() < deadline, "job 1 wrote nothing"
        time.sleep(0.2)
    r = head.ray("job", "stop", "--address", head.url, "ringserve-batch-1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _wait_status(head, "ringserve-batch-1", {"STOPPED", "SUCCEEDED", "FAILED"}, 60) \
        == "STOPPED", "job 1 finished before it could be stopped: make it longer"
    first = _complete_lines(out)
    assert 2 <= len(first) < len(all_ids), len(first)
    done_first = {json.loads(x)["id"] for x in first}
    # the kill may land inside a write: leave a torn line, as a killed run would
    torn_id = next(i for i in all_ids if i not in done_first)
    with open(out, "a", encoding="utf-8") as f:
        f.write(json.dumps({"id": torn_id, "task": "qa", "ok": True})[:25])

    # ---- run 2: the same command resumes, blocking until the end (logs streamed)
    r = submit("ringserve-batch-2", wait=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert head.status("ringserve-batch-2") == "SUCCEEDED"
    logs = head.ray("job", "logs", "--address", head.url, "ringserve-batch-2").stdout
    assert f"{len(first)} already in" in logs and "cut 25 bytes of a torn last line" in logs
    progress = [x for x in logs.splitlines() if "documents done" in x]
    assert len(progress) == len(all_ids) - len(first), logs[-3000:]
    assert all("tokens/s" in x and "ETA" in x for x in progress)

    # ---- run 3: a rerun of a finished job changes nothing (and starts no actor group)
    before = out.read_bytes()
    r = submit("ringserve-batch-3", wait=True)
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert out.read_bytes() == before

    # ---- every id exactly once; run 1's records kept as they were
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[: len(first)] == first
    results = [json.loads(x) for x in lines]
    ids = [x["id"] for x in results]
    assert sorted(map(json.dumps, ids)) == sorted(map(json.dumps, all_ids)), ids
    by_id = {json.dumps(x["id"]): x for x in results}

    # ---- bad records: reported with their error, nothing else affected
    for rid, etype in errors.items():
        res = by_id[json.dumps(rid)]
        assert res["ok"] is False and res["error"]["type"] == etype, res
    too_long = by_id[json.dumps("too-long")]["error"]
    assert too_long["requested"] > too_long["capacity"] > 0

    # ---- good records: the same as LLM run directly
    from ringserve.llm import LLM

    llm = LLM(str(model), world_size=2, layout="striped", device="cpu", max_kv_tokens=MAX_KV)
    try:
        check_against_llm(llm, by_id, good, work)
    finally:
        llm.shutdown()
