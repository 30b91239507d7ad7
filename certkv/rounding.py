"""The floating-point error model of certkv's own arithmetic (docs/theory.md, section "Rounding").

All runtime arithmetic on the attention path is IEEE binary32 with round-to-nearest; bound
arithmetic is binary64. Constants here are the only place the model's assumptions live:

* ``U32``: unit roundoff of binary32, 2^-24; ``gamma(n)`` Higham's gamma_n = n u / (1 - n u), which
  bounds the error of any n-term sum or dot product evaluated in any order (FMA included).
* ``EXP_REL``/``EXP_ABS``: the assumed accuracy of the binary32 ``exp`` the runtime calls:
  ``|exp32(x) - e^x| <= EXP_REL * e^x + EXP_ABS`` for every binary32 x <= 0. This is an assumption
  about a library routine, not a theorem: ``tests/test_rounding.py`` measures it against mpmath on a
  dense sweep of [-110, 0] plus edge cases, on the machine that runs the tests.
"""

from __future__ import annotations

import math

import torch

U32 = 2.0**-24
U64 = 2.0**-53
EXP_REL = 2.0**-20  # 16 ulp of binary32; the library exps measured are within ~1-2 ulp
EXP_ABS = 2.0**-126  # the smallest normal binary32: covers subnormal results and flush-to-zero
# Accumulation in tl.dot (tensor cores, and the FMA path): every addition is taken to err by at most
# TC_U relative to the magnitudes summed, 8x binary32's unit. Tensor cores align a block's products to
# its largest exponent and truncate (Fasi et al. 2021): up to ~2^-22 per term; an assumption about the
# hardware, measured on the GPU by tests/test_cuda.py with cancelling sums.
TC_U = 2.0**-21
# Radius slack of the quantizer beyond half a step: covers the binary32 evaluation of (x - z) / s
# (two roundings, each of relative size u, on a quotient of magnitude <= 2^8) with a 16x margin.
QUANT_SLACK = 2.0**-12


def gamma(n: int, u: float = U32) -> float:
    """Higham's gamma_n for unit roundoff u."""
    nu = n * u
    if nu >= 1.0:
        return math.inf
    return nu / (1.0 - nu)


def inflate(n_terms: int, u: float = U64) -> float:
    """Factor that turns a computed sum of ``n_terms`` non-negative terms into an upper bound of the
    exact sum: computed = exact * (1 + theta), |theta| <= gamma_n, so exact <= computed / (1 - gamma_n);
    the extra 4 units cover the rounding of this multiplication itself."""
    return 1.0 / (1.0 - gamma(n_terms + 4, u)) + 4 * u


def quotient_bound(
    acc_abs: torch.Tensor, err_num: torch.Tensor, err_den: torch.Tensor, denom: torch.Tensor
) -> torch.Tensor:
    """|acc / l - N / L| <= (E_N + (|acc| + E_N) E_L / max(1, l - E_L)) / l whenever |acc - N| <= E_N,
    |l - L| <= E_L, L >= 1 and l > 0 (real arithmetic; proofs/ lemma 5 (iii)), with acc_abs = |acc|,
    err_num = E_N, err_den = E_L and denom = l: the normalisation error of the output. The E_L term is
    N (L - l) / (l L), so it divides by L >= max(1, l - E_L) as well as by l: where the weights sum to
    l >> 1 (long contexts, flat attention), l times tighter than dividing by 1."""
    return (err_num + (acc_abs + err_num) * (err_den / torch.clamp(denom - err_den, min=1.0))) / denom


def output_distance(served: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """>= max_j |served_j - other_j| over the last axis, float64: the difference of two exact conversions
    rounds once (not at all for FP16 outputs), abs and max are exact (proofs/ lemma 11)."""
    return (served.double() - other.double()).abs().amax(-1) * (1 + 2 * U64)


def carried(bound: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """>= |served - o| whenever bound >= |other - o| and distance >= |served - other| (the triangle
    inequality; the float64 sum rounded up: proofs/ lemma 11)."""
    return (bound + distance) * (1 + 2.0**-40)
