"""Triton W8A16 matmul: y = x (qweight * scale)^T with 8-bit weights (int8, or float8 e4m3 for fp8's small batches)
per output channel, dequantized in the inner loop.

A drop-in for reference.w8a16_matmul. Activations float16 / bfloat16 (float32 accepted for tests), float32
accumulation; the per-channel scale is applied once to the accumulator. For small M (decode) the K loop is split
over SPLIT_K programs whose partial sums the last one to finish a tile adds up (split_k_store), so that a 1-token
matmul still fills the GPU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kvflight.kernels.device import num_sms


@triton.jit
def split_k_arrive(counter_ptr, tile):
    """Count a split's arrival at its tile, after the split stored its partial sums; -> the splits that arrived before
    it (SPLIT_K - 1: this is the last one, whose threads then see every split's partial sums)."""
    tl.debug_barrier()  # every thread's partial sums are stored before the arrival is counted
    return tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")


@triton.jit
def split_k_sum(partial_ptr, part_offs, plane, mask, SPLIT_K: tl.constexpr):
    """In the last split to arrive: the planes' partial sums added in split order (the same sum whatever the arrival
    order)."""
    total = tl.zeros(part_offs.shape, dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        total += tl.load(partial_ptr + s * plane + part_offs, mask=mask, other=0.0, volatile=True)
    return total


@triton.jit
def split_k_rearm(counter_ptr, tile):
    """The last split re-arms its tile's counter for the next call."""
    tl.atomic_xchg(counter_ptr + tile, 0, sem="relaxed", scope="gpu")


@triton.jit
def split_k_store(acc, out_ptr, out_offs, mask, partial_ptr, part_offs, plane, counter_ptr, tile, pid_k,
                  SPLIT_K: tl.constexpr):
    """Write a program's float32 result `acc` (any shape; out_offs / part_offs / mask alike) to the output.

    SPLIT_K == 1: cast and store. Else each split stores its partial sums in its plane of the scratch; the split that
    arrives last at the tile (an arrival counter, acquire-release: split_k_arrive) adds the planes in split order
    (split_k_sum), stores the output and re-arms the counter for the next call (split_k_rearm). One launch, where a
    zero-filled float32 output added into with atomics needs a fill kernel before and a cast kernel after.
    """
    if SPLIT_K == 1:
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(partial_ptr + pid_k * plane + part_offs, acc, mask=mask)
        if split_k_arrive(counter_ptr, tile) == SPLIT_K - 1:
            tl.debug_barrier()
            total = split_k_sum(partial_ptr, part_offs, plane, mask, SPLIT_K)
            tl.store(out_ptr + out_offs, total.to(out_ptr.dtype.element_ty), mask=mask)
            split_k_rearm(counter_ptr, tile)


@triton.jit
def _w8a16_matmul_kernel(
    x_ptr,  # [M, K] activations
    w_ptr,  # [N, K] int8 or float8e4nv
    scale_ptr,  # [N] float32
    bias_ptr,  # [N] (unused unless HAS_BIAS)
    out_ptr,  # [M, N] x dtype
    partial_ptr,  # [SPLIT_K, M, N] float32 scratch (SPLIT_K > 1)
    counter_ptr,  # [tiles] int32 arrival counters, zero between calls (SPLIT_K > 1)
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    W_FP8: tl.constexpr,  # w_ptr holds float8 e4m3 codes (passed as int8 bytes)
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 activations (no tf32), else "tf32" (ignored for 16-bit)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BM] rows of x / out
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BN] output channels
    rk = tl.arange(0, BLOCK_K)  # [BK]
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_per_split = tl.cdiv(K, BLOCK_K * SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        kk = k0 + rk  # [BK]
        k_mask = kk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)  # [BM, BK]
        w = tl.load(w_ptr + rn[None, :] * stride_wn + kk[:, None], mask=n_mask[None, :] & k_mask[:, None],
                    other=0)  # [BK, BN] int8 (fp8 codes travel as their bytes: a masked 0 byte is +0.0)
        if W_FP8:
            w = w.to(tl.float8e4nv, bitcast=True)
        acc += tl.dot(x, w.to(x.dtype), input_precision=DOT_PRECISION)
    scale = tl.load(scale_ptr + rn, mask=n_mask, other=0.0)  # [BN] float32
    acc = acc * scale[None, :]
    if HAS_BIAS:
        if pid_k == 0:
            bias = tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
            acc = acc + bias[None, :]
    split_k_store(acc, out_ptr, rm[:, None] * stride_om + rn[None, :], m_mask[:, None] & n_mask[None, :],
                  partial_ptr, rm[:, None] * N + rn[None, :], M * N, counter_ptr, pid_m * tl.num_programs(1) + pid_n,
                  pid_k, SPLIT_K)


def _num_programs_target(device: torch.device) -> int:
    """About two programs per SM on a GPU; a small fixed number under the interpreter."""
    if device.type == "cuda":
        return 2 * num_sms(device)
    return 4


class KernelConfig(NamedTuple):
    """Tile sizes and launch shape of the weight-only matmul kernels (W8A16, W4A16)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3


def choose_blocks(M: int, N: int, K: int, device: torch.device, max_block_k: int = 128) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K) for a problem shape; BLOCK_K <= max_block_k (a power of two >= 16).

    Small M (decode): thin row tiles, narrow column tiles and a split K loop so the grid covers the GPU.
    Large M (prefill): square-ish tiles, no split.
    """
    block_k = min(128, max(16, max_block_k))
    if M <= 16:
        block_m, block_n = 16, 32 if N <= 8192 else 64
    elif M <= 64:
        block_m, block_n = 32, 64
    else:
        block_m, block_n = (64, 128) if M <= 256 else (128, 128)
        block_k = min(block_k, 64)
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    split_k = 1
    if M <= 64:
        target = _num_programs_target(device)
        num_k_tiles = triton.cdiv(K, block_k)
        while tiles * split_k * 2 <= target and split_k * 2 <= num_k_tiles and split_k < 16:
            split_k *= 2
    return block_m, block_n, block_k, split_k


def choose_config(M: int, N: int, K: int, device: torch.device, max_block_k: int = 128,
                  int4: bool = False) -> KernelConfig:
    """The launch for one call. Decode-sized calls (M <= 16) on model-sized weights take the tiles a sweep on an
    H100 found fastest (benchmarks/wo_matmul_sweep_gpu.py, timed as CUDA graphs of one weight, so the qkv and o
    weights partly sat in L2). Timed with the weights rotated past L2 (benchmarks/wo_gemv_sweep_gpu.py), int8 at one
    row reads qkv / o / gate_up / down at 66 / 48 / 86 / 74% of copy bandwidth."""
    if M <= 16 and N >= 2048 and K >= 2048:
        if int4:  # unpacking dominates: wide column tiles and an 8-way split keep every SM busy
            block_n, block_k, split = (128, 64, 8) if N >= 16384 else (128, 128, 8)
            return KernelConfig(16, block_n, min(block_k, max_block_k), split, 4, 3)
        if K >= 8192:  # down: long rows, few columns
            return KernelConfig(16, 32, 256, 4, 4, 3)
        if N >= 16384:  # gate_up: enough column tiles without a split
            return KernelConfig(16, 32, 128, 1, 4, 3)
        return KernelConfig(16, 64 if N > 4096 else 32, 256, 1, 4, 4 if N > 4096 else 3)
    block_m, block_n, block_k, split = choose_blocks(M, N, K, device, max_block_k)
    return KernelConfig(block_m, block_n, block_k, split, 4 if block_m * block_n <= 64 * 64 else 8, 3)


_COUNTERS: dict[tuple[str, int], torch.Tensor] = {}  # (device, tiles) -> arrival counters, zero at rest


def split_k_buffers(M: int, N: int, split: int, num_tiles: int, x: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [M, N] x's dtype, partial [split, M, N] float32 scratch, arrival counters [num_tiles] int32) for a
    split_k_store launch; without a split the scratch and counters are unused placeholders. The counters are shared by
    the calls on one device (one after the other on its stream): the last split of each tile leaves its counter 0."""
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if split == 1:
        return out, out, out
    key = (str(x.device), num_tiles)
    counters = _COUNTERS.get(key)
    if counters is None:
        counters = _COUNTERS[key] = torch.zeros(num_tiles, dtype=torch.int32, device=x.device)
    return out, torch.empty((split, M, N), dtype=torch.float32, device=x.device), counters


def w8a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None = None, split_k: int | None = None,
                 config: KernelConfig | None = None) -> torch.Tensor:
    """x [M, K] (or [..., K]), qweight [N, K] int8 or float8_e4m3fn, scale [N] float32, bias [N] -> [M, N] in x's
    dtype. config: tiles and launch shape (default: choose_config's heuristic; split_k overrides its split)."""
    K = x.shape[-1]
    N = qweight.shape[0]
    if qweight.dtype not in (torch.int8, torch.float8_e4m3fn) or qweight.dim() != 2 or qweight.shape[1] != K:
        raise ValueError(f"w8a16_matmul: qweight {tuple(qweight.shape)} {qweight.dtype}: expected [N, {K}] int8 or "
                         "float8_e4m3fn")
    if scale.shape != (N,) or scale.dtype != torch.float32:
        raise ValueError(f"w8a16_matmul: scale {tuple(scale.shape)} {scale.dtype}: expected [{N}] float32")
    x2 = x.reshape(-1, K)  # [M, K]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = qweight if qweight.stride(-1) == 1 else qweight.contiguous()
    w_fp8 = w.dtype == torch.float8_e4m3fn
    if w_fp8:
        w = w.view(torch.int8)
    M = x2.shape[0]
    cfg = config or choose_config(M, N, K, x2.device)
    split = cfg.split_k if split_k is None else split_k
    grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(N, cfg.block_n), split)
    out, partial, counters = split_k_buffers(M, N, split, grid[0] * grid[1], x2)
    if M > 0 and N > 0:
        _w8a16_matmul_kernel[grid](
            x2, w, scale, bias if bias is not None else scale, out, partial, counters, M, N, K,
            x2.stride(0), w.stride(0), out.stride(0),
            HAS_BIAS=bias is not None, SPLIT_K=split, W_FP8=w_fp8,
            DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32",
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.view(*x.shape[:-1], N)
