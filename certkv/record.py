"""Record a trace from a Hugging Face causal LM: ``certkv record``.

The model generates greedily (dense attention); then one forward pass over prompt + generation
captures every layer's post-RoPE q, k, v (``certkv.capture``), and the decode is replayed through a
``TieredKVCache`` position by position, layer by layer: the prompt is appended as prefill, and each
generated position appends its k, v and attends with its q. The certified outputs are recorded but
not fed back into the model (teacher forcing); closed-loop generation through the cache is the
Hugging Face integration's job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from certkv import errors
from certkv.cache import TieredKVCache
from certkv.capture import capture, load_model
from certkv.config import CertConfig
from certkv.trace import TraceRecorder, TraceSample

BYTE_VOCAB = 258  # the repo's tiny model: 256 bytes, BOS, EOS (certkv.tinylm.data)


def tokenize(model: Any, path: str | Path, text: str) -> torch.Tensor:
    """Token ids [1, T] of ``text``: the checkpoint's tokenizer, or bytes for a byte-level model."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError):
        if getattr(model.config, "vocab_size", None) != BYTE_VOCAB:
            raise errors.ConfigError(f"{path}: no tokenizer found and the model is not byte-level") from None
        from certkv.tinylm.data import BOS, encode

        return torch.tensor([[BOS, *encode(text)]])
    return torch.tensor([tok(text)["input_ids"]])


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
    """Write a trace of ``max_new_tokens`` decode steps after the first ``prompt_tokens`` tokens of
    ``text``; returns a small summary (tokens, steps, stage counts)."""
    if max_new_tokens < 1:
        raise errors.ConfigError(f"max_new_tokens={max_new_tokens}: must be at least 1")
    model = load_model(model_path, dtype)
    ids = tokenize(model, model_path, text)
    if prompt_tokens is not None:
        ids = ids[:, :prompt_tokens]
    if ids.shape[1] < 2:
        raise errors.ConfigError("the prompt must have at least 2 tokens")
    full = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
        do_sample=False, pad_token_id=0,
    )  # fmt: skip
    cap = capture(model, full)
    n0 = ids.shape[1]
    layers = len(cap.k)
    _, hkv, _, d = cap.k[0].shape
    meta = {"model": str(model_path), "prompt_tokens": n0, "new_tokens": int(full.shape[1] - n0)}
    stages = [0, 0, 0, 0]
    with TraceRecorder(out, sample=sample, metadata=meta) as rec:
        cache = TieredKVCache(layers, hkv, d, config=config, recorder=rec)
        for layer in range(layers):
            cache.append(layer, cap.k[layer][:, :, :n0], cap.v[layer][:, :, :n0])
        for t in range(n0, full.shape[1]):
            for layer in range(layers):
                cache.append(layer, cap.k[layer][:, :, t : t + 1], cap.v[layer][:, :, t : t + 1])
                res = cache.attend(layer, cap.q[layer][:, :, t : t + 1], scale=cap.scaling[layer])
                for s in res.certificate.stage.flatten().tolist():
                    stages[int(s)] += 1
    return {"tokens": int(full.shape[1]), "steps": int(full.shape[1] - n0), "stages": stages}
