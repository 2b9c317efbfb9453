"""LLM(in_process=True): the one shard's worker in this process (actors/local_group.py), no Ray
actor and no Ray at all. Its answers equal transformers' (fp32, CPU) with the synchronous
engine and with pipelined async scheduling (each step's launch and finish as direct calls), a
failed call rebuilds the worker in place, bad combinations are refused with the reason, and a
Serve replica holds the worker itself (no shard actor process)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import httpx
import pytest
import torch

from tinymodels import hf_reference, load_hf, tiny_model
from ringserve import LLM, SamplingParams

NEW_TOKENS = 24
PROMPT_LENS = (29, 45)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    path = tiny_model(tmp_path_factory, "qwen2")
    return path, hf_reference(load_hf(path), 11, PROMPT_LENS, NEW_TOKENS)


GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)


def check(llm, ref_out):
    outs = llm.generate([ids for ids, _, _ in ref_out], GREEDY)
    assert [o.token_ids for o in outs] == [want for _, _, want in ref_out]
    for (ids, lp_ref, _), s in zip(ref_out, llm.score([r[0] for r in ref_out])):
        assert s.token_ids == ids
        torch.testing.assert_close(torch.tensor(s.logprobs[1:], dtype=torch.float64), lp_ref,
                                   rtol=0, atol=5e-5)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "pipelined"])
def test_answers_equal_transformers_with_the_worker_in_this_process(ref, async_scheduling):
    path, ref_out = ref
    from ringserve.actors import LocalGroup

    llm = LLM(str(path), in_process=True, max_kv_tokens=2048,
              async_scheduling=async_scheduling)
    try:
        assert isinstance(llm._group, LocalGroup)
        assert llm._group.health()[0]["pid"] == os.getpid()
        assert llm.stats()["in_process"] and llm.stats()["step_channel"] == "direct"
        assert llm._engine._pipeline is async_scheduling   # launch / finish as direct calls
        check(llm, ref_out)
        if async_scheduling:
            assert llm.stats()["steps_planned_ahead"] > 0
    finally:
        llm.shutdown()
    assert llm._group is None


def test_a_failed_call_rebuilds_the_worker_in_place(ref):
    path, ref_out = ref
    llm = LLM(str(path), in_process=True, max_kv_tokens=2048)
    try:
        group = llm._group
        first = group.worker
        real = first.execute
        calls = [0]

        def failing(plan):
            calls[0] += 1
            if calls[0] == 3:   # mid-request: the prompt's step ran, a decode step fails
                raise RuntimeError("injected worker fault")
            return real(plan)
        first.execute = failing
        check(llm, ref_out)   # the requests in flight recompute on the fresh worker
        assert group.rebuilds == 1 and group.worker is not first and calls[0] == 3
        s = llm.stats()
        assert s["worker_failures"] == 1 and s["recovered_requests"] >= 1
    finally:
        llm.shutdown()


def test_ray_is_never_started(ref):
    """A fresh interpreter: the in-process LLM answers without initialising Ray."""
    path, _ = ref
    code = textwrap.dedent(f"""
        import sys
        from ringserve import LLM, SamplingParams
        llm = LLM({str(path)!r}, in_process=True, max_kv_tokens=1024)
        out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4, temperature=0,
                                                            ignore_eos=True))[0]
        llm.shutdown()
        ray = sys.modules.get("ray")
        print("TOKENS", len(out.token_ids), "RAY", bool(ray and ray.is_initialized()))
    """)
    env = dict(os.environ, RAY_ADDRESS="")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "TOKENS 4 RAY False" in r.stdout


@pytest.mark.parametrize("kw, words", [
    ({"world_size": 2}, "context_parallel_size 1"),
    ({"tensor_parallel_size": 2}, "tensor_parallel_size 1"),
    ({"step_timeout_s": 5.0}, "step_timeout_s cannot be enforced"),
    ({"step_channel": "compiled"}, "Compiled Graph"),
    ({"in_process": "yes"}, "in_process must be True or False"),
])
def test_bad_combinations_are_refused_with_the_reason(ref, kw, words):
    path, _ = ref
    kw = {"in_process": True, **kw}
    with pytest.raises(ValueError, match=words):
        LLM(str(path), **kw)


def test_serve_arguments(tmp_path):
    from ringserve.serve.config import ServeArgs
    from ringserve.serve.launch import replica_resources

    base = {"model": str(tmp_path)}
    cfg = ServeArgs.from_dict({**base, "in_process": True, "device": "cuda",
                               "num_cpus_per_worker": 2.0, "replica_num_cpus": 0.5})
    assert replica_resources(cfg) == {"num_cpus": 2.5, "num_gpus": 1}
    cfg = ServeArgs.from_dict({**base, "in_process": True, "device": "cpu"})
    assert replica_resources(cfg) == {"num_cpus": 1.0}
    assert replica_resources(ServeArgs.from_dict(base)) == {"num_cpus": 0.0}
    for bad, words in (({"in_process": True}, "needs device"),
                       ({"in_process": True, "device": "cpu", "world_size": 2}, "world_size 1"),
                       ({"in_process": 1, "device": "cpu"}, "true, false or null")):
        with pytest.raises(ValueError, match=words):
            ServeArgs.from_dict({**base, **bad})


def test_a_serve_replica_holds_the_worker(ref, ray_session):
    """The real Serve app with in_process: answers over HTTP equal the in-process LLM's, and no
    shard actor process was started (the replica holds the worker)."""
    from ray import serve

    from servehelpers import shard_pids, start_serve
    from ringserve.serve import build_app, wait_ready

    path, ref_out = ref
    base = start_serve()
    before = shard_pids()
    try:
        serve.run(build_app({"model": str(path), "model_name": "tiny", "in_process": True,
                             "device": "cpu", "num_cpus_per_worker": 0.5,
                             "max_kv_tokens": 2048}), name="rs-local", route_prefix="/local")
        wait_ready(base + "/local", 300)
        ids = ref_out[0][0]
        r = httpx.post(base + "/local/v1/completions", timeout=120,
                       json={"model": "tiny", "prompt": ids, "max_tokens": NEW_TOKENS,
                             "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert shard_pids() == before    # no ModelShardWorker actor: the replica holds it
        text = r.json()["choices"][0]["text"]
        llm = LLM(str(path), in_process=True, max_kv_tokens=2048)
        try:
            want = llm.generate([ids], GREEDY)[0]
        finally:
            llm.shutdown()
        assert text == want.text and want.token_ids == ref_out[0][2]
    finally:
        serve.delete("rs-local")
