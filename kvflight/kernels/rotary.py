"""Triton neox-style rotary embedding over a cos/sin cache: a drop-in for reference.rotary_embedding."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvflight.kernels import pdl
from kvflight.kernels.pdl import pdl_trigger, pdl_wait


@triton.jit
def rotate_pair(x1, x2, cos, sin):
    """The neox rotation of one half pair in float32: x1, x2 [..., HALF_BLOCK] -> (x1 cos - x2 sin, x2 cos + x1 sin).
    The one formula of the Triton RoPE (rotary.py and the fused rope_write_kv.py round alike)."""
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def load_cos_sin(cache_ptr, pos, cache_stride, half, HALF_BLOCK: tl.constexpr):
    """cos and sin of position pos (int64) from a [max_position, 2 * half] cos | sin cache -> [1, HALF_BLOCK] float32
    each (0 past half)."""
    dims = tl.arange(0, HALF_BLOCK)[None, :]  # [1, HALF_BLOCK]
    dmask = dims < half
    cos = tl.load(cache_ptr + pos * cache_stride + dims, mask=dmask, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * cache_stride + half + dims, mask=dmask, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def rotate_heads(
    x_ptr, token, stride_t, stride_h, stride_d, num_heads, cos, sin, half,
    HEAD_BLOCK: tl.constexpr, HALF_BLOCK: tl.constexpr,
):
    """Rotate the first 2 * half dims of every head of one token in place. cos, sin [1, HALF_BLOCK] float32."""
    heads = tl.arange(0, HEAD_BLOCK)[:, None]  # [HEAD_BLOCK, 1]
    dims = tl.arange(0, HALF_BLOCK)[None, :]  # [1, HALF_BLOCK]
    mask = (heads < num_heads) & (dims < half)  # [HEAD_BLOCK, HALF_BLOCK]
    first = x_ptr + token * stride_t + heads * stride_h + dims * stride_d  # x1 = dims [0, half)
    second = first + half * stride_d  # x2 = dims [half, 2 * half)
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(second, mask=mask, other=0.0).to(tl.float32)
    out1, out2 = rotate_pair(x1, x2, cos, sin)
    tl.store(first, out1.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(second, out2.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr,  # [T] int
    q_ptr,  # [T, Hq, D] (any strides)
    k_ptr,  # [T, Hkv, D]
    cache_ptr,  # [max_position, rotary_dim]: cos | sin
    q_stride_t, q_stride_h, q_stride_d,
    k_stride_t, k_stride_h, k_stride_d,
    cache_stride,
    num_q_heads,
    num_kv_heads,
    half,  # rotary_dim / 2
    Q_HEAD_BLOCK: tl.constexpr,
    K_HEAD_BLOCK: tl.constexpr,
    HALF_BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (kernels/pdl.py)
):
    pdl_trigger(PDL)
    pdl_wait(PDL)
    token = tl.program_id(0).to(tl.int64)  # one program per token: all its q and k heads
    pos = tl.load(positions_ptr + token).to(tl.int64)
    cos, sin = load_cos_sin(cache_ptr, pos, cache_stride, half, HALF_BLOCK)  # [1, HALF_BLOCK] each
    rotate_heads(q_ptr, token, q_stride_t, q_stride_h, q_stride_d, num_q_heads, cos, sin, half,
                  Q_HEAD_BLOCK, HALF_BLOCK)
    rotate_heads(k_ptr, token, k_stride_t, k_stride_h, k_stride_d, num_kv_heads, cos, sin, half,
                  K_HEAD_BLOCK, HALF_BLOCK)


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
    head_dim: int | None = None, *, inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style RoPE in float32; same contract as reference.rotary_embedding (out of place by default).

    positions      [num_tokens] int64
    q              [num_tokens, num_heads, head_dim] or flattened [num_tokens, num_heads * head_dim]
    k              [num_tokens, num_kv_heads, head_dim] or flattened [num_tokens, num_kv_heads * head_dim]
    cos_sin_cache  [max_position, rotary_dim]: cos in the first half, sin in the second
    head_dim       needed for flattened inputs when rotary_dim < head_dim (default: rotary_dim)
    inplace        rotate q and k in place (and return them) instead of rotating copies
    returns        q, k rotated, same shapes and dtypes as given
    """
    rotary_dim = cos_sin_cache.shape[-1]
    if rotary_dim % 2:
        raise ValueError(f"cos_sin_cache last dim {rotary_dim} is odd")
    num_tokens = positions.shape[0]
    if q.shape[0] != num_tokens or k.shape[0] != num_tokens:
        raise ValueError(f"positions [{num_tokens}] vs q {tuple(q.shape)} / k {tuple(k.shape)}")
    if not inplace:
        q, k = q.clone(), k.clone()
    dim = head_dim or rotary_dim
    q3 = q if q.dim() == 3 else q.view(num_tokens, -1, dim)  # [T, Hq, D] (a view: writes land in q)
    k3 = k if k.dim() == 3 else k.view(num_tokens, -1, dim)  # [T, Hkv, D]
    if q3.shape[-1] < rotary_dim or k3.shape[-1] < rotary_dim:
        raise ValueError(f"head_dim {q3.shape[-1]} / {k3.shape[-1]} is smaller than rotary_dim {rotary_dim}")
    if cos_sin_cache.stride(-1) != 1:
        cos_sin_cache = cos_sin_cache.contiguous()
    if num_tokens > 0:
        half = rotary_dim // 2
        _rotary_kernel[(num_tokens,)](
            positions, q3, k3, cos_sin_cache,
            q3.stride(0), q3.stride(1), q3.stride(2),
            k3.stride(0), k3.stride(1), k3.stride(2),
            cos_sin_cache.stride(0),
            q3.shape[1], k3.shape[1], half,
            Q_HEAD_BLOCK=triton.next_power_of_2(q3.shape[1]),
            K_HEAD_BLOCK=triton.next_power_of_2(k3.shape[1]),
            HALF_BLOCK=triton.next_power_of_2(half),
            num_warps=4, **pdl.launch_kwargs(q3, "rotary"),
        )
    return q, k
