"""Record a trace from a Hugging Face causal LM: ``certkv record``.

The model decodes greedily through a ``certkv.hf.CertifiedCache`` carrying a ``TraceRecorder``: the
prompt is prefilled with exact attention (filling the tiers), and each of the ``max_new_tokens``
decode steps is served, certified and recorded exactly as a user's generation would be (closed loop:
certified outputs feed the next token).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from certkv import errors
from certkv.codec import TextCodec
from certkv.config import CertConfig
from certkv.trace import TraceRecorder, TraceSample


@torch.no_grad()
def record(
    model_path: str | Path,
    text: str,
    out: str | Path,
    max_new_tokens: int = 8,
    prompt_tokens: int | None = None,
    config: CertConfig | None = None,
    sample: TraceSample | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Write a trace of ``max_new_tokens`` certified decode steps after the first ``prompt_tokens``
    tokens of ``text``; returns a small summary (tokens, the generated text's ids, stage counts)."""
    from transformers import AutoModelForCausalLM

    from certkv.hf import CertifiedCache, register

    if max_new_tokens < 1:
        raise errors.ConfigError(f"max_new_tokens={max_new_tokens}: must be at least 1")
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype, attn_implementation=register()).eval()
    ids = torch.tensor([TextCodec(model, model_path).encode(text, bos=True)])
    if prompt_tokens is not None:
        ids = ids[:, :prompt_tokens]
    if ids.shape[1] < 2:
        raise errors.ConfigError("the prompt must have at least 2 tokens")
    meta = {"model": str(model_path), "prompt_tokens": int(ids.shape[1]), "decode_steps": max_new_tokens}
    with TraceRecorder(out, sample=sample, metadata=meta) as rec:
        cache = CertifiedCache(model.config, config, recorder=rec)
        # the first new token comes from the exact prefill; each further one from a certified step
        full = model.generate(
            ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=max_new_tokens + 1,
            min_new_tokens=max_new_tokens + 1, do_sample=False, pad_token_id=0,
        )  # fmt: skip
    report = cache.report()
    return {"tokens": int(full.shape[1]), "new_ids": full[0, ids.shape[1] :].tolist(), "stages": report.stages}
