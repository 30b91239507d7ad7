"""certkv's kernel launches with less host time than ``kernel[grid](...)``, the same compiled kernels.

An eager certified step is host-bound: its six launches and the epilogue's Python take about 0.5 ms of
host time a step on the H100's host (Triton 3.6), against 52 µs of GPU time at B = 1, 8K. Much of a
launch is Triton's generic dispatch around the kernel: the options, a string cache key, and a check of
every global constant the kernel reads against its value at compile time, through ``tl.constexpr``
operators (a third of ``JITFunction.run`` under the profiler).

``launcher(fn)[grid](*args, **kwargs)`` keeps the part that decides which kernel runs. Triton's own
binder specialises the arguments exactly as ``JITFunction.run`` does (types, 16-byte alignment,
integers equal to 1, constexpr values). The first launch of each specialisation goes through
``fn[grid]``, so Triton compiles, checks its globals and launches. It returns the compiled kernel,
which is kept under that specialisation, the options and the debug knobs. Later launches with the
same key run that kernel directly.

A specialisation never seen before always takes Triton's path, so the shortcut can only miss, never
pick another kernel (``tests/test_launch.py`` holds every direct launch to the kernel Triton's own
dispatch names for the same arguments). It assumes that the kernels' global constants do not change
after their first launch; they are module constants that nothing assigns. Under Triton's interpreter
(``TRITON_INTERPRET=1``) every launch takes Triton's path. Measured (``benchmarks/eager_host.py``,
docs/benchmarks.md): the eager step's host time 15-23% lower (medians).
"""

from __future__ import annotations

import functools
from typing import Any

from triton import knobs
from triton.runtime import driver

# set to False to send every launch through Triton's own path (tests compare the two)
ENABLED = True


class Launcher:
    """``fn[grid](...)`` with Triton's specialisation and a cache of the kernels it chose."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.kernels: dict[tuple, Any] = {}
        self.direct = 0  # launches that skipped Triton's dispatch (tests read it)
        # a JITFunction whose per-device cache holds the binder as JITFunction.run unpacks it (kernel
        # cache, key cache, target, backend, binder); the interpreter's stand-in has none
        self.usable = hasattr(fn, "device_caches") and hasattr(fn, "create_binder")

    def __getitem__(self, grid: tuple[int, ...]) -> functools.partial[Any]:
        return functools.partial(self._launch, grid)

    def _launch(self, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> Any:
        if not (ENABLED and self.usable):
            return self.fn[grid](*args, **kwargs)
        device = driver.active.get_current_device()
        *_, binder = self.fn.device_caches[device]
        bound, specialization, options = binder(*args, **kwargs)
        key = (
            device,
            tuple(specialization),
            tuple(options.items()),
            knobs.runtime.debug,
            getattr(knobs.compilation, "instrumentation_mode", None),
        )
        kernel = self.kernels.get(key)
        if kernel is None:
            kernel = self.fn[grid](*args, **kwargs)
            self.kernels[key] = kernel
            return kernel
        stream = driver.active.get_current_stream(device)
        values = bound.values()
        grid3 = (*grid, 1, 1)
        kernel.run(
            grid3[0], grid3[1], grid3[2], stream, kernel.function, kernel.packed_metadata,
            kernel.launch_metadata(grid, stream, *values), knobs.runtime.launch_enter_hook,
            knobs.runtime.launch_exit_hook, *values,
        )  # fmt: skip
        self.direct += 1
        return kernel


_LAUNCHERS: dict[int, Launcher] = {}


def launcher(fn: Any) -> Launcher:
    """The launcher of ``fn`` (one per kernel, kept as long as the process; keyed by identity, since
    hashing a JITFunction hashes its source key on every call)."""
    found = _LAUNCHERS.get(id(fn))
    if found is None or found.fn is not fn:
        found = _LAUNCHERS[id(fn)] = Launcher(fn)
    return found
