"""benchmarks/bench_structured.py on CPU (a tiny model over the test session's Ray, CUDA graphs
emulated): the GPU call's sequence of cases (plain, then masked, at batch 2 and 1, eager and
through graphs) runs with no worker failure and writes its table, so a GPU call never finds
the script or the masked path broken. Its batch-1 masked case after graph steps failed its
step on the H200 (session 8: the masks' host buffer made inside inference mode)."""
import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _module():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_structured",
                                                      BENCH / "bench_structured.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def test_bench_structured_runs_on_cpu(ray_session, tmp_path):
    mod = _module()
    out = tmp_path / "structured.json"
    rc = mod.main(["--device", "cpu", "--preset", "tiny", "--batches", "1,2", "--graphs", "0,1",
                   "--vocab", "2000", "--out-tokens", "24", "--prompt-len", "48",
                   "--mask-threads", "1,2", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    got = {(c["graphs"], c["batch"], c["case"]) for c in res["cases"]}
    assert got == {(g, b, c) for g in (False, True) for b in (1, 2)
                   for c in ("plain", "json_schema", "plain_again")}
    assert len(res["table"]) == 4 and all(r[2] > 0 and r[3] > 0 for r in res["table"])
    assert res["mask_host_us_batch1"] > 0 and res["mask_host_us_batch2"] > 0
    assert set(res["mask_host_us_by_threads"]) == {"1", "2"} and res["mask_threads"] >= 1
