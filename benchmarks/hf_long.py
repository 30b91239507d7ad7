"""Long greedy decodes through transformers with certkv's cache: does the share of head-steps that need
Tier-2 fall as decoding goes on (adaptive precision promotes tokens fetched ``promote_after`` times),
where do the fetched tokens lie, and what do the promotion, FP16-window and fetch-cap settings change?

For each context and setting (``SETTINGS``: the default ``certified`` config and variants of
``promote_after``, ``promote_budget``, ``window`` and ``fetch_fraction``), decodes ``--new`` tokens
twice (the first warms and compiles) and reports, from the second: tokens/s, the stage counts, the
stage shares in windows of 64 decoded tokens, Tier-1/FP16, the distance from the sequence's end of
every row stage 2 fetched (quantiles and shares below 256-2048 tokens), and how many of the heads that
fetched took as many rows as ``fetch_fraction`` allows (the cap, not the target share, decided those).
The second run is recorded (``Recorder``: a bincount per layer-step, and a device sync per stage-2
call), which its tokens/s include.

    PYTHONPATH=. python benchmarks/hf_long.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from hf_decode import DATA, decode
from transformers import AutoModelForCausalLM

import certkv.kernel_ladder as kernel_ladder
from certkv.codec import TextCodec
from certkv.evaluate import method_config
from certkv.hf import LayerStats, register
from certkv.ladder import fetch_cap

SETTINGS: dict[str, dict[str, float]] = {
    "default": {},
    "no_promotion": {"promote_budget": 0},
    "promote_after_1": {"promote_after": 1},
    "promote_after_1_budget_1024": {"promote_after": 1, "promote_budget": 1024},
    "window_512": {"window": 512},
    "window_1024": {"window": 1024},
    "fetch_0.1": {"fetch_fraction": 0.1},
    "fetch_0.5": {"fetch_fraction": 0.5},
    "fetch_1.0": {"fetch_fraction": 1.0},
}
WINDOW = 64  # decoded tokens per share window


class Recorder:
    """Wraps ``LayerStats.add`` (each layer-step's stage counts) and ``kernel_ladder.stage2`` (the rows it
    fetched, as distances from the sequence's end, and per fetching head whether it hit the cap) while
    installed."""

    def __init__(self) -> None:
        self.steps: list[list[int]] = []
        self.distances: list[int] = []
        self.fetching_heads = 0  # (row, KV head) pairs that fetched in a stage-2 call
        self.at_cap = 0  # of them, those that fetched all the rows fetch_fraction allows
        self._add, self._stage2 = LayerStats.add, kernel_ladder.stage2

    def __enter__(self) -> Recorder:
        add, stage2 = self._add, self._stage2
        signature = inspect.signature(stage2)

        def record_add(stats: LayerStats, res: Any) -> None:
            self.steps.append(torch.bincount(res.certificate.stage.flatten(), minlength=4).tolist())
            add(stats, res)

        def record_stage2(*args: Any, **kwargs: Any) -> Any:
            served = stage2(*args, **kwargs)
            if served is not None:
                bound = signature.bind(*args, **kwargs).arguments
                t1, n_sink, chosen = bound["t1"], bound["n_sink"], served[2]
                n_total = n_sink + chosen.shape[-1] + t1.win_k.shape[2]
                _, _, i = chosen.nonzero(as_tuple=True)
                self.distances.extend((n_total - (i + n_sink)).tolist())
                counts = chosen.sum(-1)
                counts = counts[counts > 0]
                self.fetching_heads += len(counts)
                self.at_cap += int((counts >= fetch_cap(bound["cfg"], n_total)).sum())
            return served

        LayerStats.add, kernel_ladder.stage2 = record_add, record_stage2  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        LayerStats.add, kernel_ladder.stage2 = self._add, self._stage2  # type: ignore[method-assign]


def summarise(rec: Recorder, layers: int) -> dict[str, Any]:
    per_token = torch.tensor(rec.steps).reshape(-1, layers, 4).sum(1)  # [decoded tokens, 4]
    shares = []
    for lo in range(0, len(per_token), WINDOW):
        tot = per_token[lo : lo + WINDOW].sum(0).double()
        shares.append([round(float(s), 3) for s in tot / tot.sum()])
    row: dict[str, Any] = {"stage_shares_per_64_tokens": shares, "fetched_rows": len(rec.distances)}
    row["fetching_heads"], row["fetching_heads_at_cap"] = rec.fetching_heads, rec.at_cap
    if rec.distances:
        d = torch.tensor(rec.distances, dtype=torch.float64)
        q = torch.quantile(d, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64))
        row["distance_quantiles_10_25_50_75_90"] = q.tolist()
        row["distance_share_below"] = {str(b): float((d < b).double().mean()) for b in (256, 512, 1024, 2048)}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DATA / "tinylm"))
    ap.add_argument("--text", default=str(DATA / "heldout_sample.txt"))
    ap.add_argument("--contexts", nargs="+", type=int, default=[1024, 3072])
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--json", default="hf_long.json")
    args = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float16, attn_implementation=register())
    model = model.cuda().eval()
    ids = TextCodec(model, args.model).encode(Path(args.text).read_text(), bos=True)
    rows = []
    for ctx in args.contexts:
        x = torch.tensor([ids[:ctx]], device="cuda")
        decode(model, x, "dense", args.new)
        rows.append({"context": ctx, "setting": "dense"} | decode(model, x, "dense", args.new))
        print(json.dumps(rows[-1]), flush=True)
        for name in args.settings:
            cfg = dataclasses.replace(method_config("certified", model.config), **SETTINGS[name])
            decode(model, x, "certified", args.new, config=cfg)  # compile and warm
            with Recorder() as rec:
                row = {"context": ctx, "setting": name, "config": SETTINGS[name]}
                row |= decode(model, x, "certified", args.new, config=cfg)
            row |= summarise(rec, model.config.num_hidden_layers)
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "new_tokens": args.new, "rows": rows}
    (out / args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
