"""Scheduler: exact traces (block ids, preemption, chunking, FCFS), stop conditions, aborts, random-trace invariants."""

from __future__ import annotations

from dataclasses import dataclass
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvflight.cache import block_pool
from kvflight.cache.kv_manager import KVCacheManager
from kvflight.config import SchedulerConfig
from kvflight.sched.scheduler import Scheduler
from kvflight.types import FinishReason, Request, RequestStatus, SamplingParams, SchedulerOutput

EOS = 0


def make_request(request_id: str, prompt: list[int], max_tokens: int = 4, **sampling: object) -> Request:
    return Request(request_id=request_id, prompt_token_ids=list(prompt),
                   sampling_params=SamplingParams(max_tokens=max_tokens, **sampling),  # type: ignore[arg-type]
                   eos_token_ids=frozenset({EOS}))


def make_scheduler(num_blocks: int, tokens_per_block: int = 4, caching: bool = True, max_seq_len: int = 64,
                   num_host_blocks: int = 0, **config: object) -> Scheduler:
    kv = KVCacheManager(num_blocks, tokens_per_block, caching, num_host_blocks=num_host_blocks)
    return Scheduler(SchedulerConfig(**config), kv, max_seq_len)  # type: ignore[arg-type]


def trace(out: SchedulerOutput) -> list[tuple[str, int, int, list[int], bool, bool]]:
    return [(s.request.request_id, s.start_pos, s.num_new_tokens, s.block_ids, s.do_sample, s.is_context)
            for s in out.scheduled]


def step(sched: Scheduler, token: int) -> tuple[SchedulerOutput, list[Request]]:
    """One iteration where every sampling request samples `token`; checks budgets and integrity."""
    out = sched.schedule()
    assert len(out.scheduled) <= sched.config.max_batch_size
    assert out.num_scheduled_tokens == sum(s.num_new_tokens for s in out.scheduled) <= sched.config.max_num_tokens
    got = sched.update(out, [token] * sum(1 for s in out.scheduled if s.do_sample))
    sched.check_integrity()
    return out, got


def run_to_end(sched: Scheduler, max_steps: int = 1000) -> int:
    n = 0
    while sched.has_unfinished_requests():
        step(sched, n % 50 + 1)
        n += 1
        assert n < max_steps, "requests did not finish"
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    return n


# ---------------------------------------------------------------------------------------------- exact traces
def test_trace_prefix_hits_across_steps_exact_block_ids() -> None:
    sched = make_scheduler(16, max_batch_size=4, max_num_tokens=16)
    reqs = [make_request(f"r{i}", list(range(1, 11)), max_tokens=6) for i in range(5)]
    for r in reqs:
        sched.add_request(r)
    out, _ = step(sched, 1)
    # r0 takes the whole prompt, r1 the rest of the budget; nothing is registered yet, so no sharing
    assert trace(out) == [("r0", 0, 10, [0, 1, 2], True, True), ("r1", 0, 6, [3, 4], False, True)]
    assert (out.num_context_requests, out.num_generation_requests, out.num_context_tokens) == (2, 0, 16)
    out, _ = step(sched, 2)
    # r2, r3 hit r0's two full prompt blocks (8 tokens) and compute the last 2 prompt tokens
    assert trace(out) == [("r0", 10, 1, [0, 1, 2], True, False), ("r1", 6, 4, [3, 4, 5], True, True),
                          ("r2", 8, 2, [0, 1, 6], True, True), ("r3", 8, 2, [0, 1, 7], True, True)]
    assert reqs[2].num_cached_tokens == 8 and reqs[1].num_cached_tokens == 0
    assert [sched.kv.pool.ref_count(b) for b in (0, 1)] == [3, 3]
    assert sched.num_running == 4 and sched.num_waiting == 1  # r4 waits: max_batch_size
    run_to_end(sched)
    assert all(r.finish_reason == FinishReason.LENGTH and r.num_output_tokens == 6 for r in reqs)
    assert reqs[4].num_cached_tokens == 8
    stats = sched.kv.stats()
    assert (stats["reused_blocks"], stats["missed_blocks"]) == (6, 9)


def test_preemption_max_utilization_newest_preempted_and_recomputes() -> None:
    sched = make_scheduler(5, max_batch_size=4, max_num_tokens=64)
    a = make_request("A", list(range(1, 8)), max_tokens=6)
    b = make_request("B", list(range(11, 18)), max_tokens=6)
    sched.add_request(a)
    sched.add_request(b)
    outs = [step(sched, 100 + i)[0] for i in range(3)]
    assert trace(outs[0]) == [("A", 0, 7, [0, 1], True, True), ("B", 0, 7, [2, 3], True, True)]
    assert trace(outs[1]) == [("A", 7, 1, [0, 1], True, False), ("B", 7, 1, [2, 3], True, False)]
    # both need a third block, one is free: A (older) gets it; B, the newest, is preempted (it is the requester)
    assert trace(outs[2]) == [("A", 8, 1, [0, 1, 4], True, False)]
    assert outs[2].preempted_ids == ["B"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert sched.kv.pool.free_block_ids() == [3, 2]  # B's blocks, tail first
    assert sched.iteration_stats()["num_preempted_requests"] == 1
    outs += [step(sched, 100 + i)[0] for i in range(3, 7)]
    assert a.is_finished and [s.request for s in outs[5].scheduled] == [a]  # B cannot come back before
    # B comes back after A finished: its two full blocks are still cached, one token is recomputed;
    # its third block is A's tail block 4 (least recently freed after B's own)
    assert trace(outs[6]) == [("B", 8, 1, [2, 3, 4], True, False)]
    assert sched.kv.stats()["evicted_blocks"] == 1
    for i in range(7, 10):
        step(sched, 100 + i)
    assert not sched.has_unfinished_requests() and sched.kv.num_free_blocks == 5
    assert b.num_tokens == 13 and b.output_token_ids == [100, 101, 106, 107, 108, 109]
    assert a.output_token_ids == [100, 101, 102, 103, 104, 105]
    assert b.num_cached_tokens == 0 and b.finish_reason == FinishReason.LENGTH


def test_preemption_takes_newest_first_and_requeues_at_front() -> None:
    sched = make_scheduler(4, max_batch_size=4, max_num_tokens=64)
    a = make_request("A", list(range(1, 9)), max_tokens=4)
    b = make_request("B", list(range(11, 15)), max_tokens=3)
    c = make_request("C", list(range(21, 25)), max_tokens=3)
    for r in (a, b, c):
        sched.add_request(r)
    out, _ = step(sched, 100)
    assert trace(out) == [("A", 0, 8, [0, 1], True, True), ("B", 0, 4, [2], True, True),
                          ("C", 0, 4, [3], True, True)]
    out, _ = step(sched, 101)
    # A needs a block: C (newest) is preempted, A takes C's block; B then needs one and preempts itself
    assert out.preempted_ids == ["C", "B"]
    assert trace(out) == [("A", 8, 1, [0, 1, 3], True, False)]
    assert [r.request_id for r in sched._waiting] == ["B", "C"]
    outs = [step(sched, 102 + i)[0] for i in range(3)]
    assert a.is_finished
    # B recomputes 1 token on its cached prompt block; C's block was evicted: it recomputes all 5 tokens
    assert trace(outs[2]) == [("B", 4, 1, [2, 3], True, False), ("C", 0, 5, [1, 0], True, True)]
    step(sched, 105)
    assert not sched.has_unfinished_requests() and sched.kv.num_free_blocks == 4
    assert b.num_tokens == c.num_tokens == 7
    assert b.output_token_ids == [100, 104, 105] and c.num_preemptions == 1


def test_guaranteed_no_evict_waits_instead_of_preempting() -> None:
    sched = make_scheduler(5, max_batch_size=4, max_num_tokens=64, batch_scheduler_policy="guaranteed_no_evict")
    a = make_request("A", list(range(1, 8)), max_tokens=6)  # worst case 13 tokens = 4 blocks
    b = make_request("B", list(range(11, 18)), max_tokens=6)
    sched.add_request(a)
    sched.add_request(b)
    out, _ = step(sched, 100)
    assert trace(out) == [("A", 0, 7, [0, 1], True, True)]  # B would need 4 + A's 2 reserved > 3 free
    n = 1
    while sched.has_unfinished_requests():
        out, _ = step(sched, 100 + n)
        assert not out.preempted_ids
        n += 1
    assert a.num_preemptions == b.num_preemptions == 0
    assert b.output_token_ids == [106, 107, 108, 109, 110, 111]
    assert sched.kv.num_free_blocks == 5


def test_chunked_context_splits_long_prompts() -> None:
    sched = make_scheduler(16, max_batch_size=4, max_num_tokens=4)
    r = make_request("r", list(range(1, 11)), max_tokens=2)
    sched.add_request(r)
    outs = [step(sched, 7)[0] for _ in range(4)]
    assert [trace(o) for o in outs] == [
        [("r", 0, 4, [0], False, True)],
        [("r", 4, 4, [0, 1], False, True)],
        [("r", 8, 2, [0, 1, 2], True, True)],
        [("r", 10, 1, [0, 1, 2], True, False)],
    ]
    assert r.is_finished and r.output_token_ids == [7, 7]


def test_chunked_context_shares_budget_with_decodes() -> None:
    sched = make_scheduler(16, max_batch_size=4, max_num_tokens=8)
    d = make_request("d", [1, 2], max_tokens=5)
    sched.add_request(d)
    step(sched, 9)
    w = make_request("w", list(range(1, 9)), max_tokens=1)
    sched.add_request(w)
    out, _ = step(sched, 9)
    assert trace(out) == [("d", 2, 1, [0], True, False), ("w", 0, 7, [1, 2], False, True)]


def test_no_chunked_context_waits_for_whole_prompt_and_does_not_skip() -> None:
    sched = make_scheduler(16, max_batch_size=4, max_num_tokens=8, enable_chunked_context=False)
    d = make_request("d", [1, 2], max_tokens=3)
    sched.add_request(d)
    step(sched, 9)
    w = make_request("w", list(range(1, 9)), max_tokens=1)  # 8 tokens: does not fit next to d's decode
    short = make_request("short", [5], max_tokens=1)  # would fit, but must not jump the queue
    sched.add_request(w)
    sched.add_request(short)
    out, _ = step(sched, 9)
    assert trace(out) == [("d", 2, 1, [0], True, False)]
    out, _ = step(sched, 9)
    assert trace(out) == [("d", 3, 1, [0], True, False)]
    assert d.is_finished
    out, _ = step(sched, 9)
    assert trace(out) == [("w", 0, 8, [1, 2], True, True)]  # whole prompt, then short has no budget left
    out, _ = step(sched, 9)
    assert [s.request.request_id for s in out.scheduled] == ["short"]
    run_to_end(sched)


def test_no_chunked_context_still_chunks_a_recompute_longer_than_an_iteration() -> None:
    sched = make_scheduler(3, tokens_per_block=4, caching=False, max_batch_size=4, max_num_tokens=8,
                           enable_chunked_context=False)
    a = make_request("a", list(range(1, 5)), max_tokens=8)  # grows to 12 tokens = 3 blocks
    b = make_request("b", list(range(1, 5)), max_tokens=8)
    sched.add_request(a)
    sched.add_request(b)
    for _ in range(4):
        step(sched, 3)
    assert b.num_preemptions == 1 and b.num_tokens == 5
    run_to_end(sched)
    assert b.num_tokens == 12 and b.num_preemptions >= 1


@pytest.mark.parametrize("chunked", [False, True])
def test_fcfs_long_prompt_at_head_is_not_starved(chunked: bool) -> None:
    """Short requests keep arriving behind a prompt that needs the whole budget: none may jump ahead of it."""
    sched = make_scheduler(64, max_batch_size=8, max_num_tokens=8, enable_chunked_context=chunked)
    first = make_request("s0", [1, 2], max_tokens=4)
    sched.add_request(first)
    step(sched, 3)
    long = make_request("long", list(range(100, 108)), max_tokens=2)  # 8 tokens: the whole budget
    sched.add_request(long)
    scheduled_before_long: list[str] = []
    long_started_at = None
    for i in range(1, 12):
        sched.add_request(make_request(f"s{i}", [1, 2], max_tokens=30))  # a new short request every step
        out, _ = step(sched, 3)
        ids = [x.request.request_id for x in out.scheduled]
        if "long" in ids and long_started_at is None:
            long_started_at = i
        if long_started_at is None:
            scheduled_before_long += [x for x in ids if x != "s0"]
    assert scheduled_before_long == []  # no short request behind it ran before it
    # without chunking it waits for s0 to finish (s0's decode takes 1 of the 8 tokens); with chunking it starts now
    assert long_started_at == (4 if not chunked else 1)
    assert long.is_finished
    run_to_end(sched)


def test_max_batch_size_is_respected() -> None:
    sched = make_scheduler(64, max_batch_size=2, max_num_tokens=64)
    reqs = [make_request(f"r{i}", [1, 2, 3], max_tokens=2) for i in range(5)]
    for r in reqs:
        sched.add_request(r)
    out, _ = step(sched, 5)
    assert [s.request.request_id for s in out.scheduled] == ["r0", "r1"]
    stats = sched.iteration_stats()
    assert stats["num_active_requests"] == 2 and stats["num_queued_requests"] == 3
    run_to_end(sched)
    assert all(r.num_output_tokens == 2 for r in reqs)


def test_prefix_sharing_through_the_scheduler() -> None:
    sched = make_scheduler(32, max_batch_size=4, max_num_tokens=64)
    common = list(range(50, 58))  # 2 blocks
    a = make_request("a", common + [1, 2, 3], max_tokens=8)
    sched.add_request(a)
    step(sched, 4)
    b = make_request("b", common + [9], max_tokens=2)
    sched.add_request(b)
    out, _ = step(sched, 4)
    tables = {s.request.request_id: s.block_ids for s in out.scheduled}
    assert tables["a"][:2] == tables["b"][:2] == [0, 1]
    assert tables["b"] == [0, 1, 3] and b.num_cached_tokens == 8
    assert sched.kv.pool.ref_count(0) == sched.kv.pool.ref_count(1) == 2
    stats = sched.iteration_stats()
    assert stats["reused_blocks"] == 2 and stats["num_ctx_tokens"] == 1
    run_to_end(sched)


# ---------------------------------------------------------------------------------------------- stop conditions
def run_one(req: Request, tokens: list[int], max_seq_len: int = 64) -> list[list[Request]]:
    sched = make_scheduler(32, max_seq_len=max_seq_len, max_batch_size=4, max_num_tokens=64)
    sched.add_request(req)
    got = []
    for tok in tokens:
        if not sched.has_unfinished_requests():
            break
        out = sched.schedule()
        got.append(sched.update(out, [tok]))
        sched.check_integrity()
    return got


def test_eos_stops_after_min_tokens() -> None:
    r = make_request("r", [1, 2], max_tokens=10, min_tokens=2)
    run_one(r, [EOS, EOS, 5])
    assert r.output_token_ids == [EOS, EOS] and r.finish_reason == FinishReason.STOP and r.stop_reason is None
    assert r.first_token_time is not None and r.first_scheduled_time is not None


def test_ignore_eos() -> None:
    r = make_request("r", [1, 2], max_tokens=3, ignore_eos=True)
    run_one(r, [EOS, EOS, EOS, EOS])
    assert r.output_token_ids == [EOS, EOS, EOS] and r.finish_reason == FinishReason.LENGTH


def test_stop_token_ids_set_stop_reason() -> None:
    r = make_request("r", [1, 2], max_tokens=10, stop_token_ids=[42])
    got = run_one(r, [5, 42, 6])
    assert r.output_token_ids == [5, 42] and r.finish_reason == FinishReason.STOP and r.stop_reason == 42
    assert got[-1] == [r] and r.is_finished


def test_max_seq_len_stops_with_length() -> None:
    r = make_request("r", [1, 2, 3], max_tokens=10)
    run_one(r, [5] * 10, max_seq_len=5)
    assert r.num_tokens == 5 and r.finish_reason == FinishReason.LENGTH


# ---------------------------------------------------------------------------------------------- aborts, errors, stats
def test_finish_requests_waiting_running_and_mid_step() -> None:
    sched = make_scheduler(32, max_batch_size=2, max_num_tokens=64)
    reqs = [make_request(f"r{i}", [1, 2, 3], max_tokens=5) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    step(sched, 5)
    sched.finish_requests(["r3"], FinishReason.ABORT)  # waiting
    assert reqs[3].status == RequestStatus.FINISHED and reqs[3].finish_reason == FinishReason.ABORT
    out = sched.schedule()
    sched.finish_requests("r0", FinishReason.ABORT)  # running, between schedule() and update()
    got = sched.update(out, [5, 5])
    assert got == [reqs[1]] and reqs[0].num_output_tokens == 1
    sched.check_integrity()
    sched.finish_requests(["r1", "nope"], FinishReason.ABORT)
    assert sched.get_request("r1") is None and sched.get_request("r2") is reqs[2]
    run_to_end(sched)
    assert reqs[2].num_output_tokens == 5


def test_add_request_validation() -> None:
    sched = make_scheduler(2, tokens_per_block=4, max_seq_len=64)
    sched.add_request(make_request("a", [1], max_tokens=7))  # 8 tokens = 2 blocks: fits
    with pytest.raises(ValueError, match="request_id='a' is already"):
        sched.add_request(make_request("a", [1]))
    with pytest.raises(ValueError, match="needs 3 KV blocks but the cache has 2"):
        sched.add_request(make_request("big", [1], max_tokens=8))


def test_update_checks_the_number_of_sampled_tokens() -> None:
    sched = make_scheduler(8)
    sched.add_request(make_request("a", [1, 2]))
    out = sched.schedule()
    with pytest.raises(ValueError, match="got 0 sampled_token_ids for 1"):
        sched.update(out, [])


def test_iteration_stats_fields() -> None:
    sched = make_scheduler(8, max_batch_size=4, max_num_tokens=16)
    sched.add_request(make_request("a", [1, 2, 3, 4, 5]))
    step(sched, 1)
    stats = sched.iteration_stats()
    for key in ("iter", "num_active_requests", "num_queued_requests", "num_context_requests", "num_gen_requests",
                "num_scheduled_requests", "num_ctx_tokens", "max_num_blocks", "free_num_blocks", "used_num_blocks",
                "tokens_per_block", "reused_blocks", "missed_blocks", "num_preemptions_total"):
        assert key in stats, key
    assert stats["num_context_requests"] == 1 and stats["num_ctx_tokens"] == 5 and stats["used_num_blocks"] == 2
    assert all(isinstance(v, (int, float)) for v in stats.values())


# ---------------------------------------------------------------------------------------------- random traces
@dataclass
class Arrival:
    step: int
    prompt: list[int]
    max_tokens: int


@st.composite
def scenarios(draw: st.DrawFn, host_tier: bool = False) -> dict:
    """Random arrivals, budgets and policies; host_tier=True: caching on, a host tier, few GPU blocks to spare."""
    tpb = draw(st.sampled_from([1, 2, 4]))
    max_seq_len = draw(st.integers(4, 24))
    vocab = draw(st.sampled_from([3, 1000]))  # a tiny vocabulary makes shared and duplicate blocks common
    shared = draw(st.lists(st.integers(1, vocab), min_size=max_seq_len, max_size=max_seq_len))
    arrivals = []
    for _ in range(draw(st.integers(1, 7))):
        prompt_len = draw(st.integers(1, max_seq_len - 1))
        num_shared = draw(st.integers(0, prompt_len))
        tail = draw(st.lists(st.integers(1, vocab), min_size=prompt_len - num_shared,
                             max_size=prompt_len - num_shared))
        arrivals.append(Arrival(draw(st.integers(0, 12)), shared[:num_shared] + tail, draw(st.integers(1, 10))))
    # later returns of earlier prompts (another last token): hits on blocks that may have been evicted meanwhile
    for _ in range(draw(st.integers(0, 3))):
        earlier = arrivals[draw(st.integers(0, len(arrivals) - 1))]
        arrivals.append(Arrival(earlier.step + draw(st.integers(4, 30)), earlier.prompt[:-1] + [vocab + 1],
                                draw(st.integers(1, 10))))
    worst = max(-(-min(len(a.prompt) + a.max_tokens, max_seq_len) // tpb) for a in arrivals)
    return {
        "tpb": tpb, "max_seq_len": max_seq_len, "arrivals": arrivals,
        "num_blocks": worst + draw(st.sampled_from([0, 0, 1, 2] if host_tier else [0, 0, 1, 2, 4, 8])),
        "policy": draw(st.sampled_from(["max_utilization", "guaranteed_no_evict"])),
        "chunked": draw(st.booleans()), "caching": host_tier or draw(st.booleans()),
        "max_batch_size": draw(st.integers(1, 4)), "max_num_tokens": draw(st.integers(1, 12)),
        "weak_hash": draw(st.booleans()),
        "host_blocks": draw(st.sampled_from([1, 2, 4, 16] if host_tier else [0, 0, 0, 1, 4, 16])),
        "aborts": draw(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 6), st.booleans()), max_size=2)),
    }


def simulate(sc: dict) -> None:
    tpb = sc["tpb"]
    sched = make_scheduler(sc["num_blocks"], tokens_per_block=tpb, caching=sc["caching"],
                           max_seq_len=sc["max_seq_len"], num_host_blocks=sc["host_blocks"],
                           max_batch_size=sc["max_batch_size"],
                           max_num_tokens=sc["max_num_tokens"], batch_scheduler_policy=sc["policy"],
                           enable_chunked_context=sc["chunked"])
    kv = sched.kv
    arrivals: list[Arrival] = sc["arrivals"]
    reqs: list[Request] = []
    order: dict[str, int] = {}
    aborted: set[str] = set()
    # a fake KV cache: each block slot holds the token ids its K/V depends on (the sequence up to that position);
    # checks what every step attends to. host_store: the same for the host tier's blocks.
    kv_store: dict[int, list[tuple[int, ...] | None]] = {b: [None] * tpb for b in range(kv.num_blocks)}
    host_store: dict[int, list[tuple[int, ...] | None]] = {b: [None] * tpb for b in range(sc["host_blocks"])}
    n = 0
    while n <= max(a.step for a in arrivals) or sched.has_unfinished_requests():
        for i, a in enumerate(arrivals):
            if a.step == n:
                r = make_request(f"r{i}", a.prompt, max_tokens=a.max_tokens)
                order[r.request_id] = len(reqs)
                reqs.append(r)
                sched.add_request(r)
        waiting_before = [r.request_id for r in sched._waiting]
        running_before = {r.request_id for r in sched._running}
        out = sched.schedule()
        # budgets
        assert len(out.scheduled) <= sc["max_batch_size"]
        assert out.num_scheduled_tokens == sum(s.num_new_tokens for s in out.scheduled) <= sc["max_num_tokens"]
        if sc["policy"] == "guaranteed_no_evict":
            assert not out.preempted_ids
        ids = [s.request.request_id for s in out.scheduled]
        assert len(set(ids)) == len(ids)
        # running first (arrival order), then a prefix of the waiting queue (FCFS, nobody skipped)
        num_old = sum(1 for i in ids if i in running_before)
        assert all(i in running_before for i in ids[:num_old])
        assert [order[i] for i in ids[:num_old]] == sorted(order[i] for i in ids[:num_old])
        assert ids[num_old:] == waiting_before[:len(ids) - num_old]
        assert out.num_context_requests + out.num_generation_requests == len(out.scheduled)
        assert out.num_context_tokens == sum(s.num_new_tokens for s in out.scheduled if s.is_context)
        # host-tier copies: distinct destinations, loads only into blocks of requests admitted now; the runner's
        # order (offloads, then loads) applied to the fake cache
        if not sc["host_blocks"] or not sc["caching"]:
            assert not out.kv_offloads and not out.kv_loads
        assert len({h for _, h in out.kv_offloads}) == len(out.kv_offloads)
        assert len({g for _, g in out.kv_loads}) == len(out.kv_loads)
        admitted_blocks = {b for s in out.scheduled[num_old:] for b in s.block_ids}
        assert all(g in admitted_blocks and kv.pool.ref_count(g) >= 1 for _, g in out.kv_loads)
        for g, h in out.kv_offloads:
            assert kv_store[g][-1] is not None, "offloading a block that was never computed"
            host_store[h] = list(kv_store[g])
        for h, g in out.kv_loads:
            assert host_store[h][-1] is not None, "loading a host block that was never written"
            kv_store[g] = list(host_store[h])
        for s in out.scheduled:
            r = s.request
            assert s.num_new_tokens >= 1 and r.num_computed_tokens == s.start_pos + s.num_new_tokens <= r.num_tokens
            assert s.do_sample == (r.num_computed_tokens == r.num_tokens)
            assert len(s.block_ids) * tpb >= r.num_computed_tokens
            assert s.block_ids == kv.get_block_ids(r.request_id)
            for pos in range(s.start_pos):  # the context this step attends to is this request's own tokens
                assert kv_store[s.block_ids[pos // tpb]][pos % tpb] == tuple(r.all_token_ids[:pos + 1])
            for pos in range(s.start_pos, r.num_computed_tokens):
                block_id = s.block_ids[pos // tpb]
                assert kv.pool.ref_count(block_id) == 1, "writing into a shared block"
                assert block_id not in {g for _, g in out.kv_loads}, "computing into a loaded block"
                kv_store[block_id][pos % tpb] = tuple(r.all_token_ids[:pos + 1])
        if not sc["chunked"]:
            for s in out.scheduled[num_old:]:  # newly admitted: the whole rest of the prompt, unless too long
                remaining = s.request.num_tokens - s.start_pos
                assert s.num_new_tokens == remaining or remaining > sc["max_num_tokens"]
        for abort_step, idx, between in sc["aborts"]:  # aborts between schedule() and update()
            if abort_step == n and between and idx < len(reqs) and not reqs[idx].is_finished:
                sched.finish_requests([reqs[idx].request_id], FinishReason.ABORT)
                aborted.add(reqs[idx].request_id)
        sampled = [n % 50 + 1 for s in out.scheduled if s.do_sample]  # never EOS
        got = sched.update(out, sampled)
        assert all(r.num_output_tokens >= 1 for r in got)
        for abort_step, idx, between in sc["aborts"]:  # aborts after update()
            if abort_step == n and not between and idx < len(reqs) and not reqs[idx].is_finished:
                sched.finish_requests([reqs[idx].request_id], FinishReason.ABORT)
                aborted.add(reqs[idx].request_id)
        sched.check_integrity()
        n += 1
        assert n < 3000, "no progress: requests never finish"
    assert kv.num_free_blocks == kv.num_blocks and kv.num_used_blocks == 0
    for r in reqs:
        assert r.is_finished
        if r.request_id in aborted:
            assert r.finish_reason == FinishReason.ABORT
        else:
            assert r.finish_reason == FinishReason.LENGTH
            assert r.num_tokens == min(r.num_prompt_tokens + r.max_tokens, sc["max_seq_len"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_random_traces_keep_every_invariant(sc: dict) -> None:
    if sc["weak_hash"]:  # collisions everywhere: the index must still never give a wrong block
        with mock.patch.object(block_pool, "hash_block_tokens", lambda parent, tokens: sum(tokens) % 3):
            simulate(sc)
    else:
        simulate(sc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(host_tier=True))
def test_random_traces_with_a_host_tier_keep_every_invariant(sc: dict) -> None:
    """Evictions to the host tier and loads back: every block a step attends to holds what it was computed from."""
    if sc["weak_hash"]:
        with mock.patch.object(block_pool, "hash_block_tokens", lambda parent, tokens: sum(tokens) % 3):
            simulate(sc)
    else:
        simulate(sc)


def test_next_step_tokens_bound_counts_running_decodes_and_waiting_prompts() -> None:
    """The late-scheduling check's estimate: one token per running request plus the waiting prompts, capped."""
    sched = make_scheduler(64, max_batch_size=8, max_num_tokens=24)
    assert sched.next_step_tokens_bound() == 0
    sched.add_request(make_request("a", list(range(1, 11)), max_tokens=8))
    sched.add_request(make_request("b", list(range(1, 7)), max_tokens=8))
    assert sched.next_step_tokens_bound() == 16
    out, _ = step(sched, 5)
    assert out.num_scheduled_tokens == 16
    assert sched.next_step_tokens_bound() == 2  # two decodes
    sched.add_request(make_request("c", list(range(20, 40)), max_tokens=8))
    assert sched.next_step_tokens_bound() == 22
    out, _ = step(sched, 5)
    assert out.num_scheduled_tokens == 22
    sched.add_request(make_request("d", list(range(40, 62)), max_tokens=8))  # 3 decodes + 22 > 24
    assert sched.next_step_tokens_bound() == 24  # capped at max_num_tokens
