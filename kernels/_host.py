"""Host-side launch arithmetic for the kernel wrappers, and `FastLaunch`, their launch path.

A mixed serving step launches ~400 kernels from Python and is host-bound on an H200 (session 8:
the last kernel is queued when the device finishes). triton.cdiv and triton.next_power_of_2 are
constexpr functions on triton >= 3.5: called from host code each goes through argument
unwrapping (~1,100 such calls a step, a few ms). These are plain-int equivalents, and the
device queries, which the wrappers asked on every launch, are asked once per device.
`FastLaunch` calls a compiled kernel's launcher directly once triton has compiled and launched
that specialization (triton's own per-launch Python was a third of the step's host time).
"""
from __future__ import annotations

import functools
import operator
import os
from typing import Optional

import torch


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for ints (triton.cdiv)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n, 0 for n <= 0 (triton.next_power_of_2 on n >= 0)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _props(device: torch.device):
    return torch.cuda.get_device_properties(device)


def sm_count(device: torch.device) -> int:
    """The device's multiprocessor count, queried once."""
    return _props(device).multi_processor_count


def major_capability(device: torch.device) -> int:
    """The device's compute capability major number, queried once."""
    return _props(device).major


# ---- launching a compiled kernel without triton's per-launch Python ----

_I32 = (-(1 << 31), (1 << 31) - 1)
_U64 = 1 << 63      # from here triton types an int u64 (below, out of int32: i64)
MAX_KEYS = 4096     # compiled kernels kept per kernel (past it, new keys take triton's path)


def _spec(a):
    """What triton may specialize a launch argument on, or finer (a finer key only costs a
    lookup through triton's own path, never a wrong kernel): a tensor's dtype and 16-byte
    alignment; an int's being 1, a multiple of 16, and its width (i32 / i64 / u64); a float by type (triton
    never specializes float values); a tensor descriptor's element type, block, and the
    alignment of its base, shape and strides; anything else (constexpr values, None,
    bools) by value."""
    t = type(a)
    if t is int:
        return (a == 1, not a & 15, _I32[0] <= a <= _I32[1], a >= _U64)
    if t is bool:
        return ("i1", a)
    if t is float:
        return float
    if isinstance(a, torch.Tensor):
        return (a.dtype, not a.data_ptr() & 15)
    base = getattr(a, "base", None)
    if isinstance(base, torch.Tensor):            # a host TensorDescriptor
        return (base.dtype, not base.data_ptr() & 15, tuple(a.block_shape),
                tuple(not int(s) & 15 for s in a.shape), tuple(not int(s) & 15
                                                             for s in a.strides),
                str(getattr(a, "padding", "")))
    return a


def _args_key(vals) -> tuple:
    """The key of a launch's non-constexpr arguments, each by `_spec`, inlined for the common
    types (a function call per argument was most of the key's cost): an aligned tensor is its
    dtype alone (no tuple made), an int one small code."""
    out = []
    app = out.append
    T = torch.Tensor
    for a in vals:
        t = type(a)
        if t is T:
            app(a.dtype if not a.data_ptr() & 15 else (a.dtype, 1))
        elif t is int:
            app((1 if a == 1 else 0 if a & 15 else 2)
                + (0 if -2147483648 <= a <= 2147483647 else 8 if a >= _U64 else 4))
        elif t is float:
            app(float)
        elif isinstance(a, T):
            app(a.dtype if not a.data_ptr() & 15 else (a.dtype, 1))
        elif t is bool:     # an i1 argument: never equal to an int's code (True == 1)
            app(("i1", a))
        else:               # tagged by type: never equal to an int's code or a bare dtype
            app((t, _spec(a)))   # (a numpy int 2 must not reuse the kernel of n % 16 == 0)
    return tuple(out)


def _const_key(vals: tuple) -> tuple:
    """Constexprs by type and value (True == 1 == 1.0 in Python), at C speed."""
    return vals, tuple(map(type, vals))


def _key(full, constexpr) -> tuple:
    """The launch key of `full` (every parameter's value) given which are constexprs."""
    return (_args_key([a for a, c in zip(full, constexpr) if not c]),
            _const_key(tuple(a for a, c in zip(full, constexpr) if c)))


def _getter(idx):
    """A C-speed function of a sequence returning the items at `idx` as a tuple (itemgetter
    returns a bare item for one index, and refuses none)."""
    if not idx:
        return lambda _x: ()
    if len(idx) == 1:
        i = idx[0]
        return lambda x: (x[i],)
    return operator.itemgetter(*idx)


class _CallPlan:
    """How one call shape (number of positional arguments, keyword names in order) maps onto
    the kernel's parameters, worked out once: where the rest of the parameters come from, which
    keywords are launch options, which parameters are constexprs."""
    __slots__ = ("tail", "opts", "nonconst", "const")

    def __init__(self, launcher: "FastLaunch", nargs: int, kwnames: tuple):
        names = launcher.names
        tail = names[nargs:]
        missing = [n for n in tail if n not in kwnames and n not in launcher.defaults]
        if missing:
            raise TypeError(f"{launcher.fn.__name__}: missing argument {missing[0]!r}")
        if all(n in kwnames for n in tail):
            self.tail = _getter(tail)
        else:
            d = launcher.defaults
            self.tail = lambda kw, tail=tail, d=d: tuple(kw[n] if n in kw else d[n]
                                                         for n in tail)
        self.opts = _getter([k for k in kwnames if k not in launcher.params])
        flags = launcher.constexpr
        self.nonconst = _getter([i for i, c in enumerate(flags) if not c])
        self.const = _getter([i for i, c in enumerate(flags) if c])


class FastLaunch:
    """`FastLaunch(jit_fn)(grid, *args, **kwargs)` launches like `jit_fn[grid](*args,
    **kwargs)`. The first launch of a specialization goes through triton (compiling it if
    needed) and keeps the compiled kernel under a key of the arguments' `_spec` and the
    keyword arguments; later launches with that key call the compiled kernel's launcher
    directly. Triton's own launch path (argument binding, the cache-key string, knob and
    device look-ups: about a third of a mixed serving step's host time under cProfile in
    session 8) is skipped.

    Not under TRITON_INTERPRET (the interpreter has no compiled kernels), nor with
    RINGSERVE_DIRECT_LAUNCH=0 (both read at a kernel's first launch): there every call is
    `jit_fn[grid](...)`. While a launch hook is set (a profiler's
    knobs.runtime.launch_enter_hook) triton's path runs, so the hook sees every launch. If the
    direct call fails for a reason other than the arguments (a triton whose launcher differs),
    the instance warns once and takes triton's path from then on. Measured on an H200 (session
    9, one call): the late mixed serving step 69.6 ms through triton's path, 49.5 ms direct."""

    def __init__(self, fn):
        self.fn = fn
        self.names: Optional[list] = None      # the kernel's parameters, read at first use
        self.constexpr: list = []
        self.params: set = set()
        self.defaults: dict = {}
        self.cache: dict = {}
        self.broken: Optional[str] = None
        self.direct = 0     # launches that took the direct path (tests, benchmarks)
        self.off: Optional[bool] = None
        self.plans: dict = {}   # (positional count, keyword names) -> _CallPlan

    def _full_args(self, args, kwargs) -> list:
        """Every parameter's value in the kernel's order (the compiled launcher's arguments,
        constexprs included, as triton binds them)."""
        if self.names is None:
            params = self.fn.params
            names = [p.name for p in params]
            self.constexpr = [p.is_constexpr for p in params]
            self.params = set(names)
            self.defaults = {p.name: p._param.default for p in params
                             if p._param.default is not p._param.empty}
            self.names = names      # last: a thread that sees it sees the rest
        full = list(args)
        for name in self.names[len(args):]:
            if name in kwargs:
                full.append(kwargs[name])
            elif name in self.defaults:
                full.append(self.defaults[name])
            else:
                raise TypeError(f"{self.fn.__name__}: missing argument {name!r}")
        return full

    def __call__(self, grid, *args, **kwargs):
        if self.off is None:    # the environment, read once per kernel
            self.off = _interpreting() or _disabled()
        if self.off or self.broken is not None or _hooked():
            return self.fn[grid](*args, **kwargs)
        if self.names is None:
            self._full_args(args, kwargs)       # reads the kernel's parameters
        shape = (len(args), tuple(kwargs))
        plan = self.plans.get(shape)
        if plan is None:
            plan = self.plans[shape] = _CallPlan(self, *shape)
        full = args + plan.tail(kwargs)
        device, stream = _device_and_stream()
        # constexprs by type and value, the rest by what triton specializes them on; the
        # launch options (num_warps, ...) by name (the call shape) and value; the device (a
        # compiled kernel's function handle belongs to one)
        key = (shape, _args_key(plan.nonconst(full)), _const_key(plan.const(full)),
               plan.opts(kwargs), device)
        kernel = self.cache.get(key)
        if kernel is None:
            kernel = self.fn[grid](*args, **kwargs)
            if (kernel is not None and hasattr(kernel, "packed_metadata")
                    and len(self.cache) < MAX_KEYS):
                self.cache[key] = kernel
            return kernel
        n = len(grid)
        try:
            kernel.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream,
                       kernel.function, kernel.packed_metadata, None, None, None, *full)
        except (TypeError, AttributeError) as e:
            import warnings
            self.broken = f"{type(e).__name__}: {e}"[:300]
            warnings.warn(f"direct launch of {self.fn.__name__} failed ({self.broken}); using "
                          f"triton's launch path from now on", stacklevel=2)
            return self.fn[grid](*args, **kwargs)
        self.direct += 1
        return kernel


def _device_and_stream():
    """The current CUDA device and its current stream's handle (a graph capture's stream
    while capturing), as triton's launch path asks for them."""
    device = torch.cuda.current_device()
    return device, torch._C._cuda_getCurrentRawStream(device)


_RUNTIME_KNOBS = []     # triton.knobs.runtime, looked up once


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _disabled() -> bool:
    """RINGSERVE_DIRECT_LAUNCH=0: every launch takes triton's path (a same-run comparison, or
    a triton whose compiled kernels launch differently)."""
    return os.environ.get("RINGSERVE_DIRECT_LAUNCH", "1") in ("0", "false", "no")


def _hooked() -> bool:
    """Whether a launch hook (enter or exit) is set. triton >= 3.4 keeps them in a HookChain (never None: its
    `calls` list is empty when there are none); older tritons hold one callable or None."""
    if not _RUNTIME_KNOBS:
        try:
            from triton import knobs
            _RUNTIME_KNOBS.append(knobs.runtime)
        except ImportError:     # a triton without knobs: no hooks to honour
            _RUNTIME_KNOBS.append(None)
    rt = _RUNTIME_KNOBS[0]
    if rt is None:
        return False
    for hook in (rt.launch_enter_hook, getattr(rt, "launch_exit_hook", None)):
        if hook is not None:
            calls = getattr(hook, "calls", None)
            if not isinstance(calls, list) or calls:
                return True
    return False
