"""Scheduler owns the waiting and running queues: each iteration it spends the token and request budgets.

One rule covers prefill, chunked context, prefix hits and recompute after preemption: a request has
num_computed_tokens and num_tokens, and the scheduler hands out tokens so that the first catches up with the second.
Running requests go first (in arrival order), then waiting ones (FCFS); admission stops at the first waiting request
that does not fit, so nobody is skipped forever.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Iterable

from kvflight.cache.kv_manager import KVCacheManager
from kvflight.config import SchedulerConfig
from kvflight.types import FinishReason, Request, RequestStatus, ScheduledRequest, SchedulerOutput

MAX_UTILIZATION = "max_utilization"
GUARANTEED_NO_EVICT = "guaranteed_no_evict"


class Scheduler:
    """In-flight batching over a KVCacheManager; sees block ids, never tensors."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_seq_len: int) -> None:
        if config.batch_scheduler_policy not in (MAX_UTILIZATION, GUARANTEED_NO_EVICT):
            raise ValueError(f"batch_scheduler_policy={config.batch_scheduler_policy!r}: must be "
                             f"{MAX_UTILIZATION} or {GUARANTEED_NO_EVICT}")
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len={max_seq_len}: must be >= 2 (one prompt token and one output)")
        self.config = config
        self.kv = kv
        self.max_seq_len = max_seq_len
        self._no_evict = config.batch_scheduler_policy == GUARANTEED_NO_EVICT
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # sorted by arrival sequence number
        self._requests: dict[str, Request] = {}
        self._arrival_seq: dict[str, int] = {}
        self._next_seq = 0
        # kept incrementally for guaranteed_no_evict: sum over running requests of worst-case and held blocks
        self._num_running_worst_blocks = 0
        self._num_running_table_blocks = 0
        # counters
        self._iteration = 0
        self._num_preemptions_total = 0
        # the last iteration's counts (not the SchedulerOutput itself: holding it would keep every
        # ScheduledRequest alive into older GC generations and make full collections slow)
        self._last_counts: dict[str, int] = dict.fromkeys(
            ("num_scheduled_requests", "num_context_requests", "num_gen_requests", "num_paused_requests",
             "num_ctx_tokens", "num_scheduled_tokens", "num_preempted_requests", "num_kv_offloads",
             "num_kv_loads"), 0)

    # ------------------------------------------------------------------ queues
    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def next_step_tokens_bound(self) -> int:
        """About how many tokens the next step would carry (capped at max_num_tokens): one per running request
        plus the waiting requests' uncomputed tokens (cheap: the waiting queue is short while a server keeps up)."""
        waiting = sum(r.num_tokens - r.num_computed_tokens for r in self._waiting)
        return min(self.config.max_num_tokens, len(self._running) + waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self._waiting or self._running)

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id, or None (finished requests are forgotten)."""
        return self._requests.get(request_id)

    def _final_len(self, req: Request) -> int:
        """The longest the request can grow: prompt + max_tokens, capped at max_seq_len."""
        return min(req.num_prompt_tokens + req.max_tokens, self.max_seq_len)

    def add_request(self, req: Request) -> None:
        """Queue a validated request at the back of the waiting queue."""
        if req.request_id in self._requests:
            raise ValueError(f"request_id={req.request_id!r} is already queued or running; request ids must be "
                             "unique among unfinished requests")
        if req.status != RequestStatus.WAITING or req.num_computed_tokens != 0:
            raise ValueError(f"request {req.request_id!r}: status={req.status.value}, num_computed_tokens="
                             f"{req.num_computed_tokens}; add only new requests (WAITING, nothing computed)")
        num_worst_blocks = self.kv.num_blocks_needed(self._final_len(req))
        if num_worst_blocks > self.kv.num_blocks:
            raise ValueError(f"request {req.request_id!r}: prompt ({req.num_prompt_tokens} tokens) + max_tokens "
                             f"({req.max_tokens}) needs {num_worst_blocks} KV blocks but the cache has "
                             f"{self.kv.num_blocks}; lower max_tokens / max_seq_len or give the KV cache more memory")
        self._requests[req.request_id] = req
        self._arrival_seq[req.request_id] = self._next_seq
        self._next_seq += 1
        self._waiting.append(req)

    def finish_requests(self, request_ids: str | Iterable[str], reason: FinishReason) -> None:
        """Finish waiting or running requests (e.g. aborts): free their blocks, set status FINISHED and reason.

        Unknown or already finished ids are ignored.
        """
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        reqs = [self._requests[rid] for rid in request_ids if rid in self._requests]
        if not reqs:
            return
        for req in reqs:
            self._finish(req, reason)
        self._running = [r for r in self._running if r.status is RequestStatus.RUNNING]
        if any(r.status is RequestStatus.FINISHED for r in self._waiting):
            self._waiting = deque(r for r in self._waiting if r.status is not RequestStatus.FINISHED)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        """Free the request's blocks and mark it finished; the caller removes it from its queue."""
        if req.status is RequestStatus.RUNNING:
            self._forget_running_blocks(req)
        self.kv.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        del self._requests[req.request_id]
        del self._arrival_seq[req.request_id]

    def _preempt(self, req: Request) -> None:
        """Recompute-style preemption; the caller has already removed req from the running list."""
        self._forget_running_blocks(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self._num_preemptions_total += 1
        self._waiting.appendleft(req)

    def _forget_running_blocks(self, req: Request) -> None:
        self._num_running_worst_blocks -= self.kv.num_blocks_needed(self._final_len(req))
        self._num_running_table_blocks -= self.kv.get_num_blocks(req.request_id)

    def _chunk(self, num_remaining_tokens: int, num_budget_tokens: int) -> int:
        """Tokens a request catching up by num_remaining_tokens gets from num_budget_tokens (0: it must wait)."""
        if num_remaining_tokens <= num_budget_tokens:
            return num_remaining_tokens
        if self.config.enable_chunked_context or num_remaining_tokens > self.config.max_num_tokens:
            # without chunked context only a recompute longer than one iteration (or a prompt the engine should
            # have rejected) gets here: chunk it anyway, otherwise it could never run again
            return num_budget_tokens
        return 0

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> SchedulerOutput:
        """Pick this iteration's requests and token counts, allocate their blocks, advance num_computed_tokens."""
        config = self.config
        kv = self.kv
        max_batch_size = config.max_batch_size
        num_budget_tokens = config.max_num_tokens
        no_evict = self._no_evict
        running = self._running
        scheduled: list[ScheduledRequest] = []
        preempted_ids: list[str] = []
        num_context_requests = 0
        num_context_tokens = 0

        # 1. running requests, in arrival order
        i = 0
        while i < len(running) and len(scheduled) < max_batch_size and num_budget_tokens > 0:
            req = running[i]
            start_pos = req.num_computed_tokens
            num_tokens = len(req.all_token_ids) + req.num_pending_tokens  # a pending token counts as known
            num_remaining = num_tokens - start_pos
            if req.num_pending_tokens and num_tokens >= self._final_len(req):
                i += 1  # its pending token is its last: it finishes when that token arrives
                continue
            if num_remaining == 1:
                num_new = 1
            elif num_remaining <= 0:
                i += 1
                continue
            else:
                num_new = self._chunk(num_remaining, num_budget_tokens)
                if num_new == 0:
                    i += 1
                    continue
            new_blocks = kv.allocate_slots(req, num_new)
            while new_blocks is None:
                if no_evict:
                    raise RuntimeError(f"guaranteed_no_evict: running request {req.request_id!r} could not get its "
                                       "blocks; admission accounting is broken (this is a bug)")
                victim = running.pop()  # the newest running request; never one scheduled earlier in this loop
                self._preempt(victim)
                preempted_ids.append(victim.request_id)
                if victim is req:
                    break
                new_blocks = kv.allocate_slots(req, num_new)
            if new_blocks is None:
                break  # req preempted itself; it was the last running request
            if new_blocks:
                self._num_running_table_blocks += len(new_blocks)
            is_context = num_new > 1 or start_pos < len(req.prompt_token_ids)
            if is_context:
                num_context_requests += 1
                num_context_tokens += num_new
            scheduled.append(ScheduledRequest(req, start_pos, num_new, kv.get_block_ids(req.request_id),
                                              start_pos + num_new == num_tokens, is_context))
            num_budget_tokens -= num_new
            i += 1

        # 2. waiting requests, FCFS; none after a preemption (the freed blocks go to the running ones)
        if not preempted_ids:
            waiting = self._waiting
            num_reserved_blocks = self._num_running_worst_blocks - self._num_running_table_blocks
            while waiting and len(scheduled) < max_batch_size and num_budget_tokens > 0:
                req = waiting[0]
                computed_blocks, num_prefix_tokens, host_blocks = kv.get_computed_blocks(req)
                num_tokens = req.num_tokens
                num_new = self._chunk(num_tokens - num_prefix_tokens, num_budget_tokens)
                if num_new == 0:
                    break
                num_worst_blocks = kv.num_blocks_needed(self._final_len(req))
                if no_evict:  # its worst case plus every running request's must fit in the free blocks
                    # (host hits need fresh blocks like the rest: they are in num_worst_blocks - GPU hits)
                    num_cost_blocks = num_worst_blocks - len(computed_blocks) + kv.num_free_among(computed_blocks)
                    if num_cost_blocks + num_reserved_blocks > kv.num_free_blocks:
                        break
                new_blocks = kv.allocate_slots(req, num_new, computed_blocks, host_blocks)
                if new_blocks is None:
                    break
                num_table_blocks = kv.get_num_blocks(req.request_id)
                self._num_running_worst_blocks += num_worst_blocks
                self._num_running_table_blocks += num_table_blocks
                num_reserved_blocks += num_worst_blocks - num_table_blocks
                waiting.popleft()
                req.num_computed_tokens = num_prefix_tokens
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = time.monotonic()
                    req.num_cached_tokens = num_prefix_tokens
                req.status = RequestStatus.RUNNING
                self._insert_running(req)
                is_context = num_new > 1 or num_prefix_tokens < req.num_prompt_tokens
                if is_context:
                    num_context_requests += 1
                    num_context_tokens += num_new
                scheduled.append(ScheduledRequest(req, num_prefix_tokens, num_new, kv.get_block_ids(req.request_id),
                                                  num_prefix_tokens + num_new == num_tokens, is_context))
                num_budget_tokens -= num_new

        # 3. the model computes these tokens this iteration
        # and those that sample owe a token until update() appends it (asynchronous scheduling schedules the next
        # step before that: the pending token counts as known)
        for sr in scheduled:
            sr.request.num_computed_tokens = sr.start_pos + sr.num_new_tokens
            if sr.do_sample:
                sr.request.num_pending_tokens += 1
        # host-tier copies decided by this iteration's allocations (empty without a host tier)
        kv_offloads, kv_loads = kv.take_transfers()

        output = SchedulerOutput(
            scheduled=scheduled,
            num_scheduled_tokens=config.max_num_tokens - num_budget_tokens,
            preempted_ids=preempted_ids,
            num_context_requests=num_context_requests,
            num_generation_requests=len(scheduled) - num_context_requests,
            num_context_tokens=num_context_tokens,
            kv_offloads=kv_offloads,
            kv_loads=kv_loads,
        )
        self._iteration += 1
        counts = self._last_counts
        counts["num_scheduled_requests"] = len(scheduled)
        counts["num_context_requests"] = num_context_requests
        counts["num_gen_requests"] = len(scheduled) - num_context_requests
        counts["num_paused_requests"] = len(self._running) - len(scheduled)  # running but not scheduled
        counts["num_ctx_tokens"] = num_context_tokens
        counts["num_scheduled_tokens"] = output.num_scheduled_tokens
        counts["num_preempted_requests"] = len(preempted_ids)
        counts["num_kv_offloads"] = len(kv_offloads)
        counts["num_kv_loads"] = len(kv_loads)
        return output

    def _insert_running(self, req: Request) -> None:
        seq = self._arrival_seq
        running = self._running
        if not running or seq[running[-1].request_id] < seq[req.request_id]:
            running.append(req)
        else:  # a preempted request coming back: keep arrival order
            bisect.insort(running, req, key=lambda r: seq[r.request_id])

    def _reserved_blocks(self) -> int:
        """Blocks the running requests may still allocate before reaching their final length (worst case).

        O(running): check_integrity uses it to verify the counters schedule() keeps incrementally.
        """
        kv = self.kv
        needed = kv.num_blocks_needed
        final_len = self._final_len
        return sum(needed(final_len(r)) - kv.get_num_blocks(r.request_id) for r in self._running)

    # ------------------------------------------------------------------ update
    def update(self, output: SchedulerOutput, sampled_token_ids: list[int]) -> list[Request]:
        """Apply one iteration's sampled tokens (one per do_sample request, in order); finish stopped requests.

        Returns the requests that got a token, finished ones included (with finish_reason set).
        """
        scheduled = output.scheduled
        num_samples = sum(1 for sr in scheduled if sr.do_sample)
        if len(sampled_token_ids) != num_samples:
            raise ValueError(f"update: got {len(sampled_token_ids)} sampled_token_ids for {num_samples} scheduled "
                             "requests with do_sample; pass exactly one token id per sampling request, in order")
        kv = self.kv
        cache_blocks = kv.cache_blocks if kv.enable_caching else None
        tokens_per_block = kv.tokens_per_block
        max_seq_len = self.max_seq_len
        running_status = RequestStatus.RUNNING
        preempted_status = RequestStatus.PREEMPTED
        out: list[Request] = []
        any_finished = False
        any_finished_waiting = False
        now: float | None = None
        next_sample = 0
        for sr in scheduled:
            req = sr.request
            status = req.status
            if not sr.do_sample:
                # register blocks this step filled (most steps fill none: skip the call)
                if cache_blocks is not None and status is running_status and \
                        sr.start_pos // tokens_per_block != req.num_computed_tokens // tokens_per_block:
                    cache_blocks(req, req.num_computed_tokens)
                continue
            token = sampled_token_ids[next_sample]
            next_sample += 1
            req.num_pending_tokens -= 1
            # finished (aborted) between schedule() and update(): the token is dropped. A request preempted while
            # this step was in flight (asynchronous scheduling) keeps it: it is a real sample of its sequence
            if status is not running_status and status is not preempted_status:
                continue
            all_token_ids = req.all_token_ids
            all_token_ids.append(token)
            if req.first_token_time is None:
                if now is None:
                    now = time.monotonic()
                req.first_token_time = now
            out.append(req)
            # register the blocks whose tokens are all known and whose K/V this or an already launched step
            # computes (cache_blocks caps at both; later readers run after those steps on the same stream)
            if cache_blocks is not None and status is running_status and \
                    sr.start_pos // tokens_per_block != min(req.num_computed_tokens, len(all_token_ids)) \
                    // tokens_per_block:
                cache_blocks(req, req.num_computed_tokens)
            # stop conditions, in order
            sp = req.sampling_params
            num_output_tokens = len(all_token_ids) - len(req.prompt_token_ids)
            reason: FinishReason | None = None
            if token in req.eos_token_ids and not sp.ignore_eos and num_output_tokens >= sp.min_tokens:
                reason = FinishReason.STOP
            elif sp.stop_token_ids and token in sp.stop_token_ids and num_output_tokens >= sp.min_tokens:
                reason = FinishReason.STOP
                req.stop_reason = token
            elif num_output_tokens >= req.max_tokens or len(all_token_ids) >= max_seq_len:
                reason = FinishReason.LENGTH
            if reason is not None:
                self._finish(req, reason)
                if status is running_status:
                    any_finished = True
                else:
                    any_finished_waiting = True
        if any_finished:
            self._running = [r for r in self._running if r.status is running_status]
        if any_finished_waiting:
            self._waiting = deque(r for r in self._waiting if r.status is not RequestStatus.FINISHED)
        return out

    # ------------------------------------------------------------------ stats / checks
    def iteration_stats(self) -> dict[str, int | float]:
        """Plain counters of the last iteration and the KV cache (TensorRT-LLM field names, snake_case)."""
        kv_stats = self.kv.stats()
        stats: dict[str, int | float] = {
            "iter": self._iteration,
            "num_active_requests": len(self._running),
            "num_queued_requests": len(self._waiting),
            "max_num_active_requests": self.config.max_batch_size,
            "max_num_tokens": self.config.max_num_tokens,
            **self._last_counts,
            "num_preemptions_total": self._num_preemptions_total,
            "kv_cache_usage": self.kv.usage,
        }
        stats.update(kv_stats)
        return stats

    def check_integrity(self) -> None:
        """Raise AssertionError if queues, statuses or block tables disagree. O(requests + blocks)."""
        def fail(msg: str) -> None:
            raise AssertionError(f"Scheduler integrity: {msg}")

        self.kv.check_integrity()
        kv = self.kv
        waiting_ids = [r.request_id for r in self._waiting]
        running_ids = [r.request_id for r in self._running]
        if len(set(waiting_ids)) != len(waiting_ids):
            fail("a request is twice in the waiting queue")
        if len(set(running_ids)) != len(running_ids):
            fail("a request is twice in the running list")
        both = set(waiting_ids) & set(running_ids)
        if both:
            fail(f"requests {sorted(both)} are both waiting and running")
        if set(waiting_ids) | set(running_ids) != set(self._requests):
            fail("the request registry and the queues disagree")
        seqs = [self._arrival_seq[rid] for rid in running_ids]
        if seqs != sorted(seqs):
            fail("the running list is not in arrival order")
        tpb = kv.tokens_per_block
        for req in self._running:
            if req.status is not RequestStatus.RUNNING:
                fail(f"request {req.request_id!r} is in the running list with status {req.status.value}")
            if not 0 <= req.num_pending_tokens <= 2:
                fail(f"request {req.request_id!r}: num_pending_tokens={req.num_pending_tokens} outside [0, 2]")
            if not 0 <= req.num_computed_tokens <= req.num_tokens + req.num_pending_tokens:
                fail(f"request {req.request_id!r}: num_computed_tokens={req.num_computed_tokens} outside "
                     f"[0, {req.num_tokens} + {req.num_pending_tokens} pending]")
            if kv.get_num_blocks(req.request_id) * tpb < req.num_computed_tokens:
                fail(f"request {req.request_id!r}: {kv.get_num_blocks(req.request_id)} blocks do not cover "
                     f"{req.num_computed_tokens} computed tokens")
        for req in self._waiting:
            if req.status not in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
                fail(f"request {req.request_id!r} is waiting with status {req.status.value}")
            if kv.get_num_blocks(req.request_id):
                fail(f"waiting request {req.request_id!r} holds blocks")
            if req.num_computed_tokens:
                fail(f"waiting request {req.request_id!r} has num_computed_tokens={req.num_computed_tokens}")
        num_reserved = self._reserved_blocks()
        if num_reserved != self._num_running_worst_blocks - self._num_running_table_blocks:
            fail(f"reserved-block counters drifted: recomputed {num_reserved}, kept "
                 f"{self._num_running_worst_blocks} - {self._num_running_table_blocks}")
        if self._no_evict and num_reserved > kv.num_free_blocks:
            fail(f"guaranteed_no_evict: running requests may still need {num_reserved} blocks but only "
                 f"{kv.num_free_blocks} are free")
