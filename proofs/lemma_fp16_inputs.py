"""Lemma 10: a BF16 number within FP16's range rounds into FP16 with an error of at most 2^-25.

FP16 products over a BF16 cache (certkv.streaming.arithmetic, docs/theory.md section 8) round the
BF16 query and the BF16 sink, window and promoted tokens to FP16. The claim, for every finite BF16 x
with |x| <= 65504 (larger ones are not certified): |fl16(x) - x| <= 2^-25, and in particular
fl16(x) = x where |x| >= 2^-14 (FP16's normal range holds BF16's 8 significant bits).

Checked bit-exactly over all BF16 values (FPA): the difference is taken in binary32, where it is
exact. If fl16(x) = 0 it is -x, a binary32 number (BF16 is a subset); if |x| >= 2^-14 it is 0;
otherwise |x| >= 2^-25 (below, x rounds to 0), so x's bits lie in [2^-32, 2^-13) and fl16(x)'s in
[2^-24, 2^-13]: the difference has at most 20 significant bits.
"""

from __future__ import annotations

import z3

LEMMA = "|fl16(x) - x| <= 2^-25 for every finite BF16 x with |x| <= 65504 (FP16 products over BF16 inputs)"
THEORY = "FPA (BF16 -> FP16 rounding, bit-exact over all BF16 values)"


def _rounding_error_exceeds(bound: float) -> tuple[z3.CheckSatResult, z3.ModelRef | None]:
    bf16, f16, f32 = z3.FPSort(8, 8), z3.FloatHalf(), z3.Float32()
    rne = z3.RNE()
    x = z3.FP("x", bf16)
    y = z3.fpToFP(rne, x, f16)
    diff = z3.fpSub(rne, z3.fpToFP(rne, y, f32), z3.fpToFP(rne, x, f32))
    s = z3.Solver()
    # the range compared in binary32: 65504 is no BF16 number (it would round to 2^16 there)
    wide_x = z3.fpToFP(rne, x, f32)
    s.add(z3.Not(z3.fpIsNaN(x)), z3.Not(z3.fpIsInf(x)), z3.fpLEQ(z3.fpAbs(wide_x), z3.FPVal(65504.0, f32)))
    s.add(z3.fpGT(z3.fpAbs(diff), z3.FPVal(bound, f32)))
    r = s.check()
    return r, (s.model() if r == z3.sat else None)


def prove() -> z3.CheckSatResult:
    return _rounding_error_exceeds(2.0**-25)[0]


def mutation() -> tuple[z3.CheckSatResult, str]:
    """Weakened to 2^-26 the claim must have a counterexample (a BF16 number just above 2^-25)."""
    r, model = _rounding_error_exceeds(2.0**-26)
    if model is None:
        return r, "no counterexample"
    return r, f"x = {model.eval(z3.FP('x', z3.FPSort(8, 8)))}"
