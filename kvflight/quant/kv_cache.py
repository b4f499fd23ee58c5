"""KV cache quantization (`kv_cache_dtype` fp8 / int8): dtypes, quantize / dequantize, scale calibration.

One cache tensor per layer, [2, num_blocks, tokens_per_block, num_kv_heads, head_dim] in int8 or float8_e4m3fn
(1 byte per element: twice the bfloat16 capacity). Each layer has a float32 scale tensor kv_scales [2, num_kv_heads]
(row 0 = K, row 1 = V, one scale per KV head; a per-tensor scale is the same value in every column):

    int8:  q = clamp(round(x / scale), -127, 127)        (round half to even)
    fp8:   q = clamp(x / scale, -448, 448).to(e4m3)      (round to nearest even, saturating)
    dequantize: x = q.float() * scale                    (inside the attention kernels)

scale = margin * max|x| / qmax, with max|x| per layer, K / V and KV head, from (1) a `kvflight quantize
--kv-cache-dtype` checkpoint (config.json quantization_config.kv_cache_amax, calibrated on the calibration set), or
(2) a short calibration prefill at engine start on the built-in calibration text (ONLINE_CALIBRATION_TOKENS tokens,
no cache). fp8 falls back to scale 1.0 (e4m3 covers +-448 as is) when calibration is impossible.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Sequence

import torch

from kvflight.kernels.reference import (KV_QMAX, dequantize_kv, kv_quant_name,  # noqa: F401 (re-exported)
                                       quantize_kv)

if TYPE_CHECKING:
    from kvflight.model.llama import LlamaForCausalLM

logger = logging.getLogger("kvflight.quant")

KV_QUANT_DTYPES: dict[str, torch.dtype] = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
# head room over the calibrated max |K| / |V| (later tokens may exceed it a little). Measured on SmolLM2-135M
# (held-out text, per-head scales from 512 online tokens): int8 ppl +0.02% at 1.0, +0.23% at 1.1, +0.73% at 2.0;
# fp8 +0.84% at 1.0, -0.38% at 1.2, -0.70% at 1.5 (e4m3's relative precision does not depend on the margin)
DEFAULT_KV_MARGIN: dict[str, float] = {"int8": 1.1, "fp8": 1.2}
ONLINE_CALIBRATION_SEQUENCES = 2
ONLINE_CALIBRATION_SEQ_LEN = 256  # tokens per sequence: 512 tokens at engine start
_MIN_AMAX = 1e-4  # an all-zero head still gets a usable scale


def kv_cache_torch_dtype(kv_cache_dtype: str, compute_dtype: torch.dtype) -> torch.dtype:
    """The cache tensors' dtype: the compute dtype for 'auto', int8 / float8_e4m3fn for the quantized ones."""
    if kv_cache_dtype == "auto":
        return compute_dtype
    if kv_cache_dtype not in KV_QUANT_DTYPES:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r}: expected auto, fp8 or int8")
    return KV_QUANT_DTYPES[kv_cache_dtype]


def scales_from_amax(amax: torch.Tensor, kv_cache_dtype: str, margin: float | None = None) -> torch.Tensor:
    """Scales (float32, amax's shape) so that margin * amax maps to the format's largest code."""
    margin = DEFAULT_KV_MARGIN[kv_cache_dtype] if margin is None else margin
    return (amax.float().clamp_min(_MIN_AMAX) * margin / KV_QMAX[kv_cache_dtype]).to(torch.float32)


# ---- calibration ------------------------------------------------------------------------------------------------
def _attention_modules(model: "LlamaForCausalLM") -> list[Any]:
    return [layer.self_attn.attn for layer in model.model.layers]


@torch.no_grad()
def collect_kv_amax(model: "LlamaForCausalLM", sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """max |K| and |V| (post-rotary, as the cache stores them) per layer and KV head over the sequences, with the
    quantization calibration's layer-by-layer run (no KV cache) -> [num_layers, 2, num_kv_heads] float32 (CPU)."""
    from kvflight.quant.calibrate import run_layerwise

    attns = _attention_modules(model)
    amax: list[torch.Tensor | None] = [None] * len(attns)

    def hook(index: int):
        def fn(_module, args):
            k, v = args[1], args[2]  # [T, Hkv, D]
            cur = torch.stack([k.detach().float().abs().amax(dim=(0, 2)), v.detach().float().abs().amax(dim=(0, 2))])
            amax[index] = cur if amax[index] is None else torch.maximum(amax[index], cur)
        return fn

    saved = [a.backend for a in attns]
    handles = [a.register_forward_pre_hook(hook(i)) for i, a in enumerate(attns)]
    try:
        for a in attns:
            a.backend = "reference"  # no cache: the plain prefill attention (the Triton backend needs a cache)
        run_layerwise(model, sequences, lambda *args: None, max_samples=0)
    finally:
        for a, b in zip(attns, saved):
            a.backend = b
        for h in handles:
            h.remove()
    if any(a is None for a in amax):
        raise ValueError("KV calibration saw no tokens")
    return torch.stack([a.cpu() for a in amax])  # type: ignore[misc]


def online_calibration_sequences(tokenizer: Any, vocab_size: int, seed: int = 0,
                                 num_sequences: int = ONLINE_CALIBRATION_SEQUENCES,
                                 seq_len: int = ONLINE_CALIBRATION_SEQ_LEN) -> list[list[int]]:
    """A few hundred tokens of the built-in calibration text (random ids for a model without a tokenizer)."""
    from kvflight.quant.quantize import calibration_sequences

    return fold_into_vocab(calibration_sequences(tokenizer, "default", num_sequences, seq_len, vocab_size, seed),
                           vocab_size)


def fold_into_vocab(sequences: Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    """Token ids a tokenizer larger than the model gives (tiny test models) folded into the model's vocabulary."""
    if any(t >= vocab_size for s in sequences for t in s):
        logger.warning("the tokenizer's ids exceed the model's vocabulary (%d): folding them into it", vocab_size)
        return [[t % vocab_size for t in s] for s in sequences]
    return [list(s) for s in sequences]


def checkpoint_kv_amax(path: str | None, num_layers: int, num_kv_heads: int) -> torch.Tensor | None:
    """The calibrated max |K| / |V| a `kvflight quantize --kv-cache-dtype` checkpoint records in config.json
    (quantization_config.kv_cache_amax, [L][2][Hkv] or per tensor [L][2]) -> [L, 2, Hkv] float32, or None."""
    import json
    import os

    if path is None or not os.path.isfile(os.path.join(path, "config.json")):
        return None
    with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
        quant = json.load(fh).get("quantization_config") or {}
    raw = quant.get("kv_cache_amax") if isinstance(quant, dict) else None
    if raw is None:
        return None
    amax = torch.tensor(raw, dtype=torch.float32)
    if amax.dim() == 2:  # per tensor: [L, 2]
        amax = amax[:, :, None].expand(-1, -1, num_kv_heads)
    if amax.shape[:2] != (num_layers, 2):
        logger.warning("checkpoint kv_cache_amax has shape %s, expected [%d, 2, %d]: calibrating KV scales online",
                       tuple(amax.shape), num_layers, num_kv_heads)
        return None
    return amax.contiguous()


def record_kv_calibration(output_dir: str, kv_cache_dtype: str, amax: torch.Tensor,
                          margin: float | None = None) -> None:
    """Add kv_cache_amax ([L][2][Hkv]) and kv_cache_scales (for kv_cache_dtype) to a written checkpoint's
    config.json quantization_config (what `kvflight serve` reads back)."""
    import json
    import os

    path = os.path.join(output_dir, "config.json")
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    quant = data.setdefault("quantization_config", {})
    quant["kv_cache_dtype"] = kv_cache_dtype
    quant["kv_cache_amax"] = [[[round(float(x), 6) for x in row] for row in layer] for layer in amax.tolist()]
    quant["kv_cache_scales"] = [[[float(x) for x in row] for row in layer]
                                for layer in scales_from_amax(amax, kv_cache_dtype, margin).tolist()]
    margin = DEFAULT_KV_MARGIN[kv_cache_dtype] if margin is None else margin
    quant["kv_cache_scale_rule"] = (f"per layer, K / V and KV head: scale = {margin} * max|x| / "
                                    f"{KV_QMAX[kv_cache_dtype]:g}; x = code * scale")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)


def checkpoint_kv_cache_dtype(path: str | None) -> str | None:
    """The kv_cache_dtype a `kvflight quantize` checkpoint records (None if none / not such a checkpoint)."""
    from kvflight.quant.loading import checkpoint_quant_config

    try:
        cfg = checkpoint_quant_config(path)
    except Exception:  # noqa: BLE001 - load_model reports a bad config with its own message
        return None
    return None if cfg is None else cfg.kv_cache_dtype


def set_kv_scales(model: "LlamaForCausalLM", scales: torch.Tensor | None) -> None:
    """Give each layer's Attention its [2, num_kv_heads] float32 scales (None: a float cache, no scales)."""
    for i, attn in enumerate(_attention_modules(model)):
        attn.kv_scales = None if scales is None else scales[i].contiguous()


def local_kv_heads(amax: torch.Tensor, num_local_heads: int) -> torch.Tensor:
    """Tensor parallel: a rank's KV heads differ from the checkpoint's; use per-tensor maxima over all heads."""
    if amax.shape[-1] == num_local_heads:
        return amax
    return amax.amax(dim=-1, keepdim=True).expand(*amax.shape[:-1], num_local_heads).contiguous()


def resolve_kv_scales(model: "LlamaForCausalLM", kv_cache_dtype: str, model_path: str | None,
                      tokenizer_fn: Any, vocab_size: int, seed: int = 0, margin: float | None = None
                      ) -> tuple[torch.Tensor, str]:
    """[num_layers, 2, num_kv_heads] float32 scales on the model's device, and where they came from."""
    attns = _attention_modules(model)
    num_layers, num_heads = len(attns), attns[0].num_kv_heads
    amax = None
    source = ""
    try:
        amax = checkpoint_kv_amax(model_path, num_layers, num_heads)
        source = "checkpoint calibration"
    except Exception as exc:  # noqa: BLE001
        logger.warning("could not read the checkpoint's KV scales (%s); calibrating online", exc)
    if amax is None:
        try:
            tokenizer = tokenizer_fn() if tokenizer_fn is not None else None
            sequences = online_calibration_sequences(tokenizer, vocab_size, seed)
            amax = collect_kv_amax(model, sequences)
            source = f"online calibration ({sum(len(s) for s in sequences)} tokens of the built-in text)"
        except Exception as exc:  # noqa: BLE001
            if kv_cache_dtype != "fp8":
                raise
            logger.warning("KV scale calibration failed (%s): fp8 KV cache with scale 1.0", exc)
            scales = torch.ones(num_layers, 2, num_heads, dtype=torch.float32)
            return scales.to(model.device), "fallback 1.0"
    amax = local_kv_heads(amax, num_heads)
    return scales_from_amax(amax, kv_cache_dtype, margin).to(model.device), source


# ---- perplexity through a quantized cache -------------------------------------------------------------------------
@torch.no_grad()
def perplexity_with_kv_cache(model: "LlamaForCausalLM", sequences: Sequence[Sequence[int]], kv_cache_dtype: str,
                             scales: torch.Tensor | None, tokens_per_block: int = 16,
                             predictions: list[torch.Tensor] | None = None) -> float:
    """Perplexity of each sequence scored in one prefill that writes K/V into a (quantized) paged cache and reads
    them back through it (so every attention score sees the dequantized K/V). 'auto' = a float cache.
    predictions: if a list, each sequence's greedy next-token predictions [n - 1] are appended (top-1 agreement)."""
    import torch.nn.functional as F

    from kvflight.model.attention import AttentionMetadata

    device = model.device
    attns = _attention_modules(model)
    dtype = kv_cache_torch_dtype(kv_cache_dtype, model.model.embed_tokens.weight.dtype)
    saved = [getattr(a, "kv_scales", None) for a in attns]
    set_kv_scales(model, scales if kv_cache_dtype != "auto" else None)
    nll, count = 0.0, 0
    try:
        for seq in sequences:
            n = len(seq)
            blocks = math.ceil(n / tokens_per_block)
            caches = [torch.zeros(2, blocks + 1, tokens_per_block, a.num_kv_heads, a.head_dim, dtype=dtype,
                                  device=device) for a in attns]
            meta = AttentionMetadata.build([n], [n], [list(range(blocks))], tokens_per_block, device=device)
            ids = torch.tensor(list(seq), dtype=torch.int64, device=device)
            hidden = model(ids, torch.arange(n, device=device), caches, meta)
            logits = model.compute_logits(hidden[:n - 1])
            nll += float(F.cross_entropy(logits.float(), ids[1:], reduction="sum"))
            if predictions is not None:
                predictions.append(logits.argmax(dim=-1).cpu())
            count += n - 1
    finally:
        for a, s in zip(attns, saved):
            a.kv_scales = s
    return math.exp(nll / max(1, count))
