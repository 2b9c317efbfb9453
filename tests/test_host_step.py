"""benchmarks/host_step.py on CPU: the host-only measure of a mixed step runs (Triton launches
stubbed at the compiled launcher, FastLaunch's own work kept), stubs every FastLaunch of the
kernels, and keeps decoding streams beside the chunked prompt, so the GPU-free measurement the
next host cut needs never finds the script broken."""
import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_host_step_cpu_smoke(capsys):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("host_step", BENCH / "host_step.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        assert mod.main(["--layers", "2", "--doc-len", "512", "--prefill-len", "2048",
                         "--streams", "3", "--budget", "128", "--late", "5",
                         "--profile", "2", "--count-ops", "2"]) == 0
    finally:
        sys.path.remove(str(BENCH))
    out = capsys.readouterr().out
    # the fused path's kernels (norm, RoPE + store, act * up, flash, paged decode split and
    # reduce, the two merges) are all stubbed
    import re
    assert int(re.search(r"(\d+) kernels stubbed", out).group(1)) >= 9
    assert "late mixed step (last 5" in out and "without them" in out
    assert "cProfile of 2 steps" in out and "_forward_fused" in out
    n = int(re.search(r"aten ops per late mixed step: (\d+) \(over 2 steps\)", out).group(1))
    assert n > 20 and "empty" in out     # 2 layers: a few dozen ops, allocations among them


def test_host_step_leaves_the_kernels_as_they_were():
    """The stubs are undone when the script returns: a kernel launched afterwards in the same
    process (the test session) computes again."""
    import torch

    from ringserve.kernels import _host
    from ringserve.kernels.fused import rms_norm_triton
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("host_step", BENCH / "host_step.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        stream, hooked = _host._device_and_stream, _host._hooked
        n, undo = mod.stub_launches()
        assert n >= 9
        undo()
    finally:
        sys.path.remove(str(BENCH))
    assert (_host._device_and_stream, _host._hooked) == (stream, hooked)
    x, w = torch.randn(3, 32), torch.randn(32)
    y = rms_norm_triton(x, w, 1e-5)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    assert torch.allclose(y, ref, atol=1e-5)
