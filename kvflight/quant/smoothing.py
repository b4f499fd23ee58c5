"""Activation-aware smoothing of a Llama-family decoder layer: SmoothQuant (W8A8) and AWQ (W4A16) scales.

Both rescale the input channels of a linear layer, x W^T = (x / s) (W * s)^T, and fold 1 / s into the op that
produces x, so the float model computes the same function. The four producer -> consumer pairs of a Llama layer:

    input_layernorm.weight            -> qkv_proj      (s over hidden channels)
    post_attention_layernorm.weight   -> gate_up_proj  (s over hidden channels)
    v rows of qkv_proj                -> o_proj        (s over KV channels; with GQA the query heads that read one KV
                                                        head share its scales, so o_proj's columns get s repeated)
    up rows of gate_up_proj           -> down_proj     (s over intermediate channels)

SmoothQuant: s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha) moves activation outliers into the weights, which are
quantized per output channel, so per-token int8 activations lose less. alpha fixed, or (alpha=None) chosen per group
from SMOOTHQUANT_ALPHAS by the simulated W8A8 output error on calibration rows.
AWQ: s_j = mean|x_j|^r, r searched on a grid to minimise the output error of the int4-quantized consumer on
calibration rows; then each weight group's range is shrunk (clipped) where that lowers the output error.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from kvflight.quant import ops
from kvflight.quant.calibrate import InputStats, SearchBatch

if TYPE_CHECKING:
    from kvflight.model.layers import _ParallelLinear
    from kvflight.model.llama import LlamaDecoderLayer

logger = logging.getLogger("kvflight.quant")

_MIN_STAT = 1e-5  # floor for activation / weight statistics (dead channels)
SMOOTHQUANT_ALPHAS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # searched when alpha is None


@dataclass
class SmoothGroup:
    """One producer -> consumer pair; scales live in producer space (the producer's output channels)."""

    name: str  # qkv | o | gate_up | down
    consumer: "_ParallelLinear"
    stats_key: str  # key of the consumer's InputStats
    fold: Callable[[torch.Tensor], None]  # divide the producer's output channels by s [P]
    heads_per_kv: int = 1  # o_proj with GQA: consumer channels = [Hkv, heads_per_kv, D], producer = [Hkv, D]
    head_dim: int = 1
    clip_rows: tuple[int, int] | None = None  # AWQ clipping: consumer rows it may clip (None = all)
    inspect: Callable[[torch.Tensor], torch.Tensor] | None = None  # AWQ loss: module output for consumer input

    def expand(self, s: torch.Tensor) -> torch.Tensor:
        """Producer-space scales [P] -> consumer input-channel scales [K]."""
        if self.heads_per_kv == 1:
            return s
        kv = s.view(-1, 1, self.head_dim)  # [Hkv, 1, D]
        return kv.expand(-1, self.heads_per_kv, -1).reshape(-1)  # [Hkv * group * D]

    def reduce(self, per_consumer: torch.Tensor, how: str) -> torch.Tensor:
        """Consumer-space statistic [K] -> producer space [P] (max or mean over the heads sharing a KV head)."""
        if self.heads_per_kv == 1:
            return per_consumer
        grouped = per_consumer.view(-1, self.heads_per_kv, self.head_dim)  # [Hkv, group, D]
        return (grouped.amax(1) if how == "max" else grouped.mean(1)).reshape(-1)

    def scale_consumer(self, s: torch.Tensor) -> None:
        weight = self.consumer.weight
        weight.data.copy_((weight.float() * self.expand(s)[None, :]).to(weight.dtype))


def _divide_(param: torch.Tensor, s: torch.Tensor, rows: slice | None = None) -> None:
    """param (or its rows) /= s along dim 0, in float32, stored back in the param's dtype."""
    target = param.data if rows is None else param.data[rows]
    scale = s if target.dim() == 1 else s[:, None]
    target.copy_((target.float() / scale).to(target.dtype))


def layer_groups(layer: "LlamaDecoderLayer", search: SearchBatch | None = None) -> list[SmoothGroup]:
    """The layer's four groups. With a search batch, AWQ scores the qkv scales on the whole attention block's
    output and the gate_up scales on the whole MLP's output (as AWQ does); o / down on their own outputs."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv = attn.qkv_proj
    q_size, kv_size = qkv.q_size, qkv.kv_size
    v_rows = slice(q_size + kv_size, q_size + 2 * kv_size)
    inter = mlp.gate_up_proj.output_partition_sizes[0]
    up_rows = slice(inter, 2 * inter)

    def fold_v(s: torch.Tensor) -> None:
        _divide_(qkv.weight, s, v_rows)
        if qkv.bias is not None:
            _divide_(qkv.bias, s, v_rows)

    def attention_block(x: torch.Tensor) -> torch.Tensor:  # x [S, hidden] post-norm -> [S, hidden]
        assert search is not None
        return attn(search.positions, x, None, search.meta, search.rotary)

    return [
        SmoothGroup("qkv", qkv, "self_attn.qkv_proj", lambda s: _divide_(layer.input_layernorm.weight, s),
                    clip_rows=(q_size + kv_size, q_size + 2 * kv_size),  # AWQ leaves q / k unclipped
                    inspect=attention_block if search is not None else None),
        SmoothGroup("o", attn.o_proj, "self_attn.o_proj", fold_v, heads_per_kv=attn.num_heads // attn.num_kv_heads,
                    head_dim=attn.head_dim),
        SmoothGroup("gate_up", mlp.gate_up_proj, "mlp.gate_up_proj",
                    lambda s: _divide_(layer.post_attention_layernorm.weight, s), inspect=mlp),
        SmoothGroup("down", mlp.down_proj, "mlp.down_proj", lambda s: _divide_(mlp.gate_up_proj.weight, s, up_rows)),
    ]


@contextmanager
def _swapped(param: torch.Tensor, tensor: torch.Tensor) -> Iterator[None]:
    """Run with param's data replaced by `tensor` (a candidate weight), then put the original back."""
    original = param.data
    param.data = tensor
    try:
        yield
    finally:
        param.data = original


def _check_unquantized(layer: "LlamaDecoderLayer") -> None:
    for group in layer_groups(layer):
        if group.consumer.quant_method.scheme != "none":
            raise ValueError("smoothing needs the float model: quantize after calibrating, not before")


# ---- SmoothQuant ------------------------------------------------------------------------------------------------
def _w8a8_output_error(x: torch.Tensor, weight: torch.Tensor, s: torch.Tensor) -> float:
    """Mean squared error of int8 per-token x / s times int8 per-channel W * s against x W^T (x [S, K] float32)."""
    from kvflight.kernels.reference import per_token_quant

    xq, x_scale = per_token_quant(x / s[None, :], torch.int8)
    wq, w_scale = ops.quantize_int8_per_channel(weight * s[None, :])
    out = (xq.float() @ wq.float().t()) * x_scale * w_scale[None, :]
    return float((out - x @ weight.t()).pow(2).mean())


@torch.no_grad()
def smoothquant_layer_(layer: "LlamaDecoderLayer", stats: dict[str, InputStats],
                       alpha: float | None) -> dict[str, float]:
    """Fold SmoothQuant scales into one decoder layer in place. alpha None: per group, the alpha of
    SMOOTHQUANT_ALPHAS with the smallest simulated W8A8 output error on the stats' sample rows.

    Returns per group the alpha used and the activation max / median ratio before / after (how much flatter).
    """
    _check_unquantized(layer)
    report: dict[str, float] = {}
    if alpha == 0.0:
        return report
    for group in layer_groups(layer):
        x_max = group.reduce(stats[group.stats_key].abs_max, "max").clamp(min=_MIN_STAT)  # [P]
        weight = group.consumer.weight.float()  # [N, K]
        w_max = group.reduce(weight.abs().amax(0), "max").clamp(min=_MIN_STAT)  # [P]

        def scales(a: float) -> torch.Tensor:
            return (x_max.pow(a) / w_max.pow(1.0 - a)).clamp(min=_MIN_STAT)  # [P]

        chosen = alpha
        if chosen is None:
            if not stats[group.stats_key].samples:
                raise ValueError("smoothquant alpha search needs sample rows: run_layerwise(..., max_samples > 0)")
            x = stats[group.stats_key].sample_rows()  # [S, K]
            errors = {a: _w8a8_output_error(x, weight, group.expand(scales(a))) for a in SMOOTHQUANT_ALPHAS}
            chosen = min(errors, key=errors.__getitem__)
        s = scales(chosen)
        group.fold(s)
        group.scale_consumer(s)
        report[f"{group.name}.alpha"] = chosen
        report[f"{group.name}.flatter"] = float((x_max.max() / x_max.median()) /
                                                ((x_max / s).max() / (x_max / s).median()))
    return report


# ---- AWQ ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AwqOptions:
    group_size: int = 128  # requested; per layer the effective size (ops.effective_group_size)
    zero_point: bool = True
    scale_grid: int = 20  # exponents r = 0, 1/grid, ..., (grid - 1)/grid
    clip: bool = True  # search per-group range clipping after scaling
    clip_grid: int = 20  # shrink ratios 1, 1 - 1/grid, ...
    clip_max_shrink: float = 0.5  # smallest ratio tried = 1 - clip_max_shrink
    clip_rows_per_chunk: int = 1024  # memory bound of the clipping search
    sequential: bool = False  # later layers calibrate on the already-quantized earlier layers' outputs


@torch.no_grad()
def awq_scale_group_(group: SmoothGroup, stats: InputStats, options: AwqOptions) -> float:
    """Search the exponent r of s = mean|x|^r for one group, fold the best scales in; returns r.

    Each candidate is scored by the mean squared error of the inspected module's output (the consumer alone, or
    its whole block) when the consumer's weight is int4(W * s) / s, on the search batch's rows.
    """
    param = group.consumer.weight
    x = stats.sample_rows().to(param.dtype)  # [S, K] the consumer's input
    weight = param.float()  # [N, K]
    group_size = ops.effective_group_size(weight.shape[1], options.group_size)
    inspect = group.inspect or group.consumer
    reference_out = inspect(x).float()  # [S, out]
    x_mean = group.reduce(stats.abs_mean, "mean").clamp(min=1e-4)  # [P]
    best_err, best_ratio, best_s = float("inf"), 0.0, torch.ones_like(x_mean)
    for step in range(options.scale_grid):
        ratio = step / options.scale_grid
        s = x_mean.pow(ratio)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1 in log space
        se = group.expand(s)[None, :]  # [1, K]
        candidate = (ops.fake_quantize_int4(weight * se, group_size, options.zero_point) / se).to(param.dtype)
        with _swapped(param, candidate):
            err = float((inspect(x).float() - reference_out).pow(2).mean())
        if err < best_err:
            best_err, best_ratio, best_s = err, ratio, s
    group.fold(best_s)
    group.scale_consumer(best_s)
    stats.samples = [rows / group.expand(best_s)[None, :] for rows in stats.samples]  # the consumer's new input
    return best_ratio


@torch.no_grad()
def awq_clip_group_(group: SmoothGroup, stats: InputStats, options: AwqOptions) -> float:
    """Shrink each weight group's range where that lowers the quantized output error; returns the mean ratio."""
    x = stats.sample_rows()  # [S, K] float32
    param = group.consumer.weight
    row_start, row_end = group.clip_rows or (0, param.shape[0])
    k = param.shape[1]
    group_size = ops.effective_group_size(k, options.group_size)
    num_groups = k // group_size
    xg = x.view(x.shape[0], num_groups, group_size)  # [S, ng, G]
    ratios = [1.0 - i / options.clip_grid for i in range(int(options.clip_max_shrink * options.clip_grid) + 1)]
    ratio_sum, ratio_count = 0.0, 0
    for start in range(row_start, row_end, options.clip_rows_per_chunk):
        end = min(start + options.clip_rows_per_chunk, row_end)
        w = param.data[start:end].float().view(end - start, num_groups, group_size)  # [n, ng, G]
        reference_out = torch.einsum("sgk,ngk->sng", xg, w)  # [S, n, ng]: per-group partial outputs
        best_err = torch.full((end - start, num_groups), float("inf"), device=w.device)
        best_ratio = torch.ones((end - start, num_groups), device=w.device)
        for ratio in ratios:
            fake = ops.fake_quantize_int4(w.view(end - start, k), group_size, options.zero_point, clip_ratio=ratio)
            out = torch.einsum("sgk,ngk->sng", xg, fake.view_as(w))
            err = (out - reference_out).pow(2).mean(0)  # [n, ng]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
        r = best_ratio[..., None]  # [n, ng, 1]
        if options.zero_point:
            hi = w.amax(-1, keepdim=True).clamp(min=0) * r
            lo = w.amin(-1, keepdim=True).clamp(max=0) * r
        else:
            hi = w.abs().amax(-1, keepdim=True) * r
            lo = -hi
        clipped = torch.maximum(torch.minimum(w, hi), lo)
        param.data[start:end].copy_(clipped.view(end - start, k).to(param.dtype))
        ratio_sum += float(best_ratio.sum())
        ratio_count += best_ratio.numel()
    return ratio_sum / max(1, ratio_count)


@torch.no_grad()
def awq_layer_(layer: "LlamaDecoderLayer", stats: dict[str, InputStats], search: SearchBatch | None,
               options: AwqOptions) -> dict[str, float]:
    """AWQ for one decoder layer, in place: scales for all four groups, then clipping; returns the chosen
    exponents (and mean clip ratios) per group."""
    _check_unquantized(layer)
    if search is None:
        raise ValueError("AWQ needs a search batch: run_layerwise(..., max_samples > 0)")
    report: dict[str, float] = {}
    groups = layer_groups(layer, search)
    for group in groups:
        report[f"{group.name}.ratio"] = awq_scale_group_(group, stats[group.stats_key], options)
    if options.clip:
        for group in groups:
            report[f"{group.name}.clip"] = awq_clip_group_(group, stats[group.stats_key], options)
    return report


@contextmanager
def int4_view(layer: "LlamaDecoderLayer", options: AwqOptions) -> Iterator[None]:
    """Run the layer with its four linears' weights replaced by their int4 round trip (float copies)."""
    params = [group.consumer.weight for group in layer_groups(layer)]
    originals = [p.data for p in params]
    try:
        for p in params:
            group_size = ops.effective_group_size(p.shape[1], options.group_size)
            p.data = ops.fake_quantize_int4(p.data, group_size, options.zero_point).to(p.dtype)
        yield
    finally:
        for p, original in zip(params, originals):
            p.data = original
