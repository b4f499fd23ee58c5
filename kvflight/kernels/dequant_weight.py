"""Triton weight dequantization to the compute dtype, one pass: the large-batch path of the weight-only schemes
(dequantize, then one cuBLAS GEMM, which beats the fused W8A16 / W4A16 kernels once a call has many rows).

Drop-ins for `ops.dequantize_int8(q, scale).to(dtype)` and `ops.dequantize_int4(...).to(dtype)`: the same float32
arithmetic, rounded once to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dequant8_kernel(
    q_ptr,  # [N, K] int8 (or float8 e4m3 codes passed as their bytes)
    scale_ptr,  # [N] float32
    out_ptr,  # [N, K]
    N,
    K,
    stride_qn,
    stride_on,
    W_FP8: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rn = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BN]
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # [BK]
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    q = tl.load(q_ptr + rn[:, None] * stride_qn + rk[None, :], mask=mask, other=0)  # [BN, BK]
    if W_FP8:
        q = q.to(tl.float8e4nv, bitcast=True)
    scale = tl.load(scale_ptr + rn, mask=rn < N, other=0.0)  # [BN]
    w = q.to(tl.float32) * scale[:, None]
    tl.store(out_ptr + rn[:, None] * stride_on + rk[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant4_kernel(
    qw_ptr,  # [N, K / 2] uint8 in reference.INT4_NIBBLE_COLUMNS order
    scales_ptr,  # [N, K / GROUP_SIZE]
    zeros_ptr,  # [N, K / GROUP_SIZE] uint8 (unused unless HAS_ZEROS; else zero point 8)
    out_ptr,  # [N, K]
    N,
    K,
    stride_qn,
    stride_sn,
    stride_zn,
    stride_on,
    GROUP_SIZE: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr,  # bytes per row tile (2 * BLOCK_J output columns)
):
    rn = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BN]
    rj = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)  # [BJ] byte columns
    mask = (rn[:, None] < N) & (rj[None, :] < K // 2)
    packed = tl.load(qw_ptr + rn[:, None] * stride_qn + rj[None, :], mask=mask, other=0)  # [BN, BJ] uint8
    group = (2 * rj) // GROUP_SIZE  # [BJ]: columns 2j and 2j + 1 share a group (GROUP_SIZE is even)
    scale = tl.load(scales_ptr + rn[:, None] * stride_sn + group[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        zero = tl.load(zeros_ptr + rn[:, None] * stride_zn + group[None, :], mask=mask, other=0).to(tl.float32)
    else:
        zero = tl.full((BLOCK_N, BLOCK_J), 8.0, dtype=tl.float32)
    low = ((packed & 0x0F).to(tl.float32) - zero) * scale  # [BN, BJ] low nibbles
    high = ((packed >> 4).to(tl.float32) - zero) * scale  # [BN, BJ] high nibbles
    # into column order, [BN, 2 * BJ], for one contiguous store per row: byte b = 2 bh + bl of a word holds columns
    # 4 bl + bh (low nibble) and 4 bl + 2 + bh (high nibble) (reference.INT4_NIBBLE_COLUMNS)
    w = tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_J // 4, 2, 2, 2))  # [BN, word, bh, bl, nibble]
    w = tl.reshape(tl.permute(w, (0, 1, 3, 4, 2)), (BLOCK_N, 2 * BLOCK_J)).to(out_ptr.dtype.element_ty)
    rk = tl.program_id(1) * 2 * BLOCK_J + tl.arange(0, 2 * BLOCK_J)  # [2 BJ] output columns
    out_mask = (rn[:, None] < N) & (rk[None, :] < K)
    tl.store(out_ptr + rn[:, None] * stride_on + rk[None, :], w, mask=out_mask)


def dequantize_8bit(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """qweight [N, K] int8 or float8_e4m3fn, scale [N] float32 -> [N, K] dtype = qweight * scale[:, None]."""
    if qweight.dim() != 2 or qweight.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"dequantize_8bit: qweight {tuple(qweight.shape)} {qweight.dtype}: expected [N, K] int8 or "
                         "float8_e4m3fn")
    n, k = qweight.shape
    if scale.shape != (n,) or scale.dtype != torch.float32:
        raise ValueError(f"dequantize_8bit: scale {tuple(scale.shape)} {scale.dtype}: expected [{n}] float32")
    q = qweight if qweight.stride(-1) == 1 else qweight.contiguous()
    w_fp8 = q.dtype == torch.float8_e4m3fn
    if w_fp8:
        q = q.view(torch.int8)
    out = torch.empty((n, k), dtype=dtype, device=q.device)
    block_n, block_k = 16, 256
    if n and k:
        _dequant8_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
            q, scale, out, n, k, q.stride(0), out.stride(0), W_FP8=w_fp8, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=4)
    return out


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """qweight [N, K / 2] uint8, scales / zeros [N, K / group_size] -> [N, K] dtype = (code - zero) * scale."""
    n, half_k = qweight.shape
    k = 2 * half_k
    if qweight.dtype != torch.uint8 or group_size % 2 or k % group_size:
        raise ValueError(f"dequantize_int4: qweight {tuple(qweight.shape)} {qweight.dtype}, group_size={group_size}: "
                         "expected uint8 [N, K / 2] with an even group_size dividing K")
    if scales.shape != (n, k // group_size) or (zeros is not None and zeros.shape != scales.shape):
        raise ValueError(f"dequantize_int4: scales {tuple(scales.shape)} / zeros "
                         f"{None if zeros is None else tuple(zeros.shape)}: expected [{n}, {k // group_size}]")
    qw = qweight.contiguous()
    sc = scales.contiguous()
    zr = None if zeros is None else zeros.contiguous()
    out = torch.empty((n, k), dtype=dtype, device=qw.device)
    block_n, block_j = 16, 128
    if n and k:
        _dequant4_kernel[(triton.cdiv(n, block_n), triton.cdiv(half_k, block_j))](
            qw, sc, zr if zr is not None else qw, out, n, k, qw.stride(0), sc.stride(0),
            zr.stride(0) if zr is not None else 0, out.stride(0), GROUP_SIZE=group_size, HAS_ZEROS=zr is not None,
            BLOCK_N=block_n, BLOCK_J=block_j, num_warps=4)
    return out
