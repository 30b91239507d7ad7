"""Typed errors. Every failure certkv can detect has its own class, and every message names the problem."""

from __future__ import annotations


class CertKVError(Exception):
    """Base class of every error certkv raises on purpose."""


class ConfigError(CertKVError, ValueError):
    """A ``CertConfig`` field (or a combination of fields) is invalid."""


class ShapeError(CertKVError, ValueError):
    """A tensor has the wrong rank or shape, or shapes disagree (batch, heads, head_dim)."""


class HeadMismatchError(ShapeError):
    """The number of query heads is not a positive multiple of the number of KV heads."""


class DTypeError(CertKVError, TypeError):
    """A tensor has a dtype certkv does not accept (keys and values must be float16 or bfloat16)."""


class DeviceError(CertKVError, ValueError):
    """A tensor lives on a different device from the cache."""


class NonFiniteError(CertKVError, ValueError):
    """A query, key or value contains NaN or Inf: nothing can be certified about it."""


class EmptyCacheError(CertKVError, RuntimeError):
    """``attend`` was called on a layer that holds no tokens."""


class LayerIndexError(CertKVError, IndexError):
    """A layer index outside ``range(num_layers)``."""


class CertificationError(CertKVError, RuntimeError):
    """Strict mode: a served bound exceeds its tolerance, or a self-check found a violated bound.

    ``details`` holds the figures (layer, batch row, head, bound, tolerance, stage).
    """

    def __init__(self, message: str, details: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


class TraceError(CertKVError, ValueError):
    """A trace cannot be trusted as written: missing, truncated or tampered file, wrong format
    version, checksum mismatch, or tensors whose shapes disagree with the manifest."""
