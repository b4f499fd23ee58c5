"""Quantize / dequantize helpers for weights (int8 per channel, int4 group-wise, float8 e4m3) and the int4 packing.

Plain torch, any device. Every quantizer returns the tensors a checkpoint stores; every dequantizer returns the
float32 weight they stand for, so `dequantize(quantize(w))` is the round trip the tests bound. Layouts (the same as
the Triton kernels and kernels/reference.py read):
    int8 per channel   qweight [N, K] int8, scale [N] float32                 W = q * scale[:, None]
    int4 group-wise    qweight [N, K / 2] uint8 (two codes per byte, nibbles in reference.INT4_NIBBLE_COLUMNS order),
                       scales [N, K / G] float16, zeros [N, K / G] uint8 or None (symmetric: zero point 8)
                                                                              W = (code - zero) * scale (per group)
    float8 e4m3        qweight [N, K] float8_e4m3fn, scale [N] float32        W = q * scale[:, None]
"""

from __future__ import annotations

import torch

from kvflight.kernels.reference import INT4_NIBBLE_COLUMNS, round_half_away, unpack_int4

INT8_MAX = 127
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448.0
INT4_GROUP_SIZES: tuple[int, ...] = (128, 64, 32)  # tried in order by effective_group_size
_MIN_SCALE = 1e-8  # an all-zero row / group still gets a finite, non-zero scale (float32 scales)
_MIN_SCALE_FP16 = 2.0 ** -20  # the same for the float16 int4 scales (exactly representable, not flushed to 0)


def effective_group_size(in_features: int, group_size: int) -> int:
    """The int4 group size used for a layer with `in_features` inputs: the largest of group_size, group_size / 2,
    group_size / 4 ... (>= 32) that divides in_features.

    SmolLM2's hidden size 576 = 4.5 x 128 gets groups of 64; Llama's 4096 / 14336 keep 128.
    """
    if group_size < 32 or group_size & (group_size - 1):
        raise ValueError(f"group_size={group_size}: must be a power of two >= 32 (e.g. 128)")
    size = group_size
    while size >= 32:
        if in_features % size == 0:
            return size
        size //= 2
    raise ValueError(f"in_features={in_features} is not a multiple of 32: int4 group-wise quantization needs "
                     "groups of 32, 64 or 128 columns; keep this model in int8 or fp8")


# ---- int8 per output channel ----------------------------------------------------------------------------------
def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (qweight [N, K] int8, scale [N] float32), symmetric, scale = max|w_row| / 127."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / INT8_MAX).clamp(min=_MIN_SCALE)  # [N]
    q = round_half_away(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return qweight.float() * scale.float()[:, None]  # [N, K]


# ---- float8 e4m3 --------------------------------------------------------------------------------------------
def quantize_fp8(weight: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (qweight [N, K] float8_e4m3fn, scale [N] float32); per tensor: one scale repeated N times."""
    w = weight.float()
    if per_channel:
        amax = w.abs().amax(dim=1)  # [N]
    else:
        amax = w.abs().amax().expand(w.shape[0])
    scale = (amax / FP8_MAX).clamp(min=_MIN_SCALE).contiguous()  # [N]
    q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_fp8(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return qweight.float() * scale.float()[:, None]  # [N, K]


# ---- int4 group-wise ------------------------------------------------------------------------------------------
def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] integers in 0..15 -> [N, K / 2] uint8 in the in-memory layout (reference.INT4_NIBBLE_COLUMNS:
    nibble p of each 32-bit word is column 8w + INT4_NIBBLE_COLUMNS[p])."""
    if codes.shape[-1] % 8:
        raise ValueError(f"pack_int4: K={codes.shape[-1]} must be a multiple of 8")
    n = codes.shape[0]
    nibbles = codes.to(torch.uint8).reshape(n, -1, 8)[..., list(INT4_NIBBLE_COLUMNS)]  # [N, K / 8, 8] nibble order
    c = nibbles.reshape(n, -1, 2)  # [N, K / 2, 2]: (low, high) nibble of each byte
    return c[..., 0] | (c[..., 1] << 4)


def int4_to_file_layout(packed: torch.Tensor) -> torch.Tensor:
    """In-memory qweight [N, K / 2] uint8 -> the checkpoint layout: column 2j in the low nibble of byte j."""
    c = unpack_int4(packed).reshape(packed.shape[0], -1, 2)  # [N, K / 2, 2] columns 2j, 2j + 1
    return c[..., 0] | (c[..., 1] << 4)


def int4_from_file_layout(packed: torch.Tensor) -> torch.Tensor:
    """Checkpoint qweight [N, K / 2] uint8 (column 2j in the low nibble of byte j) -> the in-memory layout."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)  # [N, K]
    return pack_int4(codes)


def _int4_codes(weight: torch.Tensor, group_size: int, zero_point: bool,
                clip_ratio: torch.Tensor | float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes [N, groups, G] float in 0..15, scales [N, groups, 1] float16, zeros [N, groups, 1] float or None)."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"int4 quantization: K={k} is not a multiple of group_size={group_size}")
    w = weight.float().reshape(n, k // group_size, group_size)  # [N, groups, G]
    ratio: torch.Tensor | float = 1.0
    if clip_ratio is not None:
        ratio = clip_ratio if isinstance(clip_ratio, float) else clip_ratio.float()[..., None]  # [N, groups, 1]
    if zero_point:
        w_max = w.amax(dim=-1, keepdim=True).clamp(min=0) * ratio  # [N, groups, 1]
        w_min = w.amin(dim=-1, keepdim=True).clamp(max=0) * ratio
        scales = ((w_max - w_min) / 15).clamp(min=_MIN_SCALE_FP16).half()
        s = scales.float()
        zeros: torch.Tensor | None = round_half_away(-w_min / s).clamp(0, 15)  # [N, groups, 1]
        codes = (round_half_away(w / s) + zeros).clamp(0, 15)
    else:
        scales = (w.abs().amax(dim=-1, keepdim=True) * ratio / 7).clamp(min=_MIN_SCALE_FP16).half()
        zeros = None
        codes = (round_half_away(w / scales.float()) + 8).clamp(0, 15)
    return codes, scales, zeros


def quantize_int4_groupwise(weight: torch.Tensor, group_size: int, zero_point: bool = True,
                            clip_ratio: torch.Tensor | float | None = None,
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """weight [N, K] -> (qweight [N, K / 2] uint8, scales [N, K / G] float16, zeros [N, K / G] uint8 or None).

    Asymmetric (zero_point=True): each group's [min, max] (widened to contain 0) maps onto codes 0..15.
    Symmetric: codes -8..7 stored with a zero point of 8, scale = max|w| / 7.
    clip_ratio [N, K / G] (or a float) shrinks each group's range before the scales are computed (AWQ clipping).
    """
    n, k = weight.shape
    codes, scales, zeros = _int4_codes(weight, group_size, zero_point, clip_ratio)
    zeros_out = None if zeros is None else zeros.squeeze(-1).to(torch.uint8)
    return pack_int4(codes.reshape(n, k)), scales.squeeze(-1), zeros_out


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                    group_size: int) -> torch.Tensor:
    codes = unpack_int4(qweight).float()  # [N, K]
    n, k = codes.shape
    zero = zeros.float()[..., None] if zeros is not None else 8.0
    w = (codes.reshape(n, k // group_size, group_size) - zero) * scales.float()[..., None]
    return w.reshape(n, k)


def fake_quantize_int4(weight: torch.Tensor, group_size: int, zero_point: bool = True,
                       clip_ratio: torch.Tensor | float | None = None) -> torch.Tensor:
    """dequantize(quantize(weight)) as float32 [N, K] without packing: what the model computes with (searches)."""
    codes, scales, zeros = _int4_codes(weight, group_size, zero_point, clip_ratio)
    w = (codes - (zeros if zeros is not None else 8.0)) * scales.float()
    return w.reshape(weight.shape)
