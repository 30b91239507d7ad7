"""Lemma 8: the logit radius of keys quantized before RoPE.

certkv.transforms.RoPE bounds the rotated query's contribution per pair (j, j + D/2) without the
position: for M = [[c, -s], [s, c]] (the binary32 cos and sin of any angle) and any error e with
|e_1| <= r_1, |e_2| <= r_2,

    |(M^T q) . e| <= sqrt(c^2 + s^2) * ||(q_1, q_2)|| * ||(r_1, r_2)||

Checked in nonlinear real arithmetic as three facts whose chain is the claim (squared, all sides
non-negative): ||M^T q||^2 = (c^2 + s^2) ||q||^2 (an identity), (u . e)^2 <= ||u||^2 ||e||^2
(Cauchy-Schwarz in two dimensions) and ||e||^2 <= ||r||^2.
"""

from __future__ import annotations

import math

import torch
import z3

from certkv.transforms import RoPE

LEMMA = "|(M^T q) . e| <= ||M|| ||q_pair|| ||r_pair|| for a scaled 2-D rotation M and |e_i| <= r_i"
THEORY = "nonlinear real arithmetic (NRA)"


def _unsat(*constraints: z3.BoolRef) -> z3.CheckSatResult:
    s = z3.Solver()
    s.set("timeout", 120_000)
    s.add(*constraints)
    return s.check()


def prove() -> z3.CheckSatResult:
    c, s, q1, q2, u1, u2, e1, e2, r1, r2 = z3.Reals("c s q1 q2 u1 u2 e1 e2 r1 r2")
    identity = _unsat((c * q1 + s * q2) ** 2 + (c * q2 - s * q1) ** 2 != (c * c + s * s) * (q1 * q1 + q2 * q2))
    cauchy = _unsat((u1 * e1 + u2 * e2) ** 2 > (u1 * u1 + u2 * u2) * (e1 * e1 + e2 * e2))
    box = _unsat(e1 * e1 <= r1 * r1, e2 * e2 <= r2 * r2, r1 >= 0, r2 >= 0, e1 * e1 + e2 * e2 > r1 * r1 + r2 * r2)
    return z3.unsat if (identity, cauchy, box) == (z3.unsat,) * 3 else z3.sat


def _mutated(u1: z3.ArithRef, u2: z3.ArithRef, e1: z3.ArithRef, e2: z3.ArithRef, r: z3.ArithRef) -> z3.BoolRef:
    """Weakened: the pair's radius taken as max(r_1, r_2) = r instead of ||(r_1, r_2)||."""
    return (u1 * e1 + u2 * e2) ** 2 > (u1 * u1 + u2 * u2) * r * r


def mutation() -> tuple[z3.CheckSatResult, str]:
    u1, u2, e1, e2, r = z3.Reals("u1 u2 e1 e2 r")
    s = z3.Solver()
    s.add(r >= 0, e1 <= r, -e1 <= r, e2 <= r, -e2 <= r, u1 == 1, u2 == 1, r == 1, _mutated(u1, u2, e1, e2, r))
    res = s.check()
    if res != z3.sat:
        return res, "no counterexample"
    m = s.model()
    e = [float(m.eval(x, model_completion=True).as_fraction()) for x in (e1, e2)]
    # replay through certkv.transforms.RoPE at position 0 (c = 1, s = 0): q = (1, 1), |e| <= r = (1, 1)
    rope = RoPE(2, 10000.0)
    q = torch.tensor([[1.0, 1.0]])
    bound = float((rope.dual(q) * rope.pair(torch.tensor([[1.0, 1.0]]))).sum())
    actual = abs(e[0] + e[1])
    mutated = math.sqrt(2) * 1.0
    assert mutated < actual <= bound
    return res, f"e = {e}: |q . e| = {actual} > the mutated {mutated:.4f}; RoPE.dual . RoPE.pair = {bound:.6f} holds"
