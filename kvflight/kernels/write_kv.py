"""Triton paged KV-cache write (one program per token, negative slots skipped): a drop-in for reference.write_kv_cache."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from kvflight.kernels import pdl
from kvflight.kernels.pdl import pdl_trigger, pdl_wait
from kvflight.kernels.reference import check_kv_scales, check_kv_write_shapes

# 1.5 * 2**23: (y + M) - M rounds a float32 |y| < 2**22 to the nearest integer, ties even (the interpreter's
# rounding; compiled kernels use libdevice rint, the same rounding in one instruction)
_RNE_MAGIC = tl.constexpr(12582912.0)
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def load_kv_scales(k_scale_ptr, v_scale_ptr, heads, num_kv_heads, scale_stride_h, QUANT: tl.constexpr):
    """The K and V scales of `heads` [HEAD_BLOCK, 1] -> ks, vs [HEAD_BLOCK, 1] float32 (1.0 for a float cache)."""
    if QUANT != 0:
        head_ok = heads < num_kv_heads
        ks = tl.load(k_scale_ptr + heads * scale_stride_h, mask=head_ok, other=1.0)
        vs = tl.load(v_scale_ptr + heads * scale_stride_h, mask=head_ok, other=1.0)
    else:
        ks = tl.full(heads.shape, 1.0, tl.float32)
        vs = tl.full(heads.shape, 1.0, tl.float32)
    return ks, vs


@triton.jit
def store_kv(dst, x, mask, scale, QUANT: tl.constexpr, INTERPRETED: tl.constexpr):
    """Store x (K or V rows, any float dtype) at the cache pointers dst: a plain cast for a float cache, else the
    codes of reference.quantize_kv (x / scale clamped to +-127 and rounded half to even, or to +-448 in e4m3)."""
    if QUANT != 0:
        qmax = 127.0 if QUANT == 1 else 448.0
        x = tl.minimum(tl.maximum(tl.div_rn(x.to(tl.float32), scale), -qmax), qmax)
        if QUANT == 1:
            if INTERPRETED:
                x = (x + _RNE_MAGIC) - _RNE_MAGIC
            else:
                x = libdevice.rint(x)
    tl.store(dst, x.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _write_kv_kernel(
    k_ptr,  # [T, Hkv, D]
    v_ptr,  # [T, Hkv, D]
    cache_ptr,  # [2, num_blocks, tokens_per_block, Hkv, D]
    slot_ptr,  # [T] int
    k_stride_t, k_stride_h, k_stride_d,
    v_stride_t, v_stride_h, v_stride_d,
    c_stride_kv, c_stride_block, c_stride_off, c_stride_h, c_stride_d,
    tokens_per_block,
    num_kv_heads,
    head_dim,
    HEAD_BLOCK: tl.constexpr,
    DIM_BLOCK: tl.constexpr,
    k_scale_ptr=None,  # [Hkv] or [1] float32 (QUANT != 0)
    v_scale_ptr=None,
    scale_stride_h=0,  # 0: one scale for every head
    QUANT: tl.constexpr = 0,
    INTERPRETED: tl.constexpr = False,  # 0: cast, 1: int8 (round half to even, +-127), 2: fp8 e4m3 (+-448)
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (kernels/pdl.py)
):
    pdl_trigger(PDL)
    pdl_wait(PDL)
    token = tl.program_id(0).to(tl.int64)  # one program per token: all its KV heads
    slot = tl.load(slot_ptr + token).to(tl.int64)
    heads_to_write = tl.where(slot >= 0, num_kv_heads, 0)  # padding tokens (slot < 0) write nothing
    safe_slot = tl.maximum(slot, 0)
    block = safe_slot // tokens_per_block
    offset = safe_slot % tokens_per_block
    heads = tl.arange(0, HEAD_BLOCK)[:, None]  # [HEAD_BLOCK, 1]
    dims = tl.arange(0, DIM_BLOCK)[None, :]  # [1, DIM_BLOCK]
    mask = (heads < heads_to_write) & (dims < head_dim)  # [HEAD_BLOCK, DIM_BLOCK]
    key = tl.load(k_ptr + token * k_stride_t + heads * k_stride_h + dims * k_stride_d, mask=mask)
    value = tl.load(v_ptr + token * v_stride_t + heads * v_stride_h + dims * v_stride_d, mask=mask)
    dst = cache_ptr + block * c_stride_block + offset * c_stride_off + heads * c_stride_h + dims * c_stride_d
    ks, vs = load_kv_scales(k_scale_ptr, v_scale_ptr, heads, num_kv_heads, scale_stride_h, QUANT)
    store_kv(dst, key, mask, ks, QUANT, INTERPRETED)
    store_kv(dst + c_stride_kv, value, mask, vs, QUANT, INTERPRETED)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """Store each token's K/V at its slot, in place; tokens with a negative slot are skipped.

    k, v          [num_tokens, num_kv_heads, head_dim]
    kv_cache      [2, num_blocks, tokens_per_block, num_kv_heads, head_dim]
    slot_mapping  [num_tokens] int64 (or int32); slot = block_id * tokens_per_block + offset_in_block
    k_scale, v_scale  quantized caches (int8 / float8_e4m3fn): float32 device tensors [num_kv_heads] or [1];
                  codes as reference.quantize_kv (no host sync: CUDA-graph capturable)
    """
    num_kv_heads, head_dim = check_kv_write_shapes(k, v, kv_cache, slot_mapping)
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    quant_args = kv_quant_launch_args(kv_cache, k_scale, v_scale, num_kv_heads)
    _write_kv_kernel[(num_tokens,)](
        k, v, kv_cache, slot_mapping,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), kv_cache.stride(4),
        kv_cache.shape[2], num_kv_heads, head_dim,
        HEAD_BLOCK=triton.next_power_of_2(num_kv_heads),
        DIM_BLOCK=triton.next_power_of_2(head_dim),
        num_warps=4,
        INTERPRETED=_INTERPRETED,
        **quant_args, **pdl.launch_kwargs(kv_cache, "write_kv"),
    )


def kv_quant_launch_args(kv_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                         num_kv_heads: int) -> dict:
    """Validated scale arguments of a KV-writing kernel (load_kv_scales / store_kv): {} for a float cache (the
    kernel's defaults: no scales, QUANT=0), else the scale pointers, their head stride and QUANT (1 int8, 2 fp8)."""
    quant = check_kv_scales(kv_cache, k_scale, v_scale, num_kv_heads)
    if quant is None:
        return {}
    assert k_scale is not None
    return dict(k_scale_ptr=k_scale, v_scale_ptr=v_scale,
                scale_stride_h=k_scale.stride(0) if k_scale.numel() > 1 else 0,
                QUANT=1 if quant == "int8" else 2)
