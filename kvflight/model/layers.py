"""TP-ready building blocks: parallel linears / embeddings with per-rank weight loaders, RMSNorm, RoPE, SiLU-and-mul.

Every layer keeps only its rank's slice and its `weight_loader(param, loaded_weight, shard_id=None)` takes that slice
out of the full checkpoint tensor. The process's TP rank / size (set_tensor_parallel, before building the model) is
read at construction; the two collectives below go through torch.distributed's default process group when the size
is > 1 (gloo on CPU, NCCL on GPUs; kvflight/runner/tp_workers.py sets it up), the all-reduce through the custom P2P
kernel for small messages when one is set (set_custom_all_reduce). One process holds one TP group.
"""

from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from kvflight.kernels import reference
from kvflight.quant.linear import LinearMethod, linear_method_for

WeightLoader = Callable[..., None]


# ---- tensor-parallel state --------------------------------------------------------------------------------------
@dataclass
class _TensorParallelState:
    rank: int = 0
    size: int = 1
    custom_all_reduce: Any = None  # kvflight.runner.custom_all_reduce.CustomAllReduce, or None: NCCL / gloo


_TP = _TensorParallelState()


def get_tp_rank() -> int:
    return _TP.rank


def get_tp_size() -> int:
    return _TP.size


def set_tensor_parallel(rank: int, size: int) -> None:
    """Set this process's TP rank / world size (before building the model)."""
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"tensor parallel rank={rank}, size={size}: need size >= 1 and 0 <= rank < size")
    _TP.rank, _TP.size = rank, size
    if size == 1:
        set_custom_all_reduce(None)


def set_custom_all_reduce(car: Any) -> None:
    """Route tp_all_reduce through `car` (a CustomAllReduce: its kernel for small messages, NCCL for the rest); None
    closes the current one and goes back to the backend's all-reduce."""
    if _TP.custom_all_reduce is not None and _TP.custom_all_reduce is not car:
        _TP.custom_all_reduce.close()
    _TP.custom_all_reduce = car


def get_custom_all_reduce() -> Any:
    return _TP.custom_all_reduce


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum partial results over the TP group in place (identity at world size 1)."""
    if get_tp_size() == 1:
        return x
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError(f"tensor parallel size {get_tp_size()} but torch.distributed is not initialized; "
                           "build TP models through the Engine (kvflight/runner/tp_workers.py sets up the group)")
    if _TP.custom_all_reduce is not None:
        return _TP.custom_all_reduce.all_reduce(x)
    dist.all_reduce(x)
    return x


def tp_all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's slice along the last dim (identity at world size 1)."""
    size = get_tp_size()
    if size == 1:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what}={total} is not divisible by the tensor parallel size {parts}")
    return total // parts


def _weak_loader(loader: WeightLoader) -> WeightLoader:
    """A bound-method loader held through a weak reference: param -> module -> param would be a reference cycle,
    and a dropped model would keep its (GPU) memory until the garbage collector happens to run."""
    if not inspect.ismethod(loader):
        return loader
    ref = weakref.WeakMethod(loader)

    def call(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        method = ref()
        if method is None:
            raise RuntimeError("weight_loader called after its layer was deleted")
        method(param, loaded_weight, shard_id)

    return call


def _new_param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str | None,
               loader: WeightLoader) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)
    param.weight_loader = _weak_loader(loader)  # type: ignore[attr-defined]
    return param


_QUANTIZED_DTYPES = (torch.int8, torch.uint8, torch.float8_e4m3fn)


def _check_shape(param: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"{what}: checkpoint tensor has shape {tuple(loaded.shape)}, the model expects "
                         f"{tuple(param.shape)} (does config.json match the weights?)")
    if param.dtype in _QUANTIZED_DTYPES and loaded.dtype != param.dtype:  # a silent cast would garble codes
        raise ValueError(f"{what}: checkpoint tensor is {loaded.dtype}, the quantized model expects {param.dtype} "
                         "(does config.json's quantization_config match the weights?)")


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
    """Replicated parameter (norms): copy the whole tensor."""
    _check_shape(param, loaded_weight, "replicated parameter")
    param.data.copy_(loaded_weight)


# ---- linears ----------------------------------------------------------------------------------------------------
class _ParallelLinear(nn.Module):
    """y = x W^T (+ b) with W [out_local, in_local] holding this rank's slice.

    How W is stored and multiplied is the layer's quant method (kvflight.quant.linear), picked at construction:
    unquantized (`weight` in the model dtype, F.linear) unless built inside `quantized_linears(config)`. Every
    quantized parameter keeps the output channel on dim 0, so the weight loaders below shard it like `weight`.
    """

    def __init__(self, in_local: int, out_local: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str | None) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.params_dtype, self.params_device = dtype, device
        self.output_partition_sizes = [out_local]  # rows of each fused projection (q / k / v, gate / up)
        self.quant_method: LinearMethod = linear_method_for(in_local)
        self.quant_method.create_weights(self, in_local, out_local, dtype)
        self.bias = _new_param((out_local,), dtype, device, self.weight_loader) if bias else None

    def register_weight(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Add a weight-like parameter (called by the quant method) that loads through this layer's loader."""
        setattr(self, name, _new_param(shape, dtype, self.params_device, self.weight_loader))

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [T, in_local] -> [T, out_local]
        return self.quant_method.apply(self, x, self.bias)


class ColumnParallelLinear(_ParallelLinear):
    """Output features split over ranks: rank r holds rows [r * out/tp, (r + 1) * out/tp) of W."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        self.input_size, self.output_size = input_size, output_size
        out_local = _divide(output_size, get_tp_size(), "output_size")
        super().__init__(input_size, out_local, bias, dtype, device)

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        rows = param.shape[0]
        shard = loaded_weight.narrow(0, self.tp_rank * rows, rows)  # [out_local, in] or [out_local]
        _check_shape(param, shard, f"{type(self).__name__} shard")
        param.data.copy_(shard)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections fused along the output dim (gate_up: [gate; up]).

    Each rank holds [gate_r; up_r]; shard_id is the index of the projection being loaded.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        self.output_sizes = list(output_sizes)
        for size in self.output_sizes:
            _divide(size, get_tp_size(), "output_size")
        super().__init__(input_size, sum(self.output_sizes), bias, dtype=dtype, device=device)
        self.output_partition_sizes = [size // self.tp_size for size in self.output_sizes]

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        if shard_id is None:  # an already-fused checkpoint tensor: split it into its projections
            offset = 0
            for i, size in enumerate(self.output_sizes):
                self.weight_loader(param, loaded_weight.narrow(0, offset, size), i)
                offset += size
            return
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(f"MergedColumnParallelLinear shard_id={shard_id!r}: "
                             f"expected 0..{len(self.output_sizes) - 1}")
        local = [s // self.tp_size for s in self.output_sizes]
        dst = param.data.narrow(0, sum(local[:shard_id]), local[shard_id])
        src = loaded_weight.narrow(0, self.tp_rank * local[shard_id], local[shard_id])
        _check_shape(dst, src, f"merged projection {shard_id}")
        dst.copy_(src)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k, v projections fused: [q (heads_local * D); k (kv_local * D); v (kv_local * D)].

    Query heads split over ranks; KV heads split too, or replicated when there are fewer KV heads than ranks.
    shard_id is "q", "k" or "v".
    """

    def __init__(self, hidden_size: int, head_dim: int, total_num_heads: int, total_num_kv_heads: int,
                 bias: bool = False, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        tp_size = get_tp_size()
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = total_num_heads, total_num_kv_heads
        self.num_heads = _divide(total_num_heads, tp_size, "num_heads")
        if tp_size >= total_num_kv_heads:
            self.num_kv_heads = 1
            self.kv_replicas = _divide(tp_size, total_num_kv_heads, "tensor parallel size over num_kv_heads")
        else:
            self.num_kv_heads = _divide(total_num_kv_heads, tp_size, "num_kv_heads")
            self.kv_replicas = 1
        self.q_size = self.num_heads * head_dim  # local
        self.kv_size = self.num_kv_heads * head_dim  # local
        self.input_size = hidden_size
        self.output_size = (total_num_heads + 2 * total_num_kv_heads) * head_dim
        _ParallelLinear.__init__(self, hidden_size, self.q_size + 2 * self.kv_size, bias, dtype, device)
        self.output_partition_sizes = [self.q_size, self.kv_size, self.kv_size]

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        full_q = self.total_num_heads * self.head_dim
        full_kv = self.total_num_kv_heads * self.head_dim
        if shard_id is None:  # already-fused qkv tensor
            for sid, start, size in (("q", 0, full_q), ("k", full_q, full_kv), ("v", full_q + full_kv, full_kv)):
                self.weight_loader(param, loaded_weight.narrow(0, start, size), sid)
            return
        if shard_id == "q":
            dst_offset, size, src_start = 0, self.q_size, self.tp_rank * self.q_size
        elif shard_id in ("k", "v"):
            dst_offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            size, src_start = self.kv_size, (self.tp_rank // self.kv_replicas) * self.kv_size
        else:
            raise ValueError(f"QKVParallelLinear shard_id={shard_id!r}: expected 'q', 'k' or 'v'")
        expected = full_q if shard_id == "q" else full_kv
        if loaded_weight.shape[0] != expected:
            raise ValueError(f"{shard_id}_proj: checkpoint tensor has {loaded_weight.shape[0]} output rows, the "
                             f"model expects {expected} (heads x head_dim; does config.json match the weights?)")
        dst = param.data.narrow(0, dst_offset, size)
        src = loaded_weight.narrow(0, src_start, size)
        _check_shape(dst, src, f"{shard_id}_proj")
        dst.copy_(src)


class RowParallelLinear(_ParallelLinear):
    """Input features split over ranks: rank r holds columns [r * in/tp, (r + 1) * in/tp) of W; partial outputs
    are summed over ranks. The bias is added once (rank 0) before the sum."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, reduce_results: bool = True) -> None:
        self.input_size, self.output_size = input_size, output_size
        self.reduce_results = reduce_results
        in_local = _divide(input_size, get_tp_size(), "input_size")
        super().__init__(in_local, output_size, bias, dtype, device)

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        if param.dim() == 1:  # bias: replicated
            shard = loaded_weight
        else:
            cols = param.shape[1]
            shard = loaded_weight.narrow(1, self.tp_rank * cols, cols)  # [out, in_local]
        _check_shape(param, shard, f"{type(self).__name__} shard")
        param.data.copy_(shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [T, in_local] -> [T, out]
        bias = self.bias if self.tp_rank == 0 else None
        out = self.quant_method.apply(self, x, bias)
        return tp_all_reduce(out) if self.reduce_results else out


# ---- embeddings -------------------------------------------------------------------------------------------------
class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split over ranks (padded to a multiple of the TP size).

    Rank r holds rows [r * V_local, (r + 1) * V_local); other ranks' tokens embed to 0 and the sum over ranks
    restores them.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_embeddings_per_rank = math.ceil(num_embeddings / self.tp_size)
        self.vocab_start = self.tp_rank * self.num_embeddings_per_rank
        self.vocab_end = min(self.vocab_start + self.num_embeddings_per_rank, num_embeddings)
        self.weight = _new_param((self.num_embeddings_per_rank, embedding_dim), dtype, device, self.weight_loader)

    def weight_loader(self, param: torch.Tensor, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        if tuple(loaded_weight.shape) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(f"{type(self).__name__}: checkpoint tensor has shape {tuple(loaded_weight.shape)}, the "
                             f"model expects ({self.num_embeddings}, {self.embedding_dim}) (vocab_size x hidden_size)")
        rows = self.vocab_end - self.vocab_start
        param.data[:rows].copy_(loaded_weight[self.vocab_start:self.vocab_end])
        if rows < param.shape[0]:
            param.data[rows:].zero_()  # padding rows of the last rank

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] int64 -> [T, hidden]
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)  # [T]
        local_ids = torch.where(mine, input_ids - self.vocab_start, torch.zeros_like(input_ids))
        out = F.embedding(local_ids, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return tp_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection to the vocabulary, split over ranks like the embedding; logits are gathered.

    quantize_int8_() turns it into an int8 head (weights per output row, as int8_wo; TensorRT-LLM's
    --quantize_lm_head): int8_weight [V_local, hidden] int8 and int8_scale [V_local] float32, read by the
    weight-only kernels (one row: wo_gemv, more: w8a16_matmul; CPU: the dequantized copy)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(num_embeddings, embedding_dim, dtype=dtype, device=device)
        self.int8_weight: torch.Tensor | None
        self.int8_scale: torch.Tensor | None
        self.register_buffer("int8_weight", None)  # [V_local, hidden] int8 once quantize_int8_ ran
        self.register_buffer("int8_scale", None)  # [V_local] float32

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead is not an embedding: call compute_logits(hidden)")

    @property
    def is_int8(self) -> bool:
        return self.int8_weight is not None

    @torch.no_grad()
    def quantize_int8_(self, keep_float_weight: bool, rows_per_chunk: int = 8192) -> None:
        """Quantize the head's rows to int8 (symmetric, max |w| / 127 per row). keep_float_weight: a tied head's
        weight is the embedding's, which stays; an untied head's float weight is freed."""
        from kvflight.quant import ops

        if self.is_int8:
            raise ValueError("the LM head is already int8")
        w = self.weight.data  # [V_local, hidden]
        q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
        for start in range(0, w.shape[0], rows_per_chunk):  # float32 temporaries of one chunk at a time
            q[start:start + rows_per_chunk], scale[start:start + rows_per_chunk] = \
                ops.quantize_int8_per_channel(w[start:start + rows_per_chunk])
        self.int8_weight = q
        self.int8_scale = scale
        if not keep_float_weight:
            del self.weight
            self.register_parameter("weight", None)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, hidden] -> [B, vocab] (model dtype)
        if self.is_int8:
            logits = self._int8_logits(hidden)  # [B, V_local]
        else:
            logits = F.linear(hidden, self.weight)  # [B, V_local]
        logits = tp_all_gather_last_dim(logits)  # [B, V_local * tp]
        return logits[..., : self.num_embeddings]

    def _int8_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        assert self.int8_weight is not None and self.int8_scale is not None
        if hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16):
            if hidden.numel() == hidden.shape[-1]:  # one row (batch-1 decode)
                from kvflight.kernels.wo_gemv import wo_gemv

                return wo_gemv(hidden, self.int8_weight, self.int8_scale)
            from kvflight.kernels.w8a16_matmul import w8a16_matmul

            return w8a16_matmul(hidden, self.int8_weight, self.int8_scale)
        cache = self.__dict__.get("_dequantized")  # CPU: the dequantized head, made once (GPU float32: each call)
        if cache is None or cache.dtype != hidden.dtype:
            cache = (self.int8_weight.float() * self.int8_scale[:, None]).to(hidden.dtype)
            if cache.device.type == "cpu":
                self.__dict__["_dequantized"] = cache
        return F.linear(hidden, cache)


# ---- norms, activation, rotary ----------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm over the last dim with float32 statistics; forward(x, residual) fuses the residual add."""

    def __init__(self, hidden_size: int, eps: float, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _new_param((hidden_size,), dtype, device, default_weight_loader)
        self.use_triton = False  # set by the model's set_kernel_backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual [..., hidden] -> (norm(x + residual) [..., hidden], x + residual [..., hidden])."""
        if self.use_triton:
            from kvflight.kernels import rms_norm as triton_rms_norm
            return triton_rms_norm.rms_norm(x, self.weight, self.eps, residual)
        return reference.rms_norm(x, self.weight, self.eps, residual)


class SiluAndMul(nn.Module):
    """x [..., 2 * I] = [gate | up] -> silu(gate) * up [..., I]."""

    def __init__(self) -> None:
        super().__init__()
        self.use_triton = False  # set by the model's set_kernel_backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_triton:
            from kvflight.kernels import silu_and_mul as triton_silu_and_mul
            return triton_silu_and_mul.silu_and_mul(x)
        return reference.silu_and_mul(x)


def rope_inv_freq(rotary_dim: int, base: float, rope_scaling: dict[str, Any] | None) -> torch.Tensor:
    """Per-pair inverse frequencies [rotary_dim / 2] float32, with the checkpoint's scaling applied."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim  # [rotary_dim / 2]
    inv_freq = 1.0 / (base ** exponents)
    if rope_scaling is None:
        return inv_freq
    kind = rope_scaling.get("rope_type")
    if kind == "linear":
        return inv_freq / rope_scaling["factor"]
    if kind == "llama3":
        factor = rope_scaling["factor"]
        low, high = rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
        old_context = rope_scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context / low  # longer waves than this are slowed down by `factor`
        high_freq_wavelen = old_context / high  # shorter waves than this are kept
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)  # 0 at the low edge, 1 at the high edge
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, blended, scaled)
    if kind == "freq_factors":
        factors = torch.tensor(list(rope_scaling["factors"]), dtype=torch.float32)
        if factors.shape != inv_freq.shape:
            raise ValueError(f"rope freq factors have {factors.numel()} entries, expected {inv_freq.numel()}")
        return inv_freq / factors
    raise ValueError(f"rope_scaling type {kind!r} is not supported; supported: default, linear, llama3, freq_factors")


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (HF Llama's rotate_half) over a precomputed cos/sin cache."""

    def __init__(self, head_dim: int, max_position: int, base: float, rope_scaling: dict[str, Any] | None = None,
                 *, rotary_dim: int | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        self.max_position = max_position
        inv_freq = rope_inv_freq(self.rotary_dim, base, rope_scaling)  # [rotary_dim / 2] float32
        positions = torch.arange(max_position, dtype=torch.float32)  # [max_position]
        freqs = torch.outer(positions, inv_freq)  # [max_position, rotary_dim / 2]
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [max_position, rotary_dim] float32
        self.register_buffer("cos_sin_cache", cache.to(device), persistent=False)
        self.use_triton = False  # set by the model's set_kernel_backend

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] int32/int64, q [T, Hq, D] (or [T, Hq * D]), k [T, Hkv, D] -> rotated q, k.

        The Triton path rotates in place (q and k are fresh projections nobody else reads)."""
        if self.use_triton:
            from kvflight.kernels import rotary as triton_rotary
            return triton_rotary.rotary_embedding(positions, q, k, self.cos_sin_cache, self.head_dim, inplace=True)
        return reference.rotary_embedding(positions, q, k, self.cos_sin_cache, self.head_dim)
