"""Lemma 1: every dequantized element lies within the radius the runtime claims.

certkv.quant computes, for an element x of a group with stored zero point z = min (exact) and stored
scale s rounded up so that z + L*s >= max (exact; L = 2^bits - 1):
    t' = fl32(fl32(x - z) / s),  c = clamp(round_half_even(t'), 0, L)
and claims |c*s + z - x| <= s * (1/2 + 2^-12). Proven in two parts:

A. (FPA, bit-exact) fl32(x - z) for FP16 x >= z has relative error <= 2^-24, checked over every pair
   of finite FP16 values.
B. (real/integer arithmetic) with t = (x - z)/s in [0, L], t' = t (1 + d1)(1 + d2), |d1|, |d2| <= 2^-24
   (part A, and IEEE correct rounding of the binary32 division), every integer c with |c - t'| <= 1/2,
   clamped to [0, L], satisfies |c - t| <= 1/2 + 2^-12, for L = 3, 15 and 255 (INT2, INT4, INT8).
   Multiplying by s gives the claim. BF16 inputs are exact in binary32, so A holds for them by the
   IEEE model of a single correctly rounded subtraction.
"""

from __future__ import annotations

import torch
import z3

from certkv.quant import quantize

LEMMA = "|c*s + z - x| <= s*(1/2 + 2^-12) for INT2/INT4/INT8 with the stored FP16 scale and zero point"
THEORY = "FPA (FP16 -> binary32 subtraction, bit-exact) + LIRA/NRA (rounding and clamping)"
U = z3.RealVal(2) ** -24


def _subtraction_relative_error(bound: float = 2.0**-24) -> z3.CheckSatResult:
    # The wide sort holds every quantity below exactly: FP16 values are multiples of 2^-24 below 2^16,
    # so x - z, the binary32 result (a multiple of 2^-24 too) and their difference are multiples of
    # 2^-24 below 2^17 (at most 41 significant bits), and |x - z| * 2^-24 is a power-of-two scaling of
    # one of them (exponents from -48 up, inside binary32's range). 48 bits instead of 64, and the
    # formula bit-blasted straight to SAT, take z3 from ~124 to ~61 s on the CI machine.
    f16, f32, wide = z3.FloatHalf(), z3.Float32(), z3.FPSort(8, 48)
    rne = z3.RNE()
    x, z = z3.FP("x", f16), z3.FP("z", f16)
    got = z3.fpToFP(rne, z3.fpSub(rne, z3.fpToFP(rne, x, f32), z3.fpToFP(rne, z, f32)), wide)
    exact = z3.fpSub(rne, z3.fpToFP(rne, x, wide), z3.fpToFP(rne, z, wide))
    err = z3.fpAbs(z3.fpSub(rne, got, exact))
    s = z3.Then("simplify", "propagate-values", "fpa2bv", "simplify", "solve-eqs", "bit-blast", "sat").solver()
    s.set("timeout", 300_000)
    s.add(*[z3.Not(z3.fpIsNaN(v)) for v in (x, z)], *[z3.Not(z3.fpIsInf(v)) for v in (x, z)])
    s.add(z3.fpLEQ(z, x), z3.fpGT(err, z3.fpMul(rne, z3.fpAbs(exact), z3.FPVal(bound, wide))))
    return s.check()


def _rounding(levels: int, factor: z3.ArithRef) -> tuple[z3.CheckSatResult, z3.ModelRef | None]:
    t, d1, d2, q = z3.Reals("t d1 d2 q")
    c = z3.Int("c")
    clamped = z3.If(c < 0, 0, z3.If(c > levels, levels, c))
    s = z3.Solver()
    s.add(t >= 0, t <= levels, d1 <= U, -d1 <= U, d2 <= U, -d2 <= U, q == t * (1 + d1) * (1 + d2))
    s.add(z3.ToReal(c) - q <= z3.RealVal(1) / 2, q - z3.ToReal(c) <= z3.RealVal(1) / 2)
    err = z3.ToReal(clamped) - t
    s.add(z3.Or(err > factor, -err > factor))
    r = s.check()
    return r, (s.model() if r == z3.sat else None)


def prove() -> z3.CheckSatResult:
    claim = z3.RealVal(1) / 2 + z3.RealVal(2) ** -12
    results = [_rounding(levels, claim)[0] for levels in (3, 15, 255)]
    results.append(_subtraction_relative_error())
    return z3.unsat if all(r == z3.unsat for r in results) else z3.sat


def mutation() -> tuple[z3.CheckSatResult, str]:
    """Weakened: a radius of a quarter step (part B), and a relative error of 2^-26 for the binary32
    subtraction (part A), each must have a counterexample."""
    if _subtraction_relative_error(2.0**-26) != z3.sat:
        return z3.unsat, "part A weakened to 2^-26 found no counterexample: its model is vacuous"
    r, model = _rounding(255, z3.RealVal(1) / 4)
    if model is None:
        return r, "no counterexample"
    t = model.eval(z3.Real("t"), model_completion=True).as_fraction()
    # replay through certkv.quant: a group [0, t, 255, 255] has z = 0 and s just above 1
    group = torch.tensor([0.0, float(t), 255.0, 255.0], dtype=torch.float16).reshape(1, 1, 1, 4)
    qt = quantize(group, 8, "channel", 4)
    c, s, z = qt.exact_parts()
    err = (c * s + z - group.double()).abs()
    assert bool((err > s / 4).any()) and bool((err <= qt.radius().double()).all())
    return r, (
        f"t = {t}: certkv.quant dequantizes {float(t)} (scale {float(s.max())}) with error "
        f"{float(err.max())} > s/4, within its real radius"
    )
