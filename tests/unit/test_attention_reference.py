"""The plain-torch paged attention oracle equals dense causal SDPA; write_kv_cache writes exactly the given slots."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from kvflight.kernels import reference
from kvflight.model.attention import Attention, AttentionMetadata, positions_for


def _dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [L, Hq, D] = the last L positions of k / v [S, Hkv, D] -> [L, Hq, D], via SDPA in float64."""
    num_queries, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    kk = k.double().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, S, D]
    vv = v.double().repeat_interleave(group, dim=1).transpose(0, 1)
    qq = q.double().transpose(0, 1)  # [Hq, L, D]
    mask = torch.ones(num_queries, seq_len, dtype=torch.bool).tril(diagonal=seq_len - num_queries)  # [L, S]
    out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask)
    return out.transpose(0, 1).to(q.dtype)


def _allocate(seq_lens: list[int], tokens_per_block: int, num_blocks: int, rng: random.Random) -> list[list[int]]:
    """Give each sequence enough blocks from a shuffled pool (block ids out of order, interleaved)."""
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    tables: list[list[int]] = []
    for seq_len in seq_lens:
        need = math.ceil(seq_len / tokens_per_block)
        tables.append([pool.pop() for _ in range(need)])
    return tables


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("tokens_per_block", [1, 4, 16])
def test_paged_attention_equals_dense(group: int, tokens_per_block: int) -> None:
    rng = random.Random(group * 100 + tokens_per_block)
    torch.manual_seed(group * 100 + tokens_per_block)
    num_kv_heads, head_dim = 2, 16
    num_heads = num_kv_heads * group
    # (context after step, new tokens): prefill, decode, chunk, block-boundary lengths, one empty query
    cases = [(1, 1), (tokens_per_block, tokens_per_block), (tokens_per_block + 1, 1), (3 * tokens_per_block, 5),
             (37, 37), (40, 3), (2 * tokens_per_block - 1, 2 * tokens_per_block - 1), (9, 0)]
    cases = [(s, min(q, s)) for s, q in cases]
    seq_lens = [s for s, _ in cases]
    query_lens = [q for _, q in cases]
    num_blocks = sum(math.ceil(s / tokens_per_block) for s in seq_lens) + 3
    tables = _allocate(seq_lens, tokens_per_block, num_blocks, rng)
    kv_cache = torch.full((2, num_blocks, tokens_per_block, num_kv_heads, head_dim), float("nan"))
    # whole-sequence K/V; the cached prefix goes in directly, the new tokens through the attention layer
    full_k = [torch.randn(s, num_kv_heads, head_dim) for s in seq_lens]
    full_v = [torch.randn(s, num_kv_heads, head_dim) for s in seq_lens]
    for i, (s, q) in enumerate(cases):
        prefix = AttentionMetadata.build([s - q], [s - q], [tables[i]], tokens_per_block)
        reference.write_kv_cache(full_k[i][: s - q], full_v[i][: s - q], kv_cache, prefix.slot_mapping)
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, tokens_per_block)
    q_all = torch.randn(sum(query_lens), num_heads, head_dim)
    k_new = torch.cat([full_k[i][s - q:] for i, (s, q) in enumerate(cases)])
    v_new = torch.cat([full_v[i][s - q:] for i, (s, q) in enumerate(cases)])
    out = Attention(num_heads, head_dim, num_kv_heads)(q_all, k_new, v_new, kv_cache, meta)  # [T, Hq, D]
    assert out.shape == q_all.shape
    start = 0
    for i, (s, q) in enumerate(cases):
        expected = _dense_causal(q_all[start:start + q], full_k[i], full_v[i])
        torch.testing.assert_close(out[start:start + q], expected, atol=1e-5, rtol=1e-5)
        start += q


def test_paged_attention_low_precision_close_to_float32() -> None:
    torch.manual_seed(0)
    tokens_per_block, num_kv_heads, num_heads, head_dim = 8, 2, 8, 32
    seq_lens, query_lens = [20, 9], [20, 2]
    tables = [[5, 0, 3], [1, 4]]
    kv32 = torch.zeros(2, 6, tokens_per_block, num_kv_heads, head_dim)
    meta = AttentionMetadata.build([20, 9], seq_lens, tables, tokens_per_block)
    k = torch.randn(29, num_kv_heads, head_dim)
    v = torch.randn(29, num_kv_heads, head_dim)
    reference.write_kv_cache(k, v, kv32, meta.slot_mapping)
    q = torch.randn(sum(query_lens), num_heads, head_dim)
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, tokens_per_block)
    ref = reference.paged_attention(q, kv32, meta.block_tables, query_lens, seq_lens)
    out = reference.paged_attention(q.bfloat16(), kv32.bfloat16(), meta.block_tables, query_lens, seq_lens)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_write_kv_cache_writes_exactly_the_slots() -> None:
    torch.manual_seed(1)
    num_blocks, tokens_per_block, num_kv_heads, head_dim = 6, 4, 3, 8
    kv_cache = torch.zeros(2, num_blocks, tokens_per_block, num_kv_heads, head_dim)
    slots = torch.tensor([0, 23, 5, 12, 13, -1, 7], dtype=torch.int64)  # -1: padding, skipped
    k = torch.randn(len(slots), num_kv_heads, head_dim)
    v = torch.randn(len(slots), num_kv_heads, head_dim)
    reference.write_kv_cache(k, v, kv_cache, slots)
    written = torch.zeros(num_blocks * tokens_per_block, dtype=torch.bool)
    for i, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        block, offset = divmod(slot, tokens_per_block)
        assert torch.equal(kv_cache[0, block, offset], k[i])
        assert torch.equal(kv_cache[1, block, offset], v[i])
        written[slot] = True
    flat = kv_cache.view(2, -1, num_kv_heads, head_dim)
    assert flat[:, ~written].abs().sum() == 0  # nothing else touched


def test_write_kv_cache_rejects_bad_shapes() -> None:
    kv_cache = torch.zeros(2, 2, 4, 2, 8)
    with pytest.raises(ValueError, match="do not match"):
        reference.write_kv_cache(torch.zeros(3, 4, 8), torch.zeros(3, 4, 8), kv_cache, torch.arange(3))
    with pytest.raises(ValueError, match="slot_mapping"):
        reference.write_kv_cache(torch.zeros(3, 2, 8), torch.zeros(3, 2, 8), kv_cache, torch.arange(2))
    with pytest.raises(ValueError, match="kv_cache shape"):
        reference.write_kv_cache(torch.zeros(3, 2, 8), torch.zeros(3, 2, 8), torch.zeros(2, 8, 2, 8),
                                 torch.arange(3))


def test_metadata_build_and_positions() -> None:
    meta = AttentionMetadata.build([3, 1], [5, 9], [[7, 2], [4, 0, 9]], tokens_per_block=4)
    # seq 0: positions 2, 3, 4 -> block 7 offsets 2, 3; block 2 offset 0. seq 1: position 8 -> block 9 offset 0
    assert meta.slot_mapping.tolist() == [30, 31, 8, 36]
    assert meta.query_start_loc.tolist() == [0, 3, 4]
    assert meta.seq_lens.tolist() == [5, 9]
    assert meta.block_tables.tolist() == [[7, 2, 0], [4, 0, 9]]
    assert meta.block_tables.dtype == torch.int32 and meta.query_start_loc.dtype == torch.int32
    assert meta.slot_mapping.dtype == torch.int64
    assert (meta.max_query_len, meta.max_seq_len) == (3, 9)
    assert positions_for([3, 1], [5, 9]).tolist() == [2, 3, 4, 8]


def test_prefill_without_cache_equals_paged() -> None:
    torch.manual_seed(2)
    query_lens = [5, 3]
    q = torch.randn(8, 4, 16)
    k = torch.randn(8, 2, 16)
    v = torch.randn(8, 2, 16)
    meta = AttentionMetadata.build(query_lens, query_lens, [[1, 0], [2]], tokens_per_block=4)
    attn = Attention(4, 16, 2)
    no_cache = attn(q, k, v, None, meta)
    paged = attn(q, k, v, torch.zeros(2, 3, 4, 2, 16), meta)
    torch.testing.assert_close(no_cache, paged)
    decode = AttentionMetadata.build([1], [4], [[0]], tokens_per_block=4)
    with pytest.raises(ValueError, match="fresh prefill"):
        attn(q[:1], k[:1], v[:1], None, decode)
