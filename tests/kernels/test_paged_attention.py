"""Triton paged attention (kernels/paged_attention.py) equals reference.paged_attention: GQA ratios, head dims,
block boundaries, mixed batches, padding rows, scrambled block ids, split-K; and choose_num_splits' rules."""

from __future__ import annotations

import math
from typing import Sequence

import pytest
import torch

from kvflight.kernels import reference
from kvflight.kernels.paged_attention import (AUTO_SPLIT_MIN_SEQ_LEN, MAX_NUM_SPLITS, MIN_TOKENS_PER_SPLIT,
                                              TARGET_PROGRAMS_PER_SM, choose_num_splits, paged_attention)

F32 = dict(atol=2e-5, rtol=2e-5)
POISON = 12345.0


def _batch(query_lens: Sequence[int], seq_lens: Sequence[int], num_heads: int, num_kv_heads: int, head_dim: int,
           tokens_per_block: int, device: str, seed: int = 0, dtype: torch.dtype = torch.float32,
           extra_tokens: int = 0, extra_table_rows: int = 0):
    """Random q and cache; each sequence gets scrambled (non-contiguous, shuffled) block ids.

    returns q [sum(query_lens) + extra_tokens, Hq, D], kv_cache, block_tables, query_start_loc, seq_lens (device)
    """
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [max(1, math.ceil(s / tokens_per_block)) for s in seq_lens]
    num_blocks = 2 * sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=g)  # shuffled ids, every other one unused
    width = max(blocks_per_seq) + 1
    table = torch.zeros(len(seq_lens) + extra_table_rows, width, dtype=torch.int32)
    next_id = 0
    for i, n in enumerate(blocks_per_seq):
        table[i, :n] = perm[next_id:next_id + 2 * n:2]
        next_id += 2 * n
    table[len(seq_lens):] = perm[-1]  # padding rows point at some block (never read)
    num_tokens = sum(query_lens) + extra_tokens
    q = torch.randn(num_tokens, num_heads, head_dim, generator=g).to(dtype)
    kv_cache = torch.randn(2, num_blocks, tokens_per_block, num_kv_heads, head_dim, generator=g).to(dtype)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return (q.to(device), kv_cache.to(device), table.to(device),
            torch.tensor(starts, dtype=torch.int32, device=device),
            torch.tensor(list(seq_lens), dtype=torch.int32, device=device))


def _check(query_lens, seq_lens, num_heads, num_kv_heads, head_dim, tokens_per_block, device, num_splits=1,
           seed=0, dtype=torch.float32, tol=F32, max_query_len=None, extra_tokens=0, extra_table_rows=0):
    q, kv_cache, table, qsl, sl = _batch(query_lens, seq_lens, num_heads, num_kv_heads, head_dim,
                                         tokens_per_block, device, seed, dtype, extra_tokens, extra_table_rows)
    scale = 1.0 / math.sqrt(head_dim)
    out = torch.full_like(q, POISON)
    got = paged_attention(q, kv_cache, table, qsl, sl, scale, num_splits=num_splits, out=out,
                          max_query_len=max(query_lens) if max_query_len is None else max_query_len)
    assert got is out
    n = sum(query_lens)
    want = reference.paged_attention(q[:n], kv_cache, table, list(query_lens), list(seq_lens), scale)
    torch.testing.assert_close(got[:n].float(), want.float(), **tol)
    # padding tokens beyond query_start_loc[-1] are not computed: their rows keep what was there
    assert bool((got[n:] == POISON).all())
    return got


# ---- GQA ratios, head dims, mixed batches ----------------------------------------------------------------------
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [
    (2, 2, 64),  # MHA
    (6, 2, 64),  # GQA 3 (SmolLM2's 9 / 3)
    (8, 2, 128),  # GQA 4
    (8, 1, 64),  # GQA 8 (MQA)
    (4, 2, 80),  # non-power-of-two head_dim: padded + masked
])
def test_mixed_batch_matches_reference(num_heads: int, num_kv_heads: int, head_dim: int, device: str) -> None:
    # a decode token, a chunk with a cached prefix, a fresh prefill, a decode at a block boundary
    _check([1, 20, 33, 1], [37, 65, 33, 48], num_heads, num_kv_heads, head_dim, 16, device, seed=num_heads)


@pytest.mark.parametrize("tokens_per_block", [16, 128])
def test_block_boundaries(tokens_per_block: int, device: str) -> None:
    """Contexts of k * tpb - 1, k * tpb, k * tpb + 1 (and the 64-token KV tile edges) for decode and prefill."""
    tpb = tokens_per_block
    seq_lens = [tpb - 1, tpb, tpb + 1, 63, 64, 65]
    _check([1] * len(seq_lens), seq_lens, 4, 2, 64, tpb, device, seed=1)  # decode
    _check([5, 16, 17, 63, 1, 65], seq_lens, 4, 2, 64, tpb, device, seed=2)  # chunks ending on the boundaries


def test_decode_batch_gqa8_long_context(device: str) -> None:
    """Many KV tiles per program (unmasked + masked loop), 8 query heads sharing one KV tile."""
    _check([1, 1, 1], [300, 129, 2], 8, 1, 64, 32, device, seed=3)


def test_max_query_len_is_an_upper_bound(device: str) -> None:
    """A looser max_query_len (what a padded graph batch passes) picks other tiles but gives the same numbers."""
    _check([1, 1, 3], [40, 7, 19], 6, 2, 64, 16, device, seed=4, max_query_len=64)
    _check([1, 1, 3], [40, 7, 19], 6, 2, 64, 16, device, seed=4, max_query_len=3)


def test_prefill_spanning_several_q_tiles(device: str) -> None:
    """One sequence's new tokens cover several BLOCK_Q tiles (MHA: 128 rows = 128 tokens per tile)."""
    _check([150, 2], [170, 9], 1, 1, 64, 32, device, seed=5)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, dict(atol=2e-3, rtol=2e-3)),
                                       (torch.bfloat16, dict(atol=1.6e-2, rtol=1.6e-2))])
def test_half_dtypes(dtype: torch.dtype, tol: dict, device: str) -> None:
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("the Triton interpreter's tl.dot mishandles bfloat16 operands (numpy has no bf16); "
                    "benchmarks/attention_gpu.py checks bf16 on the GPU")
    got = _check([1, 9], [30, 9], 4, 2, 64, 16, device, seed=6, dtype=dtype, tol=tol)
    assert got.dtype == dtype


# ---- padding (padded CUDA-graph batches) ------------------------------------------------------------------------
def test_padding_sequences_and_tokens(device: str) -> None:
    """seq_len 0 / query_len 0 sequences, a sequence with context but no new token, padding tokens after the batch
    and extra block-table rows: real rows match, padding rows untouched, nothing read out of bounds."""
    _check([1, 0, 4, 0, 1], [17, 0, 20, 33, 1], 4, 2, 64, 16, device, seed=7, extra_tokens=3, extra_table_rows=2)


def test_padding_with_splits(device: str) -> None:
    _check([1, 0, 1, 0], [70, 0, 5, 0], 4, 1, 64, 16, device, num_splits=3, seed=8, extra_tokens=2)


def test_query_without_context_writes_zeros(device: str) -> None:
    """A malformed row (query_len 1, seq_len 0) must not read the cache; it writes zeros, split or not."""
    for num_splits in (1, 2):
        q, kv_cache, table, _, _ = _batch([1, 1], [5, 5], 2, 2, 64, 16, device, seed=9)
        qsl = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
        sl = torch.tensor([5, 0], dtype=torch.int32, device=device)
        out = paged_attention(q, kv_cache, table, qsl, sl, 0.125, max_query_len=1, num_splits=num_splits)
        assert bool((out[1] == 0).all())
        want = reference.paged_attention(q[:1], kv_cache, table, [1], [5], 0.125)
        torch.testing.assert_close(out[:1], want, **F32)


# ---- split-K (multi_block_mode) -------------------------------------------------------------------------------
@pytest.mark.parametrize("num_splits", [1, 2, 3, 4])
def test_split_k_decode(num_splits: int, device: str) -> None:
    """Short contexts leave segments empty (2 < num_splits KV tiles), long ones split unevenly."""
    _check([1, 1, 1, 1], [3, 64, 200, 130], 8, 2, 64, 16, device, num_splits=num_splits, seed=10 + num_splits)


@pytest.mark.parametrize("num_splits", [2, 4])
def test_split_k_mixed_batch(num_splits: int, device: str) -> None:
    """Split-K on chunks too: rows early in a chunk see nothing in the later segments."""
    _check([1, 20, 33], [150, 90, 33], 6, 2, 64, 16, device, num_splits=num_splits, seed=20 + num_splits)


def test_split_k_head_dim_128(device: str) -> None:
    _check([1, 2], [257, 100], 4, 1, 128, 32, device, num_splits=4, seed=30)


def test_split_k_tiles_inside_large_blocks(device: str) -> None:
    """Split-K decode reads 32-token tiles: with 128-token blocks a tile starts inside a block."""
    _check([1, 1], [300, 129], 4, 2, 64, 128, device, num_splits=3, seed=31)


# ---- many programs per SM: the large-batch decode tiles ----------------------------------------------------------
@pytest.mark.parametrize("num_seqs,forced_programs_per_sm", [(32, 2.0), (64, 10.0)])
def test_large_batch_decode_tiles(num_seqs: int, forced_programs_per_sm: float, device: str,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """32 / 64 decodes x 8 KV heads: ~2 / ~4 programs per SM on an H100 (forced on the interpreter) select the
    unpipelined default tiles / 64-token KV tiles with one buffer and 2 warps; short and block-straddling contexts
    still match the reference."""
    from kvflight.kernels import paged_attention as pa

    real, seen = pa._launch_config, []

    def spy(*args, **kwargs):
        if device == "cpu":
            kwargs["programs_per_sm"] = forced_programs_per_sm
        cfg = real(*args, **kwargs)
        seen.append((kwargs["programs_per_sm"], cfg))
        return cfg

    monkeypatch.setattr(pa, "_launch_config", spy)
    seq_lens = [1 + (37 * i) % 150 for i in range(num_seqs)]
    _check([1] * num_seqs, seq_lens, 16, 8, 64, 16, device, seed=50 + num_seqs)
    programs_per_sm, cfg = seen[-1]
    if programs_per_sm >= pa.MANY_PROGRAMS_PER_SM:
        assert (cfg["BLOCK_N"], cfg["num_stages"], cfg["num_warps"]) == (64, 3, 2)
    elif programs_per_sm >= pa.SOME_PROGRAMS_PER_SM:
        assert (cfg["BLOCK_N"], cfg["num_stages"], cfg["num_warps"]) == (128, 1, 4)
    # the rule itself: decode-like only, not with split-K, the default for about one program per SM
    assert real(4, 128, 1, 2, programs_per_sm=4.0)["BLOCK_N"] == 64
    assert real(4, 128, 1, 2, programs_per_sm=2.0)["num_stages"] == 1
    assert real(4, 128, 1, 2, programs_per_sm=1.0)["num_stages"] == 5
    assert real(4, 128, 1, 2, num_splits=4, programs_per_sm=8.0)["BLOCK_N"] == 32
    assert real(4, 128, 512, 2, programs_per_sm=8.0)["num_warps"] == 8  # prefill tiles unchanged


# ---- input validation -------------------------------------------------------------------------------------------
def test_rejects_bad_inputs(device: str) -> None:
    q, kv_cache, table, qsl, sl = _batch([2], [5], 4, 2, 64, 16, device)
    ok = dict(max_query_len=2)
    with pytest.raises(ValueError, match="num_heads=3"):
        paged_attention(q[:, :3], kv_cache, table, qsl, sl, 1.0, **ok)
    with pytest.raises(ValueError, match="head_dim"):
        paged_attention(q[..., :32], kv_cache, table, qsl, sl, 1.0, **ok)
    with pytest.raises(ValueError, match="seq_lens"):
        paged_attention(q, kv_cache, table, qsl, sl.long(), 1.0, **ok)
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_attention(q, kv_cache, table, qsl[:1], sl, 1.0, **ok)
    with pytest.raises(ValueError, match="block_tables"):
        paged_attention(q, kv_cache, table[:0], qsl, sl, 1.0, **ok)
    with pytest.raises(ValueError, match="num_splits"):
        paged_attention(q, kv_cache, table, qsl, sl, 1.0, max_query_len=2, num_splits=0)
    with pytest.raises(ValueError, match="out"):
        paged_attention(q, kv_cache, table, qsl, sl, 1.0, max_query_len=2, out=torch.empty_like(q[:1]))
    with pytest.raises(ValueError, match="dtype"):
        paged_attention(q.double(), kv_cache, table, qsl, sl, 1.0, **ok)
    with pytest.raises(ValueError, match="kv_cache shape"):
        paged_attention(q, kv_cache[0], table, qsl, sl, 1.0, **ok)


# ---- choose_num_splits ------------------------------------------------------------------------------------------
def test_choose_num_splits_rules() -> None:
    sms = 132
    # off: never split
    assert choose_num_splits(1, 8, 1, 8192, sms, "off") == 1
    # auto: not for prefill / chunks, nor when the programs already cover the SMs, nor for short contexts
    assert choose_num_splits(1, 8, 4096, 8192, sms, "auto") == 1
    assert choose_num_splits(2, 8, 2, 8192, sms, "auto") == 1
    assert choose_num_splits(64, 8, 1, 8192, sms, "auto") == 1  # 512 programs >= 132 SMs
    assert choose_num_splits(16, 8, 1, 8192, sms, "auto") == 1  # 128 programs > 132 / 2: SMs mostly busy
    assert choose_num_splits(9, 8, 1, 8192, sms, "auto") == 1  # 72 > 66
    assert choose_num_splits(1, 8, 1, AUTO_SPLIT_MIN_SEQ_LEN - 1, sms, "auto") == 1
    assert choose_num_splits(1, 8, 1, AUTO_SPLIT_MIN_SEQ_LEN, sms, "auto") == 2  # at least 2 segments
    # auto, decode, idle SMs, long context: fill the SMs, at most one segment per MIN_TOKENS_PER_SPLIT tokens
    batch1 = choose_num_splits(1, 8, 1, 8192, sms, "auto")
    assert batch1 == min(math.ceil(TARGET_PROGRAMS_PER_SM * sms / 8), 8192 // MIN_TOKENS_PER_SPLIT) == 32
    assert choose_num_splits(8, 8, 1, 2048, sms, "auto") == min(math.ceil(TARGET_PROGRAMS_PER_SM * sms / 64),
                                                                2048 // MIN_TOKENS_PER_SPLIT) == 8
    assert choose_num_splits(8, 8, 1, 1024, sms, "auto") == 4  # one segment per MIN_TOKENS_PER_SPLIT tokens
    assert choose_num_splits(1, 8, 1, 512, sms, "auto") == 2
    # unknown context (graph capture): decided from the batch shape alone
    assert choose_num_splits(1, 8, 1, None, sms, "auto") == math.ceil(TARGET_PROGRAMS_PER_SM * sms / 8) == 66
    assert choose_num_splits(64, 8, 1, None, sms, "auto") == 1
    assert choose_num_splits(1, 1, 1, None, sms, "auto") == MAX_NUM_SPLITS  # capped
    # on: always > 1, even where auto would not split
    for args in [(64, 8, 1, 8192), (1, 8, 4096, 8192), (1, 8, 1, 100), (256, 32, 1, None)]:
        assert choose_num_splits(*args, sms, "on") >= 2
    assert choose_num_splits(1, 8, 1, 8192, sms, "on") == batch1
    with pytest.raises(ValueError, match="multi_block_mode"):
        choose_num_splits(1, 8, 1, 8192, sms, "sometimes")
