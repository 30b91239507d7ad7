"""``certkv eval``: end-task quality of dense, naively quantized and certified caches on one model.

Tasks (all deterministic from ``seed``):
  * ``bpb``: bits per token (per byte for byte-level models) of the last ``score`` tokens of
    non-overlapping windows of ``length`` tokens of a text: the first ``length - score`` tokens are
    prefilled (exact attention), the scored ones are fed as one chunk, which certkv serves position
    by position over the quantized cache (chunked prefill, certified).
  * ``passkey``, ``mk-niah``, ``vt``, ``cwe`` (``certkv.synthetic``): prompts of a given length,
    greedy decoding through the cache, scored by the share of expected strings in the answer, over
    ``trials`` prompts per setting (the same prompts for every method).
Methods: ``dense`` (transformers' own cache and SDPA), and certkv caches given by a ``CertConfig``:
``naive`` quantization without fallback (``max_stage=0``: the quantized output is served whatever
its bound), ``certified`` (defaults), ``certified-kernel`` / ``certified-torch`` (the same with
stage 0 always tried on the decode kernel first / from the torch path only), ``certified-strict``
(tolerances 4x tighter), and the
per-token INT4-key pair ``naive-k4``/``certified-k4`` that an outlier key channel breaks, and
``naive@POLICY``/``certified@POLICY`` for any ``certkv.policies`` name (e.g. ``certified@kivi``).

``key_outlier=c`` builds the stress model: in every KV head one RoPE channel pair of the key
projection is scaled by c and the matching query channels by 1/c. q.k, hence the dense model, is
unchanged (up to rounding); the keys now carry an outlier channel as real Llama/Qwen keys do.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from certkv.cache import KERNEL_STEPS
from certkv.calibration import for_model
from certkv.codec import TextCodec
from certkv.config import CertConfig
from certkv.synthetic import TASKS, make_probe, score

DEFAULT_METHODS = ("dense", "naive", "certified", "certified-strict")


def method_config(name: str, model_config: Any = None, calibrations: tuple[str, ...] = ()) -> CertConfig | None:
    """The cache configuration of a method name (None: dense, no certkv); with ``model_config``, a
    policy is adapted to the model (its RoPE base, a matching calibration file: ``certkv.calibration``)."""
    k4 = {"key_bits": 4, "key_group_axis": "channel", "key_group_size": 128}
    table: dict[str, CertConfig | None] = {
        "dense": None,
        "naive": CertConfig(max_stage=0),
        "certified": CertConfig(),
        "certified-kernel": CertConfig(decode_kernel="always"),  # stage 0 tried on the kernel at any length
        "certified-torch": CertConfig(decode_kernel="never"),  # stage 0 from the torch path only
        "certified-strict": CertConfig(tv_tol=0.0125, out_tol=0.005, out_rtol=0.0125),
        "naive-k4": CertConfig(max_stage=0, **k4),  # type: ignore[arg-type]
        "certified-k4": CertConfig(**k4),  # type: ignore[arg-type]
    }
    mode, _, policy = name.partition("@")
    if policy and mode in ("naive", "certified"):
        cfg = CertConfig(policy=policy, max_stage=0 if mode == "naive" else CertConfig.max_stage)
        return cfg if model_config is None else for_model(cfg, model_config, calibrations)
    if name not in table:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(table)}, naive@POLICY, certified@POLICY")
    return table[name]


@dataclass
class MethodResult:
    """One method on one task setting: its quality and what serving it cost."""

    task: str
    setting: str
    method: str
    quality: float  # bits per token (bpb, lower is better) or accuracy (passkey, higher is better)
    stderr: float = math.nan  # standard error of ``quality`` over scored tokens / trials
    samples: list[float] = field(default_factory=list)  # per scored token (bits) or per trial (hit = 1)
    stages: list[int] = field(default_factory=lambda: [0, 0, 0, 0])
    rejected: int = 0
    memory_ratio: float = math.nan
    tokens_per_s: float = math.nan
    kernel_steps: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KERNEL_STEPS, 0))

    @property
    def fallback(self) -> list[float]:
        total = sum(self.stages)
        return [n / total if total else 0.0 for n in self.stages]


def add_key_outlier(model: Any, scale: float, channel: int = 5) -> None:
    """Scale one RoPE channel pair of every KV head's keys by ``scale`` and the matching query
    channels by 1/scale (module docstring): attention logits are unchanged."""
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    hkv = cfg.num_key_value_heads
    group = cfg.num_attention_heads // hkv
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for h in range(hkv):
                for c in (channel, channel + d // 2):
                    attn.k_proj.weight[h * d + c] *= scale
                    if attn.k_proj.bias is not None:
                        attn.k_proj.bias[h * d + c] *= scale
                    for g in range(group):
                        row = (h * group + g) * d + c
                        attn.q_proj.weight[row] /= scale
                        if attn.q_proj.bias is not None:
                            attn.q_proj.bias[row] /= scale


def _cache(model: Any, cfg: CertConfig | None) -> Any:
    from transformers import DynamicCache

    from certkv.hf import CertifiedCache

    return DynamicCache(config=model.config) if cfg is None else CertifiedCache(model.config, cfg)


def _account(res: MethodResult, cache: Any, tokens: int, seconds: float) -> None:
    from certkv.hf import CertifiedCache

    if isinstance(cache, CertifiedCache):
        rep = cache.report()
        res.stages = [a + b for a, b in zip(res.stages, rep.stages)]
        res.rejected += rep.rejected
        res.memory_ratio = rep.memory.ratio
        res.kernel_steps = {k: res.kernel_steps[k] + rep.kernel_steps[k] for k in res.kernel_steps}
    res.tokens_per_s = tokens / seconds if seconds > 0 else math.nan


@torch.no_grad()
def bits_per_token(
    model: Any,
    ids: torch.Tensor,
    method: str,
    length: int,
    score: int,
    windows: int,
    calibrations: tuple[str, ...] = (),
) -> MethodResult:
    """``bpb`` task on token ids [N] (module docstring)."""
    if not 1 < score < length:
        raise ValueError(f"score={score} must be in (1, length={length})")
    cfg = method_config(method, model.config, calibrations)
    res = MethodResult("bpb", f"ctx {length}", method, math.nan)
    nll: list[torch.Tensor] = []
    tokens, seconds = 0, 0.0
    starts = list(range(0, len(ids) - length, length))[:windows]
    if not starts:
        raise ValueError(f"the text has {len(ids)} tokens: too short for one window of {length}")
    dev = next(model.parameters()).device
    for s in starts:
        w = ids[s : s + length].to(dev)[None]
        cache = _cache(model, cfg)
        head = model(w[:, : length - score], past_key_values=cache, use_cache=True).logits[:, -1:]
        t0 = time.perf_counter()
        tail = model(w[:, length - score : -1], past_key_values=cache, use_cache=True).logits
        seconds += time.perf_counter() - t0
        tokens += score - 1
        logits = torch.cat([head, tail], dim=1).float()[0]
        nll.append(torch.nn.functional.cross_entropy(logits, w[0, length - score :], reduction="none").cpu())
        _account(res, cache, tokens, seconds)
    bits = torch.cat(nll).double() / math.log(2)
    res.quality = float(bits.mean())
    res.stderr = float(bits.std() / math.sqrt(len(bits)))
    res.samples = bits.tolist()
    return res


@torch.no_grad()
def generation(
    model: Any, codec: TextCodec, filler: list[int], method: str, task: str, length: int, depth: float, trials: int,
    seed: int, calibrations: tuple[str, ...] = (),
) -> MethodResult:  # fmt: skip
    """A synthetic task (``certkv.synthetic``): greedy decoding through the cache; the score of a trial is
    the share of expected strings in the answer; ``quality`` is the mean score."""
    cfg = method_config(method, model.config, calibrations)
    where = f" depth {depth:.0%}" if task == "passkey" else ""
    res = MethodResult(task, f"len {length}{where}", method, math.nan)
    rng = random.Random(f"{seed}/{task}/{length}/{depth}")  # the same probes for every method
    dev = next(model.parameters()).device
    tokens, seconds = 0, 0.0
    for _ in range(trials):
        probe = make_probe(task, codec, filler, length, depth, rng)
        x = torch.tensor([probe.prompt], device=dev)
        cache = _cache(model, cfg)
        t0 = time.perf_counter()
        out = model.generate(
            x, attention_mask=torch.ones_like(x), past_key_values=cache, max_new_tokens=probe.new_tokens,
            min_new_tokens=probe.new_tokens, do_sample=False, pad_token_id=0,
        )  # fmt: skip
        seconds += time.perf_counter() - t0
        tokens += probe.new_tokens
        res.samples.append(score(probe, codec.decode(out[0, len(probe.prompt) :].tolist())))
        _account(res, cache, tokens, seconds)
    vals = torch.tensor(res.samples, dtype=torch.float64)
    res.quality = float(vals.mean())
    res.stderr = float(vals.std() / math.sqrt(trials)) if trials > 1 else math.nan
    return res


@dataclass
class EvalSpec:
    """One ``certkv eval`` run."""

    model: str
    text: str
    methods: tuple[str, ...] = DEFAULT_METHODS
    bpb_lengths: tuple[int, ...] = (512, 1024)
    bpb_score: int = 128
    bpb_windows: int = 2
    tasks: tuple[str, ...] = ("bpb", "passkey")
    gen_lengths: tuple[int, ...] = (1024,)
    passkey_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    trials: int = 4
    key_outlier: float | None = None
    device: str = "cpu"
    dtype: str = "bfloat16"
    seed: int = 0
    calibrations: tuple[str, ...] = ()  # files from ``certkv calibrate``; each policy uses the one fitted for it


def run(spec: EvalSpec, progress: Any = None) -> list[MethodResult]:
    """Every (task setting, method) of ``spec``; ``progress(label)`` is called before each."""
    from transformers import AutoModelForCausalLM

    from certkv.hf import register

    for m in spec.methods:
        method_config(m)  # fail fast on an unknown name
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[spec.dtype]
    model: Any = AutoModelForCausalLM.from_pretrained(spec.model, dtype=dtype, attn_implementation=register())
    model.to(spec.device).eval()
    if spec.key_outlier:
        add_key_outlier(model, spec.key_outlier)
    codec = TextCodec(model, spec.model)
    ids = codec.encode(spec.text, bos=True)
    results: list[MethodResult] = []
    jobs: list[tuple[str, Any]] = []
    for task in spec.tasks:
        if task != "bpb" and task not in TASKS:
            raise ValueError(f"unknown task {task!r}; known: bpb, {', '.join(TASKS)}")
    for length in spec.bpb_lengths if "bpb" in spec.tasks else ():
        for m in spec.methods:
            jobs.append((f"bpb ctx {length} {m}", lambda m=m, n=length: bits_per_token(
                model, torch.tensor(ids), m, n, spec.bpb_score, spec.bpb_windows, spec.calibrations)))  # fmt: skip
    for task in (t for t in spec.tasks if t != "bpb"):
        for length in spec.gen_lengths:
            for depth in spec.passkey_depths if task == "passkey" else (0.0,):
                for m in spec.methods:
                    jobs.append((f"{task} len {length} {m}", lambda m=m, n=length, d=depth, t=task: generation(
                        model, codec, ids[1:], m, t, n, d, spec.trials, spec.seed, spec.calibrations)))  # fmt: skip
    for label, job in jobs:
        if progress is not None:
            progress(label, len(results), len(jobs))
        results.append(job())
    return results


def paired_difference(a: MethodResult, b: MethodResult) -> tuple[float, float]:
    """Mean of a - b over the same scored tokens / trials, and its standard error: the noise against
    which "a equals b" is judged (|difference| within two standard errors)."""
    if len(a.samples) != len(b.samples) or len(a.samples) < 2:
        return math.nan, math.nan
    d = torch.tensor(a.samples, dtype=torch.float64) - torch.tensor(b.samples, dtype=torch.float64)
    return float(d.mean()), float(d.std() / math.sqrt(len(d)))


def to_markdown(results: list[MethodResult], unit: str = "byte") -> str:
    """One table per task: rows are settings x methods; quality with its standard error, the paired
    difference from dense, the share of head-steps served per ladder stage, head-steps over
    tolerance, Tier-1 memory ratio, layer-steps the decode kernel certified of those it was tried on,
    and speed."""
    lines = []
    titles = {
        "bpb": f"bits per {unit} (lower is better)",
        "passkey": "passkey retrieval, accuracy",
        "mk-niah": "multi-key needle in a haystack (RULER-style), accuracy",
        "vt": "variable tracking (RULER-style), share of chain variables named",
        "cwe": "common-word extraction (RULER-style), share of the 3 common words named",
    }
    for task, title in titles.items():
        rows = [r for r in results if r.task == task]
        if not rows:
            continue
        lines += [f"**{task}**: {title}", ""]
        lines.append(
            "| setting | method | quality ± s.e. | Δ vs dense ± s.e. (paired) | stage 0/1/2/3 share "
            "| over tolerance | Tier-1/FP16 | kernel served/tried | tokens/s |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        dense = {r.setting: r for r in rows if r.method == "dense"}
        for r in rows:
            ref = dense.get(r.setting)
            diff, err = paired_difference(r, ref) if ref is not None and r is not ref else (math.nan, math.nan)
            delta = f"{diff:+.4f} ± {err:.4f}" if math.isfinite(diff) else "-"
            share = "/".join(f"{x:.1%}" for x in r.fallback) if sum(r.stages) else "-"
            mem = f"{r.memory_ratio:.3f}" if math.isfinite(r.memory_ratio) else "-"
            ks = r.kernel_steps
            kernel = f"{ks['served']}/{ks['tried']}" if ks["tried"] else "-"
            if ks.get("fetched") or ks.get("dense"):  # the kernel ladder's stage 2 and dense steps
                kernel += f" ({ks.get('fetched', 0)} fetched, {ks.get('dense', 0)} dense"
                kernel += f", {ks['dense_torch']} reproved)" if ks.get("dense_torch") else ")"
            lines.append(
                f"| {r.setting} | {r.method} | {r.quality:.4f} ± {r.stderr:.4f} | {delta} | {share} | {r.rejected} "
                f"| {mem} | {kernel} | {r.tokens_per_s:.1f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(results: list[MethodResult], out: str) -> None:
    """Quality per method for every task setting (bars with standard errors)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r.task for r in results))
    fig, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in results if r.task == task]
        settings = list(dict.fromkeys(r.setting for r in rows))
        methods = list(dict.fromkeys(r.method for r in rows))
        width = 0.8 / len(methods)
        for j, m in enumerate(methods):
            got = {r.setting: r for r in rows if r.method == m}
            xs = [i + j * width for i, s in enumerate(settings) if s in got]
            ax.bar(xs, [got[s].quality for s in settings if s in got], width,
                   yerr=[got[s].stderr for s in settings if s in got], label=m, capsize=2)  # fmt: skip
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(settings))], settings, rotation=20, fontsize=8)
        ax.set_ylabel("bits per token" if task == "bpb" else "score")
        ax.set_title(task)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
