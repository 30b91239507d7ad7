"""The figures of the tinylm model card, measured on the held-out split.

* bits per byte at context 1K and 4K (non-overlapping windows, every position scored), beside a
  unigram byte model fitted on the training split;
* passkey retrieval: a 5-digit key stated early, held-out filler, greedy decode of 5 bytes;
* attention statistics: per layer and query head, the mean attention mass on the first token
  (sinks), and per layer and KV head, the largest mean |key| channel over the median channel
  (outlier channels, pre-RoPE).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from certkv.tinylm.data import VOCAB_SIZE, load_split, passkey_example


def unigram_bpb(train: np.ndarray, heldout: np.ndarray) -> float:
    """Bits per byte of a unigram model (add-one smoothed byte frequencies of ``train``) on ``heldout``."""
    counts = np.bincount(train, minlength=VOCAB_SIZE).astype(np.float64) + 1.0
    logp = np.log2(counts / counts.sum())
    return float(-logp[heldout[1:]].mean())


@torch.no_grad()
def bits_per_byte(model: Any, ids: np.ndarray, context: int, device: torch.device, max_windows: int = 64) -> float:
    windows = [ids[i : i + context + 1] for i in range(0, len(ids) - context - 1, context)][:max_windows]
    total, count = 0.0, 0
    for w in windows:
        x = torch.tensor(w, dtype=torch.long, device=device)[None]
        logits = model(input_ids=x[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum")
        total += loss.item()
        count += x.shape[1] - 1
    return total / count / math.log(2)


@torch.no_grad()
def passkey_accuracy(
    model: Any, filler: np.ndarray, length: int, trials: int, device: torch.device, seed: int = 7
) -> float:
    rng = random.Random(seed + length)
    hits = 0
    for _ in range(trials):
        prompt, key = passkey_example(filler, length, rng)
        out = model.generate(torch.tensor([prompt], device=device), max_new_tokens=5, do_sample=False, pad_token_id=0)
        got = bytes(int(t) for t in out[0, len(prompt) :] if t < 256).decode("utf-8", errors="replace")
        hits += got == key
    return hits / trials


@torch.no_grad()
def attention_statistics(
    model: Any, ids: np.ndarray, device: torch.device, context: int = 1024, samples: int = 4
) -> dict[str, Any]:
    cfg = model.config
    keys: dict[int, list[torch.Tensor]] = {i: [] for i in range(cfg.num_hidden_layers)}
    hooks = [
        layer.self_attn.k_proj.register_forward_hook(lambda _m, _i, out, i=i: keys[i].append(out.float()))
        for i, layer in enumerate(model.model.layers)
    ]
    sink = torch.zeros(cfg.num_hidden_layers, cfg.num_attention_heads)
    prev = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        for s in range(samples):
            start = (len(ids) // samples) * s
            x = torch.tensor(ids[start : start + context], dtype=torch.long, device=device)[None]
            att = model(input_ids=x, output_attentions=True).attentions
            for layer, a in enumerate(att):
                # mass on token 0, averaged over query positions after the first 16
                sink[layer] += a[0, :, 16:, 0].float().mean(dim=-1).cpu() / samples
    finally:
        model.config._attn_implementation = prev
        for h in hooks:
            h.remove()
    outlier = []
    for layer in range(cfg.num_hidden_layers):
        k = torch.cat(keys[layer], dim=1)[0]  # [T, H_kv * D]
        mag = k.abs().mean(dim=0).reshape(cfg.num_key_value_heads, -1)
        outlier.append((mag.max(dim=-1).values / mag.median(dim=-1).values).tolist())
    return {"sink_mass": sink.tolist(), "key_outlier_ratio": outlier}


def measure(model: Any, corpus_dir: Path, device: torch.device, trials: int = 24) -> dict[str, Any]:
    model.eval()
    train = load_split(corpus_dir, "train")
    held = load_split(corpus_dir, "heldout")
    return {
        "heldout_bytes": len(held),
        "bpb_unigram": unigram_bpb(train, held),
        "bpb_ctx1024": bits_per_byte(model, held, 1024, device, max_windows=256),
        "bpb_ctx4096": bits_per_byte(model, held, 4096, device, max_windows=64),
        "passkey": {str(n): passkey_accuracy(model, held, n, trials, device) for n in (1024, 2048, 4096)},
        "passkey_trials": trials,
        **attention_statistics(model, held, device),
    }
