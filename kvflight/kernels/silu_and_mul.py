"""Triton SiLU-and-mul (SwiGLU activation): a drop-in for reference.silu_and_mul."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvflight.kernels import pdl
from kvflight.kernels.pdl import pdl_trigger, pdl_wait


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [T, 2 * I] = [gate | up]
    out_ptr,  # [T, I]
    x_stride,
    out_stride,
    inter,  # I
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (kernels/pdl.py)
):
    pdl_trigger(PDL)
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)  # token
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] columns of the intermediate dim
    mask = cols < inter
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)  # [BLOCK] input dtype
    up = tl.load(x_ptr + row * x_stride + inter + cols, mask=mask, other=0.0)
    gf = gate.to(tl.float32)
    silu = (gf / (1.0 + tl.exp(-gf))).to(gate.dtype)  # F.silu: float32 math, rounded to the input dtype
    out = silu * up
    tl.store(out_ptr + row * out_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up. x [..., 2 * intermediate] -> [..., intermediate] (x's dtype)."""
    width = x.shape[-1]
    if width % 2:
        raise ValueError(f"silu_and_mul: last dim {width} is odd, expected [..., 2 * intermediate]")
    inter = width // 2
    x2 = x.reshape(-1, width)  # [T, 2I]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    num_rows = x2.shape[0]
    out = torch.empty((num_rows, inter), dtype=x.dtype, device=x.device)  # [T, I]
    if num_rows > 0 and inter > 0:
        block = min(triton.next_power_of_2(inter), 1024)
        grid = (num_rows, triton.cdiv(inter, block))
        _silu_and_mul_kernel[grid](x2, out, x2.stride(0), out.stride(0), inter,
                                   BLOCK=block, num_warps=max(1, min(8, block // 128)),
                                   **pdl.launch_kwargs(x2, "silu_and_mul"))
    return out.view(*x.shape[:-1], inter)
