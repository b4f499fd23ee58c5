"""Triton paged attention over the KV cache (one launch for mixed prefill / chunk / decode batches, GQA-grouped
query tiles, optional split-K "multi_block_mode" + merge): a drop-in for reference.paged_attention.

Layout (as in reference.py), one cache tensor per layer:
    kv_cache [2, num_blocks, tokens_per_block, num_kv_heads, head_dim]   (index 0 = K, 1 = V)

How the work is cut (the XQA idea): one program owns one KV head and a tile of BLOCK_Q consecutive new tokens of
one sequence, times all G = num_heads / num_kv_heads query heads that share that KV head. Its BLOCK_M rows are
(token, head-in-group) pairs, row m = token_offset * G + head_offset, so each K/V tile is read once for all G
heads. Programs find their sequence by a binary search over query_start_loc on the device, so the grid depends
only on host ints (CUDA-graph capturable): q tiles = num_tokens // BLOCK_Q + num_seqs is an upper bound on
sum_i ceil(query_len_i / BLOCK_Q); programs past a sequence's last tile return at once.

Split-K (num_splits > 1): each program's KV range is cut into num_splits segments of whole KV tiles, computed in
the kernel from seq_len (one captured graph serves any context length). Each segment writes its unnormalised
float32 output, running max and sum of exponentials (base 2) to a workspace; _merge_splits_kernel combines them.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvflight.kernels import pdl
from kvflight.kernels.device import num_sms
from kvflight.kernels.pdl import pdl_trigger, pdl_wait
from kvflight.kernels.reference import check_kv_scales

LOG2_E = 1.4426950408889634
MAX_NUM_SPLITS = 128  # the merge kernel loads all splits' statistics of one row at once
_SPLIT_MODES = ("auto", "on", "off")
# multi_block_mode "auto": split only when every segment still reads at least this many KV tokens
MIN_TOKENS_PER_SPLIT = 256
# ... and only from this context length on (H100, batch 1, 8 KV heads, 32-token split tiles, us per call no split /
# split: 256 tokens 6.8 / 7.1, 384 tokens 8.2 / 6.8, 512 tokens 9.8 / 8.1; batch 4 at 384: 9.3 / 8.8)
AUTO_SPLIT_MIN_SEQ_LEN = 384
# decode launches with at least this many programs (sequences x KV heads x splits) per SM take the small tiles
MANY_PROGRAMS_PER_SM = 3.0
SOME_PROGRAMS_PER_SM = 1.4  # ... and from this many on (below MANY_...) the default tiles without pipelining
# ... and aim for this many programs per SM (programs = num_seqs * num_kv_heads * num_splits)
TARGET_PROGRAMS_PER_SM = 4
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_QUANT_KV_DTYPES = (torch.int8, torch.float8_e4m3fn)  # kv_cache_dtype int8 / fp8: need k_scale / v_scale


@triton.jit
def _find_seq(query_start_loc_ptr, num_seqs, tile_idx, BLOCK_Q: tl.constexpr):
    """Largest sequence i whose first q tile (query_start_loc[i] // BLOCK_Q + i) is <= tile_idx."""
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0, tl.int32) + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_tile <= tile_idx:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _kv_tile_offsets(block_table_ptr, tile, kv_end, c_stride_block, c_stride_off, HEAD_DIM_PAD: tl.constexpr,
                     TOKENS_PER_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """KV tile `tile`'s key positions [BLOCK_N] and element offsets [BLOCK_N, HEAD_DIM_PAD] from the K half of one
    KV head (one block-table lookup, or one per position when a tile spans several cache blocks)."""
    cols = tl.arange(0, BLOCK_N)
    pos = tile * BLOCK_N + cols  # [BLOCK_N] key positions
    if BLOCK_N <= TOKENS_PER_BLOCK:
        # the whole tile lies in one cache block: one block id, contiguous offsets
        block_id = tl.load(block_table_ptr + (tile * BLOCK_N) // TOKENS_PER_BLOCK).to(tl.int64)
        slot_off = block_id * c_stride_block + ((tile * BLOCK_N) % TOKENS_PER_BLOCK + cols) * c_stride_off
    else:
        if MASKED:
            block_id = tl.load(block_table_ptr + pos // TOKENS_PER_BLOCK, mask=pos < kv_end, other=0)
        else:
            block_id = tl.load(block_table_ptr + pos // TOKENS_PER_BLOCK)
        slot_off = block_id.to(tl.int64) * c_stride_block + (pos % TOKENS_PER_BLOCK) * c_stride_off
    return pos, slot_off[:, None] + tl.arange(0, HEAD_DIM_PAD)[None, :]


@triton.jit
def _attend_tile(acc, l_i, m_i, q, k, v, pos, q_pos, qk_scale, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax update with a loaded K / V tile [BLOCK_N, HEAD_DIM_PAD] (codes or floats) at key
    positions pos [BLOCK_N]; MASKED applies the causal limit q_pos [BLOCK_M]."""
    k = k.to(q.dtype)  # [BLOCK_N, HEAD_DIM_PAD]
    v = v.to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N] f32, log2 units
    if MASKED:
        s = tl.where(pos[None, :] <= q_pos[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # [BLOCK_M]
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet stay at l = 0
    p = tl.exp2(s - m_ref[:, None])  # [BLOCK_M, BLOCK_N]
    alpha = tl.exp2(m_i - m_ref)  # [BLOCK_M]; 0 on the first visible tile
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attend_kv_tiles(
    acc, l_i, m_i,  # running state: [BLOCK_M, HEAD_DIM_PAD] f32, [BLOCK_M] f32, [BLOCK_M] f32 (log2 domain)
    q,  # [BLOCK_M, HEAD_DIM_PAD] in q's dtype
    kv_head_ptr,  # kv_cache + kv_head * c_stride_h (the K half)
    block_table_ptr,  # this sequence's row of block_tables
    tile_lo, tile_hi,  # KV tiles [tile_lo, tile_hi) of BLOCK_N positions
    q_pos,  # [BLOCK_M] absolute position of each row's token (causal limit)
    kv_end,  # keys at positions >= kv_end are never read
    qk_scale,  # softmax scale * log2(e)
    c_stride_kv, c_stride_block, c_stride_off,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, TOKENS_PER_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    dims = tl.arange(0, HEAD_DIM_PAD)
    for tile in range(tile_lo, tile_hi):
        pos, kv_off = _kv_tile_offsets(block_table_ptr, tile, kv_end, c_stride_block, c_stride_off, HEAD_DIM_PAD,
                                       TOKENS_PER_BLOCK, BLOCK_N, MASKED)  # [BLOCK_N], [BLOCK_N, HEAD_DIM_PAD]
        if MASKED:
            kv_mask = (pos < kv_end)[:, None] & (dims < HEAD_DIM)[None, :]
            k = tl.load(kv_head_ptr + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(kv_head_ptr + c_stride_kv + kv_off, mask=kv_mask, other=0.0)
        elif HEAD_DIM != HEAD_DIM_PAD:
            kv_mask = (dims < HEAD_DIM)[None, :]
            k = tl.load(kv_head_ptr + kv_off, mask=kv_mask, other=0.0)
            v = tl.load(kv_head_ptr + c_stride_kv + kv_off, mask=kv_mask, other=0.0)
        else:
            k = tl.load(kv_head_ptr + kv_off)
            v = tl.load(kv_head_ptr + c_stride_kv + kv_off)
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k, v, pos, q_pos, qk_scale, MASKED, DOT_PRECISION)
    return acc, l_i, m_i


# Integer arguments that change from step to step are not specialized on (Triton would otherwise compile a new
# variant whenever one of them becomes 1 or a multiple of 16, stalling a serving step for a second or more).
@triton.jit(do_not_specialize=["num_seqs", "num_q_tiles", "ws_stride_split", "ws_stride_t", "st_stride_split",
                               "st_stride_t"])
def _paged_attention_kernel(
    q_ptr,  # [T, Hq, D]
    kv_ptr,  # [2, num_blocks, tokens_per_block, Hkv, D]
    block_tables_ptr,  # [>= num_seqs, max_blocks_per_seq] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,  # [num_seqs] int32
    out_ptr,  # [T, Hq, D] (NUM_SPLITS == 1)
    ws_acc_ptr,  # [NUM_SPLITS, T, Hq, D] f32 (NUM_SPLITS > 1)
    ws_max_ptr,  # [NUM_SPLITS, T, Hq] f32
    ws_sum_ptr,  # [NUM_SPLITS, T, Hq] f32
    qk_scale,
    num_seqs,
    num_q_tiles,  # grid size along axis 0
    q_stride_t, q_stride_h,
    o_stride_t, o_stride_h,
    c_stride_kv, c_stride_block, c_stride_off, c_stride_h,
    bt_stride_seq,
    ws_stride_split, ws_stride_t, ws_stride_h,
    st_stride_split, st_stride_t,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    TOKENS_PER_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows = BLOCK_Q tokens * GROUP heads (+ masked padding rows)
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_TILE: tl.constexpr,  # every sequence has <= BLOCK_Q new tokens: program i is sequence i
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    k_scale_ptr=None,  # [Hkv] or [1] float32 (KV_SCALED): a quantized cache's dequantization scales
    v_scale_ptr=None,
    scale_stride_h=0,  # 0: one scale for every head
    KV_SCALED: tl.constexpr = False,
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (kernels/pdl.py)
):
    pdl_trigger(PDL)
    # Until pdl_wait only what no kernel of this forward writes is read (kernels/pdl.py): the step's metadata and the
    # keys / values cached by earlier steps. The first KV tile lying wholly before this step's new tokens is loaded
    # here, so its block-table lookup and loads overlap the kernel ahead (the one writing q and the new K / V).
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if SINGLE_TILE:
        seq = tl.program_id(0)
        q_tile_in_seq = 0
    else:
        tile_idx = num_q_tiles - 1 - tl.program_id(0)  # last tiles (most keys under the causal mask) start first
        seq = _find_seq(query_start_loc_ptr, num_seqs, tile_idx, BLOCK_Q)
        q_tile_in_seq = tile_idx - (tl.load(query_start_loc_ptr + seq) // BLOCK_Q + seq)
    q_begin = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    first_q = q_tile_in_seq * BLOCK_Q  # this tile's first new token, counted within the sequence
    if first_q >= query_len:
        pdl_wait(PDL)  # (nothing to write; waiting keeps every program's exit after the kernel ahead's)
        return  # past the sequence's last tile (or a query_len == 0 padding sequence)
    seq_len = tl.load(seq_lens_ptr + seq)
    context_before = seq_len - query_len  # cached positions before the new tokens
    last_q = tl.minimum(first_q + BLOCK_Q, query_len) - 1  # this tile's last new token

    kv_end = tl.maximum(context_before + last_q + 1, 0)  # this tile reads keys [0, kv_end)
    num_tiles = tl.cdiv(kv_end, BLOCK_N)
    num_full_tiles = tl.maximum(context_before + first_q + 1, 0) // BLOCK_N  # tiles every row sees entirely
    if NUM_SPLITS > 1:
        tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
        tile_lo = tl.minimum(split * tiles_per_split, num_tiles)
        tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    else:
        tile_lo = 0
        tile_hi = num_tiles
    full_hi = tl.minimum(tile_hi, num_full_tiles)

    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = dims < HEAD_DIM
    kv_head_ptr = kv_ptr + kv_head.to(tl.int64) * c_stride_h
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * bt_stride_seq
    # tile_lo is loaded early when it is a full tile of positions < context_before (written by earlier steps)
    early = tile_lo < tl.minimum(full_hi, tl.maximum(context_before, 0) // BLOCK_N)
    pos0, kv_off0 = _kv_tile_offsets(block_table_ptr, tl.where(early, tile_lo, 0), kv_end, c_stride_block,
                                     c_stride_off, HEAD_DIM_PAD, TOKENS_PER_BLOCK, BLOCK_N, True)
    early_mask = (dims < tl.where(early, HEAD_DIM, 0))[None, :]  # [1, HEAD_DIM_PAD]: all off unless early
    k0 = tl.load(kv_head_ptr + kv_off0, mask=early_mask, other=0.0)  # [BLOCK_N, HEAD_DIM_PAD]
    v0 = tl.load(kv_head_ptr + c_stride_kv + kv_off0, mask=early_mask, other=0.0)
    pdl_wait(PDL)

    if KV_SCALED:
        # the program owns one KV head: its K scale folds into the softmax scale, its V scale into the output
        # (K / V codes convert exactly to q's dtype in the tile loop: int8 and e4m3 fit bfloat16's mantissa)
        k_s = tl.load(k_scale_ptr + kv_head * scale_stride_h)
        v_s = tl.load(v_scale_ptr + kv_head * scale_stride_h)
        qk_scale = qk_scale * k_s
    rows = tl.arange(0, BLOCK_M)
    row_tok = rows // GROUP  # token offset in the tile
    head = kv_head * GROUP + rows % GROUP  # [BLOCK_M] query head of each row
    tok_in_seq = first_q + row_tok
    row_valid = (row_tok < BLOCK_Q) & (tok_in_seq < query_len)
    token = (q_begin + tl.minimum(tok_in_seq, last_q)).to(tl.int64)  # [BLOCK_M]; padding rows repeat the last
    q_pos = context_before + tl.minimum(tok_in_seq, last_q)  # [BLOCK_M] absolute positions
    q_mask = row_valid[:, None] & dim_ok[None, :]
    q = tl.load(q_ptr + token[:, None] * q_stride_t + head[:, None] * q_stride_h + dims[None, :],
                mask=q_mask, other=0.0)  # [BLOCK_M, HEAD_DIM_PAD]

    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if early:
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k0, v0, pos0, q_pos, qk_scale, False, DOT_PRECISION)
    acc, l_i, m_i = _attend_kv_tiles(
        acc, l_i, m_i, q, kv_head_ptr, block_table_ptr, tile_lo + early.to(tl.int32), full_hi, q_pos,
        kv_end, qk_scale, c_stride_kv, c_stride_block, c_stride_off,
        HEAD_DIM, HEAD_DIM_PAD, TOKENS_PER_BLOCK, BLOCK_N, False, DOT_PRECISION)
    acc, l_i, m_i = _attend_kv_tiles(
        acc, l_i, m_i, q, kv_head_ptr, block_table_ptr, tl.maximum(tile_lo, num_full_tiles), tile_hi, q_pos,
        kv_end, qk_scale, c_stride_kv, c_stride_block, c_stride_off,
        HEAD_DIM, HEAD_DIM_PAD, TOKENS_PER_BLOCK, BLOCK_N, True, DOT_PRECISION)
    if KV_SCALED:
        acc = acc * v_s

    if NUM_SPLITS > 1:
        ws_off = split * ws_stride_split + token * ws_stride_t + head * ws_stride_h  # [BLOCK_M]
        tl.store(ws_acc_ptr + ws_off[:, None] + dims[None, :], acc, mask=q_mask)
        st_off = split * st_stride_split + token * st_stride_t + head  # [BLOCK_M]
        tl.store(ws_max_ptr + st_off, m_i, mask=row_valid)
        tl.store(ws_sum_ptr + st_off, l_i, mask=row_valid)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # rows that saw no key (seq_len 0) write zeros
        tl.store(out_ptr + token[:, None] * o_stride_t + head[:, None] * o_stride_h + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit(do_not_specialize=["num_seqs", "ws_stride_split", "ws_stride_t", "st_stride_split", "st_stride_t"])
def _merge_splits_kernel(
    ws_acc_ptr,  # [NUM_SPLITS, T, Hq, D] f32
    ws_max_ptr,  # [NUM_SPLITS, T, Hq] f32
    ws_sum_ptr,  # [NUM_SPLITS, T, Hq] f32
    out_ptr,  # [T, Hq, D]
    query_start_loc_ptr,  # [num_seqs + 1] int32
    num_seqs,
    o_stride_t, o_stride_h,
    ws_stride_split, ws_stride_t, ws_stride_h,
    st_stride_split, st_stride_t,
    NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    PDL: tl.constexpr = False,
):
    pdl_trigger(PDL)
    pdl_wait(PDL)
    token = tl.program_id(0).to(tl.int64)  # one program per (token, query head)
    head = tl.program_id(1)
    if token >= tl.load(query_start_loc_ptr + num_seqs):
        return  # padding token beyond the batch: nothing was computed, leave out alone
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < NUM_SPLITS
    st_off = splits * st_stride_split + token * st_stride_t + head  # [SPLITS_PAD]
    m = tl.load(ws_max_ptr + st_off, mask=split_ok, other=float("-inf"))  # [SPLITS_PAD] (empty segment: -inf)
    l = tl.load(ws_sum_ptr + st_off, mask=split_ok, other=0.0)
    m_all = tl.max(m, 0)
    weight = tl.exp2(m - tl.where(m_all == float("-inf"), 0.0, m_all))  # [SPLITS_PAD]; 0 for empty segments
    total = tl.sum(weight * l, 0)
    dims = tl.arange(0, HEAD_DIM_PAD)
    ws_off = splits * ws_stride_split + token * ws_stride_t + head * ws_stride_h  # [SPLITS_PAD]
    acc_mask = split_ok[:, None] & (dims < HEAD_DIM)[None, :]
    acc = tl.load(ws_acc_ptr + ws_off[:, None] + dims[None, :], mask=acc_mask, other=0.0)  # [SPLITS_PAD, D_PAD]
    out = tl.sum(acc * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)  # [HEAD_DIM_PAD]
    tl.store(out_ptr + token * o_stride_t + head * o_stride_h + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)


def _check_inputs(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                  query_start_loc: torch.Tensor, seq_lens: torch.Tensor, max_query_len: int, num_splits: int,
                  out: torch.Tensor | None) -> None:
    if q.dim() != 3:
        raise ValueError(f"q shape {tuple(q.shape)}: expected [num_tokens, num_heads, head_dim]")
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"kv_cache shape {tuple(kv_cache.shape)}: expected "
                         "[2, num_blocks, tokens_per_block, num_kv_heads, head_dim]")
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, tokens_per_block = kv_cache.shape[3], kv_cache.shape[2]
    if kv_cache.shape[4] != head_dim:
        raise ValueError(f"kv_cache head_dim {kv_cache.shape[4]} != q head_dim {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if tokens_per_block & (tokens_per_block - 1) or tokens_per_block < 1:
        raise ValueError(f"tokens_per_block={tokens_per_block} must be a power of two")
    if q.dtype not in _FLOAT_DTYPES or kv_cache.dtype not in _FLOAT_DTYPES + _QUANT_KV_DTYPES:
        raise ValueError(f"q dtype {q.dtype} / kv_cache dtype {kv_cache.dtype}: expected float32, float16 or "
                         "bfloat16 (the cache also int8 / float8_e4m3fn, with k_scale / v_scale)")
    if q.stride(2) != 1 or kv_cache.stride(4) != 1:
        raise ValueError("q and kv_cache must be contiguous in head_dim (stride 1 on the last dim)")
    num_seqs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    if seq_lens.dim() != 1 or seq_lens.dtype != torch.int32:
        raise ValueError(f"seq_lens {tuple(seq_lens.shape)} {seq_lens.dtype}: expected [num_seqs] int32")
    if query_start_loc.shape != (num_seqs + 1,) or query_start_loc.dtype != torch.int32:
        raise ValueError(f"query_start_loc {tuple(query_start_loc.shape)} {query_start_loc.dtype}: expected "
                         f"[num_seqs + 1] = [{num_seqs + 1}] int32")
    if block_tables.dim() != 2 or block_tables.shape[0] < num_seqs or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables {tuple(block_tables.shape)} {block_tables.dtype}: expected "
                         f"[>= {num_seqs}, max_blocks_per_seq] int32")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables must be contiguous along max_blocks_per_seq")
    for name, t in (("kv_cache", kv_cache), ("block_tables", block_tables),
                    ("query_start_loc", query_start_loc), ("seq_lens", seq_lens)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if not isinstance(max_query_len, int) or max_query_len < 0:
        raise ValueError(f"max_query_len={max_query_len!r} must be a host int >= 0")
    if not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_NUM_SPLITS:
        raise ValueError(f"num_splits={num_splits!r} must be an int in [1, {MAX_NUM_SPLITS}]")
    if out is not None:
        if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(f"out {tuple(out.shape)} {out.dtype} on {out.device}: expected q's "
                             f"{tuple(q.shape)} {q.dtype} on {q.device}")
        if out.stride(2) != 1:
            raise ValueError("out must be contiguous in head_dim (stride 1 on the last dim)")


def _launch_config(group: int, head_dim_pad: int, max_query_len: int, elem_bytes: int, num_splits: int = 1,
                   programs_per_sm: float = 0.0) -> dict:
    """Tile shapes for one launch. Decode-like launches (few rows per sequence) use a narrow BLOCK_M and deep
    pipelining to keep many KV bytes in flight; prefill-like launches use 128-row tiles for the tensor cores.
    Decode launches with many programs per SM (programs_per_sm >= MANY_PROGRAMS_PER_SM: large batches) instead use
    64-token KV tiles, one buffer and 2 warps: several small programs per SM keep the bytes in flight, where one
    program holding ~130 KB of buffers left the SM idle between short sequences (H100, Llama-8B shape,
    benchmarks/attention_gpu.py --batch-sweep, us per call, default -> this: batch 256 at context 160 108.0 -> 67.4,
    320 147.8 -> 120.9, 640 241.7 -> 231.3, 4096 1424.7 -> 1420.5; batch 64: 32.3 -> 20.0, 47.1 -> 33.7,
    69.9 -> 61.3, 363.7 -> 358.1). From SOME_PROGRAMS_PER_SM (1.4) to 3 the default tiles stay but unpipelined
    (num_stages 1): batch 24 at context 320 22.0 -> 16.8, 1280 52.3 -> 49.7, 4096 144.6 -> 148.1; batch 32 25.4 ->
    19.4, 65.7 -> 60.9, 185.2 -> 183.0; batch 16 (one program per SM) keeps the two buffers.
    Split-K decode launches (num_splits > 1) use 32-token KV tiles and one buffer: each program covers a short
    stretch, and the 128-token tiles left most programs with nothing to read while holding the shared memory (H100,
    Llama-8B shape, benchmarks/attention_gpu.py --short-sweep, us per call, 128-token / 5-stage -> 32 / 3: batch 1,
    66 splits: context 512 15.6 -> 8.2, 2048 18.2 -> 9.4, 8192 26.9 -> 17.9; batch 4, 17 splits: 18.4 -> 8.9,
    26.5 -> 17.3, 58.1 -> 51.3; without a split 9.8, 27.3, 95.3 at batch 1).

    Triton's pipeliner gives a K/V load that sits behind another load in the loop (the block-table lookup)
    (num_stages - 1) // 2 shared-memory buffers on the mma.sync path (BLOCK_M <= 32 here) and num_stages - 1 on
    the wgmma path (seen in the TTGIR of triton 3.6 and 3.9), so num_stages is derived from the buffers wanted.
    """
    rows_needed = max(max_query_len, 1) * group
    block_m = min(max(16, triton.next_power_of_2(rows_needed)), max(128, triton.next_power_of_2(group)))
    block_q = max(1, min(block_m // group, triton.next_power_of_2(max(max_query_len, 1))))
    decode_like = block_m <= 32  # memory bound, mma.sync
    # H100 sweep (benchmarks/attention_gpu.py --tune, Llama-8B shape): decode best at BLOCK_N 128, 4 warps,
    # 2 buffers; prefill 4096 best at BLOCK_M 128, BLOCK_N 128, 8 warps, 2 buffers
    block_n = 128 if head_dim_pad * elem_bytes <= 256 else 64
    num_warps = 8 if block_m >= 128 else 4
    kv_buffers = 2
    # keep the K + V buffers and the Q tile within ~160 KB of shared memory (H100: 227 KB per block)
    while (2 * block_n * kv_buffers + block_m) * head_dim_pad * elem_bytes > 160 * 1024:
        if kv_buffers > 1:
            kv_buffers -= 1
        elif block_n > 32:
            block_n //= 2
        elif block_m > 16 and block_m // 2 >= group:
            block_m //= 2
            block_q = max(1, min(block_m // group, block_q))
        else:
            break
    if decode_like and num_splits > 1:
        block_n = min(block_n, 32)
        kv_buffers = 1
    elif decode_like and programs_per_sm >= MANY_PROGRAMS_PER_SM:
        block_n = min(block_n, 64)
        kv_buffers = 1
        num_warps = 2
    elif decode_like and programs_per_sm >= SOME_PROGRAMS_PER_SM:
        kv_buffers = 0  # no software pipelining: two programs per SM overlap each other's loads instead
    num_stages = 2 * kv_buffers + 1 if decode_like else kv_buffers + 1
    return dict(BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    max_query_len: int,
    num_splits: int = 1,
    out: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of a flat batch of new tokens over the paged cache (their K/V already written).

    q                [num_tokens, num_heads, head_dim]: sequences' new tokens back to back (padding rows after
                     query_start_loc[-1] allowed: they are not computed)
    kv_cache         [2, num_blocks, tokens_per_block, num_kv_heads, head_dim]
    block_tables     [>= num_seqs, max_blocks_per_seq] int32
    query_start_loc  [num_seqs + 1] int32 (device): prefix sums of the new-token counts
    seq_lens         [num_seqs] int32 (device): context length after this step (cached + new)
    scale            softmax scale (usually 1 / sqrt(head_dim))
    max_query_len    host int >= every sequence's new-token count (picks tile shapes; never read on the device)
    num_splits       split-K segments per sequence's KV range (multi_block_mode); 1 = off. See choose_num_splits.
    out              [num_tokens, num_heads, head_dim] in q's dtype, written in place if given
    k_scale, v_scale float32 device tensors [num_kv_heads] or [1], required with an int8 / float8_e4m3fn cache:
                     K / V = code * scale (the K scale folds into the softmax scale, the V scale into the output)
    Token j of a sequence with L new tokens and context S attends to positions 0 .. S - L + j, query head h
    reading KV head h // (num_heads // num_kv_heads). Accumulates in float32; returns out (q's dtype).
    No host sync; launch sizes depend only on shapes, max_query_len and num_splits (CUDA-graph capturable).
    """
    _check_inputs(q, kv_cache, block_tables, query_start_loc, seq_lens, max_query_len, num_splits, out)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, tokens_per_block = kv_cache.shape[3], kv_cache.shape[2]
    kv_scaled = check_kv_scales(kv_cache, k_scale, v_scale, num_kv_heads) is not None  # (kv_cache is on q's device)
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0 or max_query_len == 0:
        return out
    group = num_heads // num_kv_heads
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    programs_per_sm = num_seqs * num_kv_heads * num_splits / num_sms(q.device) if q.is_cuda else 0.0
    cfg = _launch_config(group, head_dim_pad, max_query_len, q.element_size(), num_splits=num_splits,
                         programs_per_sm=programs_per_sm)
    block_q = cfg["BLOCK_Q"]
    single_tile = max_query_len <= block_q
    num_q_tiles = num_seqs if single_tile else num_tokens // block_q + num_seqs
    if num_splits > 1:
        ws_acc = torch.empty((num_splits, num_tokens, num_heads, head_dim), dtype=torch.float32, device=q.device)
        ws_max = torch.empty((num_splits, num_tokens, num_heads), dtype=torch.float32, device=q.device)
        ws_sum = torch.empty_like(ws_max)
    else:
        ws_acc = ws_max = ws_sum = out  # unused
    _paged_attention_kernel[(num_q_tiles, num_kv_heads, num_splits)](
        q, kv_cache, block_tables, query_start_loc, seq_lens, out, ws_acc, ws_max, ws_sum,
        float(scale) * LOG2_E, num_seqs, num_q_tiles,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0),
        ws_acc.stride(0) if num_splits > 1 else 0, ws_acc.stride(1) if num_splits > 1 else 0,
        ws_acc.stride(2) if num_splits > 1 else 0,
        ws_max.stride(0) if num_splits > 1 else 0, ws_max.stride(1) if num_splits > 1 else 0,
        GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, TOKENS_PER_BLOCK=tokens_per_block,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_Q=block_q, BLOCK_N=cfg["BLOCK_N"], SINGLE_TILE=single_tile,
        NUM_SPLITS=num_splits, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl.launch_kwargs(q, "paged_attention"),
        **(dict(k_scale_ptr=k_scale, v_scale_ptr=v_scale,
                scale_stride_h=k_scale.stride(0) if k_scale.numel() > 1 else 0, KV_SCALED=True)
           if kv_scaled else {}),
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            ws_acc, ws_max, ws_sum, out, query_start_loc, num_seqs,
            out.stride(0), out.stride(1),
            ws_acc.stride(0), ws_acc.stride(1), ws_acc.stride(2),
            ws_max.stride(0), ws_max.stride(1),
            NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
            num_warps=4 if head_dim_pad * num_splits >= 2048 else 1, **pdl.launch_kwargs(q, "paged_attention"),
        )
    return out


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_query_len: int, max_seq_len: int | None,
                      num_sms: int, mode: str = "auto") -> int:
    """multi_block_mode: how many split-K segments paged_attention should cut each sequence's KV range into.

    "off"  -> 1.
    "on"   -> always > 1: enough segments for TARGET_PROGRAMS_PER_SM programs per SM, at least 2; when
              max_seq_len is known, no more than one segment per MIN_TOKENS_PER_SPLIT tokens (still >= 2).
    "auto" -> 1 unless the batch is decode-only (max_query_len <= 1) and num_seqs * num_kv_heads <= num_sms / 2
              (over half the SMs would sit idle; at 128 programs on 132 SMs the H100 already reads at ~87% of
              copy bandwidth and splitting was slower) and, when max_seq_len is known, max_seq_len >=
              AUTO_SPLIT_MIN_SEQ_LEN (longer contexts); then as "on". max_seq_len None (unknown, e.g. under
              CUDA-graph capture) decides from the batch shape only.
    The result is in [1, MAX_NUM_SPLITS].
    """
    if mode not in _SPLIT_MODES:
        raise ValueError(f"multi_block_mode={mode!r}: expected one of {', '.join(_SPLIT_MODES)}")
    if num_seqs < 0 or num_kv_heads < 1 or num_sms < 1 or max_query_len < 0:
        raise ValueError(f"num_seqs={num_seqs}, num_kv_heads={num_kv_heads}, num_sms={num_sms}, "
                         f"max_query_len={max_query_len}: expected num_seqs >= 0, the others >= 1 (query len >= 0)")
    if mode == "off":
        return 1
    programs = max(num_seqs, 1) * num_kv_heads
    if mode == "auto":
        if max_query_len > 1 or 2 * programs > num_sms:
            return 1
        if max_seq_len is not None and max_seq_len < AUTO_SPLIT_MIN_SEQ_LEN:
            return 1
    splits = math.ceil(TARGET_PROGRAMS_PER_SM * num_sms / programs)
    if max_seq_len is not None:
        splits = min(splits, max_seq_len // MIN_TOKENS_PER_SPLIT)
    return max(2, min(splits, MAX_NUM_SPLITS))
