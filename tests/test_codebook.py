"""The codebook quantizer: every element within its per-code radius of the exact original, in exact
rational arithmetic; outliers, concatenation, byte counts; Lloyd-Max fitting."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from certkv import errors
from certkv.codebook import Codebook, gaussian_lloyd_max, lloyd_max, outlier_mask, quantize_book, uniform
from tests.helpers import make_kv


def _exact_errors(qt, x_star: torch.Tensor) -> list[tuple[Fraction, float]]:
    """(|exact dequantized - x*|, claimed radius) per element, in exact rationals."""
    c, s, z = (t.flatten().tolist() for t in qt.exact_parts())
    r = qt.radius().flatten().tolist()
    xs = x_star.flatten().tolist()
    return [
        (abs(Fraction(ci) * Fraction(si) + Fraction(zi) - Fraction(xi)), ri)
        for ci, si, zi, xi, ri in zip(c, s, z, xs, r)
    ]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis, group", [("token", 16), ("channel", 8)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_element_is_within_its_code_radius(bits, axis, group, dtype):
    k, _ = make_kv(b=1, hkv=2, n=32, d=16, dtype=dtype, outlier=30.0)
    x = k.double()
    for book in (uniform(bits), gaussian_lloyd_max(bits)):
        mask = outlier_mask(x, axis, group, 0.05, None)
        qt = quantize_book(x, torch.zeros_like(x), book, axis, group, dtype, mask)
        pairs = _exact_errors(qt, x)
        assert all(err <= Fraction(r) for err, r in pairs)
        # the radius is not vacuous: some element uses at least a third of it
        assert max(float(err) / r for err, r in pairs if r > 0) > 1 / 3


def test_input_error_is_covered():
    """x given in float64 within x_err of the exact original: the radius covers the original."""
    gen = torch.Generator().manual_seed(3)
    x_star = torch.randn(1, 1, 16, 8, generator=gen, dtype=torch.float64)
    x_err = torch.full_like(x_star, 1e-3)
    x = x_star + (torch.rand(x_star.shape, generator=gen, dtype=torch.float64) * 2 - 1) * 1e-3
    qt = quantize_book(
        x, x_err, gaussian_lloyd_max(4), "channel", 8, torch.float16, torch.zeros_like(x, dtype=torch.bool)
    )
    assert all(err <= Fraction(r) for err, r in _exact_errors(qt, x_star))
    # the scale floor: a constant group with an input error still gets a scale covering it
    flat = torch.full((1, 1, 1, 8), 3.0, dtype=torch.float64)
    qt = quantize_book(flat, torch.full_like(flat, 1e-9), uniform(2), "channel", 8, torch.float16,
                       torch.zeros_like(flat, dtype=torch.bool))  # fmt: skip
    assert float(qt.scale) >= 2**20 * 1e-9
    assert all(err <= Fraction(r) for err, r in _exact_errors(qt, flat + 1e-9))


def test_outliers_are_kept_exactly_and_counted():
    k, _ = make_kv(b=1, hkv=2, n=64, d=16, dtype=torch.float16, outlier=50.0)
    x = k.double()
    lo, hi = torch.full((2, 16), -1.5), torch.full((2, 16), 1.5)
    mask = outlier_mask(x, "token", 32, 0.01, (lo, hi))
    assert torch.equal(mask, (x < -1.5) | (x > 1.5))
    qt = quantize_book(x, torch.zeros_like(x), gaussian_lloyd_max(4), "token", 32, torch.float16, mask)
    deq = qt.dequantize()
    assert torch.equal(deq[mask], x[mask].float())  # FP16 originals are exact
    assert torch.equal(qt.radius()[mask], torch.zeros(int(mask.sum())))
    m = int(mask.sum())
    assert m > 0
    expected = 64 * 16 * 2 * 4 // 8 + 2 * 2 * (64 // 32) * 16 * 2 + 16 * 4 + m * (4 + 2 + 2)
    assert qt.nbytes() == expected
    # the inliers' scale ignores the outliers: far smaller than the full range would need
    assert float(qt.scale.max()) < float((x.amax() - x.amin()) / 4)


def test_concatenation_keeps_values_and_outliers():
    k, _ = make_kv(b=2, hkv=2, n=48, d=16, dtype=torch.bfloat16, outlier=20.0)
    x = k.double()
    parts = []
    for lo, hi in ((0, 16), (16, 48)):
        xs = x[:, :, lo:hi]
        mask = outlier_mask(xs, "token", 16, 0.1, None)
        parts.append(quantize_book(xs, torch.zeros_like(xs), uniform(4), "token", 16, torch.bfloat16, mask))
    joined = parts[0].cat(parts[1])
    assert torch.equal(joined.dequantize(), torch.cat([p.dequantize() for p in parts], dim=2))
    assert torch.equal(joined.radius(), torch.cat([p.radius() for p in parts], dim=2))
    assert joined.o_value.numel() == sum(p.o_value.numel() for p in parts) > 0


def test_lloyd_max_is_reproducible_and_beats_uniform_levels():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 32, generator=gen, dtype=torch.float64)
    t = (x - x.amin(1, keepdim=True)) / (x.amax(1, keepdim=True) - x.amin(1, keepdim=True))
    w = torch.ones_like(t)
    a, b = lloyd_max(t, w, 3, seed=5), lloyd_max(t, w, 3, seed=5)
    assert torch.equal(a.levels, b.levels)

    def mse(book: Codebook) -> float:
        return float(((t - book.levels.double()[book.encode(t)]) ** 2).mean())

    assert mse(a) < 0.9 * mse(uniform(3))
    # weights pull levels: weight only the upper half, and the levels crowd there
    heavy = lloyd_max(t, (t > 0.5).double() + 1e-6, 3, seed=5)
    assert int((heavy.levels > 0.5).sum()) > int((a.levels > 0.5).sum())


def test_bad_codebooks_are_refused():
    for levels in ([0.0, 0.5, 0.5, 1.0], [0.2, 0.1], [-0.1, 0.5], [0.0, float("nan")]):
        with pytest.raises(errors.ConfigError, match="codebook"):
            Codebook(torch.tensor(levels, dtype=torch.float32))
    w = Codebook(torch.tensor([0.25, 0.5], dtype=torch.float32)).half_widths()
    assert w.tolist() == [0.25, 0.5]  # cells [0, 0.375) and [0.375, 1]
