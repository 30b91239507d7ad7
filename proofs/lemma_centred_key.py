"""Lemma 12: the centred per-token form of the key term (docs/theory.md section 4). For a distribution
pi on n tokens, p_i = pi_i x_i / Z with x_i = e^delta_i in [e^-R_i, e^R_i] and Z = sum pi x, any centre c,
|v_i - c| <= dev_i and |sum pi (v - c)| <= shift:

    |sum_i (p_i - pi_i)(v_i - c)| <= (sum_i pi_i (e^R_i - 1) dev_i + sum pi (e^R - 1) * shift)
                                     / (1 - sum pi (1 - e^-R)),

which is ``certkv.attention._centred`` before its float64 margins. It rests on the identity
sum (p - pi)(v - c) = (sum pi (x - 1)(v - c) - (Z - 1) sum pi (v - c)) / Z. Since both p and p_hat are
ratios of the same pi, sum (p_hat - p) v = sum (p_hat - pi)(v - c) - sum (p - pi)(v - c), and the key
term is at most the two forms' sum. E_i = e^R_i is a free real >= 1 with e^-R_i = 1 / E_i (ratio form,
as lemma 3: exp needs no enclosure). Nonlinear real arithmetic, n = 1, 2, 3 tokens.

Mutation: without the normaliser's shift (the second summand of the numerator), the claim is refuted;
the counterexample, replayed through the runtime's ``_centred`` with the model's numbers, violates the
form with a zero shift and satisfies it with the true one.
"""

from __future__ import annotations

import math

import torch
import z3

LEMMA = (
    "|sum (p - pi)(v - c)| <= (sum pi (E - 1) dev + sum pi (E - 1) shift) / (1 - sum pi (1 - 1/E)) for p ~ pi u, "
    "u_i in [1/E_i, E_i], |v - c| <= dev, |sum pi (v - c)| <= shift"
)
THEORY = "nonlinear real arithmetic (NRA): the identity for n = 1..3, each token's bounds, their combination"
N = 3


def _solver() -> z3.Solver:
    s = z3.Solver()
    s.set("timeout", 60_000)
    return s


def _abs_le(e: z3.ArithRef, b: z3.ArithRef) -> z3.BoolRef:
    return z3.And(e <= b, -e <= b)


def _identity(n: int) -> z3.CheckSatResult:
    """Z sum (p - pi)(v - c) = sum pi (u - 1)(v - c) - (Z - 1) sum pi (v - c), with Z p_i = pi_i u_i."""
    s = _solver()
    pi, u, v = ([z3.Real(f"{name}{i}") for i in range(n)] for name in ("pi", "u", "v"))
    c = z3.Real("c")
    z = z3.Sum([pi[i] * u[i] for i in range(n)])
    mean = z3.Sum([pi[i] * (v[i] - c) for i in range(n)])
    lhs = z3.Sum([(pi[i] * u[i] - z * pi[i]) * (v[i] - c) for i in range(n)])
    s.add(lhs != z3.Sum([pi[i] * (u[i] - 1) * (v[i] - c) for i in range(n)]) - (z - 1) * mean)
    return s.check()


def _token() -> z3.CheckSatResult:
    """Per token: |pi (u - 1)(v - c)| <= pi (E - 1) dev, |pi (u - 1)| <= pi (E - 1), pi u >= pi / E."""
    s = _solver()
    pi, u, e, inv, v, c, dev = z3.Reals("pi u E inv v c dev")
    s.add(pi >= 0, e >= 1, inv * e == 1, u >= inv, u <= e, _abs_le(v - c, dev))
    s.add(
        z3.Not(
            z3.And(
                _abs_le(pi * (u - 1) * (v - c), pi * (e - 1) * dev),
                _abs_le(pi * (u - 1), pi * (e - 1)),
                pi * u >= pi * inv,
            )
        )
    )
    return s.check()


def _combine(with_shift: bool) -> tuple[z3.CheckSatResult, z3.Solver, dict[str, z3.ArithRef]]:
    """Summed over tokens (linear), the per-token facts give |T| <= A with T = sum pi (u - 1)(v - c),
    A = sum pi (E - 1) dev; |Z - 1| <= B = sum pi (E - 1); Z >= D = sum pi / E = 1 - sum pi (1 - 1/E) > 0
    (sum pi = 1). With |M| <= S (M = sum pi (v - c)) and Z X = T - (Z - 1) M (the identity, X the
    left side): |X| <= (A + B S) / D."""
    s = _solver()
    x = {name: z3.Real(name) for name in ("X", "Z", "D", "T", "A", "B", "M", "S")}
    big_x, z, d, t, a, b, m, shift = x.values()
    s.add(d > 0, z >= d, _abs_le(t, a), _abs_le(z - 1, b), _abs_le(m, shift), z * big_x == t - (z - 1) * m)
    s.add(z3.Not(_abs_le(big_x * d, a + (b * shift if with_shift else 0))))
    return s.check(), s, x


def prove() -> z3.CheckSatResult:
    results = [_identity(n) for n in range(1, N + 1)] + [_token(), _combine(with_shift=True)[0]]
    return z3.unsat if all(r == z3.unsat for r in results) else z3.sat


def _check(n: int) -> tuple[z3.CheckSatResult, z3.ModelRef | None, dict[str, list]]:
    """The whole claim without the shift, for n tokens: satisfiable means refuted."""
    s = _solver()
    names = ("pi", "u", "E", "inv", "v", "dev")
    x = {name: [z3.Real(f"{name}{i}") for i in range(n)] for name in names}
    c = z3.Real("c")
    x["c"] = [c]
    pi, u, e, inv, v, dev = (x[name] for name in names)
    s.add(z3.Sum(pi) == 1)
    for i in range(n):
        s.add(pi[i] >= 0, e[i] >= 1, inv[i] * e[i] == 1, u[i] >= inv[i], u[i] <= e[i], _abs_le(v[i] - c, dev[i]))
    z = z3.Sum([pi[i] * u[i] for i in range(n)])
    lhs = z3.Sum([pi[i] * (u[i] - z) * (v[i] - c) for i in range(n)])  # Z sum (p - pi)(v - c)
    numerator = z3.Sum([pi[i] * (e[i] - 1) * dev[i] for i in range(n)])
    denominator = 1 - z3.Sum([pi[i] * (1 - inv[i]) for i in range(n)])
    s.add(z3.Not(_abs_le(lhs * denominator, numerator * z)))
    r = s.check()
    return r, (s.model() if r == z3.sat else None), x


def mutation() -> tuple[z3.CheckSatResult, str]:
    from certkv.attention import _centred, _ratios

    r, model, x = _check(2)
    if model is None:
        return r, "no counterexample"

    def val(e: z3.ArithRef) -> float:
        f = model.eval(e, model_completion=True).as_fraction()  # type: ignore[union-attr]
        return f.numerator / f.denominator

    pi, u, big_e, v = ([val(t) for t in x[name]] for name in ("pi", "u", "E", "v"))
    c = val(x["c"][0])
    z = sum(a * b for a, b in zip(pi, u, strict=True))
    actual = abs(sum((a * b / z - a) * (w - c) for a, b, w in zip(pi, u, v, strict=True)))
    shift = abs(sum(a * (w - c) for a, w in zip(pi, v, strict=True)))

    def t(xs: list[float]) -> torch.Tensor:
        return torch.tensor(xs, dtype=torch.float64)

    pi_t, radius = t(pi), t([math.log(e) for e in big_e])
    ratios = _ratios(pi_t, radius)
    dev = (ratios.pi_up * (t(v) - c).abs()).sum()
    weak = float(_centred(ratios, dev, torch.tensor(0.0, dtype=torch.float64)))
    full = float(_centred(ratios, dev, torch.tensor(shift, dtype=torch.float64)))
    assert weak < actual <= full, (weak, actual, full)
    return r, (
        f"pi={pi}, e^delta={u}, e^R={big_e}, v - c={[w - c for w in v]}: |sum (p - pi)(v - c)| = {actual:.6g} "
        f"> runtime form without the shift {weak:.6g}; with it {full:.6g}"
    )
