"""Capture the post-RoPE queries, keys and values of every attention layer of a Hugging Face model.

An attention function registered with ``transformers.AttentionInterface`` sees exactly what the
model's attention sees (after RoPE, before the GQA repeat); it records the tensors and then runs the
stock SDPA attention, so the forward pass is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CAPTURE_NAME = "certkv_capture"
DEFAULT_MODEL = Path(__file__).parent / "data" / "tinylm"


@dataclass
class Captured:
    """Per layer: q [B, H_q, T, D], k and v [B, H_kv, T, D] in the model's dtype, and the scaling."""

    q: list[torch.Tensor] = field(default_factory=list)
    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)
    scaling: list[float] = field(default_factory=list)


def load_model(path: str | Path = DEFAULT_MODEL, dtype: torch.dtype | None = None) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.eval()
    return model


@torch.no_grad()
def capture(model: Any, input_ids: torch.Tensor) -> Captured:
    """Run ``model`` on ``input_ids`` [B, T] and return every layer's q, k, v."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out = Captured()

    def recording(
        module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
    ) -> Any:
        out.q.append(query.detach().clone())
        out.k.append(key.detach().clone())
        out.v.append(value.detach().clone())
        out.scaling.append(float(kwargs.get("scaling") or module.scaling))
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register(CAPTURE_NAME, recording)
    previous = model.config._attn_implementation
    model.config._attn_implementation = CAPTURE_NAME
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        model.config._attn_implementation = previous
    return out
