"""The assumptions certkv.streaming makes about the kernel's arithmetic, measured where the tests run
(Triton's interpreter on the CPU, the GPU under CUDA): Triton's exp2 within EXP_REL relative plus
EXP_ABS absolute of 2^x, tl.dot accumulation within gamma_n(dot_u) of the magnitudes summed, and
every certkv launch compiled without floating-point contraction (each operation rounded as written)."""

from __future__ import annotations

import mpmath
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from certkv.rounding import EXP_ABS, EXP_REL, gamma  # noqa: E402
from certkv.streaming import ALPHA1, ARITHMETIC, BETA1  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _exp2_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    tl.store(y_ptr + i, tl.exp2(tl.load(x_ptr + i, mask=ok, other=0.0)), mask=ok)


def test_triton_exp2_meets_the_exp_model():
    # a dense sweep of [-160, 0] plus the arguments near 0 and the underflow edge
    x = torch.cat([
        -torch.rand(1 << 20, generator=torch.Generator().manual_seed(0)) * 160,
        -torch.logspace(-12, 0, 4096), torch.linspace(-127, -124, 4096), torch.tensor([0.0, -126.0, -149.0]),
    ]).float()  # fmt: skip
    y = torch.empty_like(x, device=DEVICE)
    _exp2_kernel[(triton.cdiv(x.numel(), 1024),)](x.to(DEVICE), y, x.numel(), BLOCK=1024)
    exact = torch.exp2(x.double())  # float64 2^x: accurate far beyond the binary32 claim
    err = (y.double().cpu() - exact).abs()
    assert bool((err <= EXP_REL * exact + EXP_ABS).all()), float(((err - EXP_ABS) / exact).max())
    # the argument rounding that ALPHA1 adds for |x| <= 128 is covered by its formula
    t = torch.tensor([-100.3, -7.77, -0.001], dtype=torch.float64)
    with mpmath.workprec(100):
        for xi in t.tolist():
            x32 = float(torch.tensor(xi, dtype=torch.float32))
            moved = abs(mpmath.power(2, x32) - mpmath.power(2, xi))
            assert moved <= ALPHA1 * mpmath.power(2, xi) + BETA1


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, K: tl.constexpr, FP16: tl.constexpr):
    r = tl.arange(0, 16)
    k = tl.arange(0, K)
    a = tl.load(a_ptr + r[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * 16 + r[None, :])
    if FP16:
        c = tl.dot(a.to(tl.float16), b.to(tl.float16), out_dtype=tl.float32)
    else:
        c = tl.dot(a, b, input_precision="ieee")
    tl.store(c_ptr + r[:, None] * 16 + r[None, :], c)


@pytest.mark.parametrize("precision", ["fp16", "ieee"])
def test_dot_accumulation_meets_its_model(precision):
    # cancelling sums of products of very different magnitudes: the hardest case for aligned,
    # truncating accumulation; the error must stay within gamma_K(dot_u) * sum |a_k b_k|
    gen = torch.Generator().manual_seed(1)
    dot_u = ARITHMETIC[precision, False].dot_u
    for trial in range(20):
        k = 128
        a = torch.randn(16, k, generator=gen) * torch.logspace(0, 4, k)[torch.randperm(k, generator=gen)]
        b = torch.randn(k, 16, generator=gen)
        b[:, trial % 16] = -b[:, (trial + 1) % 16]  # a column pair that cancels
        a, b = a.half().float(), b.half().float()  # operands exact in FP16 for both precisions
        c = torch.empty(16, 16, device=DEVICE)
        _dot_kernel[(1,)](a.to(DEVICE).contiguous(), b.to(DEVICE).contiguous(), c, K=k, FP16=precision == "fp16")
        exact = a.double() @ b.double()
        bound = gamma(k + 2, dot_u) * (a.double().abs() @ b.double().abs())
        assert bool(((c.double().cpu() - exact).abs() <= bound).all())


def test_every_certkv_launch_compiles_without_contraction(monkeypatch):
    # the rounding model follows each operation as written; with contraction the GPU build fused the
    # logit scaling into the exp2 argument (docs/benchmarks.md, "No floating-point contraction"), so
    # each of the seven kernels must be launched with enable_fp_fusion=False
    from certkv.kernels import append, decode, epilogue, launch
    from certkv.kernels.decode import decode_partials, from_cache

    from tests.helpers import make_kv, make_q
    from tests.test_streaming import SCALE, cache_of

    kernels = [append._append_kernel, decode._decode_kernel]
    kernels += [getattr(epilogue, f"_{name}_kernel") for name in ("scales", "blocks", "bins", "edges", "final")]
    fusion: dict[str, object] = {}
    # every launch through Triton's own path, where the options are recorded (direct launches reuse the
    # kernel compiled by such a launch with the same options: certkv.kernels.launch)
    monkeypatch.setattr(launch, "ENABLED", False)
    for kernel in kernels:

        def record(*args, _kernel=kernel, _run=kernel.run, **kwargs):
            fusion[_kernel.fn.__name__] = kwargs.get("enable_fp_fusion", "default")
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", record)
    k, v = make_kv(b=1, hkv=1, n=128, d=128, dtype=torch.float16, seed=0)
    append.append_block(k.to(DEVICE), v.to(DEVICE))
    cache = cache_of(1, 1, 300, torch.float16)
    st = cache._layers[0]
    t1 = from_cache(cache, 0)
    q = make_q(b=1, hq=2, d=128, dtype=torch.float16, seed=1).to(DEVICE).reshape(1, 1, 2, 128)
    partials = decode_partials(q, t1, SCALE, precision="fp16", cert=True)
    epilogue.certify(q, t1, partials, SCALE, "fp16", st.v_min, st.v_max, q.dtype)
    assert fusion == {kernel.fn.__name__: False for kernel in kernels}
