"""benchmarks/bench_serving.py on CPU (a tiny model over the test session's Ray): every scenario
but the 4K-prompt one runs and writes its figures, so a GPU call never finds the script broken;
and the compile-cause diff it prints for compiles after the warm-up."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _module():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_serving", BENCH / "bench_serving.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def test_compile_causes_name_what_changed_in_the_cache_key():
    mod = _module()
    events = [(1.0, "k[w=4] (('i32', 'D'), ('i32', 'D')) {'C': True}"),
              (2.0, "k[w=4] (('i32', 'D'), ('i32', '1')) {'C': True}"),   # after the warm-up
              (3.0, "other[w=4] (x)")]
    causes = mod.compile_causes(events, since=1.5)
    assert len(causes) == 2 and causes[1] == "no earlier compile of this kernel"
    assert causes[0].startswith("#3: 'D'))") and "-> '1'))" in causes[0]   # one part changed
    assert ";" not in causes[0]


def test_bench_serving_runs_on_cpu(ray_session, tmp_path):
    mod = _module()
    out = tmp_path / "serving.json"
    rc = mod.main(["--device", "cpu", "--preset", "tiny", "--doc-len", "256",
                   "--prefill-len", "512", "--out-tokens", "4", "--stream-tokens", "16",
                   "--concurrency", "1,2", "--budgets", "128,128:1", "--attn-equiv", "2000",
                   "--scenarios", "single,concurrent,prefill", "--async-scheduling",
                   "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["features"] == {"cuda_graphs": False, "fused_kernels": False}
    assert [r["n"] for r in res["concurrent"]["rows"]] == [1, 2]
    for r in res["concurrent"]["rows"]:   # the engine thread's time step by step
        sp = r["engine_ms_spread"]
        assert 0 <= sp["schedule_median"] <= sp["schedule_max"]
        assert 0 <= sp["update_median"] <= sp["update_max"]
        # where each step's round trip went: stamps of the engine and rank 0 paired one to one
        rt = r["round_trip_ms"]
        assert rt is not None and rt["pairs"] >= r["steps"] and rt["execute"] > 0, rt
        assert rt["to_worker"] > 0 and rt["back"] > 0, rt
        assert rt["worker_idle"] is not None and rt["worker_idle"] >= 0, rt
    assert res["single"]["length"] == 256 and res["single"]["decode_ms"] > 0
    row = res["prefill"]["budgets"][0]
    assert row["budget"] == 128 and row["steps"] > 1 and row["prefill_x"] > 0
    # --async-scheduling: the decode steps were planned while the step before ran
    assert res["args"]["async_scheduling"] and res["async_scheduling"] is True
    assert row["stats"]["steps_planned_ahead"] > 0
    # B:k: the second run interleaves one decode-only step after each mixed step, and the
    # engine's own setting (0) is back afterwards
    assert [r["interleave_decode_steps"] for r in res["prefill"]["budgets"]] == [0, 1]
    for r in res["prefill"]["budgets"]:
        gp = r["gaps_ms"]
        assert not gp or 0 < gp["p50"] <= gp["p90"] <= gp["max"], gp
    # the streams alone: a steady window (16 tokens a stream: 8 to start, then 7)
    assert 0 < res["prefill"]["itl_solo_ms"] < 1e4 and row["itl_x"] > 0
    # --attn-equiv: the cost model swept (the CPU engine counts tokens: its own E is None)
    assert row["attn_equiv"] == 2000.0 and res["prefill"]["attn_equiv_default"] is None
    # the 512-token prompt's chunks by cached prefix: every quarter seen, the chunk steps of
    # the prompt (and of the short request riding beside it) all counted
    bins = row["by_prefix"]
    assert [b["prefix"] for b in bins] == ["0-128", "128-256", "256-384", "384-end"]
    assert sum(b["steps"] for b in bins) >= 512 // 128
    assert all(b["step_ms"] > 0 and b["chunk_tokens"] >= 1 for b in bins)
    assert res["stats"]["requests_failed"] == 0
    assert res["compiles_after_warmup"] == [] and res["compile_causes"] == []


def test_bench_serving_with_the_worker_in_process(tmp_path):
    """--in-process: the same scenarios with LLM(in_process=True) (no Ray actor), its
    round-trip stamps paired as through an actor."""
    out = tmp_path / "serving.json"
    rc = _module().main(["--device", "cpu", "--preset", "tiny", "--doc-len", "256",
                         "--out-tokens", "4", "--stream-tokens", "16", "--concurrency", "2",
                         "--scenarios", "single,concurrent", "--in-process",
                         "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["args"]["in_process"] is True and res["single"]["decode_ms"] > 0
    (r,) = res["concurrent"]["rows"]
    assert r["n"] == 2 and r["round_trip_ms"]["pairs"] >= r["steps"], r


@pytest.mark.parametrize("bad", ["12:x", "0", "128:-1"])
def test_bench_serving_refuses_bad_budgets(bad):
    """--budgets items are B or B:k with B >= 1 and k >= 0: anything else is a usage error
    before Ray or a model starts."""
    with pytest.raises(SystemExit) as e:
        _module().main(["--device", "cpu", "--budgets", bad])
    assert e.value.code == 2
