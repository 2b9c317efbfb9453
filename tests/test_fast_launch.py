"""kernels._host.FastLaunch on CPU: the arguments it hands the compiled kernel's launcher
(every parameter in the kernel's order, constexprs and defaults included), the key that picks
a compiled kernel (never coarser than triton's specialization), and when it steps aside for
triton's own path. The launch itself is checked against triton's path on a GPU
(tests/test_kernels_gpu.py::test_fast_launch_equals_triton_path)."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from ringserve.kernels import _host
from ringserve.kernels._host import FastLaunch, _spec


def _body(x_ptr, y_ptr, n, stride, scale, BLOCK: tl.constexpr, FLAG: tl.constexpr = 3):
    i = tl.arange(0, BLOCK)
    tl.store(y_ptr + i * stride, tl.load(x_ptr + i, mask=i < n) * scale, mask=i < n)


class _Compiled:
    """Stands for triton's CompiledKernel: records the launcher's calls."""
    function = "fn-handle"
    packed_metadata = ("meta",)

    def __init__(self):
        self.calls = []

    def run(self, *a):
        self.calls.append(a)


class _Jit:
    """A JITFunction's parameters, with `fn[grid](...)` recorded instead of compiled."""
    def __init__(self):
        self.real = JITFunction(_body)          # parses the signature; nothing compiles
        self.params = self.real.params
        self.__name__ = "_body"
        self.slow = []
        self.compiled = _Compiled()

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.slow.append((grid, args, kwargs))
            return self.compiled
        return launch


@pytest.fixture
def compiled_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_host, "_device_and_stream", lambda: (0, 77))
    monkeypatch.setattr(_host, "_hooked", lambda: False)


def test_second_launch_goes_to_the_compiled_launcher_with_every_parameter(compiled_path):
    jit = _Jit()
    fast = FastLaunch(jit)
    x, y = torch.zeros(64), torch.zeros(64)
    fast((4,), x, y, 10, 2, 0.5, BLOCK=64)
    assert len(jit.slow) == 1 and fast.direct == 0       # the first goes through triton
    fast((5, 2), x, y, 12, 2, 1.5, BLOCK=64)
    assert len(jit.slow) == 1 and fast.direct == 1
    (call,) = jit.compiled.calls
    # grid padded to 3-D, the stream, the handle and metadata, no launch metadata or hooks,
    # then every parameter in order: the default of FLAG filled in, BLOCK from the keyword
    assert call[:9] == (5, 2, 1, 77, "fn-handle", ("meta",), None, None, None)
    assert call[9:] == (x, y, 12, 2, 1.5, 64, 3)


def test_a_different_specialization_takes_triton_path(compiled_path):
    jit = _Jit()
    fast = FastLaunch(jit)
    x, y = torch.zeros(64), torch.zeros(64)
    fast((1,), x, y, 10, 2, 0.5, BLOCK=64)
    cases = [
        ((x, y, 16, 2, 0.5), {"BLOCK": 64}),            # n divisible by 16
        ((x, y, 10, 1, 0.5), {"BLOCK": 64}),            # stride == 1
        ((x, y, 10, 2 ** 31, 0.5), {"BLOCK": 64}),      # a 64-bit int
        ((x[1:], y, 10, 2, 0.5), {"BLOCK": 64}),        # a pointer not 16-byte aligned
        ((x.half(), y, 10, 2, 0.5), {"BLOCK": 64}),     # another dtype
        ((x, y, 10, 2, 0.5), {"BLOCK": 32}),            # another constexpr
        ((x, y, 10, 2, 0.5), {"BLOCK": 64, "FLAG": 4}),
        ((x, y, 10, 2, 0.5), {"BLOCK": 64, "num_warps": 8}),   # another launch option
    ]
    for args, kw in cases:
        before = len(jit.slow)
        fast((1,), *args, **kw)
        assert len(jit.slow) == before + 1, (args, kw)
    # values that triton does not specialize on reuse the kernel: another odd n, another float
    fast((1,), x, y, 11, 2, 7.25, BLOCK=64)
    assert fast.direct == 1


def test_call_shapes_each_bind_every_parameter(compiled_path):
    """The same launch written another way (a parameter by keyword instead of position, a
    default given explicitly, keywords in another order) is another call shape with its own
    binding: each reaches the launcher with every parameter in the kernel's order, and a
    missing parameter is refused by name."""
    jit = _Jit()
    fast = FastLaunch(jit)
    x, y = torch.zeros(64), torch.zeros(64)
    shapes = [((x, y, 12, 2, 1.5), {"BLOCK": 64}),
              ((x, y, 12), {"stride": 2, "scale": 1.5, "BLOCK": 64}),
              ((x, y, 12, 2, 1.5), {"FLAG": 3, "BLOCK": 64}),
              ((x, y, 12, 2, 1.5), {"BLOCK": 64, "FLAG": 3, "num_warps": 4})]
    for args, kw in shapes:
        fast((1,), *args, **kw)         # the first of each shape: triton's path
        fast((2,), *args, **kw)         # then the launcher
        assert jit.compiled.calls[-1][9:] == (x, y, 12, 2, 1.5, 64, 3), (args, kw)
    assert fast.direct == len(shapes) and len(fast.plans) == len(shapes)
    with pytest.raises(TypeError, match="missing argument 'BLOCK'"):
        fast((1,), x, y, 12, 2, 1.5)


def test_other_scalar_types_never_share_a_key_with_ints(compiled_path):
    """An argument of another type (a numpy int) is keyed by its type too: a numpy 2 must not
    reuse the kernel compiled for an int multiple of 16, whose key code is 2."""
    import numpy as np

    from ringserve.kernels._host import _args_key
    x = torch.zeros(4)
    assert _args_key([16]) != _args_key([np.int64(2)])
    assert _args_key([x]) != _args_key([x.dtype])        # an aligned tensor's key is its dtype
    jit = _Jit()
    fast = FastLaunch(jit)
    x, y = torch.zeros(64), torch.zeros(64)
    fast((1,), x, y, 16, 2, 0.5, BLOCK=64)
    fast((1,), x, y, np.int64(2), 2, 0.5, BLOCK=64)
    assert fast.direct == 0 and len(jit.slow) == 2        # triton's path, not the 16 kernel


def test_interpreter_and_hooks_always_take_triton_path(monkeypatch):
    jit = _Jit()
    fast = FastLaunch(jit)
    x, y = torch.zeros(64), torch.zeros(64)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for _ in range(3):
        fast((1,), x, y, 10, 2, 0.5, BLOCK=64)
    assert len(jit.slow) == 3 and fast.direct == 0 and not fast.cache
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_host, "_hooked", lambda: True)     # a profiler's launch hook
    jit.slow.clear()
    fast = FastLaunch(jit)
    for _ in range(2):
        fast((1,), x, y, 10, 2, 0.5, BLOCK=64)
    assert len(jit.slow) == 2 and fast.direct == 0


VALUES = [0, 1, 2, 16, 17, -16, -1, 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 16, -2 ** 31, -2 ** 31 - 1,
          2 ** 63 - 1, 2 ** 63, 2 ** 63 + 16, 0.0, 1.0, 2.5, torch.zeros(64), torch.zeros(64)[1:],
          torch.zeros(64)[4:], torch.zeros(64).half(), None, True, False, "ieee"]


def test_key_matches_spec_of_every_argument():
    """The inlined key distinguishes exactly what `_spec` does, argument by argument."""
    from ringserve.kernels._host import _key
    for a in VALUES:
        for b in VALUES:
            same_key = _key([a], [False]) == _key([b], [False])
            same_spec = _spec(a) == _spec(b) and type(a) is type(b)
            assert same_key == same_spec, (a, b)


def test_key_is_never_coarser_than_triton_specialization():
    """Two arguments that triton itself specializes differently (its own specialization
    function: type, 1, divisibility by 16, alignment, i32 / i64 / u64) never share a key: a
    shared key would launch a kernel compiled for the other."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    from ringserve.kernels._host import _key

    def triton_spec(a):
        return native_specialize_impl(BaseBackend, a, False, True, True)

    values = [v for v in VALUES if not isinstance(v, str)]    # a str is only a constexpr
    for a in values:
        for b in values:
            if triton_spec(a) != triton_spec(b):
                assert _key([a], [False]) != _key([b], [False]), (a, b)
    assert _key([32], [True]) != _key([64], [True])         # constexprs by value
    assert len({_key([v], [True]) for v in (1, True, 1.0)}) == 3    # and by type


def test_launch_hooks_are_seen_in_triton_hook_chain(monkeypatch):
    """triton >= 3.4 keeps launch hooks in a HookChain that is never None: a set hook (a
    profiler's) must route launches through triton's path, an empty chain must not."""
    from triton import knobs
    assert not _host._hooked()

    def hook(*a):
        pass
    chain = knobs.runtime.launch_enter_hook
    if hasattr(chain, "add"):
        for c in (chain, knobs.runtime.launch_exit_hook):    # either hook counts
            c.add(hook)
            try:
                assert _host._hooked()
            finally:
                c.remove(hook)
            assert not _host._hooked()
    else:
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", hook)
        assert _host._hooked()
        monkeypatch.undo()
    assert not _host._hooked()


def test_direct_launch_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(_host, "_device_and_stream", lambda: (0, 77))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("RINGSERVE_DIRECT_LAUNCH", "0")
    jit = _Jit()
    fast = FastLaunch(jit)
    x, y = torch.zeros(64), torch.zeros(64)
    for _ in range(3):
        fast((1,), x, y, 10, 2, 0.5, BLOCK=64)
    assert len(jit.slow) == 3 and fast.direct == 0
    monkeypatch.setenv("RINGSERVE_DIRECT_LAUNCH", "1")   # read at a kernel's first launch
    jit = _Jit()
    fast = FastLaunch(jit)
    for _ in range(2):
        fast((1,), x, y, 10, 2, 0.5, BLOCK=64)
    assert len(jit.slow) == 1 and fast.direct == 1


def test_a_launcher_that_rejects_the_call_falls_back_for_good(compiled_path):
    jit = _Jit()

    def bad_run(*a):
        raise TypeError("launcher takes other arguments")
    jit.compiled.run = bad_run
    fast = FastLaunch(jit)
    x, y = torch.zeros(64), torch.zeros(64)
    fast((1,), x, y, 10, 2, 0.5, BLOCK=64)
    with pytest.warns(UserWarning, match="direct launch of _body failed"):
        fast((1,), x, y, 10, 2, 0.5, BLOCK=64)
    assert fast.broken and len(jit.slow) == 2
    fast((1,), x, y, 10, 2, 0.5, BLOCK=64)
    assert len(jit.slow) == 3


def test_missing_argument_is_named(compiled_path):
    fast = FastLaunch(_Jit())
    with pytest.raises(TypeError, match="missing argument 'BLOCK'"):
        fast((1,), torch.zeros(4), torch.zeros(4), 1, 1, 1.0)


def test_spec_of_a_tensor_descriptor():
    from triton.tools.tensor_descriptor import TensorDescriptor
    t = torch.zeros(64, 32, dtype=torch.float16)
    a = _spec(TensorDescriptor(t, [64, 32], [32, 1], [16, 32]))
    assert a == _spec(TensorDescriptor(t, [64, 32], [32, 1], [16, 32]))
    assert a != _spec(TensorDescriptor(t, [64, 32], [32, 1], [32, 32]))    # another block
    assert a != _spec(TensorDescriptor(t, [60, 32], [32, 1], [16, 32]))    # rows % 16
    assert triton.__version__      # the triton whose JITFunction parsed _body above
