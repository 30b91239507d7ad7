"""The fallback ladder: serve each head from the lowest stage whose certificate meets tolerance.

Stage 0 certified quantized; 1 FP16 values (from Tier-2) for the tokens carrying the value error;
2 additionally FP16 keys for the tokens carrying the key error (only those rows are fetched);
3 dense FP16 attention over Tier-2, the same computation as ``certkv.dense_attention``.
Every stage's certificate comes from the same formulas (``certified_step``) with the fetched tokens'
radii set to zero (proofs/ lemma 6), so a mixed-precision step is certified exactly like any other.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from certkv.attention import StepTokens, certified_step
from certkv.certificate import Certificate
from certkv.config import CertConfig

# Tier-2 row reader: (batch, kv head, token) index vectors and whether keys are wanted -> (k rows or
# None, v rows), each [m, D] 16-bit. Stage 1 replaces values only, so it reads no key rows.
RowFetch = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor | None, torch.Tensor]]
# Tier-2 reader of whole (batch, kv head) pairs -> (k, v), each [m, 1, n, D] 16-bit.
DenseFetch = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# Stage 3's served output and certificate for (batch, kv head) pairs: (pairs, q [m, 1, G, D], k, v
# [m, 1, n, D]) -> (output [m, 1, G, D], certificate [m, 1, G] with its stage-0 fields as
# ``certified_step`` leaves them); the output is ``certkv.attention.served_attention``'s, bit for bit.
DenseCertify = Callable[
    [tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, Certificate]
]

# Share of the tolerance the tokens left quantized may still contribute after a fetch: the rest is
# left to the key, cross and rounding terms, which the selection does not model exactly.
TARGET_SHARE = 0.25


@dataclass
class LadderOutcome:
    output: torch.Tensor  # [B, Hkv, G, D]
    certificate: Certificate  # fields [B, Hkv, G]
    rows_stage1: torch.Tensor  # bool [B, Hkv, n]: tokens whose FP16 values stage 1 used
    rows_stage2: torch.Tensor  # bool [B, Hkv, n]: tokens whose FP16 keys and values stage 2 added
    # whether rows_stage1 | rows_stage2 has any token: known on the host, so a step that fetched nothing
    # skips the promotion bookkeeping without a device sync
    fetched: bool


def tolerance(cfg: CertConfig, out: torch.Tensor) -> torch.Tensor:
    return cfg.out_tol + cfg.out_rtol * out.double().abs().amax(-1)


def accepts(cfg: CertConfig, cert: Certificate, tol: torch.Tensor) -> torch.Tensor:
    return (cert.tv_bound <= cfg.tv_tol) & (cert.output_bound <= tol)


def fetch_cap(cfg: CertConfig, n: int) -> int:
    """The most tokens one head of ``n`` may fetch at a stage below the dense one (``fetch_fraction``)."""
    return max(1, math.ceil(cfg.fetch_fraction * n))


def select(contrib: torch.Tensor, target: torch.Tensor, need: torch.Tensor, cap: int) -> torch.Tensor:
    """Fewest tokens per (b, kv head) whose removal leaves sum(contrib) <= target, at most ``cap``.

    contrib: [B, Hkv, n] >= 0; target: [B, Hkv]; need: bool [B, Hkv]. Returns bool [B, Hkv, n]."""
    vals, order = torch.sort(contrib, dim=-1, descending=True)
    rest = contrib.sum(-1, keepdim=True) - torch.cumsum(vals, dim=-1)
    count = (rest > target[..., None]).sum(-1) + 1
    count = torch.where(contrib.sum(-1) <= target, torch.zeros_like(count), count)
    count = torch.where(need, count.clamp(max=cap), torch.zeros_like(count))
    chosen_sorted = torch.arange(contrib.shape[-1], device=contrib.device) < count[..., None]
    chosen_sorted &= vals > 0
    return torch.zeros_like(chosen_sorted).scatter(-1, order, chosen_sorted)


def dense_stage(
    q: torch.Tensor,
    scale: float,
    cfg: CertConfig,
    out: torch.Tensor,
    cert: Certificate,
    fetch_dense: DenseFetch,
    n: int,
    certify: DenseCertify | None = None,
) -> tuple[torch.Tensor, Certificate]:
    """Stage 3 for the query rows of q [B, Hkv, G, D] that ``cert`` (of ``out``, its tolerance and
    acceptance set) does not accept: each (batch row, KV head) with such a row fetches its ``n`` tokens'
    originals and those rows are served by dense attention over them, certified by ``certify``
    (default: ``certified_step`` on exact tokens); the other rows keep ``out`` and ``cert``."""
    failing = ~cert.accepted
    pairs = failing.any(-1).nonzero(as_tuple=True)
    k_d, v_d = fetch_dense(*pairs)
    q_d = q[pairs].unsqueeze(1)
    if certify is None:
        out_d, cert_d, _ = certified_step(q_d, StepTokens.exact(k_d, v_d), scale, out.dtype)
    else:
        out_d, cert_d = certify(pairs, q_d, k_d, v_d)
    full_out = out.clone()
    full_out[pairs] = out_d[:, 0]
    dense_cert = cert.clone()
    for name, value in cert_d.to_dict().items():
        getattr(dense_cert, name)[pairs] = value[:, 0]
    dense_cert.stage[pairs] = 3
    dense_cert.fetched_values[pairs] = n
    dense_cert.fetched_keys[pairs] = n
    dense_cert.tolerance = tolerance(cfg, full_out)
    dense_cert.accepted = accepts(cfg, dense_cert, dense_cert.tolerance)
    return torch.where(failing[..., None], full_out, out), cert.where(failing, dense_cert)


def serve(
    q: torch.Tensor,
    tokens: StepTokens,
    scale: float,
    cfg: CertConfig,
    fetch_rows: RowFetch,
    fetch_dense: DenseFetch,
) -> LadderOutcome:
    """Run the ladder for q [B, Hkv, G, D] (16-bit) over ``tokens``; see the module docstring."""
    out, cert, detail = certified_step(q, tokens, scale, q.dtype)
    out_dtype = out.dtype
    n = tokens.k.shape[2]
    tol = tolerance(cfg, out)
    cert.tolerance, cert.accepted = tol, accepts(cfg, cert, tol)
    rows = {1: torch.zeros(tokens.k.shape[:3], dtype=torch.bool, device=tokens.k.device)}
    rows[2] = torch.zeros_like(rows[1])
    cap = fetch_cap(cfg, n)
    current = tokens
    fetched = False
    for stage in (1, 2):
        failing = ~cert.accepted
        if stage > cfg.max_stage or not bool(failing.any()):
            break
        need = failing.any(-1)  # [B, Hkv]
        weights = torch.where(failing[..., None], detail.weights, torch.zeros_like(detail.weights))
        if stage == 1:
            contrib = (weights * detail.value_radius.unsqueeze(2)).amax(2)
            target = TARGET_SHARE * torch.where(failing, cert.tolerance, torch.inf).amin(-1)
        else:
            contrib = (weights * detail.radius).amax(2)
            v_range = (tokens.v_max - tokens.v_min).double().amax(-1).clamp(min=1e-30)
            target = TARGET_SHARE * torch.minimum(
                torch.full_like(v_range, cfg.tv_tol), torch.where(failing, cert.tolerance, torch.inf).amin(-1) / v_range
            )
        chosen = select(contrib, target, need, cap)
        b, h, i = chosen.nonzero(as_tuple=True)
        fetched |= len(b) > 0
        k_rows, v_rows = fetch_rows(b, h, i, stage == 2)
        current = current.with_exact((b, h, i), k=k_rows, v=v_rows)
        rows[stage] = chosen
        out_s, cert_s, detail_s = certified_step(q, current, scale, out_dtype)
        cert_s.stage = torch.full_like(cert.stage, stage)
        cert_s.tolerance = tolerance(cfg, out_s)
        cert_s.accepted = accepts(cfg, cert_s, cert_s.tolerance)
        # a failing head takes this stage if it is accepted here, or if it is the last stage allowed
        take = failing & (cert_s.accepted | (stage == cfg.max_stage))
        out = torch.where(take[..., None], out_s, out)
        cert = cert.where(take, cert_s)
        detail = detail_s
    if cfg.max_stage >= 3 and not bool(cert.accepted.all()):
        out, cert = dense_stage(q, scale, cfg, out, cert, fetch_dense, n)
    n1, n2 = rows[1].sum(-1, keepdim=True), rows[2].sum(-1, keepdim=True)
    served = cert.stage
    none = torch.zeros_like(n1)
    cert.fetched_values = torch.where(
        served == 3, n, torch.where(served == 2, n1 + n2, torch.where(served == 1, n1, none))
    )
    cert.fetched_keys = torch.where(served == 3, n, torch.where(served == 2, n2, none))
    return LadderOutcome(out, cert, rows[1], rows[2], fetched)
