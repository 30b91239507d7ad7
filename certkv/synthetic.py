"""Synthetic long-context probes, generated deterministically from a random generator: passkey
retrieval and a RULER-style subset (multi-key needle in a haystack, variable tracking, common-word
extraction). Each probe is a prompt of about ``length`` ids and the strings a correct answer contains.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from certkv.codec import TextCodec

TASKS = ("passkey", "mk-niah", "vt", "cwe")
NAMES = ("apple", "river", "violet", "copper", "falcon", "meadow", "harbor", "ember", "glacier", "saffron")
WORDS = (
    "table", "window", "garden", "pencil", "candle", "basket", "mirror", "ladder", "bottle", "blanket", "hammer",
    "jacket", "kettle", "lantern", "marble", "needle", "orange", "pillow", "rocket", "saddle", "teapot", "violin",
    "wallet", "zipper", "anchor", "button", "carpet", "dagger", "engine", "feather",
)  # fmt: skip


@dataclass
class Probe:
    prompt: list[int]
    answers: list[str]
    new_tokens: int  # tokens to generate: enough for every answer


def _five_digits(rng: random.Random) -> str:
    return f"{rng.randrange(10000, 100000)}"


def _with_inserts(
    codec: TextCodec, filler: list[int], length: int, inserts: list[tuple[float, str]], question: str,
    rng: random.Random,
) -> list[int]:  # fmt: skip
    """BOS, filler of the right size with each insert placed at its depth (0..1), then the question."""
    head = codec.encode("", bos=True)
    pieces = [(d, codec.encode(t)) for d, t in inserts]
    q = codec.encode(question)
    n_fill = length - len(head) - len(q) - sum(len(p) for _, p in pieces)
    if n_fill < 0 or n_fill >= len(filler):
        raise ValueError(f"cannot build a probe of {length} ids from {len(filler)} filler ids")
    start = rng.randrange(0, len(filler) - n_fill)
    fill = filler[start : start + n_fill]
    out, at = [*head], 0
    for depth, ids in sorted(pieces, key=lambda p: p[0]):
        cut = max(at, int(depth * len(fill)))
        out += fill[at:cut] + ids
        at = cut
    return out + fill[at:] + q


def make_probe(task: str, codec: TextCodec, filler: list[int], length: int, depth: float, rng: random.Random) -> Probe:
    """One probe of ``task`` (``TASKS``); ``depth`` places the passkey (other tasks draw their depths)."""
    if task == "passkey":
        key = _five_digits(rng)
        intro = f"There is a pass key hidden in this text. Remember it. The pass key is {key}. "
        prompt = _with_inserts(codec, filler, length, [(depth, intro)], "\nWhat is the pass key? The pass key is ", rng)
        return Probe(prompt, [key], len(codec.encode(key)) + 2)
    if task == "mk-niah":
        names = rng.sample(NAMES, 4)
        keys = {n: _five_digits(rng) for n in names}
        inserts = [(rng.random(), f"The pass key for {n} is {keys[n]}. ") for n in names]
        target = rng.choice(names)
        question = f"\nWhat is the pass key for {target}? The pass key for {target} is "
        return Probe(_with_inserts(codec, filler, length, inserts, question, rng), [keys[target]], 8)
    if task == "vt":
        value = _five_digits(rng)
        chain = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5)) for _ in range(4)]
        depths = sorted(rng.random() for _ in chain)
        inserts = [(depths[0], f"VAR {chain[0]} = {value}. ")]
        inserts += [(d, f"VAR {b} = {a}. ") for d, a, b in zip(depths[1:], chain, chain[1:])]
        question = f"\nFind all variables that are assigned the value {value}. Answer: "
        return Probe(
            _with_inserts(codec, filler, length, inserts, question, rng), chain, len(codec.encode(" ".join(chain))) + 4
        )
    if task == "cwe":
        common = rng.sample(WORDS, 3)
        rare = [w for w in WORDS if w not in common]
        question = "\nWhat are the 3 most common words in the above list? Answer: "
        budget = length - len(codec.encode("", bos=True)) - len(codec.encode(question))
        words = [w for w in common for _ in range(8)]
        while True:
            candidate = [*words, rng.choice(rare)]
            if len(codec.encode(" ".join(f"{i}. {w}" for i, w in enumerate(candidate, 1)))) > budget:
                break
            words = candidate
        rng.shuffle(words)
        listing = " ".join(f"{i}. {w}" for i, w in enumerate(words, 1))
        return Probe(codec.encode("", bos=True) + codec.encode(listing + question), common, 12)
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def score(probe: Probe, answer: str) -> float:
    """Share of the expected strings the answer contains (1 or 0 for single-answer tasks)."""
    return sum(a in answer for a in probe.answers) / len(probe.answers)
