"""Triton RoPE fused into the paged KV-cache write: reference.rotary_embedding + reference.write_kv_cache in one launch.

Per token (one program): rotate q in place (every query head), rotate k in place, and store the rotated k and v at
the token's slot, quantized as write_kv does for an int8 / fp8 cache. Bit for bit what rotary.rotary_embedding(
inplace=True) followed by write_kv.write_kv_cache gives (the same formulas, roundings and casts), one kernel and
one memory round trip less per layer and step. Tokens with a negative slot (padding) still rotate q and k but
write nothing into the cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvflight.kernels import pdl
from kvflight.kernels.pdl import pdl_trigger, pdl_wait
from kvflight.kernels.reference import check_kv_write_shapes
from kvflight.kernels.rotary import load_cos_sin, rotate_heads, rotate_pair
from kvflight.kernels.write_kv import _INTERPRETED, kv_quant_launch_args, load_kv_scales, store_kv


@triton.jit
def _rotate_and_store_k(
    k_row, c_row, k_stride_d, c_stride_d, head_ok, write_ok, cos, sin, half, head_dim, ks,
    HALF_BLOCK: tl.constexpr, DIM_BLOCK: tl.constexpr, HAS_TAIL: tl.constexpr,
    QUANT: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """Rotate one token's K heads in place and store them in the cache.

    k_row, c_row  [HEAD_BLOCK, 1] pointers to each head's dim 0 in k and in the cache slot
    head_ok       [HEAD_BLOCK, 1] real heads (rotated in k); write_ok: the heads stored in the cache (none: padding)
    cos, sin      [1, HALF_BLOCK] float32; ks [HEAD_BLOCK, 1] float32 K scales (1.0 for a float cache)
    """
    dims = tl.arange(0, HALF_BLOCK)[None, :]  # [1, HALF_BLOCK]
    in_half = dims < half
    first = k_row + dims * k_stride_d  # [HEAD_BLOCK, HALF_BLOCK]: dims [0, half)
    second = first + half * k_stride_d  # dims [half, 2 * half)
    x1 = tl.load(first, mask=head_ok & in_half, other=0.0).to(tl.float32)
    x2 = tl.load(second, mask=head_ok & in_half, other=0.0).to(tl.float32)
    out1, out2 = rotate_pair(x1, x2, cos, sin)
    out1 = out1.to(k_row.dtype.element_ty)  # rounded to k's dtype first, as the cache write reads k back
    out2 = out2.to(k_row.dtype.element_ty)
    tl.store(first, out1, mask=head_ok & in_half)
    tl.store(second, out2, mask=head_ok & in_half)
    c_first = c_row + dims * c_stride_d
    store_kv(c_first, out1, write_ok & in_half, ks, QUANT, INTERPRETED)
    store_kv(c_first + half * c_stride_d, out2, write_ok & in_half, ks, QUANT, INTERPRETED)
    if HAS_TAIL:  # rotary_dim < head_dim: dims [2 * half, head_dim) are copied as they are
        tail = tl.arange(0, DIM_BLOCK)[None, :]  # [1, DIM_BLOCK]
        tail_mask = write_ok & (tail >= 2 * half) & (tail < head_dim)
        x_tail = tl.load(k_row + tail * k_stride_d, mask=tail_mask)
        store_kv(c_row + tail * c_stride_d, x_tail, tail_mask, ks, QUANT, INTERPRETED)


@triton.jit
def _rotary_write_kv_kernel(
    positions_ptr,  # [T] int
    q_ptr,  # [T, Hq, D] (any strides)
    k_ptr,  # [T, Hkv, D]
    v_ptr,  # [T, Hkv, D]
    cos_sin_ptr,  # [max_position, rotary_dim]: cos | sin
    cache_ptr,  # [2, num_blocks, tokens_per_block, Hkv, D]
    slot_ptr,  # [T] int
    q_stride_t, q_stride_h, q_stride_d,
    k_stride_t, k_stride_h, k_stride_d,
    v_stride_t, v_stride_h, v_stride_d,
    cos_sin_stride,
    c_stride_kv, c_stride_block, c_stride_off, c_stride_h, c_stride_d,
    tokens_per_block,
    num_q_heads,
    num_kv_heads,
    head_dim,
    half,  # rotary_dim / 2
    Q_HEAD_BLOCK: tl.constexpr,
    K_HEAD_BLOCK: tl.constexpr,
    HALF_BLOCK: tl.constexpr,
    DIM_BLOCK: tl.constexpr,
    HAS_TAIL: tl.constexpr,  # rotary_dim < head_dim
    k_scale_ptr=None,  # [Hkv] or [1] float32 (QUANT != 0)
    v_scale_ptr=None,
    scale_stride_h=0,  # 0: one scale for every head
    QUANT: tl.constexpr = 0,  # 0: cast, 1: int8 (round half to even, +-127), 2: fp8 e4m3 (+-448)
    INTERPRETED: tl.constexpr = False,
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (kernels/pdl.py)
):
    pdl_trigger(PDL)
    pdl_wait(PDL)
    token = tl.program_id(0).to(tl.int64)  # one program per token: all its q, k and v heads
    pos = tl.load(positions_ptr + token).to(tl.int64)
    cos, sin = load_cos_sin(cos_sin_ptr, pos, cos_sin_stride, half, HALF_BLOCK)  # [1, HALF_BLOCK] each
    rotate_heads(q_ptr, token, q_stride_t, q_stride_h, q_stride_d, num_q_heads, cos, sin, half,
                 Q_HEAD_BLOCK, HALF_BLOCK)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    heads_to_write = tl.where(slot >= 0, num_kv_heads, 0)  # padding tokens (slot < 0) write no cache
    safe_slot = tl.maximum(slot, 0)
    block = safe_slot // tokens_per_block
    offset = safe_slot % tokens_per_block
    heads = tl.arange(0, K_HEAD_BLOCK)[:, None]  # [K_HEAD_BLOCK, 1]
    head_ok = heads < num_kv_heads
    write_ok = heads < heads_to_write
    c_row = cache_ptr + block * c_stride_block + offset * c_stride_off + heads * c_stride_h  # [K_HEAD_BLOCK, 1]
    ks, vs = load_kv_scales(k_scale_ptr, v_scale_ptr, heads, num_kv_heads, scale_stride_h, QUANT)
    _rotate_and_store_k(k_ptr + token * k_stride_t + heads * k_stride_h, c_row, k_stride_d, c_stride_d,
                        head_ok, write_ok, cos, sin, half, head_dim, ks, HALF_BLOCK, DIM_BLOCK, HAS_TAIL,
                        QUANT, INTERPRETED)
    dims = tl.arange(0, DIM_BLOCK)[None, :]  # [1, DIM_BLOCK]
    v_mask = write_ok & (dims < head_dim)  # [K_HEAD_BLOCK, DIM_BLOCK]
    value = tl.load(v_ptr + token * v_stride_t + heads * v_stride_h + dims * v_stride_d, mask=v_mask)
    store_kv(c_row + c_stride_kv + dims * c_stride_d, value, v_mask, vs, QUANT, INTERPRETED)


def _heads_view(x: torch.Tensor, name: str, num_tokens: int, head_dim: int) -> torch.Tensor:
    """x [T, H, D] or flattened [T, H * D] -> a [T, H, D] view of it (writes land in x)."""
    if x.dim() == 2 and x.shape[0] == num_tokens and x.shape[1] % head_dim == 0:
        return x.view(num_tokens, -1, head_dim)
    if x.dim() == 3 and x.shape[0] == num_tokens and x.shape[2] == head_dim:
        return x
    raise ValueError(f"{name} {tuple(x.shape)}: expected [{num_tokens}, num_heads, {head_dim}] or "
                     f"[{num_tokens}, num_heads * {head_dim}] (num_tokens from positions, head_dim as given)")


def _check_rotary(positions: torch.Tensor, cos_sin_cache: torch.Tensor, head_dim: int) -> int:
    """Validate the RoPE inputs; returns rotary_dim."""
    if positions.dim() != 1:
        raise ValueError(f"positions {tuple(positions.shape)}: expected [num_tokens]")
    if cos_sin_cache.dim() != 2:
        raise ValueError(f"cos_sin_cache {tuple(cos_sin_cache.shape)}: expected [max_position, rotary_dim]")
    rotary_dim = cos_sin_cache.shape[-1]
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ValueError(f"cos_sin_cache last dim (rotary_dim) {rotary_dim}: expected even and in (0, head_dim "
                         f"{head_dim}]")
    return rotary_dim


def rotary_write_kv_cache(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_sin_cache: torch.Tensor,
    head_dim: int, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox RoPE on q and k in place, then each token's rotated K and V stored at its slot; one launch.

    positions      [num_tokens] int64 (or int32)
    q              [num_tokens, num_heads, head_dim] or flattened [num_tokens, num_heads * head_dim] (any strides)
    k, v           [num_tokens, num_kv_heads, head_dim] or flattened (e.g. views split from one qkv tensor)
    cos_sin_cache  [max_position, rotary_dim] float32: cos in the first half, sin in the second (rotary_dim <=
                   head_dim: dims past rotary_dim pass through)
    kv_cache       [2, num_blocks, tokens_per_block, num_kv_heads, head_dim]
    slot_mapping   [num_tokens] int64 (or int32); negative: padding, q and k rotated but nothing stored
    k_scale, v_scale  quantized caches (int8 / float8_e4m3fn): float32 [num_kv_heads] or [1], as write_kv_cache
    returns        q, k (the given tensors, rotated). No host sync: CUDA-graph capturable.
    """
    rotary_dim = _check_rotary(positions, cos_sin_cache, head_dim)
    num_tokens = positions.shape[0]
    q3 = _heads_view(q, "q", num_tokens, head_dim)  # [T, Hq, D]
    k3 = _heads_view(k, "k", num_tokens, head_dim)  # [T, Hkv, D]
    v3 = _heads_view(v, "v", num_tokens, head_dim)  # [T, Hkv, D]
    num_kv_heads, _ = check_kv_write_shapes(k3, v3, kv_cache, slot_mapping)
    quant_args = kv_quant_launch_args(kv_cache, k_scale, v_scale, num_kv_heads)
    if num_tokens == 0:
        return q, k
    if cos_sin_cache.stride(-1) != 1:
        cos_sin_cache = cos_sin_cache.contiguous()
    half = rotary_dim // 2
    _rotary_write_kv_kernel[(num_tokens,)](
        positions, q3, k3, v3, cos_sin_cache, kv_cache, slot_mapping,
        q3.stride(0), q3.stride(1), q3.stride(2),
        k3.stride(0), k3.stride(1), k3.stride(2),
        v3.stride(0), v3.stride(1), v3.stride(2),
        cos_sin_cache.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), kv_cache.stride(4),
        kv_cache.shape[2], q3.shape[1], num_kv_heads, head_dim, half,
        Q_HEAD_BLOCK=triton.next_power_of_2(q3.shape[1]),
        K_HEAD_BLOCK=triton.next_power_of_2(num_kv_heads),
        HALF_BLOCK=triton.next_power_of_2(half),
        DIM_BLOCK=triton.next_power_of_2(head_dim),
        HAS_TAIL=rotary_dim < head_dim,
        num_warps=4,
        INTERPRETED=_INTERPRETED,
        **quant_args, **pdl.launch_kwargs(kv_cache, "rotary_write_kv"),
    )
    return q, k
