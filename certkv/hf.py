"""Drop-in certified KV cache for Hugging Face transformers (tested with 5.17 and 5.23; the floor in
pyproject.toml).

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation=certkv.hf.register())
    cache = certkv.hf.CertifiedCache(model.config, certkv.CertConfig())
    model.generate(ids, past_key_values=cache, max_new_tokens=64)
    cache.report()

How it fits: ``CertifiedCache.update`` (called by every attention layer after RoPE) does not return
the whole cache; it hands the new keys and values, tagged with the cache and layer, to the attention
function ``register()`` installs. That function serves
  * prefill (the layer holds nothing yet): exact attention (transformers' SDPA) over the prompt, and
    the prompt fills the tiers;
  * decode and chunked prefill (the layer holds tokens): position by position, append the token and
    attend with its query through ``TieredKVCache.attend``, so each query sees exactly the tokens
    before it (causal) and every output carries a certificate.
Attention without a ``CertifiedCache`` (``use_cache=False``) is exact SDPA. Padded batches, sliding-
window attention beyond the window, beam search and cache cropping are refused with a typed error
rather than served uncertified.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from certkv import errors
from certkv.cache import KERNEL_STEPS, MemoryReport, TieredKVCache
from certkv.calibration import for_model
from certkv.certificate import AttentionResult
from certkv.config import CertConfig
from certkv.trace import TraceRecorder

ATTN = "certkv"

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
except ImportError as exc:  # pragma: no cover - transformers is an optional dependency
    raise ImportError("certkv.hf needs transformers: pip install 'certkv[hf]'") from exc


def register() -> str:
    """Install certkv's attention function (and SDPA's mask format) under the name ``"certkv"``;
    returns the name, for ``attn_implementation=``. Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN, certified_attention_forward)
    AttentionMaskInterface.register(ATTN, sdpa_mask)
    return ATTN


def _sdpa(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, _ = sdpa_attention_forward(*args, **kwargs)
    return out, None


def certified_attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function behind ``attn_implementation="certkv"`` (see the module docstring)."""
    handle = getattr(key, "_certkv", None)
    if handle is None:
        return _sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    cache, layer = handle
    return cache._attend(layer, module, query, attention_mask, scaling, kwargs)


@dataclass
class LayerStats:
    """Certificates of one layer, summarised: head-steps per stage, rejected head-steps (served bound
    above tolerance at the highest stage allowed), the largest bounds, and Tier-2 rows read."""

    head_steps: int = 0
    stages: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    rejected: int = 0
    max_output_bound: float = 0.0
    max_tv_bound: float = 0.0
    fetched_values: int = 0
    fetched_keys: int = 0

    def add(self, res: AttentionResult) -> None:
        c = res.certificate
        self.head_steps += c.stage.numel()
        # one device-to-host copy for every statistic (each separately was a sync of its own)
        counts = torch.bincount(c.stage.flatten(), minlength=len(self.stages))
        flat = torch.cat(
            [
                counts.double(),
                (~c.accepted).sum().double()[None],
                c.output_bound.max().double()[None],
                c.tv_bound.max().double()[None],
                c.fetched_values.sum().double()[None],
                c.fetched_keys.sum().double()[None],
            ]
        ).tolist()
        *stage_counts, rejected, out_max, tv_max, fetched_v, fetched_k = flat
        self.stages = [s + int(n) for s, n in zip(self.stages, stage_counts, strict=True)]
        self.rejected += int(rejected)
        self.max_output_bound = max(self.max_output_bound, out_max)
        self.max_tv_bound = max(self.max_tv_bound, tv_max)
        self.fetched_values += int(fetched_v)
        self.fetched_keys += int(fetched_k)


@dataclass
class CacheReport:
    """``CertifiedCache.report()``: per-layer certificate statistics, the tiers' memory, and the
    layer-steps the decode kernel was tried on and served (CUDA, ``CertConfig.decode_kernel``)."""

    layers: list[LayerStats]
    memory: MemoryReport
    kernel_steps: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KERNEL_STEPS, 0))

    @property
    def stages(self) -> list[int]:
        return [sum(s.stages[i] for s in self.layers) for i in range(4)]

    @property
    def head_steps(self) -> int:
        return sum(s.head_steps for s in self.layers)

    @property
    def rejected(self) -> int:
        return sum(s.rejected for s in self.layers)

    @property
    def fallback_rate(self) -> list[float]:
        """Share of head-steps served at each stage."""
        return [n / self.head_steps if self.head_steps else 0.0 for n in self.stages]


class CertifiedLayer(CacheLayerMixin):
    """One model layer's view of the shared ``TieredKVCache``: holds only the tokens of the current
    forward call until the attention function consumes them."""

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, owner: CertifiedCache, index: int) -> None:
        super().__init__()
        self.owner = owner
        self.index = index
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pending is not None:
            raise errors.ConfigError(
                f"layer {self.index}: the previous tokens never reached certkv's attention; load the model "
                f"with attn_implementation=certkv.hf.register() (got a cache update without an attention call)"
            )
        self.is_initialized = True
        self.pending = (key_states, value_states)
        tagged = key_states.view(key_states.shape)  # a new tensor object: the tag never leaks to the caller's
        tagged._certkv = (self.owner, self.index)  # type: ignore[attr-defined]
        return tagged, value_states

    def get_seq_length(self) -> int:
        tiered = self.owner.tiered
        return 0 if tiered is None else tiered.seq_len(self.index)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise errors.ConfigError("CertifiedCache cannot be reset: create a new one")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise errors.ConfigError("CertifiedCache does not support beam search (reorder_cache)")

    def crop(self, tokens_to_remove: int) -> None:
        raise errors.ConfigError("CertifiedCache does not support cropping (assisted decoding)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise errors.ConfigError("CertifiedCache does not support num_return_sequences > 1")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise errors.ConfigError("CertifiedCache does not support batch selection")


class CertifiedCache(Cache):
    """A ``transformers`` Cache whose decode attention is certified by certkv (module docstring).

    ``config``: the model's config (Llama-, Mistral-, Qwen2-style full attention, GQA allowed);
    ``cert_config``: certkv's ``CertConfig``; ``recorder``: an optional ``TraceRecorder`` (the trace
    can be checked with ``certkv audit``). Tier-1 lives on the device of the first keys seen. Pre-RoPE
    policies (``kvquant``) take the model's RoPE base unless ``rope_theta`` was passed explicitly."""

    def __init__(
        self, config: Any, cert_config: CertConfig | None = None, recorder: TraceRecorder | None = None
    ) -> None:
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        impl = getattr(text, "_attn_implementation", None)
        if impl != ATTN:
            raise errors.ConfigError(
                f"the model's attention implementation is {impl!r}: load it with "
                f"attn_implementation=certkv.hf.register(), or decode attention would bypass certkv"
            )
        layer_types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
        odd = sorted(set(layer_types) - {"full_attention"})
        if odd:
            raise errors.ConfigError(f"CertifiedCache supports full-attention layers only; this model has {odd}")
        # Mistral-style configs: attention is full until the sequence outgrows the window; beyond it the
        # model would attend to a window, which certkv does not certify, so it refuses there
        window = getattr(text, "sliding_window", None) if getattr(text, "use_sliding_window", True) else None
        self.sliding_window: int | None = int(window) if window else None
        self.num_layers = int(text.num_hidden_layers)
        self.num_kv_heads = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
        self.head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
        cfg = cert_config or CertConfig()
        if "rope_theta" not in getattr(cfg, "_explicit", frozenset()):
            cfg = for_model(cfg, text)
        self.cert_config = cfg
        self.recorder = recorder
        self.tiered: TieredKVCache | None = None
        self.stats = [LayerStats() for _ in range(self.num_layers)]
        super().__init__(layers=[CertifiedLayer(self, i) for i in range(self.num_layers)])

    def _tiers(self, like: torch.Tensor) -> TieredKVCache:
        if self.tiered is None:
            self.tiered = TieredKVCache(
                self.num_layers,
                self.num_kv_heads,
                self.head_dim,
                config=self.cert_config,
                device=like.device,
                recorder=self.recorder,
            )
        return self.tiered

    def _attend(
        self,
        layer: int,
        module: Any,
        query: torch.Tensor,
        mask: torch.Tensor | None,
        scaling: float | None,
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, None]:
        lay = self.layers[layer]
        assert isinstance(lay, CertifiedLayer)
        if lay.pending is None:
            raise errors.ConfigError(f"layer {layer}: attention called without a cache update")
        k, v = lay.pending
        lay.pending = None
        tiered = self._tiers(k)
        start = tiered.seq_len(layer)
        t = query.shape[2]
        if self.sliding_window is not None and start + t > self.sliding_window:
            raise errors.ConfigError(
                f"sequence length {start + t} exceeds the model's sliding window {self.sliding_window}: windowed "
                "attention is not certified by certkv"
            )
        if start == 0:
            tiered.append(layer, k, v)
            kwargs = {key: val for key, val in kwargs.items() if key not in ("is_causal",)}
            return _sdpa(module, query, k, v, mask, scaling=scaling, dropout=0.0, **kwargs)
        _check_causal(mask, start, t)
        outs = []
        for i in range(t):
            tiered.append(layer, k[:, :, i : i + 1], v[:, :, i : i + 1])
            res = tiered.attend(layer, query[:, :, i : i + 1], scale=scaling)
            self.stats[layer].add(res)
            outs.append(res.output)
        return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None

    def report(self) -> CacheReport:
        """Certificate statistics per layer and the tiers' memory (zeros before the first token)."""
        memory = self.tiered.memory_report() if self.tiered is not None else MemoryReport(0, 0, 0, 0)
        kernel = dict(self.tiered.kernel_steps) if self.tiered is not None else dict.fromkeys(KERNEL_STEPS, 0)
        return CacheReport([LayerStats(**vars(s)) for s in self.stats], memory, kernel)


def _check_causal(mask: torch.Tensor | None, start: int, t: int) -> None:
    """Decode and chunked prefill serve plain causal attention over every cached token: refuse a mask
    that hides anything else (padding, packing), rather than attend to tokens the model must not see."""
    if mask is None:
        return
    allowed = mask if mask.dtype == torch.bool else mask == 0
    kv = allowed.shape[-1]
    want = torch.arange(kv, device=allowed.device)[None, :] <= start + torch.arange(t, device=allowed.device)[:, None]
    if allowed.shape[-2] != t or kv != start + t or not bool((allowed == want).all()):
        raise errors.ConfigError(
            "CertifiedCache serves causal attention over every cached token; this step's attention mask hides "
            "other tokens (padding or packing), which certkv does not support"
        )
