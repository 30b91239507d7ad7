"""Byte-level tokenisation and the synthetic passkey task shared by training and measurement.

Vocabulary: the 256 byte values, then BOS = 256 and EOS = 257. No tokenizer download is needed and a
4K-token context is 4K bytes of text.
"""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import numpy as np

BOS = 256
EOS = 257
VOCAB_SIZE = 258

PASSKEY_INTRO = "There is a pass key hidden in this text. Remember it. The pass key is {key}. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is "


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids: list[int]) -> str:
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def load_split(corpus_dir: Path, name: str) -> np.ndarray:
    """Token ids of a corpus split: documents as bytes, each followed by EOS, BOS at the start."""
    with gzip.open(corpus_dir / f"{name}.txt.gz", "rb") as fh:
        blob = fh.read()
    ids = np.frombuffer(blob, dtype=np.uint8).astype(np.int16)
    ids = np.where(ids == 0, EOS, ids)
    return np.concatenate([np.array([BOS], dtype=np.int16), ids, np.array([EOS], dtype=np.int16)])


def passkey_example(
    filler: np.ndarray, length: int, rng: random.Random, depth: float | None = None
) -> tuple[list[int], str]:
    """A prompt of about ``length`` bytes: the key stated near ``depth`` (default: early), filler around it,
    then the question. Returns (prompt ids starting with BOS, the 5-digit key)."""
    key = f"{rng.randrange(10000, 100000)}"
    intro = encode(PASSKEY_INTRO.format(key=key))
    question = encode(PASSKEY_QUESTION)
    n_fill = max(0, length - len(intro) - len(question) - 1)
    start = rng.randrange(0, max(1, len(filler) - n_fill - 1))
    fill = [int(t) for t in filler[start : start + n_fill] if t < 256]
    at = 0 if depth is None else int(depth * len(fill))
    return [BOS, *fill[:at], *intro, *fill[at:], *question], key
