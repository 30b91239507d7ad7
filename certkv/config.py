"""``CertConfig``: quantization layout, tolerances and the fallback ladder, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from certkv.errors import ConfigError

GroupAxis = Literal["token", "channel"]
CodebookKind = Literal["uniform", "nuq", "lloyd-max"]
KeyTransformKind = Literal["none", "rope", "hadamard"]
DecodeKernelMode = Literal["auto", "never", "always"]

SUPPORTED_BITS = (2, 4, 8)


@dataclass(frozen=True)
class CertConfig:
    """Everything that decides what a step may serve.

    Quantization (Tier-1):
      ``key_bits``/``value_bits``: 8, 4 or 2 (asymmetric uniform; 4 and 2 are bit-packed).
      ``key_group_axis``: ``"token"`` groups ``key_group_size`` consecutive tokens of one channel
      (per-channel scales, the layout that tames outlier key channels); ``"channel"`` groups
      ``key_group_size`` channels of one token (per-token scales). Same for values.
      ``window``: the most recent ``window`` tokens (and up to one block more) stay FP16, so a
      partially filled token group is never quantized and never re-quantized.
      ``sinks``: the first ``sinks`` tokens stay FP16 (attention sinks).
      ``key_codebook``/``value_codebook``: ``"uniform"`` (evenly spaced levels), ``"nuq"``
      (sensitivity-weighted levels fitted on calibration data, KVQuant) or ``"lloyd-max"`` (unweighted
      Lloyd-Max levels); without a calibration file both non-uniform kinds use Lloyd-Max levels for
      Gaussian groups (``certkv.codebook``).
      ``key_transform``: the basis keys are quantized in: ``"none"``, ``"rope"`` (pre-RoPE keys, the
      cache undoes and re-applies the rotation with ``rope_theta``; token position = cache index) or
      ``"hadamard"`` (a randomized Hadamard rotation drawn from ``transform_seed``).
      ``key_outliers``/``value_outliers``: fraction of values kept exactly beside the codes
      (dense-and-sparse): outside the calibrated per-channel thresholds, or the farthest from their
      group's median when there is no calibration.
      ``calibration``: path of a file written by ``certkv calibrate`` (codebooks and outlier thresholds
      per layer; ``certkv.calibration``).

    Tolerances (per batch row, query head and step): a step is served at the lowest stage whose
    certificate satisfies ``tv_bound <= tv_tol`` and
    ``output_bound <= out_tol + out_rtol * max_j |output_j|``.

    Ladder: stage 0 quantized, 1 FP16 values for the tokens carrying the value error, 2 FP16 keys
    for the tokens carrying the key error, 3 dense FP16 from Tier-2. ``max_stage`` caps it
    (``max_stage=0`` disables fallback; the certificate is still computed and reported).
    ``fetch_fraction`` caps the tokens one head may fetch at stages 1 and 2 (beyond it, stage 3
    is cheaper). Tokens fetched ``promote_after`` times are promoted to FP16 in Tier-1, at most
    ``promote_budget`` tokens per (batch row, KV head, layer).

    ``decode_kernel``: serve stage 0 with the fused Triton kernel and its streamed certificate
    (``certkv.streaming``) where it applies: the paper layout (promoted tokens included), no trace
    recorder, a head dimension the kernels tile (a power of two >= 64). "auto" on CUDA, "always" also
    on the CPU (Triton's interpreter: for tests), "never" the torch path only. The heads the
    kernel's stage 0 does not certify fetch FP16 keys and values for the tokens that carry their
    error and are served again by the kernel (stage 2, ``certkv.kernel_ladder``), and those still
    uncertified are served dense (stage 3). Where ``max_stage`` stops before the stage a head needs,
    the step is re-served by the torch ladder, whose stage-0 bounds are tighter up to 32K (per-token
    forms).
    ``strict``: raise ``CertificationError`` when the served bound exceeds tolerance.
    ``self_check``: recompute every step in float64 from Tier-2 and raise if a bound is violated
    (a debugging aid: it reads the originals, which certification never does).

    ``policy``: a named preset from the literature (``certkv.policies``: "paper", "kivi", "kivi:4",
    "key-favoured:K4V2", "progressive:512" ...) that sets the quantization fields left at their defaults.
    """

    key_bits: int = 8
    value_bits: int = 4
    key_group_axis: GroupAxis = "token"
    key_group_size: int = 128
    value_group_axis: GroupAxis = "channel"
    value_group_size: int = 64
    window: int = 128
    sinks: int = 4
    key_codebook: CodebookKind = "uniform"
    value_codebook: CodebookKind = "uniform"
    key_transform: KeyTransformKind = "none"
    key_outliers: float = 0.0
    value_outliers: float = 0.0
    rope_theta: float = 10000.0
    transform_seed: int = 0
    calibration: str | None = None
    tv_tol: float = 0.05
    out_tol: float = 0.02
    out_rtol: float = 0.05
    max_stage: int = 3
    fetch_fraction: float = 0.25
    promote_after: int = 3
    promote_budget: int = 256
    strict: bool = False
    self_check: bool = False
    decode_kernel: DecodeKernelMode = "auto"
    policy: str | None = None

    def __post_init__(self) -> None:
        if self.policy is not None:
            from certkv.policies import preset

            # a policy fills the fields the caller did not pass; fields given explicitly win, even
            # when they equal the default (``_explicit`` is recorded by ``__init__`` below)
            given: frozenset[str] = getattr(self, "_explicit", frozenset())
            for name, value in preset(self.policy).items():
                if name not in given:
                    object.__setattr__(self, name, value)
        for name in ("key_bits", "value_bits"):
            if getattr(self, name) not in SUPPORTED_BITS:
                raise ConfigError(f"{name}={getattr(self, name)!r}: supported bit widths are {SUPPORTED_BITS}")
        for name in ("key_group_axis", "value_group_axis"):
            if getattr(self, name) not in ("token", "channel"):
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be 'token' or 'channel'")
        for name in ("key_group_size", "value_group_size"):
            size = getattr(self, name)
            if not isinstance(size, int) or size < 1:
                raise ConfigError(f"{name}={size!r}: must be a positive integer")
        for name in ("key_codebook", "value_codebook"):
            if getattr(self, name) not in ("uniform", "nuq", "lloyd-max"):
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be 'uniform', 'nuq' or 'lloyd-max'")
        if self.key_transform not in ("none", "rope", "hadamard"):
            raise ConfigError(f"key_transform={self.key_transform!r}: must be 'none', 'rope' or 'hadamard'")
        for name in ("key_outliers", "value_outliers"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value < 0.5):
                raise ConfigError(f"{name}={value!r}: must be a fraction in [0, 0.5)")
        if not (isinstance(self.rope_theta, (int, float)) and math.isfinite(self.rope_theta) and self.rope_theta > 1):
            raise ConfigError(f"rope_theta={self.rope_theta!r}: must be a finite number > 1")
        for name in ("window", "sinks", "promote_budget", "transform_seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be a non-negative integer")
        if not isinstance(self.promote_after, int) or self.promote_after < 1:
            raise ConfigError(f"promote_after={self.promote_after!r}: must be a positive integer")
        for name in ("tv_tol", "out_tol", "out_rtol"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0 and value == value and value != float("inf")):
                raise ConfigError(f"{name}={value!r}: must be a finite non-negative number")
        if self.max_stage not in (0, 1, 2, 3):
            raise ConfigError(f"max_stage={self.max_stage!r}: must be 0, 1, 2 or 3")
        if self.decode_kernel not in ("auto", "never", "always"):
            raise ConfigError(f"decode_kernel={self.decode_kernel!r}: must be 'auto', 'never' or 'always'")
        if not 0.0 < self.fetch_fraction <= 1.0:
            raise ConfigError(f"fetch_fraction={self.fetch_fraction!r}: must be in (0, 1]")

    @property
    def book_keys(self) -> bool:
        """Keys go through the codebook quantizer (non-uniform levels, a transform or outliers)."""
        return self.key_codebook != "uniform" or self.key_transform != "none" or self.key_outliers > 0

    @property
    def book_values(self) -> bool:
        return self.value_codebook != "uniform" or self.value_outliers > 0

    @property
    def paper_layout(self) -> bool:
        """The paper's Tier-1 layout (the defaults: INT8 keys per channel in token groups of 128, INT4
        values per token in channel groups of 64, uniform codebooks): what the Triton kernels implement."""
        keys = (self.key_bits, self.key_group_axis, self.key_group_size) == (8, "token", 128)
        values = (self.value_bits, self.value_group_axis, self.value_group_size) == (4, "channel", 64)
        return keys and values and not (self.book_keys or self.book_values)

    @property
    def block(self) -> int:
        """Tokens moved from the FP16 window into quantized storage at a time: the least common
        multiple of the token-axis group sizes, so a token group is always complete when quantized."""
        sizes = [self.key_group_size if self.key_group_axis == "token" else 1]
        sizes.append(self.value_group_size if self.value_group_axis == "token" else 1)
        return math.lcm(*sizes)


_FIELD_ORDER = [f.name for f in dataclasses.fields(CertConfig)]
_generated_init = CertConfig.__init__


def _init_recording_explicit_fields(self: CertConfig, *args: Any, **kwargs: Any) -> None:
    object.__setattr__(self, "_explicit", frozenset(_FIELD_ORDER[: len(args)]) | frozenset(kwargs))
    _generated_init(self, *args, **kwargs)


CertConfig.__init__ = _init_recording_explicit_fields  # type: ignore[method-assign]
