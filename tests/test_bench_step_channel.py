"""benchmarks/bench_step_channel.py on CPU with real Ray actors: both step channels decode the
same tokens at world sizes 1 and 2 (the script asserts it; `LLM(step_channel=...)` picks the
channel, the script asserts that too), and the table comes out, so the
measurement behind the compiled step channel never finds the script broken."""
import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_bench_step_channel_cpu_smoke(ray_session, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_step_channel",
                                                  BENCH / "bench_step_channel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    assert mod.main(["--world-sizes", "1,2", "--tokens", "12", "--repeats", "1",
                     "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["world_size"], r["channel"]) for r in rows} == {
        (1, "tasks"), (1, "compiled"), (2, "tasks"), (2, "compiled")}
    assert all(r["ms_per_token"] > 0 for r in rows)
    assert "compiled ms/token" in capsys.readouterr().out
