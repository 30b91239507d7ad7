"""certkv.kernels.launch on CUDA: launches that skip Triton's dispatch run the kernel Triton itself
would choose for their arguments, and the step they serve is bit for bit that of Triton's own
launches. (Under the interpreter every launch takes Triton's path: the CPU suites cover that.)"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from certkv.kernels import decode, epilogue, launch
from certkv.kernels.decode import from_cache

from certkv.streaming import BOUND_FIELDS, STAGE0_COUNTS, kernel_step, serving_launch
from tests.helpers import make_q
from tests.test_streaming import SCALE, cache_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

KERNELS = [decode._decode_kernel, epilogue._scales_kernel, epilogue._blocks_kernel, epilogue._bins_kernel,
           epilogue._edges_kernel, epilogue._final_kernel]  # fmt: skip


def step_inputs(b, n, dtype, seed, misaligned=False):
    cache = cache_of(b, 2, n, dtype, seed=seed)
    q = make_q(b=b, hq=8, d=128, dtype=dtype, seed=seed + 1, scale=2.0).cuda().reshape(b, 2, 4, 128)
    if misaligned:  # the same query 2 bytes past a 16-byte boundary: another specialisation
        buf = torch.empty(q.numel() + 8, dtype=dtype, device="cuda")
        q = buf[1 : 1 + q.numel()].view(q.shape).copy_(q)
        assert q.data_ptr() % 16
    st = cache._layers[0]
    return q, from_cache(cache, 0), SCALE, st.v_min, st.v_max


def assert_same_step(a, b):
    assert torch.equal(a[0], b[0])
    for name in (*BOUND_FIELDS, *STAGE0_COUNTS, "tolerance", "accepted"):
        assert torch.equal(getattr(a[1], name), getattr(b[1], name)), name


def test_direct_launches_serve_the_step_of_tritons_own_launches_bit_for_bit(monkeypatch):
    args = step_inputs(2, 700, torch.float16, seed=3)
    monkeypatch.setattr(launch, "ENABLED", False)
    ref = kernel_step(*args)
    monkeypatch.setattr(launch, "ENABLED", True)
    first = kernel_step(*args)
    before = [launch.launcher(fn).direct for fn in KERNELS]
    again = kernel_step(*args)
    after = [launch.launcher(fn).direct for fn in KERNELS]
    assert [y - x for x, y in zip(before, after, strict=True)] == [1] * len(KERNELS)  # every launch direct
    assert_same_step(first, ref)
    assert_same_step(again, ref)


@pytest.mark.parametrize(
    "b, n, dtype, misaligned, splits",
    [(1, 700, torch.float16, False, None), (2, 1500, torch.bfloat16, False, None),
     (1, 700, torch.float16, True, None), (1, 900, torch.float16, False, 1), (3, 260, torch.float16, False, 16)],
)  # fmt: skip
def test_each_direct_launch_runs_the_kernel_triton_would_choose(monkeypatch, b, n, dtype, misaligned, splits):
    # beside every direct launch, Triton's own dispatch (warmup: specialise and look up, no launch) for the
    # same arguments must name the very kernel that ran; split counts of 1 and 16 and a misaligned query
    # are specialisations of their own
    original = launch.Launcher._launch
    checked = []

    def checking(self, grid, *a, **kw):
        direct = self.direct
        kernel = original(self, grid, *a, **kw)
        if self.direct > direct:
            assert kernel is self.fn.warmup(*a, grid=grid, **kw)
            checked.append(self.fn)
        return kernel

    monkeypatch.setattr(launch.Launcher, "_launch", checking)
    q, t1, scale, v_min, v_max = step_inputs(b, n, dtype, seed=n + b, misaligned=misaligned)
    served = serving_launch(dtype) | ({"splits": splits} if splits else {})
    for _ in range(2):
        kernel_step(q, t1, scale, v_min, v_max, launch=served)
    assert set(KERNELS) <= set(checked)  # (the cache's appends may have gone through the append kernel too)
