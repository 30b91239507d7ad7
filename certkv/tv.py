"""Sound upper bounds on the total-variation distance of a perturbed softmax.

Setting (docs/theory.md, "Softmax perturbation"): a known distribution pi (given as non-negative
masses, normalised here) and an unknown p with p_i proportional to pi_i * exp(delta_i), |delta_i| <= R_i.
Both functions return U with TV(p, pi) <= U for every such p.

* ``tanh_bound``: tanh(max R / 2), tight for a uniform radius.
* ``tv_bound``: the data-dependent bound. For a set A the worst p(A) is a/(a+b) with
  a = sum_A pi e^R, b = sum_{not A} pi e^-R; TV = max_A a/(a+b) - pi(A). Radii are first rounded *up*
  to K geometric bin edges (a larger box only raises the maximum), so only K bin masses matter, and a
  bin may be split (x in [0,1]^K: the supremum can only grow). That supremum is computed exactly: with
  t = a/(a+b), the best x at each t fills bins greedily by w(t) = (1-t) e^R + t e^-R, which is convex
  in R, so the bins filled are those below some i and above some j, with at most one part-filled bin
  next to them: max = max over the edges of the vertices (i, j) of a function concave along each edge,
  bounded by its value and slope at the edge's maximiser (docs/theory.md section 3). The HEAVY tokens
  of largest mass keep 0/1 membership (each of the 2^HEAVY cases is solved), since splitting a heavy
  token is what the relaxation gives away. The result is min(tanh bound, edge maximum) plus the slack
  of the float64 arithmetic.
"""

from __future__ import annotations

import functools

import torch

from certkv.rounding import U64, gamma

BINS = 32
BIN_RATIO = 2.0**0.25  # bin edges R_max * 2^(-k/4): a radius is rounded up by at most 19%
HEAVY = 3  # tokens of largest mass decided exactly (2^HEAVY cases per row)
# Above this radius the edge maximum's float64 evaluation loses accuracy (terms of size e^(2R)) while
# the tanh bound is already >= tanh(4) = 0.9993: only the tanh bound is used there.
RELAX_MAX_RADIUS = 8.0


def sum_radius(n: int) -> float:
    """The relative rounding of float64 sums of ``n`` masses (and the bins' own), taken by ``tv_bound``
    as an extra logit radius added to every radius."""
    return 4 * gamma(n + BINS + 8, U64)


def tanh_bound(radius_max: torch.Tensor) -> torch.Tensor:
    """tanh(R/2) rounded up (float64), for the largest radius R of each row."""
    return torch.clamp(torch.tanh(radius_max / 2) * (1 + 4 * U64) + 4 * U64, max=1.0)


def _f32(x: torch.Tensor) -> torch.Tensor:
    """float64 rounded to binary32 (to nearest even) and back."""
    return x.float().double()


def _edge_bound(
    a0: torch.Tensor, b_rest: torch.Tensor, m0: torch.Tensor, af: torch.Tensor, bf: torch.Tensor, mf: torch.Tensor
) -> torch.Tensor:
    """Upper bound on max over theta in [0, 1] of F(theta) = A/(A + B) - M along one edge (broadcast):
    A = a0 + theta af, B = b_rest + (1 - theta) bf, M = m0 + theta mf (bin f moving in, af >= bf).

    F' = kappa / S^2 - mf with kappa = af (b_rest + bf) + a0 bf constant and S = A + B non-decreasing,
    so F is concave and lies below its tangent at any point: F(theta_hat) plus the slope's part towards
    the far end bounds the edge whatever theta_hat is. theta_hat is the maximiser (S^2 = kappa / mf) in
    binary32 (float64 square roots and divisions were most of the fused epilogue's time here): its
    rounding, or a NaN where a bin is empty (mapped to 0), costs tightness only. Then one float64
    division."""
    kappa = af * (b_rest + bf) + a0 * bf
    # binary32 operations correctly rounded, as the kernel's: each in float64 on binary32 operands, then
    # rounded (double rounding is harmless for + - * / sqrt from 53 to 24 bits; torch's own binary32
    # square root is not correctly rounded on every CPU)
    root = _f32(torch.sqrt(_f32(_f32(kappa) / _f32(mf))))
    theta = _f32(_f32(root - _f32(a0 + b_rest + bf)) / _f32(af - bf))
    theta = torch.where(theta > 0, torch.where(theta < 1, theta, 1.0), 0.0)
    a = a0 + theta * af
    inv = 1 / (a + (b_rest + (1 - theta) * bf))
    slope = kappa * inv * inv - mf
    return a * inv - (m0 + theta * mf) + slope.clamp(min=0) * (1 - theta) + (-slope).clamp(min=0) * theta


@functools.lru_cache(maxsize=8)
def _edges(k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index masks over bins, built once per bin count and device (never written to): before [i, k] =
    k < i, after [j, k] = k > j, and the out-ranges of the two edges of vertex (i, j) without their moving
    bin, [i, j, k]: i < k <= j (bin i moves) and i <= k < j (bin j moves)."""
    idx = torch.arange(k, device=device)
    i, j, kk = idx[:, None, None], idx[None, :, None], idx[None, None, :]
    before = (idx[None, :] < idx[:, None]).double()
    return before, before.T.contiguous(), ((i < kk) & (kk <= j)).double(), ((i <= kk) & (kk < j)).double()


@functools.lru_cache(maxsize=8)
def _subsets(k: int, device: torch.device) -> torch.Tensor:
    """Every 0/1 membership of k heavy masses, [2^k, k] float64, built once per count and device (never
    written to): built per call it was a host-to-device copy, which waits for the stream, twice a step."""
    return torch.tensor([[(s >> j) & 1 for j in range(k)] for s in range(1 << k)], dtype=torch.float64, device=device)


def _edges_max(problem: dict[str, torch.Tensor]) -> torch.Tensor:
    """max over x in [0,1]^K of A/(A + B) - M (the heavy tokens' membership fixed by h_in), bounded from
    above, one value per row: the maximum over the edges of the greedy's vertices (docs/theory.md
    section 3). Vertex (i, j), i <= j: bins below i and above j in, i..j out; its two edges move bin i
    or bin j in. Every sum is of non-negative terms (no cancellation)."""
    mass, rad = problem["mass"], problem["rad"]
    h_mass, h_rad, h_in = problem["h_mass"], problem["h_rad"], problem["h_in"]
    before, after, out_i, out_j = _edges(mass.shape[-1], mass.device)
    a, b = mass * torch.exp(rad), mass * torch.exp(-rad)
    a_h = (h_mass * torch.exp(h_rad) * h_in).sum(-1)[:, None, None]
    b_h = (h_mass * torch.exp(-h_rad) * (1 - h_in)).sum(-1)[:, None, None]
    m_h = (h_mass * h_in).sum(-1)[:, None, None]
    a0 = a_h + (a @ before.T)[:, :, None] + (a @ after.T)[:, None, :]  # [N, i, j]
    m0 = m_h + (mass @ before.T)[:, :, None] + (mass @ after.T)[:, None, :]
    b_i = b_h + torch.einsum("nk,ijk->nij", b, out_i)
    b_j = b_h + torch.einsum("nk,ijk->nij", b, out_j)
    col, row = (lambda x: x[:, :, None]), (lambda x: x[:, None, :])
    moved_i = _edge_bound(a0, b_i, m0, col(a), col(b), col(mass))
    moved_j = _edge_bound(a0, b_j, m0, row(a), row(b), row(mass))
    upper = torch.triu(torch.ones_like(before, dtype=torch.bool))
    best = torch.where(upper, torch.maximum(moved_i, moved_j), -torch.inf)
    return best.flatten(1).amax(-1)


def tv_bound(mass: torch.Tensor, radius: torch.Tensor, divisible: bool = False) -> torch.Tensor:
    """Upper bound on sup TV(p, pi) over p proportional to pi * e^delta, |delta_i| <= radius_i.

    mass: [N, n] float64 >= 0 (pi up to a common factor; rows with zero mass give 0);
    radius: [N, n] float64 >= 0. Returns float64 [N] in [0, 1]. ``divisible``: each entry is the mass
    of a group of tokens whose radii are at most radius_i, any part of which may move apart (no entry
    keeps 0/1 membership): the bound then holds for every token of every group.
    """
    mass = mass.to(torch.float64)
    radius = radius.to(torch.float64)
    n = mass.shape[-1]
    extra = sum_radius(n)
    r_max = radius.amax(-1) + extra
    base = tanh_bound(r_max)
    use = (r_max <= RELAX_MAX_RADIUS) & (mass.sum(-1) > 0)
    # every row goes through the edge maximum (no host synchronisation, so the function can be captured
    # or compiled); rows outside its range are computed on clamped inputs and discarded below
    rm = r_max.clamp(max=RELAX_MAX_RADIUS)
    r = torch.minimum(radius + extra, rm[:, None])
    total = mass.sum(-1, keepdim=True)
    m = torch.where(total > 0, mass / torch.where(total > 0, total, 1.0), 1.0 / n)
    rows, dev = m.shape[0], m.device
    # the HEAVY largest masses keep 0/1 membership (2^HEAVY cases); the rest are binned and divisible
    k_heavy = 0 if divisible else min(HEAVY, n)
    h_mass, h_idx = torch.topk(m, k_heavy, dim=-1)
    h_rad = torch.gather(r, -1, h_idx)
    light = m.scatter(-1, h_idx, 0.0)
    exps = torch.arange(BINS - 1, -1, -1, dtype=torch.float64, device=dev)
    edges = rm[:, None] * BIN_RATIO ** (-exps)  # ascending; the last edge is r_max itself
    edges[:, -1] = rm
    idx = torch.searchsorted(edges.contiguous(), r.contiguous(), right=False).clamp(max=BINS - 1)
    binned = torch.zeros(rows, BINS, dtype=torch.float64, device=dev).scatter_add_(1, idx, light)
    subsets = _subsets(k_heavy, dev)
    reps = subsets.shape[0]
    problem = {
        "mass": binned.repeat_interleave(reps, 0),
        "rad": edges.repeat_interleave(reps, 0),
        "h_mass": h_mass.repeat_interleave(reps, 0),
        "h_rad": h_rad.repeat_interleave(reps, 0),
        "h_in": subsets.repeat(rows, 1),
    }
    edge_max = _edges_max(problem).reshape(rows, reps).amax(-1)
    slack = 64 * (BINS + HEAVY) * U64 * torch.exp(2 * rm) + 2.0**-45
    out = torch.where(use, torch.minimum(base, edge_max.clamp(min=0) + slack), base)
    return out.clamp(max=1.0)
