"""Host KV tier: HostTier LRU and locks, offload / load block ids through the KVCacheManager and the Scheduler, and
KVOffloader running those copies on real (CPU) tensors in the order that makes them correct."""

from __future__ import annotations

import itertools

import pytest
import torch

from kvflight.cache import block_pool
from kvflight.cache.host_tier import HostTier
from kvflight.cache.kv_manager import KVCacheManager
from kvflight.config import SchedulerConfig
from kvflight.runner.kv_offload import KVOffloader
from kvflight.sched.scheduler import Scheduler
from kvflight.types import Request, SamplingParams

TPB = 4  # tokens per block in these tests


def make_request(request_id: str, prompt: list[int], max_tokens: int = 8) -> Request:
    return Request(request_id=request_id, prompt_token_ids=list(prompt),
                   sampling_params=SamplingParams(max_tokens=max_tokens), eos_token_ids=frozenset({0}))


def admit(kv: KVCacheManager, req: Request) -> list[int]:
    """What the scheduler does for a new request whose whole remaining prompt fits: match, allocate, compute."""
    hits, num_cached, host_hits = kv.get_computed_blocks(req)
    new = kv.allocate_slots(req, req.num_tokens - num_cached, hits, host_hits)
    assert new is not None
    req.num_computed_tokens = req.num_tokens
    kv.cache_blocks(req, req.num_computed_tokens)
    kv.check_integrity()
    return kv.get_block_ids(req.request_id)


# ---------------------------------------------------------------------------------------------- HostTier
def test_host_tier_store_lookup_lru_and_locks() -> None:
    host = HostTier(2)
    assert host.lru_block_ids() == [0, 1]
    assert host.store(key=10, token_ids=(1, 2), parent_uid=None, uid=0) == 0
    assert host.lru_block_ids() == [1, 0] and host.is_locked(0)
    assert host.store(key=11, token_ids=(3, 4), parent_uid=0, uid=1) == 1
    # both blocks are locked this iteration: a third offload is dropped, nothing overwritten
    assert host.store(key=12, token_ids=(5, 6), parent_uid=None, uid=2) is None
    assert host.num_dropped_blocks == 1
    host.unlock_all()
    assert host.lookup(10, (1, 2), None) == 0
    assert host.lookup(10, (1, 2), 7) is None  # other parent
    assert host.lookup(10, (2, 1), None) is None  # other tokens under the same key
    # the same content (uid) again: no copy, just most recently used
    assert host.store(key=10, token_ids=(1, 2), parent_uid=None, uid=0) is None
    assert host.lru_block_ids() == [1, 0]
    # a new content evicts the least recently used block (1, holding uid 1)
    assert host.store(key=12, token_ids=(5, 6), parent_uid=None, uid=2) == 1
    assert host.lookup(11, (3, 4), 0) is None and host.num_evicted_blocks == 1
    assert host.lru_block_ids() == [0, 1]
    host.unlock_all()
    # other content under a key already held (a recompute under a new uid): replaces that entry in place
    assert host.store(key=10, token_ids=(1, 2), parent_uid=None, uid=9) == 0
    assert host.uid(0) == 9 and host.lookup(12, (5, 6), None) == 1
    host.check_integrity()
    host.unlock_all()
    host.lock(1)
    assert host.store(key=13, token_ids=(7, 8), parent_uid=None, uid=3) == 0  # 1 is locked: 0 goes
    host.unlock_all()
    host.reset()
    assert host.num_cached_blocks == 0 and host.lookup(12, (5, 6), None) is None
    host.check_integrity()
    with pytest.raises(ValueError, match="host block 0 is empty"):
        host.lock(0)
    with pytest.raises(ValueError, match="kv_host_cache_bytes"):
        HostTier(0)


# ---------------------------------------------------------------------------------------------- KVCacheManager
def test_evicted_block_is_offloaded_then_loaded_back_exact_ids() -> None:
    kv = KVCacheManager(4, TPB, num_host_blocks=4)
    assert kv.num_host_blocks == 4
    a = make_request("a", list(range(1, 9)) + [9])  # 2 full blocks + 1
    assert admit(kv, a) == [0, 1, 2]
    assert kv.take_transfers() == ([], [])
    kv.free(a)  # free list 3, 2, 1, 0
    c = make_request("c", list(range(21, 33)) + [33])  # 3 full blocks + 1: takes 3, 2, 1, 0
    assert admit(kv, c) == [3, 2, 1, 0]
    # 2 was partial (never registered); 1 and 0 were a's registered blocks: offloaded, in eviction order
    assert kv.take_transfers() == ([(1, 0), (0, 1)], [])
    assert kv.pool.host.lru_block_ids() == [2, 3, 0, 1]  # type: ignore[union-attr]
    kv.free(c)  # free list 0, 1, 2, 3 (0 partial; 1, 2, 3 registered)
    a2 = make_request("a2", list(range(1, 9)) + [10])
    match = kv.get_computed_blocks(a2)
    assert match == ([], 8, [1, 0])  # a's two blocks, both on the host (block 1's content is in host block 0)
    assert kv.allocate_slots(a2, 1, match.block_ids, match.host_block_ids) == [0, 1, 2]
    # the loads' destinations 0 and 1 come first; 1 and 2 held c's registered blocks: offloaded first (same step)
    offloads, loads = kv.take_transfers()
    assert offloads == [(1, 2), (2, 3)]
    assert loads == [(1, 0), (0, 1)]
    assert kv.pool.host.lru_block_ids() == [2, 3, 1, 0]  # type: ignore[union-attr]  # offloads, then hits
    stats = kv.stats()
    assert stats["host_hit_blocks"] == 2 and stats["reused_blocks"] == 2 and stats["offloaded_blocks"] == 4
    a2.num_computed_tokens = a2.num_tokens
    kv.cache_blocks(a2, a2.num_computed_tokens)
    kv.check_integrity()
    # the loaded blocks are registered on the GPU under their old uids: the next request hits them there
    a3 = make_request("a3", list(range(1, 9)) + [11])
    assert kv.get_computed_blocks(a3) == ([0, 1], 8, [])
    kv.free(a2)
    # a2's blocks are freed and evicted again: their content is still on the host, so no second copy
    d = make_request("d", list(range(41, 53)) + [53])
    admit(kv, d)
    offloads, loads = kv.take_transfers()
    assert [g for g, _ in offloads] == [3]  # only c's third block (not on the host yet); a's blocks: already there
    assert kv.stats()["offloaded_blocks"] == 5
    kv.free(d)
    assert kv.num_free_blocks == 4
    kv.check_integrity()


def test_host_lru_evicts_least_recently_used_and_hits_refresh() -> None:
    kv = KVCacheManager(2, TPB, num_host_blocks=3)
    host = kv.pool.host
    assert host is not None
    # each prompt: one full block + 1 token, so each request needs both GPU blocks and evicts the last one's
    prompts = {name: [base + i for i in range(4)] + [99] for name, base in
               (("p", 10), ("q", 20), ("r", 30), ("s", 40), ("t", 50))}

    ids = itertools.count()

    def run(name: str) -> tuple[list, list]:
        req = make_request(f"{name}{next(ids)}", prompts[name])
        admit(kv, req)
        kv.free(req)
        return kv.take_transfers()

    def on_host(name: str) -> int | None:
        tokens = tuple(prompts[name][:TPB])
        return host.lookup(block_pool.hash_block_tokens(None, tokens), tokens, None)

    assert run("p") == ([], [])
    assert run("q") == ([(0, 0)], [])  # p's block 0 -> host 0
    assert run("r") == ([(1, 1)], [])  # q's block 1 -> host 1
    assert host.lru_block_ids() == [2, 0, 1]
    # p comes back: loaded from host 0 into block 1 while r's block 0 goes to the empty host block 2
    assert run("p") == ([(0, 2)], [(0, 1)])
    assert host.lru_block_ids() == [1, 2, 0]  # the hit made host 0 most recently used
    assert run("s") == ([], [])  # evicts p's block again: its content is still on the host, no copy
    # t evicts s's block: the host is full; the least recently used is q (host 1), not p (stored first, hit later)
    assert run("t") == ([(0, 1)], [])
    assert (on_host("p"), on_host("q"), on_host("r"), on_host("s")) == (0, None, 2, 1)
    assert host.lru_block_ids() == [2, 0, 1]
    stats = kv.stats()
    assert stats["host_hit_blocks"] == 1 and stats["offloaded_blocks"] == 4 and stats["host_evicted_blocks"] == 1
    kv.check_integrity()


def test_load_source_is_locked_against_offloads_of_the_same_step() -> None:
    kv = KVCacheManager(2, TPB, num_host_blocks=1)
    a = make_request("a", [1, 2, 3, 4, 5])
    admit(kv, a)  # blocks 0 (registered), 1
    kv.free(a)  # free list 1, 0
    b = make_request("b", [6, 7, 8, 9, 10])
    admit(kv, b)  # takes 1, 0: a's block 0 goes to host block 0
    assert kv.take_transfers() == ([(0, 0)], [])
    kv.free(b)  # free list 0 (b's registered block), 1
    a2 = make_request("a2", [1, 2, 3, 4, 11])
    match = kv.get_computed_blocks(a2)
    assert match == ([], 4, [0])
    assert kv.allocate_slots(a2, 1, match.block_ids, match.host_block_ids) == [0, 1]
    # b's block 0 is evicted, but the only host block is this step's load source: that offload is dropped
    assert kv.take_transfers() == ([], [(0, 0)])
    assert kv.stats()["host_dropped_blocks"] == 1
    kv.free(a2)
    kv.check_integrity()


def test_host_hash_collision_gives_no_false_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(block_pool, "hash_block_tokens", lambda parent_key, token_ids: 0)
    kv = KVCacheManager(2, TPB, num_host_blocks=4)
    a = make_request("a", [1, 2, 3, 4, 5])
    admit(kv, a)
    kv.free(a)
    b = make_request("b", [5, 6, 7, 8, 9])  # same key, other tokens: no hit anywhere
    assert kv.get_computed_blocks(b) == ([], 0, [])
    admit(kv, b)  # evicts a's block to the host
    assert kv.take_transfers() == ([(0, 0)], [])
    kv.free(b)
    c = make_request("c", [5, 6, 7, 8, 1])  # b's block is still on the GPU under key 0
    assert kv.get_computed_blocks(c) == ([1], 4, [])
    x = make_request("x", [9, 9, 9, 9, 1])  # key 0 on both tiers, tokens match neither
    assert kv.get_computed_blocks(x) == ([], 0, [])
    a2 = make_request("a2", [1, 2, 3, 4, 0])
    assert kv.get_computed_blocks(a2) == ([], 4, [0])  # the GPU entry under key 0 is b's: the host has a's
    kv.check_integrity()


def test_reuse_off_or_reset_clears_the_host_tier() -> None:
    assert KVCacheManager(4, TPB, enable_caching=False, num_host_blocks=8).num_host_blocks == 0
    kv = KVCacheManager(2, TPB, num_host_blocks=2)
    a = make_request("a", [1, 2, 3, 4, 5])
    admit(kv, a)
    kv.free(a)
    admit(kv, make_request("b", [6, 7, 8, 9, 10]))
    kv.take_transfers()
    assert kv.stats()["host_cached_blocks"] == 1
    kv.reset_prefix_cache()
    assert kv.stats()["host_cached_blocks"] == 0
    assert kv.get_computed_blocks(make_request("a2", [1, 2, 3, 4, 5])) == ([], 0, [])
    kv.check_integrity()
    with pytest.raises(ValueError, match="no host tier"):
        KVCacheManager(4, TPB).allocate_slots(make_request("z", [1, 2, 3, 4, 5]), 1, [], [0])


# ---------------------------------------------------------------------------------------------- Scheduler
def test_scheduler_emits_the_copies_and_counts_host_hits_as_cached() -> None:
    kv = KVCacheManager(4, TPB, num_host_blocks=4)
    sched = Scheduler(SchedulerConfig(max_batch_size=4, max_num_tokens=32), kv, max_seq_len=16)

    def run(req: Request):
        sched.add_request(req)
        outs = []
        while sched.has_unfinished_requests():
            out = sched.schedule()
            outs.append(out)
            sched.update(out, [7] * sum(1 for s in out.scheduled if s.do_sample))
            sched.check_integrity()
        return outs

    outs = run(make_request("a", list(range(1, 9)) + [9], max_tokens=2))
    assert all(not o.kv_offloads and not o.kv_loads for o in outs)
    outs = run(make_request("c", list(range(21, 33)) + [33], max_tokens=2))
    assert outs[0].kv_offloads == [(1, 0), (0, 1)] and not outs[0].kv_loads
    a2 = make_request("a2", list(range(1, 9)) + [10], max_tokens=2)
    outs = run(a2)
    first = outs[0]
    assert first.kv_loads == [(1, 0), (0, 1)]
    assert [(s.start_pos, s.num_new_tokens, s.block_ids) for s in first.scheduled] == [(8, 1, [0, 1, 2])]
    assert a2.num_cached_tokens == 8
    stats = sched.iteration_stats()
    assert stats["host_hit_blocks"] == 2 and stats["reused_blocks"] == 2
    assert stats["num_kv_loads"] == 0  # the last iteration (a decode step) copied nothing


# ---------------------------------------------------------------------------------------------- KVOffloader
def _caches(num_layers: int, num_blocks: int) -> list[torch.Tensor]:
    # [2, num_blocks + 1, tokens_per_block, num_kv_heads, head_dim]; block b of layer l holds 1000 * l + b
    caches = []
    for layer in range(num_layers):
        kv = torch.empty(2, num_blocks + 1, TPB, 2, 3)
        for b in range(num_blocks + 1):
            kv[:, b] = 1000 * layer + b
        caches.append(kv)
    return caches


def test_offloader_runs_offloads_before_loads() -> None:
    caches = _caches(2, 4)
    off = KVOffloader(caches, num_host_blocks=3)
    assert [tuple(h.shape) for h in off.host_caches] == [(2, 3, TPB, 2, 3)] * 2
    assert not off.host_caches[0].is_pinned() and off.host_bytes == 2 * 2 * 3 * TPB * 2 * 3 * 4
    off.apply([(1, 0)], [])
    assert torch.all(off.host_caches[1][:, 0] == 1001)
    # block 2 is evicted to host 1 and reused as the destination of a load from host 0, in one step; a second
    # load reads host 1, written by this step's offload
    off.apply([(2, 1)], [(0, 2), (1, 3)])
    assert torch.all(off.host_caches[0][:, 1] == 2) and torch.all(off.host_caches[1][:, 1] == 1002)
    assert torch.all(caches[0][:, 2] == 1) and torch.all(caches[1][:, 2] == 1001)  # host 0's old block 1
    assert torch.all(caches[1][:, 3] == 1002)  # the evicted content, via host 1
    assert torch.all(caches[0][:, 4] == 4)  # the scratch block is never touched
    assert off.num_offloaded_blocks == 2 and off.num_loaded_blocks == 2
    off.apply([], [])


def test_offloader_rejects_bad_ids() -> None:
    off = KVOffloader(_caches(1, 4), num_host_blocks=2)
    with pytest.raises(ValueError, match="kv_offloads"):
        off.apply([(4, 0)], [])  # 4 is the scratch block
    with pytest.raises(ValueError, match="kv_loads"):
        off.apply([], [(2, 0)])
    with pytest.raises(ValueError, match="twice"):
        off.apply([], [(0, 1), (1, 1)])
    with pytest.raises(ValueError, match="num_host_blocks=0"):
        KVOffloader(_caches(1, 4), 0).apply([(0, 0)], [])
    with pytest.raises(ValueError, match="num_host_blocks=-1"):
        KVOffloader(_caches(1, 4), -1)


def test_manager_copies_applied_to_tensors_keep_every_block_content() -> None:
    """Drive the manager through evictions and host hits and run its copies on tensors: every block a request
    attends to holds the content (here: the request tokens) it was computed from."""
    num_blocks, num_host_blocks = 3, 2
    kv = KVCacheManager(num_blocks, TPB, num_host_blocks=num_host_blocks)
    caches = [torch.full((2, num_blocks + 1, TPB, 1, 1), -1.0)]
    off = KVOffloader(caches, num_host_blocks)
    prompts = [list(range(1, 9)) + [9], list(range(11, 19)) + [19], list(range(1, 9)) + [29],
               list(range(11, 19)) + [39], list(range(1, 5)) + [40] * 4 + [41], list(range(1, 9)) + [49]]
    num_loads = 0
    for i, prompt in enumerate(prompts):
        req = make_request(f"r{i}", prompt)
        hits, num_cached, host_hits = kv.get_computed_blocks(req)
        assert kv.allocate_slots(req, req.num_tokens - num_cached, hits, host_hits) is not None
        offloads, loads = kv.take_transfers()
        num_loads += len(loads)
        off.apply(offloads, loads)
        table = kv.get_block_ids(req.request_id)
        for pos in range(num_cached):  # what this request reuses holds its own tokens
            assert caches[0][0, table[pos // TPB], pos % TPB, 0, 0] == prompt[pos], (i, pos)
        for pos in range(num_cached, req.num_tokens):  # the "forward" writes the rest
            caches[0][:, table[pos // TPB], pos % TPB] = prompt[pos]
        req.num_computed_tokens = req.num_tokens
        kv.cache_blocks(req, req.num_tokens)
        kv.free(req)
        kv.check_integrity()
    assert num_loads >= 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offloader_on_cuda_pinned_round_trip_in_order() -> None:
    caches = [c.to(device="cuda", dtype=torch.float16) for c in _caches(3, 6)]  # values <= 2006: exact
    before = [c.clone() for c in caches]
    off = KVOffloader(caches, num_host_blocks=4)
    assert off.host_caches[0].is_pinned()
    off.apply([(0, 0), (1, 1), (5, 2)], [])
    # 5 is evicted to host 3 and is the destination of a load from host 0 (old block 0) in the same step; block 4
    # gets the old block 5 back through host 2, written by the previous step
    off.apply([(5, 3)], [(0, 5), (2, 4)])
    for c, b, h in zip(caches, before, off.host_caches):
        assert torch.equal(h[:, 3], b[:, 5].cpu()) and torch.equal(h[:, 1], b[:, 1].cpu())
        assert torch.equal(c[:, 5], b[:, 0]) and torch.equal(c[:, 4], b[:, 5])
        assert torch.equal(c[:, :4], b[:, :4]) and torch.equal(c[:, 6], b[:, 6])


def test_offloader_copies_runs_of_consecutive_host_blocks() -> None:
    from kvflight.runner.kv_offload import _runs

    assert _runs([3, 4, 5, 9, 1, 2]) == [(0, 3, 3), (3, 9, 1), (4, 1, 2)]
    assert _runs([7]) == [(0, 7, 1)] and _runs([2, 1]) == [(0, 2, 1), (1, 1, 1)]


# ---------------------------------------------------------------------------------------------- reporting
def test_prometheus_counts_host_hits_and_offloads() -> None:
    from kvflight.server.engine_core import EngineStats
    from kvflight.server.metrics import ServerMetrics

    m = ServerMetrics("m")
    m.update_engine_stats(EngineStats(prefix_reused_blocks=3, prefix_missed_blocks=1, prefix_host_hit_blocks=1,
                                      kv_offloaded_blocks=4, num_host_blocks=8, num_host_cached_blocks=2))
    m.update_engine_stats(EngineStats(prefix_reused_blocks=6, prefix_missed_blocks=2, prefix_host_hit_blocks=4,
                                      kv_offloaded_blocks=5, num_host_blocks=8, num_host_cached_blocks=4))
    text = m.render().decode()

    def value(name: str) -> float:
        line = next(ln for ln in text.splitlines() if ln.startswith(name + "{"))
        return float(line.rsplit(" ", 1)[1])

    assert value("kvflight:prefix_cache_host_hits_total") == 4
    assert value("kvflight:kv_cache_offloaded_blocks_total") == 5
    assert value("kvflight:prefix_cache_hits_total") == 6
    assert value("kvflight:prefix_cache_host_hit_rate") == 0.5
    assert value("kvflight:host_kv_cache_usage_perc") == 0.5
