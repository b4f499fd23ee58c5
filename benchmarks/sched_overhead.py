"""CPU microbenchmark of the scheduler's per-iteration cost: schedule() + update() with many requests in decode.

    python benchmarks/sched_overhead.py [--num-requests 256] [--prompt-len 512] [--iters 200]

Prints one line: mean / p50 / p99 microseconds per iteration (target: under 1 ms for 256 decoding requests).
"""

from __future__ import annotations

import argparse
import statistics
import time

from kvflight.cache.kv_manager import KVCacheManager
from kvflight.config import SchedulerConfig
from kvflight.sched.scheduler import Scheduler
from kvflight.types import Request, SamplingParams


def run(num_requests: int, num_prompt_tokens: int, num_iters: int, tokens_per_block: int,
        enable_caching: bool, policy: str) -> list[float]:
    """Admit num_requests prompts, run them into decode, then time num_iters decode iterations (µs each)."""
    max_seq_len = num_prompt_tokens + num_iters + 64
    num_blocks = num_requests * (-(-max_seq_len // tokens_per_block)) + 64  # big pool: no preemption
    kv = KVCacheManager(num_blocks, tokens_per_block, enable_caching)
    config = SchedulerConfig(max_batch_size=num_requests, max_num_tokens=max(8192, num_requests),
                             batch_scheduler_policy=policy)
    sched = Scheduler(config, kv, max_seq_len)
    for i in range(num_requests):
        # distinct prompts (no prefix sharing), like independent chat requests
        prompt = [(i * 7919 + j) % 32000 + 1 for j in range(num_prompt_tokens)]
        sched.add_request(Request(request_id=f"req-{i}", prompt_token_ids=prompt,
                                  sampling_params=SamplingParams(max_tokens=num_iters + 32),
                                  eos_token_ids=frozenset({0})))
    step = 0
    # warm-up: prefill every prompt (not timed)
    while any(r.num_output_tokens == 0 for r in sched._running) or sched.num_waiting:
        out = sched.schedule()
        sched.update(out, [step % 50 + 1] * sum(1 for s in out.scheduled if s.do_sample))
        step += 1
    times_us: list[float] = []
    clock = time.perf_counter_ns
    for _ in range(num_iters):
        t0 = clock()
        out = sched.schedule()
        tokens = [step % 50 + 1] * len(out.scheduled)
        sched.update(out, tokens)
        times_us.append((clock() - t0) / 1e3)
        step += 1
        assert len(out.scheduled) == num_requests and all(s.do_sample for s in out.scheduled)
    sched.check_integrity()
    return times_us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--tokens-per-block", type=int, default=32)
    parser.add_argument("--policy", default="max_utilization", choices=("max_utilization", "guaranteed_no_evict"))
    parser.add_argument("--no-caching", action="store_true", help="disable KV block reuse")
    args = parser.parse_args()
    times_us = run(args.num_requests, args.prompt_len, args.iters, args.tokens_per_block,
                   not args.no_caching, args.policy)
    times_us.sort()
    p50 = times_us[len(times_us) // 2]
    p99 = times_us[min(len(times_us) - 1, int(len(times_us) * 0.99))]
    print(f"sched_overhead  requests={args.num_requests} prompt={args.prompt_len} tokens_per_block="
          f"{args.tokens_per_block} policy={args.policy} caching={not args.no_caching} iters={args.iters} | "
          f"mean {statistics.fmean(times_us):.0f} us | p50 {p50:.0f} us | p99 {p99:.0f} us per iteration")


if __name__ == "__main__":
    main()
