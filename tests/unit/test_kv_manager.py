"""KVCacheManager: prefix matching, slot allocation, incremental registration, LRU eviction, collision safety."""

from __future__ import annotations

import pytest

from kvflight.cache import block_pool
from kvflight.cache.kv_manager import KVCacheManager
from kvflight.types import Request, SamplingParams

TPB = 4  # tokens per block in these tests


def make_request(request_id: str, prompt: list[int], max_tokens: int = 8) -> Request:
    return Request(request_id=request_id, prompt_token_ids=list(prompt),
                   sampling_params=SamplingParams(max_tokens=max_tokens), eos_token_ids=frozenset({0}))


def admit(kv: KVCacheManager, req: Request) -> list[int]:
    """What the scheduler does for a new request whose whole remaining prompt fits: match, allocate, compute."""
    hits, num_cached, _ = kv.get_computed_blocks(req)
    new = kv.allocate_slots(req, req.num_tokens - num_cached, hits)
    assert new is not None
    req.num_computed_tokens = req.num_tokens
    kv.cache_blocks(req, req.num_computed_tokens)
    return kv.get_block_ids(req.request_id)


def test_num_blocks_needed_and_sizes() -> None:
    kv = KVCacheManager(10, TPB)
    assert [kv.num_blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    assert kv.num_free_blocks == 10 and kv.num_used_blocks == 0 and kv.usage == 0.0
    with pytest.raises(ValueError, match="tokens_per_block=0"):
        KVCacheManager(10, 0)


def test_caching_off_never_matches() -> None:
    kv = KVCacheManager(8, TPB, enable_caching=False)
    a = make_request("a", list(range(1, 10)))
    assert admit(kv, a) == [0, 1, 2]
    b = make_request("b", list(range(1, 10)))
    assert kv.get_computed_blocks(b) == ([], 0, [])
    assert admit(kv, b) == [3, 4, 5]
    assert kv.stats()["cached_blocks"] == 0
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 8
    kv.check_integrity()


def test_prefix_sharing_two_requests_share_two_blocks() -> None:
    kv = KVCacheManager(16, TPB)
    common = [11, 12, 13, 14, 15, 16, 17, 18]  # two full blocks
    a = make_request("a", common + [1, 2, 3])
    assert admit(kv, a) == [0, 1, 2]
    b = make_request("b", common + [7, 7])
    hits, num_cached, _ = kv.get_computed_blocks(b)
    assert (hits, num_cached) == ([0, 1], 8)
    assert kv.allocate_slots(b, b.num_tokens - num_cached, hits) == [3]
    assert kv.get_block_ids("b") == [0, 1, 3]
    assert [kv.pool.ref_count(i) for i in range(4)] == [2, 2, 1, 1]
    stats = kv.stats()
    assert stats["reused_blocks"] == 2 and stats["missed_blocks"] == 3 + 1
    kv.check_integrity()
    kv.free(a)
    assert [kv.pool.ref_count(i) for i in range(4)] == [1, 1, 0, 1]
    kv.free(b)
    assert kv.num_free_blocks == 16
    kv.check_integrity()


def test_fully_cached_prompt_leaves_one_token_to_compute() -> None:
    kv = KVCacheManager(8, TPB)
    a = make_request("a", list(range(1, 9)))  # exactly two blocks
    admit(kv, a)
    same = make_request("same", list(range(1, 9)))
    assert kv.get_computed_blocks(same) == ([0], 4, [])  # the last block is dropped: 4 tokens left to compute
    longer = make_request("longer", list(range(1, 10)))
    assert kv.get_computed_blocks(longer) == ([0, 1], 8, [])
    one = make_request("one", [1])
    assert kv.get_computed_blocks(one) == ([], 0, [])


def test_allocate_slots_counts_touched_free_blocks() -> None:
    kv = KVCacheManager(4, TPB)
    a = make_request("a", list(range(1, 9)))
    admit(kv, a)  # blocks [0, 1], both registered
    kv.free(a)  # free list: 2, 3, 1, 0
    hog = make_request("hog", [99])
    assert kv.allocate_slots(hog, 1) == [2]  # free list: 3, 1, 0
    b = make_request("b", list(range(1, 9)) + [5, 6, 7, 8, 9])  # hits [0, 1], needs 2 more blocks
    hits, num_cached, _ = kv.get_computed_blocks(b)
    assert (hits, num_cached) == ([0, 1], 8)
    # 2 new + 2 touched free hits = 4 > 3 free: refused, nothing changed
    assert kv.allocate_slots(b, b.num_tokens - num_cached, hits) is None
    assert kv.get_block_ids("b") == [] and kv.num_free_blocks == 3
    assert kv.pool.free_block_ids() == [3, 1, 0]
    kv.check_integrity()
    c = make_request("c", list(range(1, 9)) + [5])  # hits [0, 1], needs 1 more: 1 + 2 = 3 fits exactly
    hits, num_cached, _ = kv.get_computed_blocks(c)
    assert kv.allocate_slots(c, c.num_tokens - num_cached, hits) == [3]
    assert kv.get_block_ids("c") == [0, 1, 3]
    assert kv.num_free_blocks == 0
    kv.check_integrity()


def test_allocate_slots_grows_incrementally_for_decode() -> None:
    kv = KVCacheManager(8, TPB)
    r = make_request("r", [1, 2, 3])
    assert kv.allocate_slots(r, 3) == [0]
    r.num_computed_tokens = 3
    for tok, expected in [(4, []), (5, [1]), (6, []), (7, []), (8, []), (9, [2])]:
        r.append_token(tok)
        assert kv.allocate_slots(r, 1) == expected
        r.num_computed_tokens += 1
    assert kv.get_block_ids("r") == [0, 1, 2]
    with pytest.raises(ValueError, match="already holds 3 blocks"):
        kv.allocate_slots(r, 1, [5])


def test_cache_blocks_is_incremental_and_registers_decode_blocks() -> None:
    kv = KVCacheManager(8, TPB)
    r = make_request("r", [1, 2, 3, 4, 5, 6])
    kv.allocate_slots(r, 6)
    kv.cache_blocks(r, 6)
    assert kv.stats()["cached_blocks"] == 1
    r.num_computed_tokens = 6
    for tok in (7, 8, 9):
        r.append_token(tok)
        kv.allocate_slots(r, 1)
        r.num_computed_tokens += 1
        kv.cache_blocks(r, r.num_computed_tokens)
    assert r.num_computed_tokens == 9 and kv.stats()["cached_blocks"] == 2
    other = make_request("o", [1, 2, 3, 4, 5, 6, 7, 8, 100])
    assert kv.get_computed_blocks(other) == ([0, 1], 8, [])


def test_lru_eviction_order_of_cached_blocks() -> None:
    kv = KVCacheManager(6, TPB)
    a = make_request("a", list(range(1, 13)) + [50])  # 3 full blocks + 1 partial: [0, 1, 2, 3]
    assert admit(kv, a) == [0, 1, 2, 3]
    b = make_request("b", list(range(101, 105)) + [60])  # [4, 5]
    assert admit(kv, b) == [4, 5]
    kv.free(a)  # tail first: free list 3, 2, 1, 0
    kv.free(b)  # then 5, 4
    assert kv.pool.free_block_ids() == [3, 2, 1, 0, 5, 4]
    # new private allocations consume the least recently freed first: a's tail, then its prefix, then b
    x = make_request("x", [200])
    assert kv.allocate_slots(x, 1) == [3]
    assert kv.stats()["evicted_blocks"] == 0  # block 3 was partial, never registered
    y = make_request("y", [201])
    assert kv.allocate_slots(y, 1) == [2]
    assert kv.stats()["evicted_blocks"] == 1
    a2 = make_request("a2", list(range(1, 13)) + [51])
    assert kv.get_computed_blocks(a2) == ([0, 1], 8, [])  # block 2 (a's third block) is gone, 0 and 1 remain
    z = make_request("z", [202])
    assert kv.allocate_slots(z, 1) == [1]
    assert kv.get_computed_blocks(a2) == ([0], 4, [])
    b2 = make_request("b2", list(range(101, 105)) + [61])
    assert kv.get_computed_blocks(b2) == ([4], 4, [])  # b freed later, so it outlives a's blocks
    assert kv.stats()["evicted_blocks"] == 2
    for r in (x, y, z):
        kv.free(r)
    assert kv.num_free_blocks == 6
    kv.check_integrity()


def test_duplicate_computation_registers_once_and_chains_on() -> None:
    kv = KVCacheManager(16, TPB)
    prompt = list(range(1, 10))
    a, b = make_request("a", prompt), make_request("b", prompt)
    # both admitted in the same step, before either registered: both compute the prompt
    for r in (a, b):
        assert kv.get_computed_blocks(r) == ([], 0, [])
        kv.allocate_slots(r, r.num_tokens)
        r.num_computed_tokens = r.num_tokens
    for r in (a, b):
        kv.cache_blocks(r, r.num_computed_tokens)
    assert kv.get_block_ids("a") == [0, 1, 2] and kv.get_block_ids("b") == [3, 4, 5]
    assert kv.stats()["cached_blocks"] == 2  # a's blocks; b's duplicates stay private
    # b decodes on and fills its third block: registered under the shared chain
    for tok in (10, 11, 12):
        b.append_token(tok)
        kv.allocate_slots(b, 1)
        b.num_computed_tokens += 1
    kv.cache_blocks(b, b.num_computed_tokens)
    assert kv.stats()["cached_blocks"] == 3
    c = make_request("c", list(range(1, 13)) + [0])
    assert kv.get_computed_blocks(c) == ([0, 1, 5], 12, [])
    kv.free(a)
    kv.free(b)
    kv.check_integrity()


def test_forced_hash_collision_gives_no_false_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(block_pool, "hash_block_tokens", lambda parent_key, token_ids: 0)
    kv = KVCacheManager(8, TPB)
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    admit(kv, a)
    assert kv.stats()["cached_blocks"] == 1  # a's second block collides with its first: not registered
    b = make_request("b", [5, 6, 7, 8, 1, 2, 3, 4, 9])  # same key for every block, other tokens
    assert kv.get_computed_blocks(b) == ([], 0, [])
    admit(kv, b)
    a2 = make_request("a2", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert kv.get_computed_blocks(a2) == ([0], 4, [])  # the true hit still works
    for r in (a, b):
        kv.free(r)
    kv.check_integrity()


def test_collision_across_eviction_checks_the_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    """A child registered under an evicted parent must not match a new parent whose key collides with it."""
    monkeypatch.setattr(block_pool, "hash_block_tokens",
                        lambda parent_key, token_ids: hash((parent_key, sum(token_ids))))
    kv = KVCacheManager(3, 2)
    a = make_request("a", [1, 2, 5, 5, 0])  # blocks (1,2) (5,5) (0); key of (1,2) == key of (2,1)
    assert admit(kv, a) == [0, 1, 2]
    kv.free(a)  # free list 2, 1, 0
    kv.pool.touch([1])  # keep a's child (5,5) cached and in use, as if another request held it
    b = make_request("b", [2, 1, 7])  # (2,1) collides with (1,2)
    assert kv.get_computed_blocks(b) == ([], 0, [])
    assert admit(kv, b) == [2, 0]  # evicts a's (1,2), then registers (2,1) under the same key
    assert kv.stats()["evicted_blocks"] == 1
    c = make_request("c", [2, 1, 5, 5, 0])  # (2,1) hits b's block; (5,5)'s key matches a's child ...
    assert kv.get_computed_blocks(c) == ([2], 2, [])  # ... but that child's parent is a's evicted block: no hit
    kv.free(b)
    kv.pool.free([1])
    assert kv.num_free_blocks == 3
    kv.check_integrity()


def test_free_unknown_request_is_a_noop_and_get_block_ids_copies() -> None:
    kv = KVCacheManager(4, TPB)
    r = make_request("r", [1, 2, 3, 4, 5])
    kv.free(r)
    kv.allocate_slots(r, 5)
    table = kv.get_block_ids("r")
    table.append(99)
    assert kv.get_block_ids("r") == [0, 1]
    assert kv.get_block_ids("nobody") == []
    kv.free(r)
    kv.check_integrity()
