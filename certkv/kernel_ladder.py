"""The ladder's stage 2 on the decode kernel: the heads whose kernel certificate misses tolerance are
served again by the kernel with FP16 keys and values, fetched from Tier-2, for the tokens that carry
most of their error.

Without it, a step the kernel did not certify for every head went whole to the torch ladder, ~500
float64 launches a certified step, up to three of them a step: on the H100 a layer-step of the tiny
model at 2K cost 43 ms that way against ~2 ms through the kernel, and half the layer-steps took it
(docs/benchmarks.md, "The ladder's stage 2 on the kernel").

The fetched rows are served as promoted tokens: exact copies in the kernel's last split, their
quantized copies skipped. That is the kernel's own arithmetic for the cache's adaptive precision, so
the certificate of a stage-2 step is the kernel's certificate, with the same guarantee; which tokens
are fetched only decides how tight it is. They are chosen from an estimate of each token's share of
the bound, in binary32 over the failing heads only: its largest weight over the query rows (softmax
of the dequantized logits) times its value radius plus its logit radius times the head's value range.
The cache computes it in one launch (``certkv.kernels.shares``, the softmax's normaliser from stage 0's
partials); ``token_shares`` here is that kernel's torch reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from certkv import errors
from certkv.attention import StepTokens, certified_step, served_attention
from certkv.certificate import Certificate
from certkv.config import CertConfig
from certkv.ladder import TARGET_SHARE, RowFetch, accepts, fetch_cap, select, tolerance
from certkv.quant import RADIUS_FACTOR
from certkv.rounding import carried, output_distance

# bytes of binary32 temporaries per chunk of failing heads in ``token_shares`` (dequantized keys)
CHUNK_BYTES = 1 << 28


def token_shares(
    q: torch.Tensor, t1: object, scale: float, value_range: torch.Tensor, pairs: torch.Tensor
) -> torch.Tensor:
    """Per quantized token of the (batch row, KV head) ``pairs`` [P, 2], an estimate of its share of the
    output bound, binary32 [P, n_quant]: max over the query rows g of w_g,i (eta_i + eps_g,i R), with w
    the softmax of the dequantized and exact logits, eta_i the token's largest value radius, eps_g,i
    its logit radius s |q_g|.r_k and R ``value_range`` [B, H_kv] (the head's largest channel range).
    Promoted tokens (served exactly already) get 0."""
    from certkv.kernels.decode import KEY_GROUP, Tier1

    assert isinstance(t1, Tier1)
    n = t1.kc.shape[2]
    d = q.shape[-1]
    shares = torch.zeros(len(pairs), n, dtype=torch.float32, device=q.device)
    served = t1.served()
    step = max(1, CHUNK_BYTES // max(1, 4 * n * d))
    for lo in range(0, len(pairs), step):
        b, h = pairs[lo : lo + step].unbind(1)
        qf = q[b, h].float()  # [P, G, D]
        quantized = t1.quantized_keys((b, h))
        keys = [quantized.dequantize()[:, 0], *(k[b, h].float() for k, _ in t1.exact_segments())]
        logits = torch.cat([scale * torch.matmul(qf, k.transpose(-1, -2)) for k in keys], -1)  # [P, G, N]
        weights = torch.softmax(logits.masked_fill(~served[b, h][:, None, :], -math.inf), -1)[..., :n]
        ks = quantized.scale[:, 0].float()  # [P, n / KEY_GROUP, D]
        eps = scale * torch.matmul(qf.abs(), (ks * RADIUS_FACTOR).transpose(-1, -2))  # [P, G, n / KEY_GROUP]
        eta = (t1.vs[b, h].float() * RADIUS_FACTOR).amax(-1)  # [P, n]
        radius = eta[:, None, :] + eps.repeat_interleave(KEY_GROUP, -1) * value_range[b, h][:, None, None]
        shares[lo : lo + step] = (weights * radius).amax(1)
    return shares


def with_fetched(
    t1: object, rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor
) -> object:
    """A copy of Tier-1 ``t1`` in which the quantized tokens ``rows`` (batch, KV head, index among the
    quantized tokens; grouped by (batch, head), as ``nonzero`` gives them) are promoted: their exact keys
    ``k`` and values ``v`` [m, D] appended to the promotion slots, their quantized copies masked."""
    from certkv.kernels.decode import Tier1

    assert isinstance(t1, Tier1)
    b, h, i = rows
    nb, nh, n, d = t1.kc.shape
    pair = b * nh + h
    counts = torch.bincount(pair, minlength=nb * nh)
    rank = torch.arange(len(pair), device=pair.device) - (torch.cumsum(counts, 0) - counts)[pair]
    have = t1.n_promoted
    size = have + int(counts.max()) if len(pair) else have
    # the originals as they are: a conversion could change them while the certificate takes them as exact
    if not (k.dtype == v.dtype == t1.sink_k.dtype):
        raise errors.DTypeError(f"fetched rows are {k.dtype}/{v.dtype}, Tier-1's exact tokens {t1.sink_k.dtype}")
    out = Tier1(**vars(t1))
    out.prom_k = torch.zeros(nb, nh, size, d, dtype=k.dtype, device=t1.kc.device)
    out.prom_v = torch.zeros(nb, nh, size, d, dtype=v.dtype, device=t1.kc.device)
    out.prom_idx = torch.full((nb, nh, size), -1, dtype=torch.int64, device=t1.kc.device)
    out.prom_mask = torch.zeros(nb, nh, n, dtype=torch.uint8, device=t1.kc.device)
    if have:
        assert t1.prom_k is not None and t1.prom_v is not None and t1.prom_idx is not None
        assert t1.prom_mask is not None
        out.prom_k[:, :, :have], out.prom_v[:, :, :have] = t1.prom_k, t1.prom_v
        out.prom_idx[:, :, :have] = t1.prom_idx
        out.prom_mask.copy_(t1.prom_mask)
    out.prom_k[b, h, have + rank] = k
    out.prom_v[b, h, have + rank] = v
    out.prom_idx[b, h, have + rank] = i
    out.prom_mask[b, h, i] = 1
    return out


def stage2(
    q: torch.Tensor,
    t1: object,
    scale: float,
    v_min: torch.Tensor,
    v_max: torch.Tensor,
    cfg: CertConfig,
    out: torch.Tensor,
    cert: Certificate,
    partials: object,
    n_sink: int,
    fetch_rows: RowFetch,
    step: Callable[[object], tuple[torch.Tensor, Certificate]],
) -> tuple[torch.Tensor, Certificate, torch.Tensor] | None:
    """Stage 2 for the query rows of q [B, H_kv, G, D] that ``cert`` (the certificate of the kernel's
    stage-0 output ``out``, its tolerance and acceptance set; ``partials`` that launch's partials) does
    not accept. Each (batch row, KV head) with such a row fetches the fewest tokens, by their estimated
    shares (``token_shares``, computed in one launch by ``certkv.kernels.shares``), whose
    removal leaves at most ``TARGET_SHARE`` of its tightest tolerance, at most ``fetch_fraction`` of
    its tokens (as the torch ladder's stages); ``step(tier1)`` serves all heads over Tier-1 with those tokens promoted
    (``with_fetched``), and the failing rows take that result.

    Returns the output [B, H_kv, G, D] and certificate (tolerance and acceptance set) of every row:
    stage 0's where ``cert`` accepts it, else stage 2's (with the head's fetched count), and the
    fetched rows, bool [B, H_kv, n_quant]; None where nothing would be fetched (no quantized token
    carries weight, or the estimate already meets the target)."""
    from certkv.kernels.decode import Partials, Tier1
    from certkv.kernels.shares import token_shares as shares_kernel

    assert isinstance(t1, Tier1) and isinstance(partials, Partials)
    failing = ~cert.accepted  # [B, H, G]
    need = failing.any(-1)
    pairs = need.nonzero()
    value_range = (v_max.float() - v_min.float()).amax(-1)
    shares = torch.zeros(t1.kc.shape[:3], dtype=torch.float64, device=q.device)
    shares[pairs[:, 0], pairs[:, 1]] = shares_kernel(q, t1, partials, scale, value_range, pairs).double()
    target = TARGET_SHARE * torch.where(failing, cert.tolerance, torch.inf).amin(-1)
    n = t1.kc.shape[2] + t1.sink_k.shape[2] + t1.win_k.shape[2]
    chosen = select(shares, target, need, fetch_cap(cfg, n))
    b, h, i = chosen.nonzero(as_tuple=True)
    if len(b) == 0:
        return None
    k_rows, v_rows = fetch_rows(b, h, i + n_sink, True)
    assert k_rows is not None
    out2, cert2 = step(with_fetched(t1, (b, h, i), k_rows, v_rows))
    cert2.stage = torch.full_like(cert2.stage, 2)
    count = chosen.sum(-1, keepdim=True).expand_as(cert2.stage)
    cert2.fetched_values, cert2.fetched_keys = count.clone(), count.clone()
    cert2.tolerance = tolerance(cfg, out2)
    cert2.accepted = accepts(cfg, cert2, cert2.tolerance)
    return torch.where(failing[..., None], out2, out), cert.where(failing, cert2), chosen


def certify_dense(
    pairs: tuple[torch.Tensor, ...],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    cfg: CertConfig,
    v_min: torch.Tensor,
    v_max: torch.Tensor,
) -> tuple[torch.Tensor, Certificate, bool]:
    """Stage 3 certified on the kernel (``certkv.ladder.dense_stage``'s ``certify``): the dense path's
    output over the originals k, v [m, 1, n, D] of the (batch row, KV head) ``pairs`` for q [m, 1, G, D]
    (``served_attention``: what the torch ladder's stage 3 serves, bit for bit), and a certificate for
    it from the decode kernel run over the same originals (``Tier1.of_originals``):

        |served - o| <= |served - kernel| + |kernel - o| <= distance + the kernel's output bound,

    the distance taken in float64 (exact for FP16 outputs, one rounding for BF16 ones), each sum
    rounded up (proofs/lemma_dense_transfer.py); the rounding term takes the distance too. The
    kernel's bound is looser than the binary32 dense computation's own (FP16 weights in its products:
    0.004-0.006 against 0.0003-0.0004 for values of 0.5 N(0, 1) at 4K-128K, docs/benchmarks.md), and
    its certificate costs one kernel step against ~500 small launches. Pairs with a row whose bound
    this leaves above tolerance are also certified by ``certified_step`` over the originals, and each
    row keeps the smaller bound. Also returns whether any pair needed that. v_min, v_max [B, H_kv, D]:
    the range of the originals over every token."""
    from certkv.kernels.decode import Tier1
    from certkv.streaming import kernel_step

    out = served_attention(q, k, v, scale, q.dtype)
    b, h = pairs
    out_k, cert = kernel_step(q, Tier1.of_originals(k, v), scale, v_min[b, h][:, None], v_max[b, h][:, None])
    apart = output_distance(out, out_k)
    cert.rounding_term, cert.output_bound = carried(cert.rounding_term, apart), carried(cert.output_bound, apart)
    missed = (~accepts(cfg, cert, tolerance(cfg, out))).any(-1)[:, 0]  # [m]
    if not bool(missed.any()):
        return out, cert, False
    out_t, cert_t, _ = certified_step(q[missed], StepTokens.exact(k[missed], v[missed]), scale, q.dtype)
    # the same output (one served computation); each row keeps the smaller of its two bounds
    tighter = cert_t.output_bound < cert.output_bound[missed]  # [m', 1, G]
    out[missed] = torch.where(tighter[..., None], out_t, out[missed])
    for name, value in cert_t.to_dict().items():
        field = getattr(cert, name)
        field[missed] = torch.where(tighter, value, field[missed])
    return out, cert, True
