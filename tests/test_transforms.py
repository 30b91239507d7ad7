"""Key transforms: every bound of ``certkv.transforms`` checked in exact rational arithmetic."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from certkv import errors
from certkv.transforms import Hadamard, RoPE


def _matrices(tf, pos: int, d: int) -> list[list[Fraction]]:
    """T_pos as exact rationals: RoPE from its binary32 cos/sin, Hadamard from signs and H."""
    if isinstance(tf, RoPE):
        c, s = (x[0].tolist() for x in tf._cos_sin(torch.tensor([pos])))
        h = d // 2
        m = [[Fraction(0)] * d for _ in range(d)]
        for j in range(h):
            cj, sj = Fraction(c[j]), Fraction(s[j])
            m[j][j], m[j][j + h], m[j + h][j], m[j + h][j + h] = cj, -sj, sj, cj
        return m
    factor = Fraction(int(tf.n1), d)
    return [[Fraction(int(tf.sign[i])) * Fraction(int(tf.h[j][i])) * factor for j in range(d)] for i in range(d)]


def _apply(m: list[list[Fraction]], x: list[Fraction]) -> list[Fraction]:
    return [sum((a * b for a, b in zip(row, x)), Fraction(0)) for row in m]


def _solve(m: list[list[Fraction]], y: list[Fraction]) -> list[Fraction]:
    """m^-1 y by Gauss-Jordan elimination over the rationals."""
    n = len(y)
    a = [[*row, y[i]] for i, row in enumerate(m)]
    for col in range(n):
        piv = next(r for r in range(col, n) if a[r][col] != 0)
        a[col], a[piv] = a[piv], a[col]
        inv = 1 / a[col][col]
        a[col] = [v * inv for v in a[col]]
        for r in range(n):
            if r != col and a[r][col] != 0:
                f = a[r][col]
                a[r] = [v - f * w for v, w in zip(a[r], a[col])]
    return [a[i][n] for i in range(n)]


TRANSFORMS = [
    pytest.param(lambda d: RoPE(d, 10000.0), id="rope"),
    pytest.param(lambda d: Hadamard(d, 7), id="hadamard"),
]


@pytest.mark.parametrize("make", TRANSFORMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_basis_round_trip_bounds_hold_exactly(make, dtype):
    d, t = 8, 6
    tf = make(d)
    gen = torch.Generator().manual_seed(1)
    k = (torch.randn(1, 1, t, d, generator=gen) * 4).to(dtype)
    pos = torch.arange(100, 100 + t)
    x, err = tf.to_basis(k, pos)
    xhat = (x + torch.randn(x.shape, generator=gen, dtype=torch.float64) * 0.1).float()
    k_used, delta = tf.from_basis(xhat, pos, torch.zeros_like(x))
    for i in range(t):
        m = _matrices(tf, int(pos[i]), d)
        x_star = _solve(m, [Fraction(v) for v in k[0, 0, i].double().tolist()])
        assert all(
            abs(Fraction(a) - b) <= Fraction(e) for a, b, e in zip(x[0, 0, i].tolist(), x_star, err[0, 0, i].tolist())
        )
        exact = _apply(m, [Fraction(v) for v in xhat[0, 0, i].tolist()])
        used = k_used[0, 0, i].tolist()
        assert all(abs(Fraction(a) - b) <= Fraction(e) for a, b, e in zip(used, exact, delta[0, 0, i].tolist()))
    # the transform is what it claims: back from the basis gives the keys to binary32 accuracy
    back, _ = tf.from_basis(x.float(), pos, torch.zeros_like(x))
    assert torch.allclose(back.double(), k.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", TRANSFORMS)
def test_dual_pairing_bounds_the_rotated_query(make):
    """|(T_i^T q) . e| <= dual(q) . pair(r) for |e| <= r, at any position, in exact arithmetic."""
    d = 8
    tf = make(d)
    gen = torch.Generator().manual_seed(2)
    for trial in range(20):
        q = (torch.randn(d, generator=gen) * 3).float()
        r = torch.rand(d, generator=gen, dtype=torch.float64)
        e = r * torch.sign(torch.randn(d, generator=gen, dtype=torch.float64))  # a corner of the box
        bound = sum(Fraction(a) * Fraction(b) for a, b in zip(tf.dual(q).tolist(), tf.pair(r).tolist()))
        m = _matrices(tf, 37 * trial, d)
        mt_q = [sum((m[j][i] * Fraction(qj) for j, qj in enumerate(q.tolist())), Fraction(0)) for i in range(d)]
        assert abs(sum(a * Fraction(b) for a, b in zip(mt_q, e.tolist()))) <= bound


def test_transforms_refuse_head_dims_they_cannot_handle():
    with pytest.raises(errors.ConfigError, match="even"):
        RoPE(7, 10000.0)
    with pytest.raises(errors.ConfigError, match="power-of-two"):
        Hadamard(96, 0)


def test_rope_tables_agree_within_the_charged_gap():
    """from_basis charges a one-ulp difference between two binary32 cos/sin tables; that needs torch's
    float64 cos and sin to be faithful (within an ulp of the exact value), measured here against
    mpmath, and two evaluations of the table (different batch shapes: vectorised and scalar paths) to
    differ by at most TABLE_GAP."""
    import mpmath

    rope = RoPE(128, 500000.0)
    pos = torch.arange(0, 200_000, 997)
    j = torch.arange(64, dtype=torch.float64)
    angle = pos.double()[:, None] * 500000.0 ** (-2.0 * j / 128)
    mpmath.mp.prec = 120
    for fn, mfn in ((torch.cos, mpmath.cos), (torch.sin, mpmath.sin)):
        got = fn(angle).flatten().tolist()
        for a, g in zip(angle.flatten().tolist()[::7], got[::7]):
            exact = mfn(mpmath.mpf(a))
            ulp = abs(torch.nextafter(torch.tensor(g), torch.tensor(float("inf"))).item() - g)
            assert abs(mpmath.mpf(g) - exact) < ulp
    whole = rope._cos_sin(pos)
    for lo in range(0, len(pos), 37):  # odd-sized pieces: other vector/tail splits
        part = rope._cos_sin(pos[lo : lo + 37])
        for a, b in zip(part, whole):
            assert float((a - b[lo : lo + 37]).abs().max()) <= RoPE.TABLE_GAP
