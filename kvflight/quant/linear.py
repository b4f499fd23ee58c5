"""Linear methods: how a linear layer stores its weight (parameter names, shapes, dtypes) and computes y = x W^T.

One method per scheme (see schemes.py). A layer built inside `quantized_linears(config)` asks `linear_method_for`
for its method, which registers the layer's parameters (`create_weights`), so a quantized checkpoint loads through
the layer's ordinary weight loaders: every quantized tensor keeps the output channel on dim 0. `quantize_linear_`
turns a layer holding a float weight into a quantized one (online quantization at load time; calibration).

Parameters per scheme (N output, K input features of this rank):
    none      weight [N, K] model dtype
    int8_wo   weight [N, K] int8, weight_scale [N] float32                       -> w8a16_matmul (Triton on CUDA);
                                                              1 row: wo_gemv; >= 128 rows: dequantize_8bit + cuBLAS
    int4_*    qweight [N, K/2] uint8, scales [N, K/G] float16, qzeros [N, K/G] uint8 (if zero points)
                                                                                 -> w4a16_matmul (Triton on CUDA);
                                                              1 row: wo_gemv; 2..8 rows: w4_mma_gemv;
                                                              >= 17 rows: dequantize_int4 + cuBLAS
    fp8       weight [N, K] float8_e4m3fn, weight_scale [N] float32               -> torch._scaled_mm (sm >= 8.9);
                                                              <= 16 rows: w8a16_matmul on the fp8 weights
                                                              (1 row: wo_gemv on them)
    int8_sq   weight [N, K] int8, weight_scale [N] float32                       -> torch._int_mm (CUDA);
                                                              <= 16 rows: w8a16_matmul on the int8 weights
                                                              (1 row: wo_gemv on them)
On CPU every scheme computes the same math in float (dequantize + matmul; W8A8 quantizes activations exactly as
the GPU path does), so the engine runs everywhere. The CPU path dequantizes a layer's weight once and keeps the float
copy (CPU_CACHE_DEQUANTIZED): CPU memory is not what quantization is for, and dequantizing every weight at every
decode step would make CPU generation crawl.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn.functional as F

from kvflight.kernels import reference
from kvflight.kernels.device import capability_at_least
from kvflight.quant import ops
from kvflight.quant.schemes import QuantConfig

if TYPE_CHECKING:
    from kvflight.model.layers import _ParallelLinear

# rows (tokens) from which a weight-only call dequantizes the weight in one pass and runs cuBLAS instead of the
# fused kernel (H100 sweep, benchmarks/wo_matmul_sweep_gpu.py, one Llama-8B layer's four linears: 8-bit fused
# 534 us vs dequantize + cuBLAS 446 us at 256 rows, fused ahead at 64; int4: the fused kernel loses from 16 rows)
WO_DEQUANT_MIN_ROWS_8BIT = 128
WO_DEQUANT_MIN_ROWS_INT4 = 17
# fp8 and int8_sq calls up to this many rows skip the activation quantization and the 8-bit GEMM: the W8A16 kernel
# reads the 8-bit weights directly (decode is weight-bandwidth bound; cuBLASLt's fp8 GEMM pads a 1-row call, the
# int8 one needs 17 rows). The result is the weight-only product: no activation rounding.
W8A8_WEIGHT_ONLY_MAX_ROWS = 16
INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA needs more than 16 rows: smaller batches are zero-padded
CPU_CACHE_DEQUANTIZED = True  # CPU fallback: keep each layer's dequantized weight after its first use


class LinearMethod:
    """Unquantized: weight [N, K] in the model dtype, F.linear."""

    scheme = "none"
    tensor_names: tuple[str, ...] = ("weight",)

    def create_weights(self, layer: "_ParallelLinear", in_features: int, out_features: int,
                       params_dtype: torch.dtype) -> None:
        layer.register_weight("weight", (out_features, in_features), params_dtype)

    def quantize_weight(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """One projection's float weight [rows, K] -> its checkpoint tensors (output rows on dim 0)."""
        return {"weight": weight}

    def apply(self, layer: "_ParallelLinear", x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)  # x [T, K] -> [T, N]

    def after_checkpoint_load(self, layer: "_ParallelLinear") -> None:
        """Turn tensors loaded as a checkpoint stores them into the in-memory layout (nothing for most schemes)."""

    def checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The inverse of after_checkpoint_load for one tensor: as a checkpoint stores it."""
        return tensor

    def dequantized_weight(self, layer: "_ParallelLinear") -> torch.Tensor:
        """The float32 weight [N, K] this layer computes with (tests, calibration, debugging)."""
        return layer.weight.float()

    def describe(self) -> str:
        return self.scheme

    def cpu_weight(self, layer: "_ParallelLinear", dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight [N, K] in `dtype` for the CPU path (cached, see CPU_CACHE_DEQUANTIZED)."""
        cache = layer.__dict__.get("_cpu_dequantized")
        if cache is not None and cache.dtype == dtype:
            return cache
        weight = self.dequantized_weight(layer).to(dtype)
        if CPU_CACHE_DEQUANTIZED and weight.device.type == "cpu":
            layer.__dict__["_cpu_dequantized"] = weight
        return weight


class Int8WeightOnlyMethod(LinearMethod):
    scheme = "int8_wo"
    tensor_names = ("weight", "weight_scale")

    def create_weights(self, layer, in_features, out_features, params_dtype):
        layer.register_weight("weight", (out_features, in_features), torch.int8)
        layer.register_weight("weight_scale", (out_features,), torch.float32)

    def quantize_weight(self, weight):
        q, scale = ops.quantize_int8_per_channel(weight)
        return {"weight": q, "weight_scale": scale}

    def apply(self, layer, x, bias):
        if x.is_cuda:
            if x.numel() >= WO_DEQUANT_MIN_ROWS_8BIT * x.shape[-1]:
                from kvflight.kernels.dequant_weight import dequantize_8bit

                return F.linear(x, dequantize_8bit(layer.weight, layer.weight_scale, x.dtype), bias)
            if x.numel() == x.shape[-1]:  # one row (batch-1 decode): the CUDA-core GEMV
                from kvflight.kernels.wo_gemv import wo_gemv

                return wo_gemv(x, layer.weight, layer.weight_scale, bias=bias)
            from kvflight.kernels.w8a16_matmul import w8a16_matmul

            return w8a16_matmul(x, layer.weight, layer.weight_scale, bias)
        return F.linear(x, self.cpu_weight(layer, x.dtype), bias)  # dequantized [N, K]

    def dequantized_weight(self, layer):
        return ops.dequantize_int8(layer.weight, layer.weight_scale)


class Int4WeightOnlyMethod(LinearMethod):
    """Group-wise int4 (int4_wo, and int4_awq whose AWQ scales are already folded into the weights)."""

    def __init__(self, scheme: str, in_features: int, group_size: int, zero_point: bool) -> None:
        self.scheme = scheme
        self.group_size = ops.effective_group_size(in_features, group_size)
        self.zero_point = zero_point
        self.tensor_names = ("qweight", "scales", "qzeros") if zero_point else ("qweight", "scales")

    def create_weights(self, layer, in_features, out_features, params_dtype):
        groups = in_features // self.group_size
        layer.register_weight("qweight", (out_features, in_features // 2), torch.uint8)
        layer.register_weight("scales", (out_features, groups), torch.float16)
        if self.zero_point:
            layer.register_weight("qzeros", (out_features, groups), torch.uint8)

    def after_checkpoint_load(self, layer):
        layer.qweight.data = ops.int4_from_file_layout(layer.qweight.data)  # plain nibble order -> in-memory

    def checkpoint_tensor(self, name, tensor):
        return ops.int4_to_file_layout(tensor) if name == "qweight" else tensor  # column 2j in the low nibble

    def quantize_weight(self, weight):
        q, scales, zeros = ops.quantize_int4_groupwise(weight, self.group_size, self.zero_point)
        out = {"qweight": q, "scales": scales}
        if zeros is not None:
            out["qzeros"] = zeros
        return out

    def apply(self, layer, x, bias):
        zeros = layer.qzeros if self.zero_point else None
        if x.is_cuda:
            if x.numel() >= WO_DEQUANT_MIN_ROWS_INT4 * x.shape[-1]:
                from kvflight.kernels.dequant_weight import dequantize_int4

                w = dequantize_int4(layer.qweight, layer.scales, zeros, self.group_size, x.dtype)  # [N, K]
                return F.linear(x, w, bias)
            if x.numel() == x.shape[-1]:  # one row (batch-1 decode): the CUDA-core GEMV streams the codes faster
                from kvflight.kernels.wo_gemv import wo_gemv

                return wo_gemv(x, layer.qweight, layer.scales, zeros, self.group_size, bias)
            from kvflight.kernels import w4_mma_gemv

            if w4_mma_gemv.supported(x, self.group_size):  # 2..8 rows: the tensor-core GEMV (2-2.7x the matmul)
                return w4_mma_gemv.w4_mma_gemv(x, layer.qweight, layer.scales, zeros, self.group_size, bias)
            from kvflight.kernels.w4a16_matmul import w4a16_matmul

            return w4a16_matmul(x, layer.qweight, layer.scales, zeros, self.group_size, bias)
        return F.linear(x, self.cpu_weight(layer, x.dtype), bias)  # dequantized [N, K]

    def dequantized_weight(self, layer):
        return ops.dequantize_int4(layer.qweight, layer.scales, layer.qzeros if self.zero_point else None,
                                   self.group_size)

    def describe(self) -> str:
        return f"{self.scheme}(g{self.group_size}{'' if self.zero_point else ', symmetric'})"


class _W8A8Method(LinearMethod):
    """Shared by fp8 and int8_sq: weight [N, K] 8-bit, weight_scale [N]; activations quantized per token."""

    weight_dtype: torch.dtype = torch.int8
    tensor_names = ("weight", "weight_scale")

    def create_weights(self, layer, in_features, out_features, params_dtype):
        layer.register_weight("weight", (out_features, in_features), self.weight_dtype)
        layer.register_weight("weight_scale", (out_features,), torch.float32)

    def emulate(self, layer: "_ParallelLinear", x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The CPU path: quantize activations per token exactly like the GPU, multiply in float32."""
        x2 = x.reshape(-1, x.shape[-1])  # [T, K]
        xq, x_scale = reference.per_token_quant(x2, self.weight_dtype)  # [T, K], [T, 1]
        codes = self.cpu_weight(layer, torch.float32)  # [N, K] float32 copy of the 8-bit codes (exact)
        out = (xq.float() @ codes.t()) * x_scale * layer.weight_scale[None, :]  # [T, N] float32
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype).view(*x.shape[:-1], -1)

    @staticmethod
    def weight_only_batch(x: torch.Tensor) -> bool:
        """A decode-sized 16-bit call (<= W8A8_WEIGHT_ONLY_MAX_ROWS rows) that weight_only serves."""
        return x.numel() <= W8A8_WEIGHT_ONLY_MAX_ROWS * x.shape[-1] and x.dtype in (torch.bfloat16, torch.float16)

    @staticmethod
    def weight_only(layer: "_ParallelLinear", x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (qweight * scale)^T through the W8A16 kernel on the 8-bit weights (CUDA); one row through the CUDA-core
        GEMV (converting the codes there is cheaper than feeding the tensor cores a padded tile: H100, Llama-8B
        linears, us per call matmul kernel -> GEMV, int8 qkv 12.4 -> 10.6, o 11.7 -> 8.5, down 24.3 -> 23.8)."""
        if x.numel() == x.shape[-1]:
            from kvflight.kernels.wo_gemv import wo_gemv

            return wo_gemv(x, layer.weight, layer.weight_scale, bias=bias)
        from kvflight.kernels.w8a16_matmul import w8a16_matmul

        return w8a16_matmul(x, layer.weight, layer.weight_scale, bias)

    def dequantized_weight(self, layer):
        return layer.weight.float() * layer.weight_scale[:, None]

    def cpu_weight(self, layer, dtype):
        """The 8-bit codes as float32 (the scales are applied after the matmul, as on the GPU)."""
        cache = layer.__dict__.get("_cpu_dequantized")
        if cache is None:
            cache = layer.weight.float()
            if CPU_CACHE_DEQUANTIZED and cache.device.type == "cpu":  # a GPU without fp8 / int8 GEMMs: no cache
                layer.__dict__["_cpu_dequantized"] = cache
        return cache


class Fp8Method(_W8A8Method):
    scheme = "fp8"
    weight_dtype = ops.FP8_DTYPE

    def __init__(self, per_channel: bool = True) -> None:
        self.per_channel = per_channel

    def quantize_weight(self, weight):
        q, scale = ops.quantize_fp8(weight, per_channel=self.per_channel)
        return {"weight": q, "weight_scale": scale}

    def apply(self, layer, x, bias):
        n, k = layer.weight.shape
        if not (x.is_cuda and capability_at_least(x.device, 8, 9) and n % 16 == 0 and k % 16 == 0):
            return self.emulate(layer, x, bias)
        if self.weight_only_batch(x):
            return self.weight_only(layer, x, bias)
        from kvflight.kernels.per_token_quant import per_token_quant

        x2 = x.reshape(-1, k)  # [T, K]
        xq, x_scale = per_token_quant(x2, ops.FP8_DTYPE)  # [T, K] e4m3, [T, 1] float32
        # row-wise scaled GEMM: out[t, n] = sum_k xq[t, k] w[n, k] * x_scale[t] * w_scale[n]; weight.t() is the
        # column-major [K, N] operand cuBLASLt wants
        out = torch._scaled_mm(xq, layer.weight.t(), scale_a=x_scale, scale_b=layer.weight_scale.view(1, n),
                               out_dtype=torch.bfloat16, use_fast_accum=True)  # [T, N]
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out.to(x.dtype).view(*x.shape[:-1], n)

    def describe(self) -> str:
        return f"fp8(weights per {'channel' if self.per_channel else 'tensor'}, activations per token)"


class Int8SmoothQuantMethod(_W8A8Method):
    scheme = "int8_sq"
    weight_dtype = torch.int8

    def quantize_weight(self, weight):
        q, scale = ops.quantize_int8_per_channel(weight)
        return {"weight": q, "weight_scale": scale}

    def apply(self, layer, x, bias):
        n, k = layer.weight.shape
        if not (x.is_cuda and n % 8 == 0 and k % 8 == 0):
            return self.emulate(layer, x, bias)
        if self.weight_only_batch(x):
            return self.weight_only(layer, x, bias)
        from kvflight.kernels.per_token_quant import per_token_quant

        x2 = x.reshape(-1, k)  # [T, K]
        num_tokens = x2.shape[0]
        xq, x_scale = per_token_quant(x2, torch.int8)  # [T, K] int8, [T, 1] float32
        if num_tokens < INT_MM_MIN_ROWS:
            xq = F.pad(xq, (0, 0, 0, INT_MM_MIN_ROWS - num_tokens))  # [17, K]
        acc = torch._int_mm(xq, layer.weight.t())[:num_tokens]  # [T, N] int32, exact
        out = acc.float().mul_(x_scale).mul_(layer.weight_scale[None, :])
        if bias is not None:
            out = out.add_(bias.float())
        return out.to(x.dtype).view(*x.shape[:-1], n)

    def describe(self) -> str:
        return "int8_sq(weights per channel, activations per token)"


def make_linear_method(config: QuantConfig | None, in_features: int) -> LinearMethod:
    """The method a linear layer with `in_features` inputs (this rank's) uses under `config` (None: unquantized)."""
    if config is None:
        return LinearMethod()
    if config.scheme == "int8_wo":
        return Int8WeightOnlyMethod()
    if config.scheme in ("int4_wo", "int4_awq"):
        return Int4WeightOnlyMethod(config.scheme, in_features, config.group_size, config.zero_point)
    if config.scheme == "fp8":
        return Fp8Method(per_channel=config.weight_granularity == "channel")
    if config.scheme == "int8_sq":
        return Int8SmoothQuantMethod()
    raise AssertionError(config.scheme)  # QuantConfig validated the name


# ---- which method a layer gets at construction ------------------------------------------------------------------
_ACTIVE: list[QuantConfig | None] = [None]


@contextmanager
def quantized_linears(config: QuantConfig | None) -> Iterator[None]:
    """Linear layers constructed inside this block register `config`'s quantized parameters."""
    _ACTIVE.append(config)
    try:
        yield
    finally:
        _ACTIVE.pop()


def linear_method_for(in_features: int) -> LinearMethod:
    """Called by every linear layer's constructor."""
    return make_linear_method(_ACTIVE[-1], in_features)


# ---- online quantization ----------------------------------------------------------------------------------------
@torch.no_grad()
def quantize_linear_(layer: "_ParallelLinear", method: LinearMethod) -> None:
    """Replace an unquantized layer's float weight by `method`'s quantized parameters, in place.

    Each fused projection (q / k / v, gate / up) is quantized on its own, as a checkpoint stores it, so per-tensor
    scales belong to one projection.
    """
    if layer.quant_method.scheme != "none":
        raise ValueError(f"layer is already quantized ({layer.quant_method.describe()})")
    weight = layer.weight.data  # [N, K]
    out_features, in_features = weight.shape
    parts: list[dict[str, torch.Tensor]] = []
    start = 0
    for rows in layer.output_partition_sizes:
        parts.append(method.quantize_weight(weight[start:start + rows]))
        start += rows
    del layer.weight
    del weight
    layer.quant_method = method
    method.create_weights(layer, in_features, out_features, layer.params_dtype)
    for name in method.tensor_names:
        getattr(layer, name).data.copy_(torch.cat([part[name] for part in parts], dim=0))
