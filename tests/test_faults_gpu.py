"""GPU faults: two shard actors on two GPUs joined by NCCL (cupy), the tiny Llama in bf16.

- `ray.kill` of rank 1 during a decode (once tokens stream): WorkerFailedError within a bound,
  new actors and a new NCCL communicator, the next request equals a fresh run;
- a hung peer (SIGSTOP of rank 1's process) during a decode: rank 0's NCCL all-gather wait passes
  `transport_timeout_s`, the broken communicator is aborted (not destroyed, which would wait for
  the peer forever), the group is rebuilt, the next request equals a fresh run.

Starts its own Ray without the CPU suite's TRITON_INTERPRET, as tests/test_llm_gpu.py does.
Run on a host with two GPUs: python -m pytest -q tests/test_faults_gpu.py
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from tinymodels import tiny_model

pytestmark = [pytest.mark.multigpu, pytest.mark.timeout(600)]

SEED = random.SystemRandom().randrange(1 << 30)
TRANSPORT_TIMEOUT_S = 5.0
FAIL_BOUND_S = 120.0


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    ray = pytest.importorskip("ray")
    from ringserve import LLM

    path = tiny_model(tmp_path_factory, "llama")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
    llm = LLM(str(path), world_size=2, device="cuda", max_kv_tokens=16384,
              transport_timeout_s=TRANSPORT_TIMEOUT_S)
    try:
        yield llm
    finally:
        llm.shutdown()
        if started:
            ray.shutdown()


def _greedy(n: int):
    from ringserve import SamplingParams
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _state(llm):
    health = llm._group.health()
    return [h["pid"] for h in health], [h["transport"] for h in health]


def _stream_until_error(llm, prompt, on_token, at: int):
    """Stream a long greedy decode; call on_token() once `at` tokens arrived; return (tokens
    seen, the error raised, seconds from on_token to the error)."""
    from ringserve.errors import WorkerFailedError

    got, t0 = [], None
    with pytest.raises(WorkerFailedError) as e:
        for item in llm.stream(prompt, _greedy(12000)):
            got.append(item.token_id)
            if len(got) == at:
                t0 = time.monotonic()
                on_token()
    return got, e.value, time.monotonic() - t0


def test_nccl_kill_during_decode(llm):
    import ray

    rng = random.Random(SEED)
    prompt = [rng.randrange(300) for _ in range(rng.randint(500, 3000))]
    fresh = llm.generate(prompt, _greedy(16))[0].token_ids
    pids, transports = _state(llm)
    assert transports == ["NcclTransport"] * 2
    victim = llm._group.actors[1]
    got, err, took = _stream_until_error(
        llm, prompt, lambda: threading.Thread(target=ray.kill, args=(victim,)).start(), 8)
    assert took < FAIL_BOUND_S and got[:16] == fresh[:len(got[:16])]
    assert llm.generate(prompt, _greedy(16))[0].token_ids == fresh
    new_pids, transports = _state(llm)
    assert not set(new_pids) & set(pids) and transports == ["NcclTransport"] * 2
    print(f"GPU kill during decode: WorkerFailedError after {took:.1f} s: {str(err)[:160]}")


def test_nccl_hung_peer_times_out(llm):
    rng = random.Random(SEED + 1)
    prompt = [rng.randrange(300) for _ in range(rng.randint(500, 3000))]
    fresh = llm.generate(prompt, _greedy(16))[0].token_ids
    pids, _ = _state(llm)
    try:
        got, err, took = _stream_until_error(
            llm, prompt, lambda: os.kill(pids[1], signal.SIGSTOP), 8)
    finally:
        try:
            os.kill(pids[1], signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert "TransportTimeoutError" in str(err) or "timed out" in str(err).lower(), str(err)
    assert TRANSPORT_TIMEOUT_S <= took < FAIL_BOUND_S
    assert llm.generate(prompt, _greedy(16))[0].token_ids == fresh
    new_pids, transports = _state(llm)
    assert not set(new_pids) & set(pids) and transports == ["NcclTransport"] * 2
    print(f"GPU hung peer: WorkerFailedError after {took:.1f} s: {str(err)[:160]}")
