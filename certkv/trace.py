"""Recorded traces: what a certified cache served, with the state needed to re-check every claim.

A trace is a directory (format version 2, reads 1 too; every field is documented in docs/trace-format.md):

* ``manifest.json``: format name and version, certkv version, the cache's config and shapes, the
  sampling, user metadata. Written once, when the recorder is bound to a cache.
* ``chunk-NNNNNN.safetensors``: the tensors of a few entries, named ``<entry>.<tensor>``.
* ``journal.jsonl``: one JSON line per chunk (its entries, and every tensor's dtype, shape and
  SHA-256), appended only after the chunk file is durable; a final ``{"end": ...}`` line on close.

Entries, in serving order, for the sampled layers and KV heads only:

* ``tokens``: Tier-2 originals k, v of tokens [start, end) that earlier entries did not carry;
* ``quant``: Tier-1 quantized storage (codes, 16-bit scales and zero points; a codebook's levels and
  outliers; keys rotated back from a transformed basis) of quantized tokens [start, end) counted
  within the quantized span, again only what is new;
* ``step``: one served step: query, output, every certificate field, the Tier-2 rows the ladder
  read, the promoted rows, and the positions that locate the rest in the entries above.

Every token is written once, so a trace grows with the context, not with context x steps. Crash
safety: a run killed midway leaves a journal whose complete lines describe complete chunks; the
reader audits those and reports that the tail is missing.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from certkv import errors
from certkv.certificate import AttentionResult, Certificate
from certkv.codebook import BookTensor

if TYPE_CHECKING:
    from certkv.cache import TieredKVCache

FORMAT = "certkv-trace"
VERSION = 2  # 2 added codebook layouts and rotated-back keys to quant entries (docs/trace-format.md)
READS = (1, 2)
MANIFEST = "manifest.json"
JOURNAL = "journal.jsonl"
CERT_FIELDS = tuple(f.name for f in dataclasses.fields(Certificate))


@dataclass(frozen=True)
class TraceSample:
    """Which steps a recorder keeps: ``layers`` and ``kv_heads`` (None: all; a sampled KV head brings
    all its query heads), every ``every``-th attend call of each layer, at most ``max_steps`` per layer."""

    layers: tuple[int, ...] | None = None
    kv_heads: tuple[int, ...] | None = None
    every: int = 1
    max_steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("layers", "kv_heads"):
            val = getattr(self, name)
            if val is not None and (
                not val or any(not isinstance(i, int) or i < 0 for i in val) or len(set(val)) != len(val)
            ):
                raise errors.ConfigError(f"TraceSample.{name}={val!r}: must be None or distinct non-negative ints")
        if not isinstance(self.every, int) or self.every < 1:
            raise errors.ConfigError(f"TraceSample.every={self.every!r}: must be a positive integer")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            raise errors.ConfigError(f"TraceSample.max_steps={self.max_steps!r}: must be None or a positive integer")


def platform_tag() -> dict[str, str]:
    """What decides the bits of certkv's dense path on a CPU (and the version of that path,
    ``certkv.attention.DENSE_PATH``): stored in the manifest, so an audit compares stage-3 outputs bit
    for bit only where it can reproduce them."""
    from certkv.attention import DENSE_PATH

    return {
        "machine": platform.machine(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "dense_path": str(DENSE_PATH),
    }


def _checksum(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _write_durably(path: Path, write: Any) -> None:
    """Write through a temporary file, fsync, then rename: a reader never sees a partial file."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o644)  # traces are meant to be shared (some writers create files 0600)
    os.replace(tmp, path)


@dataclass
class _LayerCursor:
    tokens: int = 0  # originals written so far
    quantized: int = 0  # quantized tokens written so far
    calls: int = 0  # attend calls seen
    kept: int = 0  # steps written


class TraceRecorder:
    """Records sampled steps of one ``TieredKVCache`` into the trace directory ``path`` (created; it
    must not exist or be empty). Pass it as ``TieredKVCache(..., recorder=...)``; entries are buffered
    and written as a chunk every ``flush_every`` steps and on ``close()`` (also a context manager)."""

    def __init__(
        self,
        path: str | Path,
        sample: TraceSample | None = None,
        flush_every: int = 16,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise errors.TraceError(f"{self.path}: exists and is not an empty directory; refusing to overwrite")
        if not isinstance(flush_every, int) or flush_every < 1:
            raise errors.ConfigError(f"flush_every={flush_every!r}: must be a positive integer")
        self.path.mkdir(parents=True, exist_ok=True)
        self.sample = sample or TraceSample()
        self.flush_every = flush_every
        self.metadata = dict(metadata or {})
        self._cache: TieredKVCache | None = None
        self._heads = torch.zeros(0, dtype=torch.int64)
        self._cursors: dict[int, _LayerCursor] = {}
        self._entries: list[dict[str, Any]] = []
        self._tensors: dict[str, torch.Tensor] = {}
        self._pending_steps = 0
        self._chunks = 0
        self._steps = 0
        self._closed = False

    # ------------------------------------------------------------------ binding
    def bind(self, cache: TieredKVCache) -> None:
        """Called by the cache's constructor: validates the sample against it and writes the manifest."""
        if self._cache is not None:
            raise errors.TraceError("this TraceRecorder is already bound to a cache")
        s = self.sample
        for name, limit in (("layers", cache.num_layers), ("kv_heads", cache.num_kv_heads)):
            val = getattr(s, name)
            if val is not None and max(val) >= limit:
                raise errors.ConfigError(f"TraceSample.{name}={val!r}: the cache has {limit} {name.replace('_', ' ')}")
        self._cache = cache
        heads = range(cache.num_kv_heads) if s.kv_heads is None else s.kv_heads
        self._heads = torch.tensor(sorted(heads), dtype=torch.int64)
        layers = range(cache.num_layers) if s.layers is None else s.layers
        self._cursors = {layer: _LayerCursor() for layer in layers}
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "certkv_version": _certkv_version(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": dataclasses.asdict(cache.config),
            "cache": {
                "num_layers": cache.num_layers,
                "num_kv_heads": cache.num_kv_heads,
                "head_dim": cache.head_dim,
                "device": cache.device.type,
            },
            "platform": platform_tag(),
            "sample": {
                "layers": sorted(self._cursors),
                "kv_heads": self._heads.tolist(),
                "every": s.every,
                "max_steps": s.max_steps,
            },
            "metadata": self.metadata,
            "journal": JOURNAL,
        }
        _write_durably(self.path / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=2) + "\n"))
        (self.path / JOURNAL).touch()

    # ------------------------------------------------------------------ recording
    def record(self, cache: TieredKVCache, layer: int, q: torch.Tensor, scale: float, result: AttentionResult) -> None:
        """Called by ``cache.attend`` after serving, before Tier-1 changes (promotion)."""
        if self._closed:
            raise errors.TraceError(f"{self.path}: recorder is closed")
        cur = self._cursors.get(layer)
        if cur is None:
            return
        cur.calls += 1
        if (cur.calls - 1) % self.sample.every or (
            self.sample.max_steps is not None and cur.kept >= self.sample.max_steps
        ):
            return
        cur.kept += 1
        heads = self._heads
        k, v = cache.originals(layer)
        length = int(k.shape[2])
        if length > cur.tokens:
            self._add("tokens", {"layer": layer, "start": cur.tokens, "end": length}, {
                "k": k[:, heads, cur.tokens : length], "v": v[:, heads, cur.tokens : length]
            })  # fmt: skip
            cur.tokens = length
        qk, qv = cache.quantized_storage(layer)
        n_quant = 0 if qk is None else qk.num_tokens
        if qk is not None and qv is not None and n_quant > cur.quantized:
            parts: dict[str, torch.Tensor] = {}
            layout: dict[str, Any] = {}
            for role, qt in (("k", qk), ("v", qv)):
                sl = qt.slice(heads.to(qt.codes.device), cur.quantized, n_quant)
                parts.update({f"{role}_codes": sl.codes, f"{role}_scale": sl.scale, f"{role}_zero": sl.zero})
                layout["key" if role == "k" else "value"] = [qt.bits, qt.axis, qt.group_size]
                if isinstance(sl, BookTensor):
                    layout["key" if role == "k" else "value"].append("book")
                    parts.update({f"{role}_levels": sl.book.levels, f"{role}_oflat": sl.o_flat,
                                  f"{role}_ovalue": sl.o_value, f"{role}_oradius": sl.o_radius})  # fmt: skip
            used = cache.used_keys(layer)
            if used is not None:  # keys rotated back from a basis: the exact reference is given these
                parts["k_used"] = used[:, heads.to(used.device), cur.quantized : n_quant]
            meta_q = {
                "layer": layer,
                "start": cur.quantized,
                "end": n_quant,
                "layout": layout,
                "used": used is not None,
            }
            self._add("quant", meta_q, parts)
            cur.quantized = n_quant
        n_sink, _ = cache.quantized_span(layer)
        group = q.shape[1] // cache.num_kv_heads
        qheads = (heads[:, None] * group + torch.arange(group)).reshape(-1)
        dev_heads, dev_qheads = heads.to(q.device), qheads.to(q.device)
        cert = result.certificate
        tensors = {"q": q[:, dev_qheads, 0], "output": result.output[:, dev_qheads, 0]}
        tensors.update({f"cert_{name}": getattr(cert, name)[:, dev_qheads, 0] for name in CERT_FIELDS})
        tensors["rows_stage1"] = _local_rows(result.rows_stage1[:, dev_heads])
        tensors["rows_stage2"] = _local_rows(result.rows_stage2[:, dev_heads])
        tensors["promoted"] = _local_promoted(cache.promoted_rows(layer), heads)
        mem = cache.memory_report()
        meta = {
            "layer": layer,
            "step": cur.calls - 1,
            "length": length,
            "n_sink": n_sink,
            "n_quant": n_quant,
            "group": group,
            "scale": scale,
            "tier1_bytes": mem.tier1_bytes,
            "fp16_bytes": mem.fp16_cache_bytes,
        }
        self._add("step", meta, tensors)
        self._steps += 1
        self._pending_steps += 1
        if self._pending_steps >= self.flush_every:
            self.flush()

    def _add(self, kind: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        idx = len(self._entries)
        self._entries.append({"kind": kind, **meta})
        for name, t in tensors.items():
            # a copy: parts of one entry may share storage (a layer's codebook), which safetensors refuses
            self._tensors[f"e{idx}.{name}"] = t.detach().to("cpu", copy=True).contiguous()

    def flush(self) -> None:
        """Write buffered entries as one chunk, then journal it."""
        if not self._entries:
            return
        name = f"chunk-{self._chunks:06d}.safetensors"
        tensors = self._tensors
        _write_durably(self.path / name, lambda p: save_file(tensors, str(p)))
        line = {
            "chunk": self._chunks,
            "file": name,
            "entries": self._entries,
            "tensors": {
                key: {"dtype": _dtype_name(t), "shape": list(t.shape), "sha256": _checksum(t)}
                for key, t in tensors.items()
            },
        }
        self._append_journal(line)
        self._chunks += 1
        self._entries, self._tensors, self._pending_steps = [], {}, 0

    def _append_journal(self, line: dict[str, Any]) -> None:
        with open(self.path / JOURNAL, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, separators=(",", ":")) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def close(self) -> None:
        """Flush and mark the trace complete; idempotent."""
        if self._closed:
            return
        self.flush()
        self._append_journal({"end": True, "chunks": self._chunks, "steps": self._steps})
        self._closed = True

    def __enter__(self) -> TraceRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _local_rows(mask: torch.Tensor) -> torch.Tensor:
    """bool [B, Hs, n] -> int64 [m, 3] of (batch, sampled-head position, token)."""
    return mask.nonzero().to(torch.int64).cpu()


def _local_promoted(rows: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """Promoted (batch, kv head, token) rows of the sampled heads, heads renumbered as positions."""
    pos = torch.full((int(heads.max()) + 1 if len(heads) else 1,), -1, dtype=torch.int64)
    pos[heads] = torch.arange(len(heads))
    keep = rows[:, 1] < len(pos)
    rows = rows[keep]
    local = pos[rows[:, 1]]
    rows = rows[local >= 0]
    return torch.stack([rows[:, 0], local[local >= 0], rows[:, 2]], dim=1) if len(rows) else rows


def _certkv_version() -> str:
    import certkv

    return certkv.__version__


# ---------------------------------------------------------------------- reading
@dataclass
class Entry:
    kind: str
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


ENTRY_TENSORS = {
    "tokens": ("k", "v"),
    "quant": ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"),
    "step": ("q", "output", *(f"cert_{n}" for n in CERT_FIELDS), "rows_stage1", "rows_stage2", "promoted"),
}
BOOK_TENSORS = ("levels", "oflat", "ovalue", "oradius")  # per role, for codebook layouts (version 2)


def entry_tensors(kind: str, meta: dict[str, Any]) -> tuple[str, ...]:
    """The tensors an entry carries: fixed per kind, plus a codebook role's table and outliers and the
    rotated-back keys of a transformed key basis (``quant`` entries, version 2)."""
    names = ENTRY_TENSORS[kind]
    if kind == "quant":
        layout = meta.get("layout") or {}
        for role, name in (("k", "key"), ("v", "value")):
            if len(layout.get(name, ())) == 4 and layout[name][3] == "book":
                names += tuple(f"{role}_{t}" for t in BOOK_TENSORS)
        if meta.get("used"):
            names += ("k_used",)
    return names


class TraceReader:
    """Reads and validates a trace directory; every problem raises ``errors.TraceError`` with one line.

    ``complete`` is False when the recorder never closed the trace (a killed run); ``tail`` then says
    what is missing. ``entries()`` yields every journaled entry with checksums verified."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise errors.TraceError(f"{self.path}: no such trace directory")
        mpath = self.path / MANIFEST
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise errors.TraceError(f"{mpath}: missing manifest; not a certkv trace") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise errors.TraceError(f"{mpath}: unreadable manifest ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise errors.TraceError(f"{mpath}: not a certkv trace (format {manifest.get('format')!r})")
        if manifest.get("version") not in READS:
            raise errors.TraceError(
                f"{mpath}: trace format version {manifest.get('version')!r}; this certkv reads versions {READS}"
            )
        try:
            cache = manifest["cache"]
            self.head_dim = int(cache["head_dim"])
            self.num_kv_heads = int(cache["num_kv_heads"])
            self.device = str(cache["device"])
            self.kv_heads = [int(h) for h in manifest["sample"]["kv_heads"]]
            self.layers = [int(h) for h in manifest["sample"]["layers"]]
            self.config = dict(manifest["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise errors.TraceError(f"{mpath}: manifest lacks or garbles a field ({exc!r})") from None
        self.manifest = manifest
        self.chunks, self.complete, self.tail = self._read_journal()

    def _read_journal(self) -> tuple[list[dict[str, Any]], bool, str | None]:
        jpath = self.path / JOURNAL
        try:
            raw = jpath.read_bytes()
        except FileNotFoundError:
            raise errors.TraceError(f"{jpath}: missing journal") from None
        lines = raw.split(b"\n")
        partial = lines.pop()  # bytes after the last newline: a line cut by a crash
        chunks: list[dict[str, Any]] = []
        end: dict[str, Any] | None = None
        for no, line in enumerate(lines, 1):
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise errors.TraceError(f"{jpath}: line {no} is not valid JSON (corrupt journal)") from None
            if end is not None:
                raise errors.TraceError(f"{jpath}: line {no} follows the end record (tampered journal)")
            if rec.get("end"):
                end = rec
                continue
            if rec.get("chunk") != len(chunks) or not isinstance(rec.get("entries"), list):
                raise errors.TraceError(f"{jpath}: line {no} is not chunk {len(chunks)} (tampered journal)")
            chunks.append(rec)
        steps = sum(e.get("kind") == "step" for c in chunks for e in c["entries"])
        if end is not None:
            if partial:
                raise errors.TraceError(f"{jpath}: bytes after the end record (tampered journal)")
            if end.get("chunks") != len(chunks) or end.get("steps") != steps:
                raise errors.TraceError(
                    f"{jpath}: end record says {end.get('chunks')} chunks / {end.get('steps')} steps, "
                    f"the journal holds {len(chunks)} / {steps}"
                )
            return chunks, True, None
        cut = " and a cut journal line" if partial else ""
        return chunks, False, f"the recorder never closed the trace{cut}: steps after the {steps} recorded are missing"

    @property
    def num_steps(self) -> int:
        return sum(e.get("kind") == "step" for c in self.chunks for e in c["entries"])

    def entries(self) -> Iterator[Entry]:
        for rec in self.chunks:
            cpath = self.path / str(rec.get("file"))
            try:
                tensors = load_file(str(cpath))
            except FileNotFoundError:
                raise errors.TraceError(f"{cpath}: journaled chunk file is missing") from None
            except (SafetensorError, OSError, ValueError) as exc:
                raise errors.TraceError(f"{cpath}: unreadable or truncated chunk ({exc})") from None
            listed = rec.get("tensors", {})
            if set(listed) != set(tensors):
                raise errors.TraceError(f"{cpath}: tensors differ from the journal's list (tampered chunk)")
            for key, t in tensors.items():
                want = listed[key]
                if want.get("dtype") != _dtype_name(t) or want.get("shape") != list(t.shape):
                    raise errors.TraceError(f"{cpath}: tensor {key} is {_dtype_name(t)} {list(t.shape)}, "
                                            f"the journal says {want.get('dtype')} {want.get('shape')}")  # fmt: skip
                if want.get("sha256") != _checksum(t):
                    raise errors.TraceError(f"{cpath}: checksum mismatch for tensor {key} (tampered or corrupt)")
            for idx, meta in enumerate(rec["entries"]):
                kind = meta.get("kind")
                if kind not in ENTRY_TENSORS:
                    raise errors.TraceError(f"{cpath}: entry {idx} has unknown kind {kind!r}")
                try:
                    entry = Entry(kind, meta, {n: tensors[f"e{idx}.{n}"] for n in entry_tensors(kind, meta)})
                except KeyError as exc:
                    raise errors.TraceError(f"{cpath}: entry {idx} ({kind}) lacks tensor {exc}") from None
                try:
                    self._check_shapes(cpath, idx, entry)
                except errors.TraceError:
                    raise
                except (KeyError, TypeError, ValueError, IndexError) as exc:
                    raise errors.TraceError(f"{cpath}: entry {idx} ({kind}) is malformed ({exc!r})") from None
                yield entry

    def _check_shapes(self, cpath: Path, idx: int, e: Entry) -> None:
        hs, d = len(self.kv_heads), self.head_dim

        def bad(msg: str) -> errors.TraceError:
            return errors.TraceError(f"{cpath}: entry {idx} ({e.kind}, layer {e.meta.get('layer')}): {msg}")

        if e.meta.get("layer") not in self.layers:
            raise bad("layer not in the manifest's sample")
        if e.kind == "tokens":
            t = int(e.meta["end"]) - int(e.meta["start"])
            for name in ("k", "v"):
                x = e.tensors[name]
                if x.dim() != 4 or x.shape[1:] != (hs, t, d):
                    raise bad(f"{name} has shape {tuple(x.shape)}, the manifest implies [B, {hs}, {t}, {d}]")
                if x.dtype not in (torch.float16, torch.bfloat16):
                    raise bad(f"{name} has dtype {x.dtype}; caches hold float16 or bfloat16")
        elif e.kind == "quant":
            t = int(e.meta["end"]) - int(e.meta["start"])
            for role, spec in (("k", e.meta["layout"]["key"]), ("v", e.meta["layout"]["value"])):
                bits, axis, size = spec[:3]
                codes = e.tensors[f"{role}_codes"]
                groups = (t // size, d) if axis == "token" else (t, d // size)
                if codes.dim() != 4 or codes.shape[1:] != (hs, t, d * bits // 8) or codes.dtype != torch.uint8:
                    raise bad(f"{role}_codes is {codes.dtype} {tuple(codes.shape)}, expected uint8 [B, {hs}, {t}, "
                              f"{d * bits // 8}]")  # fmt: skip
                for part in ("scale", "zero"):
                    x = e.tensors[f"{role}_{part}"]
                    if x.dim() != 4 or x.shape[0] != codes.shape[0] or x.shape[1:] != (hs, *groups):
                        raise bad(f"{role}_{part} has shape {tuple(x.shape)}, expected [B, {hs}, {groups}]")
                if f"{role}_levels" in e.tensors:
                    lv, flat = e.tensors[f"{role}_levels"], e.tensors[f"{role}_oflat"]
                    val, rad = e.tensors[f"{role}_ovalue"], e.tensors[f"{role}_oradius"]
                    if lv.shape != (1 << bits,) or lv.dtype != torch.float32:
                        raise bad(f"{role}_levels is {lv.dtype} {tuple(lv.shape)}, expected float32 [{1 << bits}]")
                    m = flat.shape[0] if flat.dim() == 1 else -1
                    if flat.dtype != torch.int32 or m < 0 or val.shape != (m,) or rad.shape != (m,):
                        raise bad(f"{role} outliers: positions {flat.dtype} {tuple(flat.shape)}, values "
                                  f"{tuple(val.shape)}, radii {tuple(rad.shape)} do not match")  # fmt: skip
                    if m and not (int(flat.min()) >= 0 and int(flat.max()) < codes.shape[0] * hs * t * d):
                        raise bad(f"{role} outlier positions outside the block")
            if "k_used" in e.tensors:
                ku = e.tensors["k_used"]
                if ku.dtype != torch.float32 or ku.shape != (e.tensors["k_codes"].shape[0], hs, t, d):
                    raise bad(f"k_used is {ku.dtype} {tuple(ku.shape)}, expected float32 [B, {hs}, {t}, {d}]")
        elif e.kind == "step":
            g = int(e.meta["group"])
            b = e.tensors["q"].shape[0]
            for name in ("q", "output"):
                if e.tensors[name].shape != (b, hs * g, d):
                    raise bad(f"{name} has shape {tuple(e.tensors[name].shape)}, expected [{b}, {hs * g}, {d}]")
            for name in CERT_FIELDS:
                if e.tensors[f"cert_{name}"].shape != (b, hs * g):
                    raise bad(f"certificate field {name} has shape {tuple(e.tensors[f'cert_{name}'].shape)}")
            for name in ("rows_stage1", "rows_stage2", "promoted"):
                r = e.tensors[name]
                if r.dim() != 2 or r.shape[1] != 3 or r.dtype != torch.int64:
                    raise bad(f"{name} must be int64 [m, 3], got {r.dtype} {tuple(r.shape)}")
                if len(r) and (
                    int(r.min()) < 0
                    or int(r[:, 0].max()) >= b
                    or int(r[:, 1].max()) >= hs
                    or int(r[:, 2].max()) >= int(e.meta["length"])
                ):
                    raise bad(f"{name} indexes outside [B={b}, H={hs}, n={e.meta['length']}]")
