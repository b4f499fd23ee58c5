"""Triton dynamic per-token quantization (int8 or float8 e4m3) for the W8A8 matmuls: one kernel instead of the
~7 elementwise torch ops of reference.per_token_quant, whose results it reproduces."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _per_token_quant_kernel(
    x_ptr,  # [M, K] float32 / float16 / bfloat16
    q_ptr,  # [M, K] int8 or float8e4nv
    scale_ptr,  # [M] float32
    K,
    stride_x,
    stride_q,
    QMAX: tl.constexpr,  # 127.0 (int8) or 448.0 (e4m3)
    IS_INT8: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # one program per token row
    cols = tl.arange(0, BLOCK)  # [BLOCK]
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_ptr + row * stride_x + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0), 1e-10) / QMAX  # scalar float32
    tl.store(scale_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        mask = k0 + cols < K
        x = tl.load(x_ptr + row * stride_x + k0 + cols, mask=mask, other=0.0).to(tl.float32)
        scaled = x / scale
        if IS_INT8:
            rounded = tl.where(scaled >= 0, tl.floor(scaled + 0.5), tl.ceil(scaled - 0.5))
            q = tl.minimum(tl.maximum(rounded, -127.0), 127.0).to(tl.int8)
        else:
            q = tl.minimum(tl.maximum(scaled, -QMAX), QMAX).to(q_ptr.dtype.element_ty)
        tl.store(q_ptr + row * stride_q + k0 + cols, q, mask=mask)


def per_token_quant(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] in dtype (torch.int8 / torch.float8_e4m3fn), scale [M, 1] float32)."""
    if dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"per_token_quant: dtype {dtype}: supported: torch.int8, torch.float8_e4m3fn")
    if x.dim() != 2:
        raise ValueError(f"per_token_quant: x {tuple(x.shape)}: expected [M, K]")
    x2 = x if x.stride(-1) == 1 else x.contiguous()
    M, K = x2.shape
    q = torch.empty((M, K), dtype=dtype, device=x.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=x.device)
    if M > 0 and K > 0:
        block = min(triton.next_power_of_2(K), 2048)
        qmax = 127.0 if dtype == torch.int8 else float(torch.finfo(dtype).max)
        _per_token_quant_kernel[(M,)](x2, q, scale, K, x2.stride(0), q.stride(0), QMAX=qmax,
                                      IS_INT8=dtype == torch.int8, BLOCK=block,
                                      num_warps=max(1, min(8, block // 256)))
    return q, scale
