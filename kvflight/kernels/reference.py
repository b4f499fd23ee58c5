"""Plain-torch reference ops (KV write, paged attention, RMSNorm, RoPE, SiLU-and-mul): the oracles for every kernel.

Slow and obviously correct. KV cache layout, one tensor per layer:
    kv_cache [2, num_blocks, tokens_per_block, num_kv_heads, head_dim]   (index 0 = K, 1 = V)
A token's slot is block_id * tokens_per_block + offset_in_block.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def check_kv_write_shapes(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> tuple[int, int]:
    """Validate a K/V cache write (shared by every write_kv_cache backend); returns (num_kv_heads, head_dim)."""
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"kv_cache shape {tuple(kv_cache.shape)}: expected "
                         "[2, num_blocks, tokens_per_block, num_kv_heads, head_dim]")
    num_kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
    if k.shape != v.shape or k.shape[1:] != (num_kv_heads, head_dim):
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match the cache's "
                         f"[*, {num_kv_heads}, {head_dim}]")
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping shape {tuple(slot_mapping.shape)}: expected [{k.shape[0]}]")
    return num_kv_heads, head_dim


# ---- quantized KV cache (kv_cache_dtype int8 / fp8) ----------------------------------------------------------------
KV_QMAX: dict[str, float] = {"fp8": 448.0, "int8": 127.0}  # largest code magnitude


def kv_quant_name(dtype: torch.dtype) -> str | None:
    """'int8' / 'fp8' for a quantized cache dtype (int8 / float8_e4m3fn), None for a float one."""
    if dtype == torch.int8:
        return "int8"
    if dtype == torch.float8_e4m3fn:
        return "fp8"
    return None


def check_kv_scales(kv_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                    num_kv_heads: int) -> str | None:
    """Validate the K / V scales a Triton kernel reads a cache with (shared by the KV writes and paged attention):
    a quantized cache needs both, float32 [num_kv_heads] or [1] alike on the cache's device; a float cache none.
    Returns kv_quant_name(kv_cache.dtype)."""
    quant = kv_quant_name(kv_cache.dtype)
    if quant is None and k_scale is None and v_scale is None:
        return None
    if quant is None or k_scale is None or v_scale is None:
        raise ValueError(f"kv_cache {kv_cache.dtype}: a quantized cache (int8 / float8_e4m3fn) needs k_scale and "
                         "v_scale, and scales need a quantized cache")
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if t.dtype != torch.float32 or t.numel() not in (1, num_kv_heads) or t.numel() != k_scale.numel() \
                or t.device != kv_cache.device \
                or (t.numel() > 1 and (t.dim() != 1 or t.stride(0) != k_scale.stride(0))):
            raise ValueError(f"{name} {tuple(t.shape)} {t.dtype} on {t.device}: expected float32 [num_kv_heads] "
                             f"or [1] on {kv_cache.device}")
    return quant


def _per_head(scale: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A scale (scalar, [1] or [num_kv_heads]) shaped to broadcast over x [..., num_kv_heads, head_dim]."""
    s = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(-1)
    if s.numel() not in (1, x.shape[-2]):
        raise ValueError(f"KV scale of {s.numel()} values for {x.shape[-2]} KV heads: expected 1 or one per head")
    return s[:, None] if s.numel() > 1 else s.reshape(())


def quantize_kv(x: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """x [..., num_kv_heads, head_dim] float -> dtype (int8 / float8_e4m3fn) codes; other dtypes: a plain cast."""
    name = kv_quant_name(dtype)
    if name is None:
        return x.to(dtype)
    y = x.float() / _per_head(scale, x)
    qmax = KV_QMAX[name]
    y = y.clamp(-qmax, qmax)
    if name == "int8":
        y = torch.round(y)  # half to even, as the Triton write
    return y.to(dtype)


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor | float | None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes [..., num_kv_heads, head_dim] -> dtype values (q.float() * scale); float caches (scale None) cast."""
    if scale is None or kv_quant_name(q.dtype) is None:
        return q.to(dtype)
    return (q.float() * _per_head(scale, q)).to(dtype)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                   k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None) -> None:
    """Store each token's K/V at its slot, in place. Tokens with a negative slot (padding) are skipped.

    k, v          [num_tokens, num_kv_heads, head_dim]
    kv_cache      [2, num_blocks, tokens_per_block, num_kv_heads, head_dim]
    slot_mapping  [num_tokens] int32 or int64
    k_scale, v_scale  float32 [num_kv_heads] or [1] (quantized caches: int8 / float8_e4m3fn): stored codes are
                  clamp(round(x / scale), -127, 127) (int8) or clamp(x / scale, -448, 448) in e4m3 (fp8)
    """
    num_kv_heads, head_dim = check_kv_write_shapes(k, v, kv_cache, slot_mapping)
    key_slots = kv_cache[0].view(-1, num_kv_heads, head_dim)  # [num_blocks * tokens_per_block, Hkv, D] (a view)
    value_slots = kv_cache[1].view(-1, num_kv_heads, head_dim)
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    if k_scale is not None or v_scale is not None:
        # byte views: index_copy_ has no float8 kernel on CPU
        key_slots.view(torch.uint8).index_copy_(0, slots, quantize_kv(k[valid], k_scale, kv_cache.dtype)
                                                .view(torch.uint8))
        value_slots.view(torch.uint8).index_copy_(0, slots, quantize_kv(v[valid], v_scale, kv_cache.dtype)
                                                  .view(torch.uint8))
        return
    key_slots.index_copy_(0, slots, k[valid].to(kv_cache.dtype))
    value_slots.index_copy_(0, slots, v[valid].to(kv_cache.dtype))


def gather_kv(kv_cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's first `seq_len` K and V rows, in position order.

    block_ids [>= ceil(seq_len / tokens_per_block)] -> k, v [seq_len, num_kv_heads, head_dim]
    """
    tokens_per_block = kv_cache.shape[2]
    num_blocks = (seq_len + tokens_per_block - 1) // tokens_per_block
    ids = block_ids[:num_blocks].long()
    k = kv_cache[0, ids].reshape(-1, kv_cache.shape[3], kv_cache.shape[4])[:seq_len]
    v = kv_cache[1, ids].reshape(-1, kv_cache.shape[3], kv_cache.shape[4])[:seq_len]
    return k, v


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of L queries that are the LAST L positions of a context of S keys, in float32.

    q [L, Hq, D], k / v [S, Hkv, D] -> out [L, Hq, D] (q's dtype)
    """
    num_queries, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    if num_queries > seq_len:
        raise ValueError(f"{num_queries} queries but only {seq_len} context positions")
    group = num_heads // num_kv_heads
    kf = k.float().repeat_interleave(group, dim=1)  # [S, Hq, D]: query head h reads kv head h // group
    vf = v.float().repeat_interleave(group, dim=1)  # [S, Hq, D]
    scores = torch.einsum("lhd,shd->hls", q.float(), kf) * scale  # [Hq, L, S]
    query_pos = torch.arange(seq_len - num_queries, seq_len, device=q.device)  # [L] absolute positions
    key_pos = torch.arange(seq_len, device=q.device)  # [S]
    allowed = key_pos[None, :] <= query_pos[:, None]  # [L, S]
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # [Hq, L, S] float32
    out = torch.einsum("hls,shd->lhd", probs, vf)  # [L, Hq, D]
    return out.to(q.dtype)


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: Sequence[int],
    seq_lens: Sequence[int],
    scale: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention over the paged cache for a flat batch of sequences (K/V already written).
    A quantized cache (int8 / float8_e4m3fn) is dequantized in the gather: x = code * k_scale / v_scale
    (float32 [num_kv_heads] or [1]).

    q             [num_tokens, num_heads, head_dim]: sequences' new tokens back to back, in batch order
    kv_cache      [2, num_blocks, tokens_per_block, num_kv_heads, head_dim]
    block_tables  [num_seqs, max_blocks_per_seq] int32
    query_lens    num_seqs host ints: new tokens per sequence (sum == num_tokens)
    seq_lens      num_seqs host ints: context length after this step (cached + new)
    Query i of a sequence with L new tokens and context S attends to positions 0 .. S - L + i.
    returns       [num_tokens, num_heads, head_dim] in q's dtype
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[3]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if len(query_lens) != len(seq_lens) or len(query_lens) > block_tables.shape[0]:
        raise ValueError(f"{len(query_lens)} query_lens, {len(seq_lens)} seq_lens and "
                         f"{block_tables.shape[0]} block-table rows must describe the same sequences")
    if sum(query_lens) != num_tokens:
        raise ValueError(f"query_lens sum to {sum(query_lens)} but q has {num_tokens} tokens")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.empty_like(q)  # [num_tokens, Hq, D]
    start = 0
    for i, (query_len, seq_len) in enumerate(zip(query_lens, seq_lens)):
        if query_len == 0:
            continue
        k, v = gather_kv(kv_cache, block_tables[i], seq_len)  # [S, Hkv, D]
        if k_scale is not None or v_scale is not None:
            k, v = dequantize_kv(k, k_scale), dequantize_kv(v, v_scale)  # float32
        out[start:start + query_len] = _attend(q[start:start + query_len], k, v, scale)
        start += query_len
    return out


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_lens: Sequence[int], scale: float | None = None,
) -> torch.Tensor:
    """Causal attention of fresh sequences with no cache (every sequence is all new tokens).

    q [num_tokens, Hq, D], k / v [num_tokens, Hkv, D] -> [num_tokens, Hq, D]
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.empty_like(q)
    start = 0
    for query_len in query_lens:
        end = start + query_len
        out[start:end] = _attend(q[start:end], k[start:end], v[start:end], scale)
        start = end
    return out


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim, statistics in float32 (as HF Llama), optional residual add first.

    x, residual [..., hidden], weight [hidden] -> (out [..., hidden], new_residual [..., hidden])
    new_residual = x + residual (added in x's dtype) or x itself when residual is None.
    """
    if residual is not None:
        x = x + residual
    new_residual = x
    xf = x.float()
    variance = xf.pow(2).mean(dim=-1, keepdim=True)  # [..., 1]
    normed = (xf * torch.rsqrt(variance + eps)).to(x.dtype)
    return weight * normed, new_residual


def rotary_embedding(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
    head_dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style RoPE (rotate the two halves of each head's first rotary_dim dims), out of place, in float32.

    positions      [num_tokens] int64
    q              [num_tokens, num_heads, head_dim] or flattened [num_tokens, num_heads * head_dim]
    k              [num_tokens, num_kv_heads, head_dim] or flattened [num_tokens, num_kv_heads * head_dim]
    cos_sin_cache  [max_position, rotary_dim] float32: cos in the first half, sin in the second
    head_dim       needed for flattened inputs when rotary_dim < head_dim (default: rotary_dim)
    returns        q, k rotated, same shapes and dtypes as given
    """
    rotary_dim = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache[positions].float().chunk(2, dim=-1)  # [T, rotary_dim / 2] each
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, rotary_dim / 2]

    def apply(x: torch.Tensor) -> torch.Tensor:
        x3 = x if x.dim() == 3 else x.view(x.shape[0], -1, head_dim or rotary_dim)  # [T, H, D]
        xf = x3.float()
        x1, x2 = xf[..., :rotary_dim].chunk(2, dim=-1)  # [T, H, rotary_dim / 2]
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, xf[..., rotary_dim:]], dim=-1)
        return rotated.to(x.dtype).reshape(x.shape)

    return apply(q), apply(k)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation: silu(gate) * up. x [..., 2 * intermediate] -> [..., intermediate]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---- weight-only quantized matmuls (oracles for w8a16_matmul.py / w4a16_matmul.py) ------------------------------
# In-memory 4-bit layout (every int4 kernel and oracle; checkpoints keep the plain layout, ops.int4_to_file_layout):
# each little-endian 32-bit word of a row holds 8 columns 8w .. 8w + 7, nibble p (bits 4p .. 4p + 3) being column
# 8w + INT4_NIBBLE_COLUMNS[p]. So (word >> 4j) & 0x000F000F puts columns 8w + 2j, 8w + 2j + 1 in the two 16-bit
# halves, matching the activation pair (x[8w + 2j], x[8w + 2j + 1]) as one 32-bit register holds it.
INT4_NIBBLE_COLUMNS = (0, 2, 4, 6, 1, 3, 5, 7)
INT4_COLUMN_NIBBLES = (0, 4, 1, 5, 2, 6, 3, 7)  # the inverse: column 8w + c sits in nibble INT4_COLUMN_NIBBLES[c]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the input dim, in the in-memory layout above.

    packed [N, K / 2] uint8 -> codes [N, K] uint8 in 0..15
    """
    n = packed.shape[0]
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(n, -1, 8)  # [N, K / 8, 8] nibble order
    return nibbles[..., list(INT4_COLUMN_NIBBLES)].reshape(n, -1)


def w8a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x (qweight * scale)^T (+ bias), weights int8 per output channel, computed in float32.

    x [M, K] (float32 / float16 / bfloat16), qweight [N, K] int8, scale [N] float32, bias [N] -> y [M, N] x.dtype
    """
    weight = qweight.float() * scale.float()[:, None]  # [N, K] float32
    out = x.float() @ weight.t()  # [M, N]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ bias) with W dequantized group-wise from 4-bit codes, computed in float32.

    x [M, K], qweight [N, K / 2] uint8 (unpack_int4 layout), scales [N, K / group_size] (float16 / float32),
    zeros [N, K / group_size] uint8 codes 0..15 or None (symmetric: zero point 8) -> y [M, N] x.dtype
    W[n, k] = (code[n, k] - zero[n, k // group_size]) * scale[n, k // group_size]
    """
    codes = unpack_int4(qweight).float()  # [N, K]
    zero = zeros.float() if zeros is not None else torch.full_like(scales, 8.0, dtype=torch.float32)
    zero = zero.repeat_interleave(group_size, dim=1)  # [N, K]
    scale = scales.float().repeat_interleave(group_size, dim=1)  # [N, K]
    out = x.float() @ ((codes - zero) * scale).t()  # [M, N]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest integer, ties away from zero (the rounding every int8 quantizer here uses)."""
    return torch.where(x >= 0, torch.floor(x + 0.5), torch.ceil(x - 0.5))


def per_token_quant(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-row quantization for W8A8 matmuls.

    x [M, K] -> (q [M, K] in `dtype` (torch.int8 or torch.float8_e4m3fn), scale [M, 1] float32) with
    x ~= q * scale, scale = max|x_row| / qmax (qmax 127 for int8, 448 for e4m3; an all-zero row gets a tiny scale).
    """
    qmax = 127.0 if dtype == torch.int8 else torch.finfo(dtype).max
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-10) / qmax  # [M, 1]
    scaled = xf / scale
    if dtype == torch.int8:
        return round_half_away(scaled).clamp(-127, 127).to(torch.int8), scale
    return scaled.clamp(-qmax, qmax).to(dtype), scale
