"""benchmarks/profile_decode.py on CPU (tiny model, emulated graphs): it runs, the eager, graph
and pipelined paths give the same greedy tokens, and the profile of one step is filled in."""
import importlib.util
import json
from pathlib import Path


def _script():
    """benchmarks/profile_decode.py as a module."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_decode.py"
    spec = importlib.util.spec_from_file_location("profile_decode", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_profile_decode_cpu_smoke(tmp_path):
    mod = _script()
    out = tmp_path / "p.json"
    rc = mod.main(["--preset", "tiny", "--device", "cpu", "--lengths", "200,333", "--steps", "6",
                   "--page-size", "16", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["length"] for r in rows] == [200, 333]
    for r in rows:
        assert r["same_tokens"] and len(r["eager"]["tokens"]) == 6
        assert r["eager"]["ms_per_token"] > 0 and r["graphs"]["ms_per_token"] > 0
        assert r["profile"]["aten_ops"] > 100 and r["profile"]["host_ms"] > 0
        # the pipelined row (the served engine's launch / finish, in-process) really was:
        # the worker queued its steps behind the ones in flight, and drew the same tokens
        assert r["pipelined"]["ms_per_token"] > 0 and r["pipelined_launches"] >= 6
        assert r["pipelined"]["tokens"] == r["eager"]["tokens"]


def test_profile_decode_batch_cpu_smoke(tmp_path):
    """--batch: questions decoding together on the cached document (the cascade path), the
    same tokens eager and through graphs, per question."""
    mod = _script()
    out = tmp_path / "p.json"
    trace = tmp_path / "trace.json"
    rc = mod.main(["--preset", "tiny", "--device", "cpu", "--lengths", "150", "--steps", "5",
                   "--page-size", "16", "--batch", "3", "--host-sample",
                   "--pipeline-trace", str(trace), "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())["rows"][0]
    assert r["batch"] == 3 and r["same_tokens"]
    assert len(r["graphs"]["tokens"]) == 3 and all(len(t) == 5 for t in r["graphs"]["tokens"])
    assert r["profile"]["aten_ops"] > 100
    # the engine thread's steady state per mode, and the worker's calls in the pipelined one
    for mode in ("eager", "graphs", "pipelined"):
        e = r["engine"][mode]
        assert e["decode_steps"] >= 4 and e["period_ms"] > 0 and e["schedule_ms"] > 0
        assert r[mode]["median_ms"] <= r[mode]["worst_ms"]
    calls = r["engine"]["pipelined"]["worker_calls"]
    assert calls["launch"][0] >= 5 and calls["finish"][0] >= 5
    # the host sampler saw the engine thread; the pipelined mode's trace was written
    assert r["host_sample"]["samples"] > 0 and r["host_sample"]["ringserve"]
    assert "device_busy" in r["pipeline_trace"] and trace.exists()
