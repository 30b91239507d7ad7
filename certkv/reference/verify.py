"""Check every claim of a served step against the exact reference.

``verify_step`` rebuilds, for each (batch row, query head), the keys and values that head was served
(Tier-1 dequantized values, with the originals the ladder read at its stage), runs
``certkv.reference.exact.exact_step`` and compares each certificate field with its exact counterpart.
Used by the property tests, ``certkv demo`` and the audit.
"""

from __future__ import annotations

from dataclasses import dataclass

import mpmath
import torch

from certkv.certificate import AttentionResult
from certkv.reference.exact import exact_step

# certificate field -> how its exact counterpart is obtained from an ExactStep
CLAIMS = ("tv_bound", "key_term", "value_term", "cross_term", "rounding_term", "output_bound")


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
    """q [B, H_q, 1, D]; k, v [B, H_kv, n, D] originals; k_parts, v_parts the stage-0 Tier-1 values
    as (codes, scale, zero) float64 [B, H_kv, n, D] (``TieredKVCache.dequantized_exact``)."""
    b_n, hq, _, _ = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    cert = result.certificate
    checks = []
    for b in range(b_n):
        for h in range(hq):
            hk = h // group
            stage = int(cert.stage[b, h, 0])
            n = k.shape[2]
            rows1 = result.rows_stage1[b, hk].cpu()
            rows2 = result.rows_stage2[b, hk].cpu()
            all_rows = torch.ones(n, dtype=torch.bool)
            none = torch.zeros(n, dtype=torch.bool)
            key_rows = {0: none, 1: none, 2: rows2, 3: all_rows}[stage]
            value_rows = {0: none, 1: rows1, 2: rows1 | rows2, 3: all_rows}[stage]
            kh = _served_parts(tuple(p[b, hk].cpu() for p in k_parts), k[b, hk].cpu(), key_rows)
            vh = _served_parts(tuple(p[b, hk].cpu() for p in v_parts), v[b, hk].cpu(), value_rows)
            ex = exact_step(
                q[b, h, 0].cpu(), k[b, hk].cpu(), v[b, hk].cpu(), kh, vh, result.output[b, h, 0].cpu(), scale, prec
            )
            exact = {
                "tv_bound": ex.tv,
                "key_term": ex.max_abs(ex.key),
                "value_term": ex.max_abs(ex.value),
                "cross_term": ex.max_abs(ex.cross),
                "rounding_term": ex.max_abs(ex.rounding),
                "output_bound": ex.max_abs(ex.error),
            }
            claimed = {name: float(getattr(cert, name)[b, h, 0]) for name in CLAIMS}
            violations = [name for name in CLAIMS if not mpmath.mpf(claimed[name]) >= exact[name]]
            checks.append(HeadCheck(b, h, stage, claimed, {n_: float(x) for n_, x in exact.items()}, violations))
    return checks
