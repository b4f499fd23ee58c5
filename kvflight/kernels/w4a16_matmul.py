"""Triton W4A16 matmul: y = x W^T with W in 4-bit codes, group-wise scales and zero points, dequantized in the loop.

A drop-in for reference.w4a16_matmul. Packing (reference.INT4_NIBBLE_COLUMNS): byte j = 4w + b of a row holds the
code of column 8w + (0, 4, 1, 5)[b] in its low nibble and of that column + 2 in its high nibble. Instead of
reordering nibbles inside the kernel, x is read in the matching column order: the low nibbles multiply one gather
of x's columns, the high nibbles another, two dots into one float32 accumulator. A K tile never straddles a
quantization group (BLOCK_K divides group_size), so each tile has one scale and one zero per output channel,
applied to the tile's partial sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvflight.kernels.w8a16_matmul import KernelConfig, choose_config, split_k_buffers, split_k_store


@triton.jit
def _w4a16_matmul_kernel(
    x_ptr,  # [M, K] activations
    qw_ptr,  # [N, K / 2] uint8, two codes per byte
    scales_ptr,  # [N, K / GROUP_SIZE] float16 / float32
    zeros_ptr,  # [N, K / GROUP_SIZE] uint8 codes (unused unless HAS_ZEROS; else zero point 8)
    bias_ptr,  # [N] (unused unless HAS_BIAS)
    out_ptr,  # [M, N] x dtype
    partial_ptr,  # [SPLIT_K, M, N] float32 scratch (SPLIT_K > 1)
    counter_ptr,  # [tiles] int32 arrival counters, zero between calls (SPLIT_K > 1)
    M,
    N,
    K,
    stride_xm,
    stride_qn,
    stride_sn,
    stride_zn,
    stride_om,
    GROUP_SIZE: tl.constexpr,
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # divides GROUP_SIZE; K is a multiple of GROUP_SIZE
):
    HALF_K: tl.constexpr = BLOCK_K // 2
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BM]
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BN]
    rj = tl.arange(0, HALF_K)  # [BK / 2] byte index inside the tile
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_per_split = tl.cdiv(K, BLOCK_K * SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        jj = k0 // 2 + rj  # [BK / 2] byte columns
        j_mask = jj < K // 2
        x_rows = x_ptr + rm[:, None] * stride_xm
        xm = m_mask[:, None] & j_mask[None, :]
        # byte j = 4w + b of a row holds column 8w + (0, 4, 1, 5)[b] in its low nibble and that + 2 in its high one
        # (reference.INT4_NIBBLE_COLUMNS)
        col_low = 8 * (jj // 4) + (jj & 1) * 4 + ((jj >> 1) & 1)  # [BK / 2]
        x_even = tl.load(x_rows + col_low[None, :], mask=xm, other=0.0)  # [BM, BK / 2] the low nibbles' columns
        x_odd = tl.load(x_rows + col_low[None, :] + 2, mask=xm, other=0.0)  # [BM, BK / 2] the high nibbles' columns
        packed = tl.load(qw_ptr + rn[None, :] * stride_qn + jj[:, None], mask=n_mask[None, :] & j_mask[:, None],
                         other=0)  # [BK / 2, BN] uint8
        group = tl.minimum(k0, K - 1) // GROUP_SIZE  # a split's tail past K reads the last group, times x = 0
        scale = tl.load(scales_ptr + rn * stride_sn + group, mask=n_mask, other=0.0).to(tl.float32)  # [BN]
        if HAS_ZEROS:
            zero = tl.load(zeros_ptr + rn * stride_zn + group, mask=n_mask, other=0).to(tl.float32)  # [BN]
        else:
            zero = tl.full((BLOCK_N,), 8.0, dtype=tl.float32)
        low = (packed & 0x0F).to(tl.float32) - zero[None, :]  # [BK / 2, BN] in -15..15: exact in 16-bit floats
        high = (packed >> 4).to(tl.float32) - zero[None, :]
        part = tl.dot(x_even, low.to(x_even.dtype), input_precision=DOT_PRECISION)
        part += tl.dot(x_odd, high.to(x_odd.dtype), input_precision=DOT_PRECISION)  # [BM, BN]
        acc += part * scale[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            bias = tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
            acc = acc + bias[None, :]
    split_k_store(acc, out_ptr, rm[:, None] * stride_om + rn[None, :], m_mask[:, None] & n_mask[None, :],
                  partial_ptr, rm[:, None] * N + rn[None, :], M * N, counter_ptr, pid_m * tl.num_programs(1) + pid_n,
                  pid_k, SPLIT_K)


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 group_size: int, bias: torch.Tensor | None = None, split_k: int | None = None,
                 config: KernelConfig | None = None) -> torch.Tensor:
    """x [M, K] (or [..., K]), qweight [N, K / 2] uint8, scales / zeros [N, K / group_size] -> [M, N] x.dtype."""
    K = x.shape[-1]
    N = qweight.shape[0]
    if group_size < 32 or group_size & (group_size - 1) or K % group_size:
        raise ValueError(f"w4a16_matmul: group_size={group_size} must be a power of two >= 32 dividing K={K}")
    if qweight.dtype != torch.uint8 or qweight.shape != (N, K // 2):
        raise ValueError(f"w4a16_matmul: qweight {tuple(qweight.shape)} {qweight.dtype}: expected [N, {K // 2}] "
                         "uint8")
    groups = K // group_size
    if scales.shape != (N, groups):
        raise ValueError(f"w4a16_matmul: scales {tuple(scales.shape)}: expected [{N}, {groups}]")
    if zeros is not None and (zeros.shape != (N, groups) or zeros.dtype != torch.uint8):
        raise ValueError(f"w4a16_matmul: zeros {tuple(zeros.shape)} {zeros.dtype}: expected [{N}, {groups}] uint8")
    x2 = x.reshape(-1, K)  # [M, K]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    qw = qweight if qweight.stride(-1) == 1 else qweight.contiguous()
    sc = scales if scales.stride(-1) == 1 else scales.contiguous()
    zr = None if zeros is None else (zeros if zeros.stride(-1) == 1 else zeros.contiguous())
    M = x2.shape[0]
    cfg = config or choose_config(M, N, K, x2.device, max_block_k=group_size, int4=True)
    if group_size % cfg.block_k:
        raise ValueError(f"w4a16_matmul: block_k={cfg.block_k} must divide group_size={group_size}")
    split = cfg.split_k if split_k is None else split_k
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(N, cfg.block_n), split)
    out, partial, counters = split_k_buffers(M, N, split, grid[0] * grid[1], x2)
    if M > 0 and N > 0:
        _w4a16_matmul_kernel[grid](
            x2, qw, sc, zr if zr is not None else qw, bias if bias is not None else sc, out, partial, counters, M, N,
            K,
            x2.stride(0), qw.stride(0), sc.stride(0), zr.stride(0) if zr is not None else 0, out.stride(0),
            GROUP_SIZE=group_size, HAS_ZEROS=zr is not None, HAS_BIAS=bias is not None, SPLIT_K=split,
            DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.view(*x.shape[:-1], N)
