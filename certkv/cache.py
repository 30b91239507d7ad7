"""``TieredKVCache``: quantized Tier-1 on the cache's device, FP16 originals in Tier-2 on the host.

Tier-1, per layer, in token order: FP16 sink tokens, quantized tokens (keys and values, with their
16-bit scales and zero points), an FP16 recent window; plus promoted tokens (FP16 copies of
quantized tokens that kept needing fallback) and the per-channel range of the original values.
Tier-2: every original key and value row, in pinned host memory when the cache is on CUDA, written
with non-blocking copies on append and read back by (batch, kv head, token) rows on fallback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from certkv import errors, transforms
from certkv.attention import StepTokens, default_scale
from certkv.calibration import Calibration, default_books
from certkv.certificate import AttentionResult, Certificate
from certkv.codebook import BookTensor, Codebook, join, outlier_mask, quantize_book
from certkv.config import CertConfig
from certkv.ladder import LadderOutcome, accepts, dense_stage, serve, tolerance
from certkv.quant import DEQUANT_REL, QuantizedTensor, quantize

if TYPE_CHECKING:
    from certkv.trace import TraceRecorder

ACCEPTED_DTYPES = (torch.float16, torch.bfloat16)


# counters of ``TieredKVCache.kernel_steps``: layer-steps the decode kernel was tried on and served
# without the torch ladder; of those, the ones that fetched rows (its stage 2) or served a row dense,
# and of the dense ones those whose kernel-made certificate missed tolerance somewhere, so that
# ``certified_step``'s was computed too (``certkv.kernel_ladder.certify_dense``)
KERNEL_STEPS = ("tried", "served", "fetched", "dense", "dense_torch")


@dataclass
class MemoryReport:
    """Bytes held per tier for the tokens appended so far; ``ratio`` = Tier-1 / an FP16 K+V cache."""

    tier1_bytes: int
    tier2_bytes: int
    fp16_cache_bytes: int
    tokens: int

    @property
    def ratio(self) -> float:
        return self.tier1_bytes / self.fp16_cache_bytes if self.fp16_cache_bytes else math.nan


Quantized = QuantizedTensor | BookTensor


@dataclass
class _Layer:
    books: tuple[Codebook, Codebook]
    bounds: dict[str, tuple[torch.Tensor, torch.Tensor] | None]
    dtype: torch.dtype | None = None
    batch: int = 0
    length: int = 0
    sink_k: torch.Tensor | None = None
    sink_v: torch.Tensor | None = None
    qk: Quantized | None = None
    qv: Quantized | None = None
    win_k: torch.Tensor | None = None
    win_v: torch.Tensor | None = None
    v_min: torch.Tensor | None = None
    v_max: torch.Tensor | None = None
    tier2_k: torch.Tensor | None = None
    tier2_v: torch.Tensor | None = None
    fetch_count: torch.Tensor | None = None  # int32 [B, H, n_quantized]
    promoted: dict[str, torch.Tensor] = field(default_factory=dict)  # idx [B,H,P] (-1 free), k, v [B,H,P,D]
    # every head's promotion slots taken at the budget: promotions are never undone, so the fetch
    # bookkeeping has nothing left to do (known on the host, checked once per promotion)
    promotion_full: bool = False

    @property
    def n_sink(self) -> int:
        return 0 if self.sink_k is None else int(self.sink_k.shape[2])

    @property
    def n_quant(self) -> int:
        return 0 if self.qk is None else self.qk.num_tokens


class TieredKVCache:
    """A KV cache for ``num_layers`` layers of ``num_kv_heads`` heads of size ``head_dim``.

    ``append(layer, k, v)`` adds tokens ([B, H_kv, T, D], float16 or bfloat16); ``attend(layer, q)``
    serves one decode step for q [B, H_q, 1, D] (H_q a multiple of H_kv) with a certificate per
    (batch row, query head): bound >= |served - exact attention over the originals| (see
    ``Certificate``), escalating along the fallback ladder as ``config`` requires.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        config: CertConfig | None = None,
        device: torch.device | str | None = None,
        recorder: TraceRecorder | None = None,
    ) -> None:
        self.config = config or CertConfig()
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(value, int) or value < 1:
                raise errors.ConfigError(f"{name}={value!r}: must be a positive integer")
        cfg = self.config
        for role, bits, axis, size in (
            ("key", cfg.key_bits, cfg.key_group_axis, cfg.key_group_size),
            ("value", cfg.value_bits, cfg.value_group_axis, cfg.value_group_size),
        ):
            if head_dim % (8 // bits):
                raise errors.ConfigError(
                    f"head_dim={head_dim} is not a multiple of {8 // bits}, needed to pack {role}s at {bits} bits"
                )
            if axis == "channel" and head_dim % size:
                raise errors.ConfigError(f"{role}_group_size={size} does not divide head_dim={head_dim}")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.recorder = recorder
        self.transform = transforms.make(cfg.key_transform, head_dim, cfg.rope_theta, cfg.transform_seed)
        calibration = None
        if cfg.calibration is not None:
            calibration = Calibration.load(cfg.calibration)
            calibration.check(cfg, num_layers, num_kv_heads, head_dim)
        self._layers = [
            _Layer(
                default_books(cfg) if calibration is None else calibration.books(cfg, i),
                {r: None if calibration is None else calibration.bounds(r, i) for r in ("k", "v")},
            )
            for i in range(num_layers)
        ]
        self._pin = self.device.type == "cuda"
        # the Triton kernels implement the paper layout and tile the head dimension whole (a power of
        # two, at least one value group); on CUDA appends go through certkv.kernels.append
        self._kernel_layout = cfg.paper_layout and head_dim >= 64 and head_dim & (head_dim - 1) == 0
        self._append_kernel = self._pin and self._kernel_layout
        # CertConfig.decode_kernel's layer-steps (KERNEL_STEPS)
        self.kernel_steps = dict.fromkeys(KERNEL_STEPS, 0)
        if recorder is not None:
            recorder.bind(self)

    # ------------------------------------------------------------------ validation
    def _layer(self, layer: int) -> _Layer:
        if not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise errors.LayerIndexError(f"layer {layer!r} is out of range: this cache has {self.num_layers} layers")
        return self._layers[layer]

    def _check(self, name: str, x: Any, heads: int | None, length: int | None) -> None:
        if not isinstance(x, torch.Tensor):
            raise errors.ShapeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise errors.ShapeError(f"{name} must have rank 4 [B, H, T, D], got shape {tuple(x.shape)}")
        if x.dtype not in ACCEPTED_DTYPES:
            raise errors.DTypeError(f"{name} has dtype {x.dtype}; certkv accepts float16 or bfloat16")
        if x.device.type != self.device.type or (self.device.index is not None and x.device != self.device):
            raise errors.DeviceError(f"{name} is on {x.device} but the cache is on {self.device}")
        if x.shape[-1] != self.head_dim:
            raise errors.ShapeError(f"{name} has head_dim {x.shape[-1]}, the cache expects {self.head_dim}")
        if heads is not None and x.shape[1] != heads:
            raise errors.HeadMismatchError(f"{name} has {x.shape[1]} heads, the cache has {heads} KV heads")
        if length is not None and x.shape[2] != length:
            raise errors.ShapeError(f"{name} has {x.shape[2]} positions, expected {length}")
        if x.shape[0] < 1 or x.shape[2] < 1:
            raise errors.ShapeError(f"{name} has an empty batch or token axis: shape {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise errors.NonFiniteError(f"{name} contains NaN or Inf")

    # ------------------------------------------------------------------ append
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add T >= 1 tokens: k, v [B, H_kv, T, D] of one 16-bit dtype."""
        st = self._layer(layer)
        outliers = (self.config.book_keys and self.config.key_outliers > 0) or (
            self.config.book_values and self.config.value_outliers > 0
        )
        if (
            outliers
            and isinstance(k, torch.Tensor)
            and k.dim() == 4
            and k.shape[0] * self.num_kv_heads * (st.length + k.shape[2]) * self.head_dim >= 2**31
        ):
            # checked before anything is written: outlier positions are int32 over [B, H_kv, tokens, D]
            raise errors.ConfigError(
                f"layer {layer}: {st.length + k.shape[2]} tokens x batch {k.shape[0]} x {self.num_kv_heads} KV heads x "
                f"head_dim {self.head_dim} exceed the 2^31 values a codebook policy with outliers can index"
            )
        self._check("k", k, self.num_kv_heads, None)
        self._check("v", v, self.num_kv_heads, k.shape[2])
        if v.dtype != k.dtype or v.shape[0] != k.shape[0]:
            raise errors.ShapeError(f"k {tuple(k.shape)} {k.dtype} and v {tuple(v.shape)} {v.dtype} disagree")
        if st.dtype is None:
            st.dtype, st.batch = k.dtype, k.shape[0]
        elif k.dtype != st.dtype:
            raise errors.DTypeError(f"layer {layer} holds {st.dtype} tokens; cannot append {k.dtype}")
        elif k.shape[0] != st.batch:
            raise errors.ShapeError(f"layer {layer} has batch {st.batch}; cannot append batch {k.shape[0]}")
        self._write_tier2(st, k, v)
        vf = v.float()
        st.v_min = vf.amin(2) if st.v_min is None else torch.minimum(st.v_min, vf.amin(2))
        st.v_max = vf.amax(2) if st.v_max is None else torch.maximum(st.v_max, vf.amax(2))
        take = min(self.config.sinks - st.n_sink, k.shape[2])
        if take > 0:
            st.sink_k = _cat(st.sink_k, k[:, :, :take])
            st.sink_v = _cat(st.sink_v, v[:, :, :take])
        st.win_k = _cat(st.win_k, k[:, :, take:])
        st.win_v = _cat(st.win_v, v[:, :, take:])
        st.length += k.shape[2]
        self._flush(st)

    def _write_tier2(self, st: _Layer, k: torch.Tensor, v: torch.Tensor) -> None:
        t = k.shape[2]
        need = st.length + t
        if st.tier2_k is None or st.tier2_k.shape[2] < need:
            cap = max(need, 2 * (0 if st.tier2_k is None else st.tier2_k.shape[2]), 64)
            shape = (st.batch, self.num_kv_heads, cap, self.head_dim)
            new_k = torch.empty(shape, dtype=k.dtype, pin_memory=self._pin)
            new_v = torch.empty(shape, dtype=k.dtype, pin_memory=self._pin)
            if st.tier2_k is not None and st.tier2_v is not None:
                new_k[:, :, : st.length] = st.tier2_k[:, :, : st.length]
                new_v[:, :, : st.length] = st.tier2_v[:, :, : st.length]
            st.tier2_k, st.tier2_v = new_k, new_v
        assert st.tier2_k is not None and st.tier2_v is not None
        st.tier2_k[:, :, st.length : need].copy_(k, non_blocking=self._pin)
        st.tier2_v[:, :, st.length : need].copy_(v, non_blocking=self._pin)

    def _flush(self, st: _Layer) -> None:
        """Quantize whole blocks leaving the window (the window keeps >= ``config.window`` tokens)."""
        cfg = self.config
        assert st.win_k is not None and st.win_v is not None
        excess = st.win_k.shape[2] - cfg.window
        blocks = excess // cfg.block if excess > 0 else 0
        if blocks == 0:
            return
        m = blocks * cfg.block
        if self._append_kernel:
            from certkv.kernels.append import append_block

            # one launch, bit for bit the torch quantizer's output (tests/test_append_kernel.py)
            qk, qv, _, _ = append_block(st.win_k[:, :, :m], st.win_v[:, :, :m])
        else:
            pos = torch.arange(st.n_sink + st.n_quant, st.n_sink + st.n_quant + m, device=self.device)
            qk = self._quantize(st, "k", st.win_k[:, :, :m], pos)
            qv = self._quantize(st, "v", st.win_v[:, :, :m], pos)
        st.qk = qk if st.qk is None else join(st.qk, qk)
        st.qv = qv if st.qv is None else join(st.qv, qv)
        st.win_k, st.win_v = st.win_k[:, :, m:].contiguous(), st.win_v[:, :, m:].contiguous()
        zeros = torch.zeros(st.batch, self.num_kv_heads, m, dtype=torch.int32, device=self.device)
        st.fetch_count = zeros if st.fetch_count is None else torch.cat([st.fetch_count, zeros], dim=2)

    def _quantize(self, st: _Layer, role: str, x: torch.Tensor, pos: torch.Tensor) -> Quantized:
        """One block of keys or values into the configured quantizer (uniform, or codebook in the
        key transform's basis)."""
        cfg = self.config
        bits, axis, size = (
            (cfg.key_bits, cfg.key_group_axis, cfg.key_group_size)
            if role == "k"
            else (cfg.value_bits, cfg.value_group_axis, cfg.value_group_size)
        )
        if not (cfg.book_keys if role == "k" else cfg.book_values):
            return quantize(x, bits, axis, size)
        if role == "k" and self.transform is not None:
            xb, err = self.transform.to_basis(x, pos)
        else:
            xb, err = x.double(), torch.zeros(x.shape, dtype=torch.float64, device=x.device)
        fraction = cfg.key_outliers if role == "k" else cfg.value_outliers
        mask = outlier_mask(xb, axis, size, fraction, st.bounds[role])
        return quantize_book(xb, err, st.books[0 if role == "k" else 1], axis, size, x.dtype, mask)

    def _quantized_keys(self, st: _Layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The quantized span's keys as a step uses them: binary32 keys, their radius (original basis),
        the magnitude bound, and the radius in the transform's pairing (None without a transform)."""
        assert st.qk is not None
        if self.transform is None:
            return st.qk.dequantize(), st.qk.radius(), st.qk.magnitude(), None
        pos = torch.arange(st.n_sink, st.n_sink + st.n_quant, device=self.device)
        assert isinstance(st.qk, BookTensor)  # a key transform implies the codebook quantizer
        r = st.qk.dequantized_radius()
        k_used, delta = self.transform.from_basis(st.qk.dequantize(), pos, r)
        return k_used, delta, k_used.double().abs(), self.transform.pair(r)

    # ------------------------------------------------------------------ views
    def seq_len(self, layer: int) -> int:
        return self._layer(layer).length

    def originals(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tier-2 originals [B, H_kv, n, D] (host tensors)."""
        st = self._layer(layer)
        if st.tier2_k is None or st.tier2_v is None:
            raise errors.EmptyCacheError(f"layer {layer} holds no tokens")
        if self._pin:
            torch.cuda.current_stream().synchronize()  # the non-blocking appends have landed
        return st.tier2_k[:, :, : st.length], st.tier2_v[:, :, : st.length]

    def quantized_span(self, layer: int) -> tuple[int, int]:
        """[start, end) token indices held quantized (the rest is FP16 in Tier-1)."""
        st = self._layer(layer)
        return st.n_sink, st.n_sink + st.n_quant

    def tokens(self, layer: int) -> StepTokens:
        """Everything one step of ``layer`` sees, from Tier-1 only."""
        st = self._layer(layer)
        if st.length == 0:
            raise errors.EmptyCacheError(f"layer {layer} holds no tokens: append before attend")
        parts = []
        if st.sink_k is not None and st.sink_v is not None:
            parts.append(StepTokens.exact(st.sink_k, st.sink_v))
        if st.qk is not None and st.qv is not None:
            k_used, k_radius, k_mag, kb_radius = self._quantized_keys(st)
            v_mag = st.qv.magnitude().amax(-1)
            parts.append(
                StepTokens(
                    k=k_used,
                    k_radius=k_radius,
                    k_mag=k_mag,
                    v=st.qv.dequantize(),
                    v_radius=st.qv.radius(),
                    v_mag=v_mag * (1 + DEQUANT_REL),
                    v_dq=v_mag * DEQUANT_REL,
                    v_min=st.v_min,  # type: ignore[arg-type]
                    v_max=st.v_max,  # type: ignore[arg-type]
                    kb_radius=kb_radius,
                )
            )
        if st.win_k is not None and st.win_k.shape[2]:
            parts.append(StepTokens.exact(st.win_k, st.win_v))  # type: ignore[arg-type]
        fields_ = ("k", "k_radius", "k_mag", "v", "v_radius", "v_mag", "v_dq")
        joined: dict[str, Any] = {f: torch.cat([getattr(p, f) for p in parts], dim=2) for f in fields_}
        merged = StepTokens(
            **joined,
            v_min=st.v_min,  # type: ignore[arg-type]
            v_max=st.v_max,  # type: ignore[arg-type]
        )
        if self.transform is not None:
            merged.dual = self.transform.dual
            merged.kb_radius = torch.cat(
                [p.kb_radius if p.kb_radius is not None else torch.zeros_like(p.k, dtype=torch.float64) for p in parts],
                dim=2,
            )
        if not st.promoted:
            return merged
        b, h, slot, i = _promoted_rows(st)
        return merged.with_exact((b, h, i), k=st.promoted["k"][b, h, slot], v=st.promoted["v"][b, h, slot])

    def dequantized_exact(self, layer: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """For the exact reference: keys and values as Tier-1 serves them at stage 0, each as float64
        (codes, scale, zero) [B, H_kv, n, D] whose exact real value is codes * scale + zero (FP16 tokens:
        codes 0, scale 0, zero the value; codebook values: the level for the code; keys quantized in a
        transformed basis: the binary32 keys rotated back, which the step's key radii are about)."""
        st = self._layer(layer)
        if st.length == 0:
            raise errors.EmptyCacheError(f"layer {layer} holds no tokens")

        def exact(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            z = torch.zeros_like(x, dtype=torch.float64)
            return z, z, x.double()

        out = []
        for role in ("k", "v"):
            parts = []
            if st.n_sink:
                parts.append(exact(getattr(st, f"sink_{role}")))
            quant = st.qk if role == "k" else st.qv
            if quant is not None and role == "k" and self.transform is not None:
                parts.append(exact(self._quantized_keys(st)[0]))  # the binary32 keys the step uses
            elif quant is not None:
                parts.append(quant.exact_parts())
            win = getattr(st, f"win_{role}")
            if win is not None and win.shape[2]:
                parts.append(exact(win))
            c, s, z = (torch.cat([p[i] for p in parts], dim=2) for i in range(3))
            if st.promoted:
                b, h, slot, i = _promoted_rows(st)
                c[b, h, i], s[b, h, i], z[b, h, i] = 0.0, 0.0, st.promoted[role][b, h, slot].double()
            out.append((c, s, z))
        return out[0], out[1]

    def quantized_storage(self, layer: int) -> tuple[Quantized | None, Quantized | None]:
        """Tier-1's quantized keys and values of ``layer`` as stored (None before the first block)."""
        st = self._layer(layer)
        return st.qk, st.qv

    def used_keys(self, layer: int) -> torch.Tensor | None:
        """With a key transform: the binary32 keys [B, H_kv, n_quant, D] the step computes with for the
        quantized span (rotated back from the basis); None without a transform or quantized tokens."""
        st = self._layer(layer)
        if self.transform is None or st.qk is None:
            return None
        return self._quantized_keys(st)[0]

    def promoted_rows(self, layer: int) -> torch.Tensor:
        """(batch, kv head, token index in cache order) of every promoted token, int64 [m, 3]."""
        st = self._layer(layer)
        if not st.promoted:
            return torch.zeros(0, 3, dtype=torch.int64)
        b, h, _, i = _promoted_rows(st)
        return torch.stack([b, h, i], dim=1).cpu()

    def promoted_count(self, layer: int) -> torch.Tensor:
        """Promoted tokens per (batch row, KV head), [B, H_kv]."""
        st = self._layer(layer)
        if not st.promoted:
            return torch.zeros(st.batch, self.num_kv_heads, dtype=torch.int64)
        return (st.promoted["idx"] >= 0).sum(-1)

    # ------------------------------------------------------------------ attend
    def attend(self, layer: int, q: torch.Tensor, scale: float | None = None) -> AttentionResult:
        """One certified decode step of ``layer`` for q [B, H_q, 1, D]."""
        st = self._layer(layer)
        self._check("q", q, None, 1)
        if st.length == 0:
            raise errors.EmptyCacheError(f"layer {layer} holds no tokens: append before attend")
        b, hq, _, d = q.shape
        if b != st.batch:
            raise errors.ShapeError(f"q has batch {b}, layer {layer} holds batch {st.batch}")
        if hq % self.num_kv_heads:
            raise errors.HeadMismatchError(
                f"q has {hq} heads, not a multiple of the cache's {self.num_kv_heads} KV heads"
            )
        if scale is None:
            scale = default_scale(d)
        elif not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise errors.ConfigError(f"scale={scale!r}: must be a finite positive number")
        g = hq // self.num_kv_heads
        qg = q.reshape(b, self.num_kv_heads, g, d)
        outcome = self._kernel_ladder(layer, st, qg, float(scale))
        if outcome is None:
            outcome = serve(
                qg,
                self.tokens(layer),
                float(scale),
                self.config,
                lambda bi, hi, ti, keys: self._fetch_rows(st, bi, hi, ti, keys),
                lambda bi, hi: self._fetch_dense(st, bi, hi),
            )
        output = outcome.output.reshape(b, hq, 1, d)
        cert = Certificate(**{k: v.reshape(b, hq, 1) for k, v in outcome.certificate.to_dict().items()})
        result = AttentionResult(output, cert, outcome.rows_stage1, outcome.rows_stage2)
        if self.recorder is not None:
            # before promotion changes Tier-1, and before strict mode can raise: a rejected step is
            # exactly the one an audit wants to see
            self.recorder.record(self, layer, q, float(scale), result)
        if outcome.fetched:
            self._count_fetches(st, outcome.rows_stage1 | outcome.rows_stage2)
        if self.config.self_check:
            self._self_check(layer, q, float(scale), result)
        if self.config.strict:
            _raise_if_rejected(layer, cert)
        return result

    def _kernel_ladder(self, layer: int, st: _Layer, qg: torch.Tensor, scale: float) -> LadderOutcome | None:
        """The ladder with stage 0 from the fused decode kernel (``CertConfig.decode_kernel``) when it
        applies: the query rows its stage 0 leaves uncertified are served again by the kernel with FP16
        keys and values fetched for their heads' heaviest-error tokens (stage 2, ``certkv.kernel_ladder``),
        and the rows still uncertified by dense attention over their heads' originals (stage 3).
        None sends the step to the torch ladder: the kernel does not apply, or a row is uncertified
        and ``max_stage`` stops the ladder before the stage it needs."""
        cfg = self.config
        if cfg.decode_kernel == "never":
            return None
        # "auto": on CUDA at any length. Per layer-step on the H100 the kernel with its fused epilogue
        # costs 0.3-0.5 ms eager against 8 ms (2K) to 60 ms (128K) on the torch path; a step its stage 2
        # leaves uncertified pays both (docs/benchmarks.md)
        if cfg.decode_kernel == "auto" and self.device.type != "cuda":
            return None
        usable = self._kernel_layout and self.transform is None and self.recorder is None
        if not usable or st.qk is None or st.v_min is None or st.v_max is None:
            return None
        from certkv.kernel_ladder import certify_dense, stage2
        from certkv.kernels.decode import from_cache
        from certkv.streaming import kernel_step, kernel_step_partials

        v_min, v_max = st.v_min, st.v_max

        def step(t1: object) -> tuple[torch.Tensor, Certificate]:
            return kernel_step(qg, t1, scale, v_min, v_max)

        t1 = from_cache(self, layer)
        out, cert, partials = kernel_step_partials(qg, t1, scale, v_min, v_max)
        cert.tolerance = tolerance(cfg, out)
        cert.accepted = accepts(cfg, cert, cert.tolerance)
        self.kernel_steps["tried"] += 1
        none = torch.zeros(qg.shape[0], self.num_kv_heads, st.length, dtype=torch.bool, device=qg.device)
        rows = none.clone()
        fetched = dense = False  # known on the host: no device sync to count them
        if not bool(cert.accepted.all()):
            if cfg.max_stage < 2:
                return None
            served = stage2(
                qg, t1, scale, v_min, v_max, cfg, out, cert, partials, st.n_sink,
                lambda bi, hi, ti, keys: self._fetch_rows(st, bi, hi, ti, keys), step,
            )  # fmt: skip
            if served is not None:
                out, cert, chosen = served
                rows[:, :, st.n_sink : st.n_sink + st.n_quant] = chosen
                fetched = True
        if not bool(cert.accepted.all()):
            if cfg.max_stage < 3:
                return None

            def certify(
                pairs: tuple[torch.Tensor, ...], q_d: torch.Tensor, k_d: torch.Tensor, v_d: torch.Tensor
            ) -> tuple[torch.Tensor, Certificate]:
                out_d, cert_d, reproved = certify_dense(pairs, q_d, k_d, v_d, scale, cfg, v_min, v_max)
                self.kernel_steps["dense_torch"] += reproved
                return out_d, cert_d

            fetch = lambda b, h: self._fetch_dense(st, b, h)  # noqa: E731
            out, cert = dense_stage(qg, scale, cfg, out, cert, fetch, st.length, certify)
            dense = True
        self.kernel_steps["served"] += 1
        self.kernel_steps["fetched"] += fetched
        self.kernel_steps["dense"] += dense
        return LadderOutcome(out, cert, none, rows, fetched)

    def _fetch_rows(
        self, st: _Layer, b: torch.Tensor, h: torch.Tensor, t: torch.Tensor, keys: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(batch, kv head, token) rows from Tier-2, [m, D] each on the cache's device (keys None unless
        ``keys``): gathered into a pinned buffer, so the device copy is asynchronous (a pageable gather
        would make it synchronous) and the value rows' host gather runs while the key rows copy."""
        assert st.tier2_k is not None and st.tier2_v is not None
        cap = st.tier2_k.shape[2]
        flat = (b.cpu() * self.num_kv_heads + h.cpu()) * cap + t.cpu()
        out = []
        for buf in (st.tier2_k, st.tier2_v) if keys else (st.tier2_v,):
            rows = torch.empty((len(flat), self.head_dim), dtype=buf.dtype, pin_memory=self._pin)
            # gathered as 16-bit integers, the same bits: some torch CPU builds have no fast index_select
            # for FP16/BF16 (torch 2.13 here: 326 us for 480 rows of 128 against 6 as int16; torch 2.11
            # on the H100 host: 12-13 us either way)
            torch.index_select(buf.view(-1, self.head_dim).view(torch.int16), 0, flat, out=rows.view(torch.int16))
            out.append(rows.to(self.device, non_blocking=self._pin))
        return (out[0], out[1]) if keys else (None, out[0])

    def _fetch_dense(self, st: _Layer, b: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole (batch row, KV head) pairs from Tier-2, [m, 1, n, D] on the cache's device. Each pair's
        rows are one contiguous run of the pinned buffer, copied straight to the device (no gather into
        pageable memory first, which made the copy synchronous and bounded by a CPU memcpy)."""
        assert st.tier2_k is not None and st.tier2_v is not None
        n = st.length
        out = [torch.empty((len(b), 1, n, self.head_dim), dtype=st.tier2_k.dtype, device=self.device) for _ in "kv"]
        for j, (bi, hi) in enumerate(zip(b.tolist(), h.tolist(), strict=True)):
            out[0][j, 0].copy_(st.tier2_k[bi, hi, :n], non_blocking=self._pin)
            out[1][j, 0].copy_(st.tier2_v[bi, hi, :n], non_blocking=self._pin)
        return out[0], out[1]

    def _count_fetches(self, st: _Layer, fetched: torch.Tensor) -> None:
        """Adaptive precision: quantized tokens fetched ``promote_after`` times move to FP16 in Tier-1."""
        if st.fetch_count is None or self.config.promote_budget == 0 or st.promotion_full:
            return
        lo, hi = st.n_sink, st.n_sink + st.n_quant
        st.fetch_count += fetched[:, :, lo:hi].to(torch.int32)
        ready = st.fetch_count >= self.config.promote_after
        if st.promoted:
            ready &= ~self._promoted_mask(st)
        if not bool(ready.any()):
            return
        held = (st.promoted["idx"] >= 0).sum(-1) if st.promoted else torch.zeros_like(ready.sum(-1))
        self._grow_promoted(st, min(self.config.promote_budget, int((held + ready.sum(-1)).max())))
        idx = st.promoted["idx"]
        for b, h in ready.any(-1).nonzero().tolist():
            free = (idx[b, h] < 0).nonzero().flatten()
            cand = ready[b, h].nonzero().flatten()[: len(free)]
            if len(cand) == 0:
                continue
            slots = free[: len(cand)]
            rows = torch.tensor([b] * len(cand)), torch.tensor([h] * len(cand)), (cand + lo).cpu()
            k, v = self._fetch_rows(st, *rows)
            assert k is not None
            idx[b, h, slots] = cand
            st.promoted["k"][b, h, slots] = k
            st.promoted["v"][b, h, slots] = v
        st.promotion_full = idx.shape[2] == self.config.promote_budget and bool((idx >= 0).all())

    def _grow_promoted(self, st: _Layer, slots: int) -> None:
        """Promoted-token storage grows by doubling up to the budget: Tier-1 holds no idle budget."""
        have = st.promoted["idx"].shape[2] if st.promoted else 0
        if slots <= have:
            return
        size = min(self.config.promote_budget, max(slots, 2 * have, 8))
        shape = (st.batch, self.num_kv_heads, size)
        grown = {
            "idx": torch.full(shape, -1, dtype=torch.int64, device=self.device),
            "k": torch.zeros((*shape, self.head_dim), dtype=st.dtype, device=self.device),
            "v": torch.zeros((*shape, self.head_dim), dtype=st.dtype, device=self.device),
        }
        for name, old in st.promoted.items():
            grown[name][:, :, :have] = old
        st.promoted = grown

    def _promoted_mask(self, st: _Layer) -> torch.Tensor:
        assert st.fetch_count is not None
        mask = torch.zeros_like(st.fetch_count, dtype=torch.bool)
        b, h, _, i = _promoted_rows(st)
        mask[b, h, i - st.n_sink] = True
        return mask

    def _self_check(self, layer: int, q: torch.Tensor, scale: float, result: AttentionResult) -> None:
        """float64 recomputation from Tier-2; raises if |served - o| exceeds the bound.

        float64 is not exact: the comparison allows 2^-40 relative of the value range, far below
        any bound (documented in docs/theory.md)."""
        k, v = self.originals(layer)
        g = q.shape[1] // self.num_kv_heads
        kq, vq = k.double().to(self.device).repeat_interleave(g, 1), v.double().to(self.device).repeat_interleave(g, 1)
        w = torch.softmax(scale * torch.matmul(q.double(), kq.transpose(-1, -2)), dim=-1)
        o = torch.matmul(w, vq)
        err = (result.output.double() - o).abs().amax(-1)
        slack = 2.0**-40 * (1 + vq.abs().amax((-1, -2)).unsqueeze(-1))
        bad = err > result.certificate.output_bound + slack
        if bool(bad.any()):
            bi, hi, _ = bad.nonzero()[0].tolist()
            raise errors.CertificationError(
                f"self-check: layer {layer} batch {bi} head {hi}: |served - o| = {err[bi, hi, 0].item():.3e} "
                f"exceeds the certified bound {result.certificate.output_bound[bi, hi, 0].item():.3e}",
                {"layer": layer, "batch": bi, "head": hi},
            )

    # ------------------------------------------------------------------ memory
    def memory_report(self) -> MemoryReport:
        tier1 = tier2 = fp16 = tokens = 0
        for st in self._layers:
            if st.length == 0:
                continue
            tensors = [st.sink_k, st.sink_v, st.win_k, st.win_v, st.v_min, st.v_max, *st.promoted.values()]
            tier1 += sum(t.numel() * t.element_size() for t in tensors if t is not None)
            tier1 += sum(qt.nbytes() for qt in (st.qk, st.qv) if qt is not None)
            unit = st.batch * self.num_kv_heads * self.head_dim * 2
            tier2 += 2 * st.length * unit
            fp16 += 2 * st.length * unit
            tokens += st.length
        return MemoryReport(tier1, tier2, fp16, tokens)


def _promoted_rows(st: _Layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(batch, kv head, slot, token index in cache order) of every promoted token."""
    idx = st.promoted["idx"]
    b, h, slot = (idx >= 0).nonzero(as_tuple=True)
    return b, h, slot, idx[b, h, slot] + st.n_sink


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b.contiguous() if a is None else torch.cat([a, b], dim=2)


def _raise_if_rejected(layer: int, cert: Certificate) -> None:
    bad = ~cert.accepted
    if bool(bad.any()):
        bi, hi, _ = bad.nonzero()[0].tolist()
        raise errors.CertificationError(
            f"strict: layer {layer} batch {bi} head {hi} served at stage {int(cert.stage[bi, hi, 0])} with "
            f"output bound {cert.output_bound[bi, hi, 0].item():.3e} "
            f"(tolerance {cert.tolerance[bi, hi, 0].item():.3e}) "
            f"and TV bound {cert.tv_bound[bi, hi, 0].item():.3e}",
            {
                "layer": layer,
                "batch": bi,
                "head": hi,
                "stage": int(cert.stage[bi, hi, 0]),
                "output_bound": cert.output_bound[bi, hi, 0].item(),
                "tolerance": cert.tolerance[bi, hi, 0].item(),
                "tv_bound": cert.tv_bound[bi, hi, 0].item(),
            },
        )


def certified_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: CertConfig | None = None, scale: float | None = None
) -> AttentionResult:
    """One shot: quantize k, v [B, H_kv, n, D] into a fresh single-layer cache and attend with q."""
    if not isinstance(k, torch.Tensor) or k.dim() != 4:
        raise errors.ShapeError(f"k must be a rank-4 tensor [B, H_kv, n, D], got {getattr(k, 'shape', type(k))}")
    cache = TieredKVCache(1, k.shape[1], k.shape[-1], config=config, device=k.device)
    cache.append(0, k, v)
    return cache.attend(0, q, scale=scale)
