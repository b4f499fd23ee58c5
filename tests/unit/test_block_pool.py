"""BlockPool: ref counts, LRU free list order, prefix index (hits, duplicates, collisions, eviction), integrity."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvflight.cache.block_pool import BlockPool


def test_allocate_takes_from_head_and_free_appends_to_tail() -> None:
    pool = BlockPool(6)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(1) == [2]
    assert pool.free_block_ids() == [3, 4, 5]
    pool.free(reversed([0, 1]))  # a request frees its table tail first
    assert pool.free_block_ids() == [3, 4, 5, 1, 0]
    assert pool.num_free_blocks == 5 and pool.num_used_blocks == 1
    assert pool.allocate(5) == [3, 4, 5, 1, 0]
    assert pool.num_allocated_blocks == 8
    pool.check_integrity()


def test_allocate_more_than_free_raises_and_changes_nothing() -> None:
    pool = BlockPool(3)
    pool.allocate(2)
    with pytest.raises(ValueError, match="num_blocks=2 but only 1 blocks are free"):
        pool.allocate(2)
    assert pool.free_block_ids() == [2]
    pool.check_integrity()


def test_bad_num_blocks() -> None:
    with pytest.raises(ValueError, match="num_blocks=0"):
        BlockPool(0)


def test_touch_and_ref_counts() -> None:
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.touch(a)
    assert [pool.ref_count(b) for b in range(4)] == [2, 2, 0, 0]
    pool.free(a)
    assert [pool.ref_count(b) for b in range(4)] == [1, 1, 0, 0]
    pool.free([1, 0])
    assert pool.free_block_ids() == [2, 3, 1, 0]
    # touching a free block takes it out of the free list in O(1), wherever it is
    pool.touch([1])
    assert pool.free_block_ids() == [2, 3, 0]
    assert pool.ref_count(1) == 1
    assert pool.num_free_among([0, 1, 2]) == 2
    pool.check_integrity()
    pool.free([1])
    with pytest.raises(ValueError, match="freed twice"):
        pool.free([1])


def test_register_lookup_and_parent_check() -> None:
    pool = BlockPool(4)
    b0, b1 = pool.allocate(2)
    uid0 = pool.register(b0, key=10, token_ids=(1, 2), parent_uid=None)
    uid1 = pool.register(b1, key=11, token_ids=(3, 4), parent_uid=uid0)
    assert uid0 is not None and uid1 is not None and uid0 != uid1
    assert pool.lookup(10, (1, 2), None) == b0
    assert pool.lookup(11, (3, 4), uid0) == b1
    assert pool.lookup(11, (3, 4), None) is None  # right tokens, wrong parent
    assert pool.lookup(11, (3, 5), uid0) is None  # right key, wrong tokens
    assert pool.lookup(12, (3, 4), uid0) is None  # unknown key
    assert pool.num_cached_blocks == 2
    pool.check_integrity()


def test_register_duplicate_and_collision() -> None:
    pool = BlockPool(4)
    b0, b1, b2 = pool.allocate(3)
    uid = pool.register(b0, key=5, token_ids=(1, 2), parent_uid=None)
    # the same content computed again into another block: known by the existing entry's uid, b1 stays private
    assert pool.register(b1, key=5, token_ids=(1, 2), parent_uid=None) == uid
    assert pool.block_uid(b1) is None
    # other content under the same key (a hash collision): refused, and no false hit afterwards
    assert pool.register(b2, key=5, token_ids=(9, 9), parent_uid=None) is None
    assert pool.lookup(5, (9, 9), None) is None
    assert pool.lookup(5, (1, 2), None) == b0
    pool.check_integrity()


def test_register_free_block_raises() -> None:
    pool = BlockPool(2)
    with pytest.raises(ValueError, match="block 0 is free"):
        pool.register(0, key=1, token_ids=(1,), parent_uid=None)


def test_free_registered_block_stays_reusable_until_it_reaches_the_head() -> None:
    pool = BlockPool(4)
    blocks = pool.allocate(3)  # [0, 1, 2]
    uids: list[int | None] = [None]
    for i, b in enumerate(blocks):
        uids.append(pool.register(b, key=100 + i, token_ids=(i,), parent_uid=uids[-1]))
    pool.free(reversed(blocks))
    assert pool.free_block_ids() == [3, 2, 1, 0]
    assert pool.lookup(100, (0,), None) == 0  # still cached while free
    assert pool.allocate(1) == [3]  # not registered: no eviction
    assert pool.num_evicted_blocks == 0
    assert pool.allocate(1) == [2]  # the request's tail block goes first
    assert pool.num_evicted_blocks == 1
    assert pool.lookup(102, (2,), uids[2]) is None
    assert pool.lookup(101, (1,), uids[1]) == 1
    # reuse block 1 (touch), then allocation passes it by and evicts 0
    pool.touch([1])
    assert pool.allocate(1) == [0]
    assert pool.num_evicted_blocks == 2
    assert pool.lookup(100, (0,), None) is None
    assert pool.lookup(101, (1,), uids[1]) == 1  # orphaned but harmless: no lookup can reach it via block 0
    assert pool.num_free_blocks == 0
    pool.check_integrity()


def test_reset_prefix_cache() -> None:
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.register(b, key=1, token_ids=(1,), parent_uid=None)
    pool.reset_prefix_cache()
    assert pool.lookup(1, (1,), None) is None and pool.num_cached_blocks == 0
    pool.check_integrity()


def test_check_integrity_detects_corruption() -> None:
    pool = BlockPool(3)
    pool.allocate(1)
    pool._ref_counts[0] = 0  # leaked: ref 0 but not in the free list
    with pytest.raises(AssertionError, match="not in the free list"):
        pool.check_integrity()
    pool = BlockPool(3)
    pool._ref_counts[1] = 1  # in use and free at once
    with pytest.raises(AssertionError, match="is in the free list"):
        pool.check_integrity()
    pool = BlockPool(3)
    (b,) = pool.allocate(1)
    pool.register(b, key=7, token_ids=(1,), parent_uid=None)
    pool._index[7] = 2  # index points to a block whose stored key differs
    with pytest.raises(AssertionError, match="index"):
        pool.check_integrity()


@settings(max_examples=150, deadline=None)
@given(num_blocks=st.integers(1, 8),
       ops=st.lists(st.tuples(st.sampled_from(["alloc", "free", "touch", "register"]), st.integers(0, 7),
                              st.integers(0, 3)), max_size=60))
def test_random_ops_match_a_reference_model(num_blocks: int, ops: list[tuple[str, int, int]]) -> None:
    """Random allocate/free/touch/register against a plain-list model of refs, LRU order and the index."""
    pool = BlockPool(num_blocks)
    refs = [0] * num_blocks
    free_order = list(range(num_blocks))
    index: dict[int, tuple[int, tuple[int, ...]]] = {}  # key -> (block, tokens)
    for op, a, b in ops:
        if op == "alloc":
            n = a % (num_blocks + 1)
            if n > len(free_order):
                with pytest.raises(ValueError):
                    pool.allocate(n)
                continue
            got = pool.allocate(n)
            assert got == free_order[:n]
            del free_order[:n]
            for blk in got:
                refs[blk] = 1
                for key in [k for k, (kb, _) in index.items() if kb == blk]:
                    del index[key]
        elif op == "free":
            blk = a % num_blocks
            if refs[blk] == 0:
                continue
            pool.free([blk])
            refs[blk] -= 1
            if refs[blk] == 0:
                free_order.append(blk)
        elif op == "touch":
            blk = a % num_blocks
            pool.touch([blk])
            if refs[blk] == 0:
                free_order.remove(blk)
            refs[blk] += 1
        else:
            blk = a % num_blocks
            if refs[blk] == 0 or pool.block_uid(blk) is not None:
                continue
            key, tokens = b, (a,)
            uid = pool.register(blk, key, tokens, None)
            if key in index:
                assert (uid is None) == (index[key][1] != tokens)
            else:
                assert uid is not None
                index[key] = (blk, tokens)
        assert pool.free_block_ids() == free_order
        assert [pool.ref_count(i) for i in range(num_blocks)] == refs
        for key, (blk, tokens) in index.items():
            assert pool.lookup(key, tokens, None) == blk
        assert pool.num_cached_blocks == len(index)
        pool.check_integrity()
