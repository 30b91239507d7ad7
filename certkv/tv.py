"""Sound upper bounds on the total-variation distance of a perturbed softmax.

Setting (docs/theory.md, "Softmax perturbation"): a known distribution pi (given as non-negative
masses, normalised here) and an unknown p with p_i proportional to pi_i * exp(delta_i), |delta_i| <= R_i.
Both functions return U with TV(p, pi) <= U for every such p.

* ``tanh_bound``: tanh(max R / 2), tight for a uniform radius.
* ``tv_bound``: the data-dependent bound. For a set A the worst p(A) is a/(a+b) with
  a = sum_A pi e^R, b = sum_{not A} pi e^-R; TV = max_A a/(a+b) - pi(A). Relaxing A to x in [0,1]^n and
  writing t = a/(a+b): max = max_t [t - c(t)] with c(t) a fractional knapsack (fill tokens by
  w(t) = (1-t) e^R + t e^-R). By LP duality c(t) >= lam*demand(t) - sum_k P_k max(0, lam*w_k(t) - 1)
  for every lam >= 0, so t - c(t) has a majorant convex in t for each fixed lam: on a grid interval
  it is bounded by its value at the endpoints, with lam the optimal multiplier of either endpoint
  (error second order in the grid step). Radii are first
  rounded *up* to K geometric bin edges (a larger box only raises the maximum), so only K bin masses
  matter. The relaxation is loose when a heavy token is split fractionally, so the HEAVY tokens of
  largest mass keep 0/1 membership (each of the 2^HEAVY cases is solved; c stays non-decreasing in
  t for each). The result is min(tanh bound, relaxation) plus the slack of the float64 arithmetic.
"""

from __future__ import annotations

import torch

from certkv.rounding import U64, gamma

BINS = 32
BIN_RATIO = 2.0**0.25  # bin edges R_max * 2^(-k/4): a radius is rounded up by at most 19%
GRID = 64
HEAVY = 3  # tokens of largest mass decided exactly (2^HEAVY cases per row)
# Above this radius the relaxation's float64 evaluation loses accuracy (terms of size e^(2R)) while the
# tanh bound is already >= tanh(4) = 0.9993: only the tanh bound is used there.
RELAX_MAX_RADIUS = 8.0


def tanh_bound(radius_max: torch.Tensor) -> torch.Tensor:
    """tanh(R/2) rounded up (float64), for the largest radius R of each row."""
    return torch.clamp(torch.tanh(radius_max / 2) * (1 + 4 * U64) + 4 * U64, max=1.0)


def _terms(problem: dict[str, torch.Tensor], t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each row and t ([N, T]): the light demand dem(t) = t*b_total - heavy benefit(t) [N, T],
    the light weights w(t) [N, T, K], and the heavy cost pi(S) [N, 1]."""
    mass, rad = problem["mass"], problem["rad"]
    h_mass, h_rad, h_in = problem["h_mass"], problem["h_rad"], problem["h_in"]
    total_b = (mass * torch.exp(-rad)).sum(-1, keepdim=True) + (h_mass * torch.exp(-h_rad)).sum(-1, keepdim=True)
    h_w = (1 - t)[..., None] * torch.exp(h_rad)[:, None, :] + t[..., None] * torch.exp(-h_rad)[:, None, :]
    demand = t * total_b - (h_w * (h_mass * h_in)[:, None, :]).sum(-1)
    w = (1 - t)[..., None] * torch.exp(rad)[:, None, :] + t[..., None] * torch.exp(-rad)[:, None, :]
    return demand, w, (h_mass * h_in).sum(-1, keepdim=True)


def _dual(mass: torch.Tensor, demand: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """An optimal (or, where infeasible, a large) dual multiplier of the light knapsack at each t:
    1 / w of the critical (fractionally filled) bin, 0 where the demand is met by the heavy tokens."""
    w_sorted, order = torch.sort(w, dim=-1, descending=True)
    benefit = torch.cumsum(torch.gather(mass[:, None, :].expand_as(w), -1, order) * w_sorted, dim=-1)
    m = (benefit < demand[..., None]).sum(-1, keepdim=True).clamp(max=mass.shape[-1] - 1)
    lam = 1.0 / torch.gather(w_sorted, -1, m)[..., 0]
    lam = torch.where(demand <= 0, torch.zeros_like(lam), lam)
    return torch.where(demand > benefit[..., -1], torch.full_like(lam, 1e12), lam)


def _objective_bound(
    mass: torch.Tensor,
    t: torch.Tensor,
    demand: torch.Tensor,
    w: torch.Tensor,
    heavy_cost: torch.Tensor,
    lam: torch.Tensor,
) -> torch.Tensor:
    """h(t, lam) = t - [pi(S) + lam*dem(t) - sum_k P_k max(0, lam*w_k(t) - 1)] >= t - c(t) for every
    lam >= 0 (weak LP duality), and convex in t: its maximum on an interval is at an endpoint."""
    slack = (mass[:, None, :] * (lam[..., None] * w - 1).clamp(min=0)).sum(-1)
    return t - heavy_cost - lam * demand + slack


def _relaxed(problem: dict[str, torch.Tensor]) -> torch.Tensor:
    """max_t [t - c(t)] bounded from above, one value per row: on each grid interval, the dual
    multipliers of both endpoints each give a convex majorant; take the better of the two."""
    mass = problem["mass"]
    n, dev = mass.shape[0], mass.device
    ts = (torch.arange(GRID + 1, dtype=torch.float64, device=dev) / GRID).expand(n, GRID + 1).contiguous()
    demand, w, heavy_cost = _terms(problem, ts)  # once for the whole grid; endpoints are slices
    lam = _dual(mass, demand, w)
    ends = [(ts[:, sl], demand[:, sl], w[:, sl]) for sl in (slice(None, -1), slice(1, None))]
    # third multiplier: balances the two endpoints when no light bin is active (exact for the heavy
    # tokens alone, where c jumps to infinity inside an interval)
    rise = (demand[:, 1:] - demand[:, :-1]).clamp(min=2.0**-60)
    balance = (ts[:, 1:] - ts[:, :-1]) / rise
    bounds = []
    for lam_at in (lam[:, :-1], lam[:, 1:], balance):
        at_ends = [_objective_bound(mass, t, d, wk, heavy_cost, lam_at) for t, d, wk in ends]
        bounds.append(torch.maximum(*at_ends))
    return torch.minimum(torch.minimum(bounds[0], bounds[1]), bounds[2]).amax(-1)


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
    # relative rounding of the float64 mass sums below, taken as an extra logit radius
    extra = 4 * gamma(n + BINS + 8, U64)
    r_max = radius.amax(-1) + extra
    base = tanh_bound(r_max)
    use = (r_max <= RELAX_MAX_RADIUS) & (mass.sum(-1) > 0)
    # every row goes through the relaxation (no host synchronisation, so the function can be captured
    # or compiled); rows outside its range are computed on clamped inputs and discarded below
    rm = r_max.clamp(max=RELAX_MAX_RADIUS)
    r = torch.minimum(radius + extra, rm[:, None])
    total = mass.sum(-1, keepdim=True)
    m = torch.where(total > 0, mass / torch.where(total > 0, total, 1.0), 1.0 / n)
    rows, dev = m.shape[0], m.device
    # the HEAVY largest masses keep 0/1 membership (2^HEAVY cases); the rest are binned and relaxed
    k_heavy = 0 if divisible else min(HEAVY, n)
    h_mass, h_idx = torch.topk(m, k_heavy, dim=-1)
    h_rad = torch.gather(r, -1, h_idx)
    light = m.scatter(-1, h_idx, 0.0)
    exps = torch.arange(BINS - 1, -1, -1, dtype=torch.float64, device=dev)
    edges = rm[:, None] * BIN_RATIO ** (-exps)  # ascending; the last edge is r_max itself
    edges[:, -1] = rm
    idx = torch.searchsorted(edges.contiguous(), r.contiguous(), right=False).clamp(max=BINS - 1)
    binned = torch.zeros(rows, BINS, dtype=torch.float64, device=dev).scatter_add_(1, idx, light)
    subsets = torch.tensor(
        [[(s >> j) & 1 for j in range(k_heavy)] for s in range(1 << k_heavy)], dtype=torch.float64, device=dev
    )
    reps = subsets.shape[0]
    problem = {
        "mass": binned.repeat_interleave(reps, 0),
        "rad": edges.repeat_interleave(reps, 0),
        "h_mass": h_mass.repeat_interleave(reps, 0),
        "h_rad": h_rad.repeat_interleave(reps, 0),
        "h_in": subsets.repeat(rows, 1),
    }
    relaxed = _relaxed(problem).reshape(rows, reps).amax(-1)
    slack = 64 * (BINS + HEAVY) * U64 * torch.exp(2 * rm) + 2.0**-45
    out = torch.where(use, torch.minimum(base, relaxed.clamp(min=0) + slack), base)
    return out.clamp(max=1.0)
