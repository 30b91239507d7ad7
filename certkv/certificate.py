"""Certificates and results: what a step served and the bound that holds for it."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

STAGE_NAMES = ("quantized", "fp16-values", "fp16-keys", "dense")


@dataclass
class Certificate:
    """Per (batch row, query head, query position) figures of one attention step, each [B, H_q, 1].

    Let o be exact real-arithmetic attention of the query over the appended FP16/BF16 originals, p its
    weights, p_hat the exact weights over the dequantized keys served, v_hat the dequantized values.
    Every field is a float64 upper bound, in the units of the output (values) unless stated:

    * ``tv_bound`` >= TV(p, p_hat) (a probability, unitless);
    * ``key_term`` >= max_j |sum_i (p_hat_i - p_i) v_ij|        (Delta W . V)
    * ``value_term`` >= max_j |sum_i p_i (v_hat_ij - v_ij)|     (W . Delta V)
    * ``cross_term`` >= max_j |sum_i (p_hat_i - p_i)(v_hat_ij - v_ij)|  (Delta W . Delta V)
    * ``rounding_term`` >= max_j |output_j - sum_i p_hat_i v_hat_ij| (the computation's own arithmetic)
    * ``output_bound`` >= max_j |output_j - o_j|: the max over j of the four per-coordinate terms' sum.

    ``stage`` is the ladder stage served (0 quantized, 1 FP16 values, 2 FP16 keys, 3 dense);
    ``tv_tanh`` the uniform-radius baseline tanh(max radius / 2) for comparison; ``logit_radius``
    the largest logit perturbation radius (key quantization plus rounding); ``tolerance`` the output
    tolerance the step was held to and ``accepted`` whether the served bounds meet both tolerances;
    ``fetched_values``/``fetched_keys`` the Tier-2 rows read for this head (stages 1-2).
    """

    tv_bound: torch.Tensor
    key_term: torch.Tensor
    value_term: torch.Tensor
    cross_term: torch.Tensor
    rounding_term: torch.Tensor
    output_bound: torch.Tensor
    stage: torch.Tensor
    tv_tanh: torch.Tensor
    logit_radius: torch.Tensor
    tolerance: torch.Tensor
    accepted: torch.Tensor
    fetched_values: torch.Tensor
    fetched_keys: torch.Tensor

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def clone(self) -> Certificate:
        return Certificate(**{f.name: getattr(self, f.name).clone() for f in fields(self)})

    def where(self, mask: torch.Tensor, other: Certificate) -> Certificate:
        """Field-wise: ``other`` where mask (shape [B, H_q, 1]) is true, ``self`` elsewhere."""
        return Certificate(
            **{f.name: torch.where(mask, getattr(other, f.name), getattr(self, f.name)) for f in fields(self)}
        )


@dataclass
class AttentionResult:
    """``output``: [B, H_q, 1, D] in the query's dtype; ``certificate``: per-head bounds.

    ``rows_stage1``/``rows_stage2`` (bool [B, H_kv, n]) say which tokens' originals the ladder read: a
    head served at stage 1 used FP16 values for ``rows_stage1``; at stage 2 FP16 values for both and
    FP16 keys for ``rows_stage2``; at stage 3 every original."""

    output: torch.Tensor
    certificate: Certificate
    rows_stage1: torch.Tensor
    rows_stage2: torch.Tensor
