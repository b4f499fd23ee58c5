"""Triton fused residual-add + RMSNorm (float32 statistics): a drop-in for reference.rms_norm."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvflight.kernels import pdl
from kvflight.kernels.pdl import pdl_trigger, pdl_wait


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [T, hidden]
    res_ptr,  # [T, hidden] (unused unless HAS_RESIDUAL)
    w_ptr,  # [hidden]
    out_ptr,  # [T, hidden]
    new_res_ptr,  # [T, hidden] (unused unless HAS_RESIDUAL)
    x_stride,
    res_stride,
    out_stride,
    new_res_stride,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,  # next power of two >= hidden
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (kernels/pdl.py)
):
    pdl_trigger(PDL)
    row = tl.program_id(0).to(tl.int64)  # one program per token row
    cols = tl.arange(0, BLOCK)  # [BLOCK]
    mask = cols < hidden
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)  # [BLOCK] weight dtype (a weight: read before the wait)
    pdl_wait(PDL)
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)  # [BLOCK] input dtype
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        x = x + r  # added in the input dtype, as the reference does
        tl.store(new_res_ptr + row * new_res_stride + cols, x.to(new_res_ptr.dtype.element_ty), mask=mask)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, axis=0) / hidden  # scalar float32 (masked lanes are 0)
    normed = (xf * tl.rsqrt(variance + eps)).to(x.dtype)  # rounded to the (post-add) input dtype first
    out = w * normed
    tl.store(out_ptr + row * out_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _as_rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """[..., hidden] -> [T, hidden] with unit stride on the last dim (a view when possible)."""
    rows = t.reshape(-1, hidden)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _num_warps(block: int) -> int:
    return max(1, min(16, block // 256))


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim, optional residual add first; same contract as reference.rms_norm.

    x, residual [..., hidden], weight [hidden] -> (out [..., hidden], new_residual [..., hidden])
    new_residual = x + residual (in x's dtype) or x itself when residual is None.
    """
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight shape {tuple(weight.shape)}: expected [{hidden}]")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    sum_dtype = x.dtype if residual is None else torch.result_type(x, residual)
    out_dtype = torch.result_type(weight, torch.empty((), dtype=sum_dtype))
    weight = weight.contiguous()
    x2 = _as_rows(x, hidden)  # [T, hidden]
    num_rows = x2.shape[0]
    out = torch.empty((num_rows, hidden), dtype=out_dtype, device=x.device)  # [T, hidden]
    if residual is None:
        res2 = x2
        new_res = x2
        new_residual = x
    else:
        res2 = _as_rows(residual, hidden)  # [T, hidden]
        new_res = torch.empty((num_rows, hidden), dtype=sum_dtype, device=x.device)  # [T, hidden]
        new_residual = new_res.view(x.shape)
    if num_rows > 0:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(num_rows,)](
            x2, res2, weight, out, new_res,
            x2.stride(0), res2.stride(0), out.stride(0), new_res.stride(0),
            hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_num_warps(block),
            **pdl.launch_kwargs(x2, "rms_norm"),
        )
    return out.view(x.shape), new_residual
