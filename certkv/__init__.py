"""certkv: KV-cache quantization whose every attention step is certified or recomputed exactly."""

from certkv import errors
from certkv.attention import dense_attention
from certkv.cache import MemoryReport, TieredKVCache, certified_attention
from certkv.certificate import AttentionResult, Certificate
from certkv.config import CertConfig
from certkv.trace import TraceRecorder, TraceSample

__version__ = "0.1.0"

__all__ = [
    "AttentionResult",
    "CertConfig",
    "Certificate",
    "MemoryReport",
    "TieredKVCache",
    "TraceRecorder",
    "TraceSample",
    "certified_attention",
    "dense_attention",
    "errors",
]
