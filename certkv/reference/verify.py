"""Check every claim of a served step against the exact reference.

``verify_step`` rebuilds, for each (batch row, query head), the keys and values that head was served
(Tier-1 dequantized values, with the originals the ladder read at its stage), runs
``certkv.reference.exact.exact_step`` and compares each certificate field with its exact counterpart.
Used by the property tests, the tests and ``certkv audit``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import mpmath
import torch

from certkv.certificate import AttentionResult, Certificate
from certkv.reference.exact import exact_step

# certificate field -> the ExactStep term it bounds
TERMS = {
    "tv_bound": "tv",
    "key_term": "key",
    "value_term": "value",
    "cross_term": "cross",
    "rounding_term": "rounding",
    "output_bound": "error",
}
CLAIMS = tuple(TERMS)


@dataclass
class HeadCheck:
    """Claimed bound and exact value of each term for one head (floats; exact values rounded to
    nearest binary64 for reporting, comparisons made in mpmath)."""

    batch: int
    head: int
    stage: int
    claimed: dict[str, float]
    exact: dict[str, float]
    violations: list[str]


def _served_parts(
    parts: tuple[torch.Tensor, ...], original: torch.Tensor, exact_rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    c, s, z = (p.clone() for p in parts)
    c[exact_rows], s[exact_rows], z[exact_rows] = 0.0, 0.0, original[exact_rows].double()
    return c, s, z


@dataclass
class HeadTask:
    """Everything needed to check one (batch row, query head) of a step; picklable, so tasks can be
    checked in worker processes. k_hat/v_hat are the keys and values this head was served, as exact
    (codes, scale, zero) float64 [n, D]; ``claimed`` holds the certificate's float fields."""

    batch: int
    head: int
    stage: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_hat: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    v_hat: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    served: torch.Tensor
    scale: float | None
    prec: int
    claimed: dict[str, float]


def head_tasks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_parts: tuple[torch.Tensor, ...],
    v_parts: tuple[torch.Tensor, ...],
    output: torch.Tensor,
    cert: Certificate,
    rows_stage1: torch.Tensor,
    rows_stage2: torch.Tensor,
    scale: float | None = None,
    prec: int = 128,
) -> Iterator[HeadTask]:
    """One task per (batch row, query head). q, output [B, H_q, 1, D]; k, v [B, H_kv, n, D] originals;
    k_parts, v_parts the stage-0 Tier-1 values as (codes, scale, zero) float64 [B, H_kv, n, D]
    (``TieredKVCache.dequantized_exact``); rows_stage1/2 bool [B, H_kv, n] (``AttentionResult``)."""
    b_n, hq, _, _ = q.shape
    group = hq // k.shape[1]
    n = k.shape[2]
    all_rows = torch.ones(n, dtype=torch.bool)
    none = torch.zeros(n, dtype=torch.bool)
    for b in range(b_n):
        for h in range(hq):
            hk = h // group
            stage = int(cert.stage[b, h, 0])
            rows1, rows2 = rows_stage1[b, hk].cpu(), rows_stage2[b, hk].cpu()
            key_rows = {0: none, 1: none, 2: rows2, 3: all_rows}[stage]
            value_rows = {0: none, 1: rows1, 2: rows1 | rows2, 3: all_rows}[stage]
            kb, vb = k[b, hk].cpu(), v[b, hk].cpu()
            yield HeadTask(
                b,
                h,
                stage,
                q[b, h, 0].cpu(),
                kb,
                vb,
                _served_parts(tuple(p[b, hk].cpu() for p in k_parts), kb, key_rows),
                _served_parts(tuple(p[b, hk].cpu() for p in v_parts), vb, value_rows),
                output[b, h, 0].cpu(),
                scale,
                prec,
                {name: float(getattr(cert, name)[b, h, 0]) for name in CLAIMS},
            )


MAX_PREC = 4096  # bits; a claim still undecided here is reported as a violation, never passed


def check_head(task: HeadTask) -> HeadCheck:
    """Exact reference for one head. A claim holds when claimed >= exact + the reference's own error
    bound, is violated when claimed < exact - that bound, and otherwise the reference is recomputed at
    twice the precision (up to MAX_PREC bits; still undecided counts as violated)."""
    prec = task.prec
    while True:
        ex = exact_step(task.q, task.k, task.v, task.k_hat, task.v_hat, task.served, task.scale, prec)
        exact = {name: ex.magnitude(term) for name, term in TERMS.items()}
        margin = {name: ex.err[term] for name, term in TERMS.items()}
        claimed = task.claimed
        # a NaN claim compares False both ways: it is never decided as held
        held = [name for name in CLAIMS if mpmath.mpf(claimed[name]) >= exact[name] + margin[name]]
        broken = [
            name
            for name in CLAIMS
            if math.isnan(claimed[name]) or mpmath.mpf(claimed[name]) < exact[name] - margin[name]
        ]
        undecided = [name for name in CLAIMS if name not in held and name not in broken]
        if not undecided or prec >= MAX_PREC or broken:
            break
        prec *= 2
    violations = broken + undecided
    return HeadCheck(task.batch, task.head, task.stage, claimed, {n: float(x) for n, x in exact.items()}, violations)


def verify_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_parts: tuple[torch.Tensor, ...],
    v_parts: tuple[torch.Tensor, ...],
    result: AttentionResult,
    scale: float | None = None,
    prec: int = 128,
) -> list[HeadCheck]:
    """Check every head of a served step (arguments as in ``head_tasks``)."""
    tasks = head_tasks(
        q,
        k,
        v,
        k_parts,
        v_parts,
        result.output,
        result.certificate,
        result.rows_stage1,
        result.rows_stage2,
        scale,
        prec,
    )
    return [check_head(t) for t in tasks]
