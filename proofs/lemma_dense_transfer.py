"""Lemma 11: stage 3 on the kernel. A bound B on the kernel's output a, |a - o| <= B, carries over to the
dense output s that stage 3 serves as fl(fl(B + fl(fl(|s - a|) (1 + 2u))) (1 + 2^-40)) >= |s - o|.

That is ``certkv.kernel_ladder.certify_dense``: the distance |s - a| taken in float64 from two exact
conversions (one rounding, in the subtraction; abs and max are exact), inflated, added to the kernel's
output bound and inflated again, each operation rounded by the standard model |delta| <= u = 2^-53
(docs/theory.md section 6). Nonlinear real arithmetic (the products with the rounding errors), per
output coordinate; the maximum over coordinates is exact and monotone.

Mutation: the kernel's bound alone, without the distance (serving s under a's certificate). The solver
finds s, a, o with |s - o| above it; the replay takes the model's numbers through the runtime's own
``certkv.rounding.output_distance`` and ``carried``: with a zero distance the bound is violated, with the
distance it holds.
"""

from __future__ import annotations

import torch
import z3

from certkv.rounding import carried, output_distance

LEMMA = "|s - o| <= fl(fl(B + fl(fl(|s - a|)(1 + 2u)))(1 + 2^-40)) whenever |a - o| <= B (fl: |delta| <= u)"
THEORY = "nonlinear real arithmetic (NRA), the standard model of float64 rounding"


def _check(with_distance: bool) -> tuple[z3.CheckSatResult, z3.ModelRef | None, dict[str, z3.ArithRef]]:
    s = z3.Solver()
    s.set("timeout", 60_000)
    u = z3.RealVal(2) ** -53
    x = {name: z3.Real(name) for name in ("o", "a", "served", "B")}
    d = [z3.Real(f"d{i}") for i in range(4)]
    s.add(*[z3.And(di >= -u, di <= u) for di in d])
    o, a, served, bound_k = x["o"], x["a"], x["served"], x["B"]
    s.add(bound_k >= 0, a - o <= bound_k, o - a <= bound_k)
    gap = z3.If(served >= a, served - a, a - served)
    apart = gap * (1 + d[0]) * (1 + 2 * u) * (1 + d[1]) if with_distance else z3.RealVal(0)
    bound = (bound_k + apart) * (1 + d[2]) * (1 + z3.RealVal(2) ** -40) * (1 + d[3])
    err = z3.If(served >= o, served - o, o - served)
    s.add(err > bound)
    r = s.check()
    return r, (s.model() if r == z3.sat else None), x


def prove() -> z3.CheckSatResult:
    return _check(with_distance=True)[0]


def mutation() -> tuple[z3.CheckSatResult, str]:
    r, model, x = _check(with_distance=False)
    if model is None:
        return r, "no counterexample"

    def val(name: str) -> float:
        v = model.eval(x[name], model_completion=True)
        return float(v.numerator_as_long()) / float(v.denominator_as_long())  # type: ignore[attr-defined]

    o, a, served, bound_k = (torch.tensor([val(n)], dtype=torch.float64) for n in ("o", "a", "served", "B"))
    without = carried(bound_k, torch.zeros(()))
    with_distance = carried(bound_k, output_distance(served, a))
    err = (served - o).abs()
    assert float(without) < float(err) <= float(with_distance)
    return r, (
        f"|a - o| = {float((a - o).abs()):.3g} <= B = {float(bound_k):.3g}, yet |s - o| = {float(err):.3g} "
        f"exceeds B alone; with the distance the bound is {float(with_distance):.3g}"
    )
