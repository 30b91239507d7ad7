"""The binary32 exp assumption of the rounding model, measured against mpmath on this machine."""

import mpmath
import numpy as np
import torch

from certkv.rounding import EXP_ABS, EXP_REL, gamma, inflate


def test_exp_of_zero_is_one():
    assert torch.exp(torch.zeros(1, dtype=torch.float32)).item() == 1.0


def test_binary32_exp_within_the_assumed_error():
    xs = np.concatenate(
        [
            -np.linspace(0, 110, 200_001, dtype=np.float32),
            -np.abs(np.random.default_rng(0).standard_normal(50_000).astype(np.float32)) * 30,
            np.array([-87.33654, -87.3365, -88.72284, -103.27893, -103.9, -104.0], dtype=np.float32),
            -(np.float32(2.0) ** -np.arange(1, 40, dtype=np.float32)),
        ]
    )
    got = torch.exp(torch.from_numpy(xs)).double().numpy()
    ref = np.exp(xs.astype(np.float64))  # float64 exp is accurate to ~1e-16 relative: ample here
    assert np.all(np.abs(got - ref) <= EXP_REL * ref + EXP_ABS)
    # spot-check the float64 reference itself against mpmath
    for x in xs[:: len(xs) // 50]:
        exact = mpmath.exp(mpmath.mpf(float(x)))
        assert abs(mpmath.mpf(float(np.exp(np.float64(x)))) - exact) <= 1e-15 * exact


def test_gamma_and_inflate_bound_real_sums():
    rng = np.random.default_rng(1)
    for n in (1, 10, 1000):
        terms = rng.random(n).astype(np.float32) * 1e3
        computed = float(torch.from_numpy(terms).sum())
        exact = mpmath.fsum(mpmath.mpf(float(t)) for t in terms)
        assert abs(mpmath.mpf(computed) - exact) <= gamma(n) * exact
        assert mpmath.mpf(computed) / (1 - gamma(n)) >= exact
        s64 = float(np.sum(terms.astype(np.float64)))
        assert mpmath.mpf(s64 * inflate(n)) >= exact
