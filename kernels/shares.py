"""The ladder's per-token error shares in one launch; its torch reference is
``certkv.kernel_ladder.token_shares``.

Stage 2 on the kernel (``certkv.kernel_ladder.stage2``) fetches, for each head its stage 0 left
uncertified, the quantized tokens with the largest estimated share of the output bound: per token,
max over the query rows g of w_g,i (eta_i + eps_g,i R), with w the step's softmax weights, eta_i the
token's largest value radius, eps_g,i its logit radius and R the head's value range. The torch
reference dequantizes the keys, computes every served token's logit and a softmax (some twenty
launches, 1.1-1.7 ms of host time per stage-2 call on the H100's host). Here one launch does it, and
the softmax's normaliser comes from stage 0's own partials (the split maxima m and sums l, log2
units): the same served tokens, so the same weights up to rounding.

The shares only choose which rows to fetch: the certificate of the step served after the fetch is
the kernel's own, whatever was chosen, so this estimate carries no soundness obligation (its
rounding is not modelled). Tests hold it to the reference within a relative tolerance.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from certkv.quant import RADIUS_FACTOR

from .decode import KEY_GROUP, LOG2E, VALUE_GROUP, Partials, Tier1
from .launch import launcher

BLOCK_T = 64  # tokens per program (a divisor of KEY_GROUP: a program's tokens share one key group)
RADIUS_F = tl.constexpr(RADIUS_FACTOR)


@triton.jit(do_not_specialize=["n_quant", "n_parts"])
def _shares_kernel(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, vs_ptr, pmask_ptr, m_ptr, l_ptr, range_ptr, pairs_ptr, out_ptr,
    n_quant, n_parts, qk_scale, eps_scale,
    H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, GPART: tl.constexpr, SP: tl.constexpr,
    D: tl.constexpr, BLOCK_T: tl.constexpr, PROMOTED: tl.constexpr,
):  # fmt: skip
    p = tl.program_id(0)
    t0 = tl.program_id(1) * BLOCK_T
    bh = tl.load(pairs_ptr + 2 * p) * H + tl.load(pairs_ptr + 2 * p + 1)
    gi = tl.arange(0, GP)
    real = gi < G
    dc = tl.arange(0, D)
    q = tl.load(q_ptr + (bh * G + gi)[:, None] * D + dc[None, :], mask=real[:, None], other=0.0).to(tl.float32)
    # the step's normaliser per query row: its splits' partials merged (log2 units)
    si = tl.arange(0, SP)
    part = (bh * n_parts + si)[:, None] * GPART + gi[None, :]
    have = (si < n_parts)[:, None] & real[None, :]
    m_s = tl.load(m_ptr + part, mask=have, other=-float("inf"))
    top = tl.max(m_s, 0)
    top = tl.where(top == -float("inf"), 0.0, top)  # padding rows: no weight anywhere
    l_row = tl.sum(tl.where(have, tl.load(l_ptr + part, mask=have, other=0.0) * tl.exp2(m_s - top[None, :]), 0.0), 0)
    # the keys of this program's tokens, dequantized in binary32 (one key group)
    ti = t0 + tl.arange(0, BLOCK_T)
    codes = tl.load(kc_ptr + (bh * n_quant + ti)[:, None] * D + dc[None, :]).to(tl.float32)
    grp = (bh * (n_quant // 128) + t0 // 128) * D + dc
    k_s = tl.load(ks_ptr + grp).to(tl.float32)
    keys = codes * k_s[None, :] + tl.load(kz_ptr + grp).to(tl.float32)[None, :]
    z = tl.dot(q, tl.trans(keys), input_precision="ieee") * qk_scale  # [GP, BLOCK_T]
    w = tl.exp2(z - top[:, None]) / tl.where(real, l_row, 1.0)[:, None]
    eps = eps_scale * tl.sum(tl.abs(q) * k_s[None, :], 1)  # [GP]: the group's logit radius per row
    vg = tl.arange(0, D // 64)
    eta = tl.max(tl.load(vs_ptr + (bh * n_quant + ti)[:, None] * (D // 64) + vg[None, :]).to(tl.float32), 1)
    radius = eta[None, :] * RADIUS_F + eps[:, None] * tl.load(range_ptr + bh)
    share = tl.max(tl.where(real[:, None], w * radius, 0.0), 0)
    if PROMOTED:  # served from their exact copies already
        share = tl.where(tl.load(pmask_ptr + bh * n_quant + ti) != 0, 0.0, share)
    tl.store(out_ptr + p * n_quant + ti, share)


def token_shares(
    q: torch.Tensor, t1: Tier1, partials: Partials, scale: float, value_range: torch.Tensor, pairs: torch.Tensor
) -> torch.Tensor:
    """``certkv.kernel_ladder.token_shares`` for q [B, H_kv, G, D] over Tier-1 ``t1``, with the softmax's
    normaliser from ``partials``, the stage-0 launch over the same ``t1`` and q; binary32 [P, n_quant]
    for the (batch row, KV head) ``pairs`` [P, 2]; value_range [B, H_kv]."""
    _, h, g, d = q.shape
    n = t1.kc.shape[2]
    if n % KEY_GROUP or d < VALUE_GROUP:
        raise ValueError("layout: n_quant must be a multiple of 128 and D >= 64")
    out = torch.empty(len(pairs), n, dtype=torch.float32, device=q.device)
    if len(pairs) == 0 or n == 0:
        return out.zero_()
    parts = partials.m.shape[1]
    mask = t1.prom_mask if t1.prom_mask is not None else t1.kc
    launcher(_shares_kernel)[(len(pairs), n // BLOCK_T)](
        q.contiguous(), t1.kc, t1.ks, t1.kz, t1.vs, mask, partials.m, partials.l,
        value_range.float().contiguous(), pairs.to(torch.int32).contiguous(), out,
        n, parts, scale * LOG2E, scale * RADIUS_FACTOR,
        H=h, G=g, GP=max(16, triton.next_power_of_2(g)), GPART=partials.m.shape[2],
        SP=triton.next_power_of_2(parts), D=d, BLOCK_T=BLOCK_T, PROMOTED=t1.prom_mask is not None,
    )  # fmt: skip
    return out
