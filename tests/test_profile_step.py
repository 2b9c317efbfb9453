"""benchmarks/profile_step.py on CPU (tiny model, in-process worker): it runs through the decode
batches, the prefill with and without decodes beside it, and the profile of a late mixed step,
so the GPU call that needs it never finds it broken."""
import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _profile_step():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("profile_step", BENCH / "profile_step.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def test_profile_step_cpu_smoke(capsys):
    _profile_step().main(["--device", "cpu", "--preset", "tiny", "--doc-len", "256", "--prefill-len", "512",
              "--budget", "96", "--kv-tokens", "1600"])  # holds one 512-token document at a
    # time beside the streams: a script that keeps every prefilled one fails with CapacityError
    out = capsys.readouterr().out
    for n in (1, 8, 16):
        assert f"decode batch {n:3d}: step" in out
    assert "prefill 512 with 0 decodes" in out and "prefill 512 with 8 decodes" in out
    assert "profiled mixed step (8 decodes + a chunk of " in out
    assert "mixed steps with a chunk in 384..512" in out


def test_profile_step_late_only_reports_the_timeline(capsys):
    """--late-only (the GPU calls' form) with --at: the profile of a chunk's step at that
    point of the prompt, the step times and the worker's step timeline (wall, all kernels
    queued, device span) of the chunks after it."""
    _profile_step().main(["--device", "cpu", "--preset", "tiny", "--doc-len", "256", "--prefill-len", "1024",
              "--budget", "128", "--kv-tokens", "2400", "--late-only", "--torch-threads", "1",
              "--python-profile", "2", "--at", "0.25"])
    out = capsys.readouterr().out
    assert "torch threads 1" in out
    assert "decode batch" not in out and "with 8 decodes" not in out     # skipped
    # --at 0.25: an early chunk (256 of 1024) is profiled, and the step times and timeline
    # are those of the chunks starting in 256..512
    assert "profiled mixed step (8 decodes + a chunk of " in out
    prof = [x for x in out.splitlines() if x.startswith("profiled mixed step")][0]
    assert 256 <= int(prof.split(" tokens at ")[1].split(")")[0]) < 512, prof
    assert "mixed steps with a chunk in 256..512" in out
    line = [x for x in out.splitlines() if x.startswith("[in-process] timeline")]
    assert line and "with a chunk in 256..512" in line[0], out[-2000:]
    assert "all kernels queued at" in line[0]
    assert "[in-process] python profile: 2 steps profiled" in out


def test_profile_step_single_passes_and_the_kind_table(capsys, tmp_path):
    """--single with --passes: only the named prefills run (the profiled one last, its
    trace written and summed by kind: no CUDA kernels on CPU); an unknown pass is refused."""
    import pytest
    trace = tmp_path / "t.json"
    _profile_step().main(["--device", "cpu", "--preset", "tiny", "--single", "600",
                          "--passes", "one,profiled", "--trace", str(trace)])
    out = capsys.readouterr().out
    assert "budget 4194304 x1: 600 tokens in" in out and "1 steps" in out
    assert "(under the profiler): 600 tokens in" in out
    assert "budget 2100 x16: 600" not in out                     # the chunked pass skipped
    assert trace.exists() and "device busy 0 ms" in out and "GEMM FLOPs" in out
    with pytest.raises(SystemExit, match="unknown pass 'x'"):
        _profile_step().main(["--device", "cpu", "--preset", "tiny", "--single", "600",
                              "--passes", "one,x"])


def test_trace_category_totals(tmp_path):
    """trace_kernels.category_totals: kernels summed by kind (first matching name wins: a
    merge kernel is not attention), the busy time as the union of overlapping intervals."""
    import json
    sys.path.insert(0, str(BENCH))
    try:
        from trace_kernels import category_totals, kind_of
    finally:
        sys.path.remove(str(BENCH))
    ev = [{"cat": "kernel", "name": n, "ts": ts, "dur": d, "args": {}} for n, ts, d in (
        ("_flash_fwd_gluon_kernel", 0, 100), ("nvjet_sm90_tst_256x128", 50, 100),
        ("_merge_splits_kernel", 300, 10), ("_rms_norm_kernel", 400, 5),
        ("void at::native::elementwise_kernel<>", 400, 2))]
    ev.append({"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1000})
    p = tmp_path / "t.json"
    p.write_text(json.dumps({"traceEvents": ev}))
    tot = category_totals(str(p))
    assert {k: v[0] for k, v in tot["kinds"].items()} == {
        "attention": 1, "gemm": 1, "merge": 1, "norm/rope/act": 1, "other": 1}
    assert tot["busy_ms"] == (150 + 10 + 5) / 1e3 and tot["span_ms"] == 405 / 1e3
    assert kind_of("_merge_splits_kernel") == "merge" and kind_of("nvjet_x") == "gemm"
