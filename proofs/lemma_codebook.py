"""Lemma 7: a codebook quantizer's per-code radius.

certkv.codebook stores a value as the level b_c whose cell holds clamp(t, 0, 1), t the float64 value of
(x - z)/s, and claims |b_c - t*| <= w_c + sigma for the exact t* = (x* - z)/s, where w_c is the cell's
half-width clipped to [0, 1] and sigma >= |t - t_x| + |t* - t_x| with t_x = (x - z)/s in [0, 1] (the
scale floor makes sigma <= 2^-20 = BOOK_SLACK). Checked in linear real arithmetic for any m = 2..5
strictly increasing levels in [0, 1] (symbolic), every code.
"""

from __future__ import annotations

from fractions import Fraction

import torch
import z3

from certkv.codebook import BOOK_SLACK, Codebook

LEMMA = "|b_c - t*| <= w_c + sigma for the code of clamp(t) whenever |t - t_x| + |t* - t_x| <= sigma, t_x in [0, 1]"
THEORY = "linear real arithmetic (LRA), m = 2..5 symbolic levels, every code"


def _counterexample(m: int, slack_scale: int, margin: float = 0.0) -> tuple[z3.CheckSatResult, z3.ModelRef | None]:
    b = [z3.Real(f"b{i}") for i in range(m)]
    tx, t, ts, sigma = z3.Reals("tx t ts sigma")
    s = z3.Solver()
    s.add(b[0] >= 0, b[-1] <= 1, *[b[i] < b[i + 1] for i in range(m - 1)])
    s.add(tx >= 0, tx <= 1, sigma >= 0)
    d1, d2 = t - tx, ts - tx
    s.add(z3.If(d1 >= 0, d1, -d1) + z3.If(d2 >= 0, d2, -d2) <= sigma)
    ct = z3.If(t < 0, z3.RealVal(0), z3.If(t > 1, z3.RealVal(1), t))
    edges = [z3.RealVal(0), *[(b[i] + b[i + 1]) / 2 for i in range(m - 1)], z3.RealVal(1)]
    bad = []
    for c in range(m):
        lower_ok = ct >= edges[c] if c > 0 else z3.BoolVal(True)
        upper_ok = ct < edges[c + 1] if c < m - 1 else z3.BoolVal(True)  # ties go up, as searchsorted(right)
        w = z3.If(b[c] - edges[c] >= edges[c + 1] - b[c], b[c] - edges[c], edges[c + 1] - b[c])
        err = ts - b[c]
        bad.append(z3.And(lower_ok, upper_ok, z3.If(err >= 0, err, -err) > w + slack_scale * sigma + margin))
    s.add(z3.Or(bad))
    if margin:
        s.add(sigma == 2 * margin)
    r = s.check()
    return r, (s.model() if r == z3.sat else None)


def prove() -> z3.CheckSatResult:
    results = [_counterexample(m, 1)[0] for m in range(2, 6)]
    return z3.unsat if all(r == z3.unsat for r in results) else z3.sat


def mutation() -> tuple[z3.CheckSatResult, str]:
    """Weakened: no slack (the radius of the cell alone). Replayed through Codebook.encode/half_widths."""
    r, model = _counterexample(4, 0, margin=1 / 32)  # a clear violation, robust to binary32 rounding
    if model is None:
        return r, "no counterexample"

    def val(name: str) -> Fraction:
        return Fraction(str(model.eval(z3.Real(name), model_completion=True).as_fraction()))

    sigma = val("sigma")
    if sigma == 0:
        return z3.unsat, "counterexample needs sigma > 0"
    book = Codebook(torch.tensor([float(val(f"b{i}")) for i in range(4)], dtype=torch.float32))
    t, ts = float(val("t")), float(val("ts"))
    code = int(book.encode(torch.tensor([t], dtype=torch.float64))[0])
    level = Fraction(float(book.levels[code]))
    w = Fraction(float(book.half_widths()[code]))
    err = abs(Fraction(ts) - level)
    assert err > w, "the replayed point should exceed the bare cell radius"
    return r, (
        f"levels {book.levels.tolist()}, t = {t:.6g}, t* = {ts:.6g}: code {code} is off by {float(err):.6g} > "
        f"w_c = {float(w):.6g} (sigma {float(sigma):.3g}; the runtime adds BOOK_SLACK = {BOOK_SLACK:.3g} "
        "per unit of scale)"
    )
