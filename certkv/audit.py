"""Audit a recorded trace: rebuild what every recorded step saw and re-check every claim exactly.

For each step entry the audit rebuilds, from the trace alone, the Tier-2 originals and the Tier-1
values served (quantized codes times 16-bit scales plus zero points; FP16 sink, window and promoted
tokens), replaces the rows the ladder fetched by their originals, and runs
``certkv.reference.exact`` per (batch row, query head): every claimed field (tv_bound, key, value,
cross and rounding terms, output_bound) must dominate its exact value. Stage-3 outputs must also
equal certkv's dense path recomputed here, bit for bit, when the trace was recorded on this kind of
platform (otherwise the summary says that check was not possible and why).
"""

from __future__ import annotations

import math
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from certkv import errors, transforms
from certkv.attention import dense_attention
from certkv.certificate import Certificate
from certkv.codebook import BookTensor, Codebook, join
from certkv.quant import QuantizedTensor
from certkv.reference.verify import CLAIMS, HeadCheck, HeadTask, check_head, head_tasks
from certkv.trace import CERT_FIELDS, Entry, TraceReader, platform_tag


@dataclass
class StepCheck:
    """The audit of one recorded step: its checks per head, and the stage-3 dense comparison."""

    layer: int
    step: int
    length: int
    heads: list[HeadCheck]
    memory_ratio: float
    dense_checked: int = 0
    dense_mismatch: list[int] = field(default_factory=list)  # query heads whose output differed


@dataclass
class AuditReport:
    """Everything ``certkv audit`` prints. ``complete`` is False for a trace whose recorder never
    closed it (``tail`` says what is missing); ``dense_note`` says why stage-3 bits were not compared."""

    path: str
    steps: list[StepCheck]
    complete: bool
    tail: str | None
    dense_note: str | None

    @property
    def heads(self) -> list[tuple[StepCheck, HeadCheck]]:
        return [(s, h) for s in self.steps for h in s.heads]

    @property
    def violations(self) -> list[str]:
        out = []
        for s in self.steps:
            for h in s.heads:
                for name in h.violations:
                    out.append(
                        f"layer {s.layer} step {s.step} batch {h.batch} head {h.head} (stage {h.stage}): "
                        f"{name} claimed {h.claimed[name]:.6e} < exact {h.exact[name]:.6e}"
                    )
            for head in s.dense_mismatch:
                out.append(f"layer {s.layer} step {s.step} head {head}: stage-3 output differs from the dense path")
        return out

    def stage_counts(self) -> list[int]:
        counts = [0, 0, 0, 0]
        for _, h in self.heads:
            counts[h.stage] += 1
        return counts

    def tightness(self) -> dict[str, dict[str, float]]:
        """Per term: median and p99 of claimed / exact over head-steps with a nonzero exact value."""
        out = {}
        for name in CLAIMS:
            ratios = [h.claimed[name] / h.exact[name] for _, h in self.heads if h.exact[name] > 0]
            zero = sum(h.exact[name] == 0 for _, h in self.heads)
            out[name] = {
                "median": float(np.median(ratios)) if ratios else math.nan,
                "p99": float(np.percentile(ratios, 99)) if ratios else math.nan,
                "exact_zero": float(zero),
            }
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "trace": self.path,
            "complete": self.complete,
            "tail": self.tail,
            "dense_note": self.dense_note,
            "summary": {
                "steps": len(self.steps),
                "head_steps": len(self.heads),
                "stages": self.stage_counts(),
                "violations": len(self.violations),
                "tightness": self.tightness(),
                "memory_ratio_last": self.steps[-1].memory_ratio if self.steps else None,
                "dense_checked": sum(s.dense_checked for s in self.steps),
            },
            "violations": self.violations,
            "heads": [
                {
                    "layer": s.layer,
                    "step": s.step,
                    "length": s.length,
                    "batch": h.batch,
                    "head": h.head,
                    "stage": h.stage,
                    "claimed": h.claimed,
                    "exact": h.exact,
                    "violations": h.violations,
                }
                for s, h in self.heads
            ],
        }


@dataclass
class _LayerState:
    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)
    tokens: int = 0
    qk: QuantizedTensor | BookTensor | None = None
    qv: QuantizedTensor | BookTensor | None = None
    k_used: list[torch.Tensor] = field(default_factory=list)  # keys rotated back from a basis, per block

    @property
    def quantized(self) -> int:
        return 0 if self.qk is None else self.qk.num_tokens


class _Replay:
    """Turns the entry stream into per-step inputs of the exact reference."""

    def __init__(self, reader: TraceReader, prec: int) -> None:
        self.reader = reader
        self.prec = prec
        self.layers: dict[int, _LayerState] = {}

    def _bad(self, e: Entry, msg: str) -> errors.TraceError:
        return errors.TraceError(f"{self.reader.path}: {e.kind} entry of layer {e.meta.get('layer')}: {msg}")

    def feed(self, e: Entry) -> tuple[Entry, list[HeadTask], dict[str, torch.Tensor]] | None:
        try:
            return self._feed(e)
        except errors.TraceError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
            # a re-signed but malformed entry: unreadable, never a pass or a traceback
            raise self._bad(e, f"malformed entry ({type(exc).__name__}: {exc})") from None

    def _feed(self, e: Entry) -> tuple[Entry, list[HeadTask], dict[str, torch.Tensor]] | None:
        st = self.layers.setdefault(int(e.meta["layer"]), _LayerState())
        if e.kind == "tokens":
            if int(e.meta["start"]) != st.tokens:
                raise self._bad(e, f"starts at token {e.meta['start']}, the trace holds {st.tokens}")
            st.k.append(e.tensors["k"])
            st.v.append(e.tensors["v"])
            st.tokens = int(e.meta["end"])
            return None
        if e.kind == "quant":
            if int(e.meta["start"]) != st.quantized:
                raise self._bad(e, f"starts at quantized token {e.meta['start']}, the trace holds {st.quantized}")
            try:
                parts = [
                    self._quantized(e, role, e.meta["layout"][name]) for role, name in (("k", "key"), ("v", "value"))
                ]
            except (KeyError, TypeError, ValueError) as exc:
                raise self._bad(e, f"bad quantization layout ({exc!r})") from None
            st.qk = parts[0] if st.qk is None else join(st.qk, parts[0])
            st.qv = parts[1] if st.qv is None else join(st.qv, parts[1])
            if "k_used" in e.tensors:
                self._check_rotated_back(e, parts[0], e.tensors["k_used"])
                st.k_used.append(e.tensors["k_used"])
            elif st.k_used:
                raise self._bad(e, "a block without rotated-back keys after blocks with them")
            return None
        return e, *self._step(e, st)

    def _check_rotated_back(self, e: Entry, keys: QuantizedTensor | BookTensor, k_used: torch.Tensor) -> None:
        """The recorded rotated-back keys must be the codes' keys: recomputed here from the codes with
        the trace's transform, they may differ only by what two evaluations of the transform can (twice
        its own rounding bound, which covers a one-ulp different RoPE table)."""
        cfg = self.reader.config
        tf = transforms.make(cfg["key_transform"], self.reader.head_dim, cfg["rope_theta"], cfg["transform_seed"])
        if tf is None:
            raise self._bad(e, "rotated-back keys in a trace whose config has no key transform")
        first = int(cfg["sinks"]) + int(e.meta["start"])  # quantized tokens follow the sinks
        pos = torch.arange(first, first + k_used.shape[2])
        if not isinstance(keys, BookTensor):
            raise self._bad(e, "rotated-back keys beside a uniform key layout")
        again, delta = tf.from_basis(keys.dequantize(), pos, keys.dequantized_radius())
        if not bool(((k_used.double() - again.double()).abs() <= 2 * delta.double()).all()):
            raise self._bad(e, "the rotated-back keys do not match the quantized codes")

    def _quantized(self, e: Entry, role: str, spec: list[Any]) -> QuantizedTensor | BookTensor:
        bits, axis, size = int(spec[0]), spec[1], int(spec[2])
        codes, scale, zero = (e.tensors[f"{role}_{p}"] for p in ("codes", "scale", "zero"))
        d = self.reader.head_dim
        if len(spec) == 3:
            return QuantizedTensor(codes, scale, zero, bits, axis, size, d)
        book = Codebook(e.tensors[f"{role}_levels"])
        t = (e.tensors[f"{role}_{n}"] for n in ("oflat", "ovalue", "oradius"))
        return BookTensor(codes, scale, zero, book, axis, size, d, *t)

    def _step(self, e: Entry, st: _LayerState) -> tuple[list[HeadTask], dict[str, torch.Tensor]]:
        n, n_sink, n_quant = (int(e.meta[k]) for k in ("length", "n_sink", "n_quant"))
        if n > st.tokens or n_sink + n_quant > n or n_quant > st.quantized or n_sink < 0:
            raise self._bad(
                e,
                f"length {n}, sinks {n_sink}, quantized {n_quant} disagree with the {st.tokens} tokens and "
                f"{st.quantized} quantized tokens recorded so far",
            )
        ko, vo = torch.cat(st.k, dim=2)[:, :, :n], torch.cat(st.v, dim=2)[:, :, :n]
        if ko.shape[0] != e.tensors["q"].shape[0]:
            raise self._bad(e, f"batch {e.tensors['q'].shape[0]} but the tokens have batch {ko.shape[0]}")
        parts = []
        for role, orig, qt in (("k", ko, st.qk), ("v", vo, st.qv)):
            c = torch.zeros(orig.shape, dtype=torch.float64)
            s = torch.zeros_like(c)
            z = orig.double()
            if n_quant:
                assert qt is not None
                try:
                    qc, qs, qz = qt.slice(None, 0, n_quant).exact_parts()
                except (ValueError, RuntimeError) as exc:
                    raise self._bad(e, f"quantized storage does not cover {n_quant} tokens ({exc})") from None
                if role == "k" and st.k_used:  # the step computed with keys rotated back from the basis
                    qz = torch.cat(st.k_used, dim=2)[:, :, :n_quant].double()
                    qc, qs = torch.zeros_like(qz), torch.zeros_like(qz)
                span = slice(n_sink, n_sink + n_quant)
                c[:, :, span], s[:, :, span], z[:, :, span] = qc, qs, qz
            prom = e.tensors["promoted"]
            if len(prom):
                b, h, i = prom.unbind(1)
                c[b, h, i], s[b, h, i], z[b, h, i] = 0.0, 0.0, orig[b, h, i].double()
            parts.append((c, s, z))
        cert = Certificate(**{name: e.tensors[f"cert_{name}"].unsqueeze(-1) for name in CERT_FIELDS})
        if not bool(((cert.stage >= 0) & (cert.stage <= 3)).all()):
            raise self._bad(e, "a stage outside 0-3")
        masks = []
        for name in ("rows_stage1", "rows_stage2"):
            m = torch.zeros(ko.shape[:3], dtype=torch.bool)
            r = e.tensors[name]
            if len(r):
                m[r[:, 0], r[:, 1], r[:, 2]] = True
            masks.append(m)
        q = e.tensors["q"].unsqueeze(2)
        out = e.tensors["output"].unsqueeze(2)
        scale = float(e.meta["scale"])
        tasks = list(head_tasks(q, ko, vo, parts[0], parts[1], out, cert, masks[0], masks[1], scale, self.prec))
        return tasks, {"q": q, "k": ko, "v": vo, "output": out, "stage": cert.stage}


def _dense_check(step: dict[str, torch.Tensor], scale: float, group: int) -> tuple[int, list[int]]:
    """Recompute certkv's dense path for every (batch row, KV head) with a stage-3 head; compare bits."""
    checked, mismatched = 0, []
    stage3 = step["stage"][..., 0] == 3  # [B, Hq]
    for b, hk in sorted({(int(b), int(h) // group) for b, h in stage3.nonzero().tolist()}):
        heads = slice(hk * group, (hk + 1) * group)
        dense = dense_attention(
            step["q"][b : b + 1, heads], step["k"][b : b + 1, hk : hk + 1], step["v"][b : b + 1, hk : hk + 1], scale
        )
        for j in range(group):
            h = hk * group + j
            if bool(stage3[b, h]):
                checked += 1
                if not torch.equal(dense[0, j], step["output"][b, h]):
                    mismatched.append(h)
    return checked, mismatched


def _init_worker() -> None:
    torch.set_num_threads(1)


def audit(
    path: str | Path,
    prec: int = 128,
    jobs: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> AuditReport:
    """Audit the trace at ``path`` (see the module docstring). ``progress(done, total)`` is called
    after each step. Raises ``errors.TraceError`` for an unreadable, corrupt or tampered trace."""
    if prec < 100:
        raise errors.ConfigError(f"precision={prec}: the exact reference needs at least 100 bits")
    if not isinstance(jobs, int) or jobs < 1:
        raise errors.ConfigError(f"jobs={jobs!r}: must be a positive integer")
    reader = TraceReader(path)
    recorded = reader.manifest.get("platform")
    here = platform_tag()
    dense_ok = reader.device == "cpu" and recorded == here
    dense_note = None
    if not dense_ok:
        where = reader.device if reader.device != "cpu" else f"a different platform ({recorded})"
        if (
            reader.device == "cpu"
            and isinstance(recorded, dict)
            and {**recorded, "dense_path": ""} == {**here, "dense_path": ""}
        ):
            # the same machine, but another version of certkv's dense computation (absent: version 1)
            where = f"certkv's dense path version {recorded.get('dense_path', '1')}"
        dense_note = f"stage-3 bit equality not checked: trace recorded on {where}, auditing on {here}"
    replay = _Replay(reader, prec)
    total = reader.num_steps
    steps: list[StepCheck] = []

    def finish(e: Entry, checks: list[HeadCheck], step: dict[str, torch.Tensor]) -> None:
        group = int(e.meta["group"])
        for h in checks:  # the trace numbers the sampled heads locally; report the model's head index
            h.head = reader.kv_heads[h.head // group] * group + h.head % group
        sc = StepCheck(
            int(e.meta["layer"]),
            int(e.meta["step"]),
            int(e.meta["length"]),
            checks,
            int(e.meta["tier1_bytes"]) / max(1, int(e.meta["fp16_bytes"])),
        )
        if dense_ok:
            sc.dense_checked, local = _dense_check(step, float(e.meta["scale"]), group)
            sc.dense_mismatch = [reader.kv_heads[h // group] * group + h % group for h in local]
        steps.append(sc)
        if progress is not None:
            progress(len(steps), total)

    fed = (x for x in map(replay.feed, reader.entries()) if x is not None)
    if jobs == 1:
        for e, tasks, step in fed:
            finish(e, [check_head(t) for t in tasks], step)
    else:
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker) as pool:
            for e, futures, step in _bounded(fed, pool, 2 * jobs):
                finish(e, [f.result() for f in futures], step)
    return AuditReport(str(path), steps, reader.complete, reader.tail, dense_note)


def _bounded(
    fed: Iterator[tuple[Entry, list[HeadTask], dict[str, torch.Tensor]]], pool: ProcessPoolExecutor, depth: int
) -> Iterator[tuple[Entry, list[Future[HeadCheck]], dict[str, torch.Tensor]]]:
    """Submit steps ahead of consumption, at most ``depth`` steps in flight, yielding in order."""
    window: deque[tuple[Entry, list[Future[HeadCheck]], dict[str, torch.Tensor]]] = deque()
    for e, tasks, step in fed:
        window.append((e, [pool.submit(check_head, t) for t in tasks], step))
        if len(window) >= depth:
            yield window.popleft()
    yield from window


def plot(report: AuditReport, out: str | Path) -> None:
    """Bound vs exact per term on log axes (left) and stage use per recorded step (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    lo, hi = math.inf, 0.0
    for name in CLAIMS:
        pts = [(h.exact[name], h.claimed[name]) for _, h in report.heads if h.exact[name] > 0 and h.claimed[name] > 0]
        if not pts:
            continue
        x, y = zip(*pts)
        lo, hi = min(lo, *x, *y), max(hi, *x, *y)
        ax1.scatter(x, y, s=8, alpha=0.6, label=name.replace("_", " "))
    if hi > 0:
        ax1.plot([lo, hi], [lo, hi], "k--", lw=1, label="bound = actual")
    ax1.set(xscale="log", yscale="log", xlabel="exact |term| (reference)", ylabel="claimed bound")
    ax1.set_title("every point must lie on or above the dashed line")
    ax1.legend(fontsize=8)
    keys = sorted({(s.step, s.layer) for s in report.steps})
    order = {k: i for i, k in enumerate(sorted({s.step for s in report.steps}))}
    counts = np.zeros((len(order), 4))
    for s in report.steps:
        for h in s.heads:
            counts[order[s.step], h.stage] += 1
    bottom = np.zeros(len(order))
    for stage, name in enumerate(("0 quantized", "1 fp16 values", "2 fp16 keys", "3 dense")):
        ax2.bar(list(order), counts[:, stage], bottom=bottom, label=name)
        bottom += counts[:, stage]
    ax2.set(xlabel="decode step (attend call of each layer)", ylabel="head-steps (all sampled layers)")
    ax2.set_title(f"stage use over {len(keys)} recorded layer-steps")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(out), dpi=120)
    plt.close(fig)
