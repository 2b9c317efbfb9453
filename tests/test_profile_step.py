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
