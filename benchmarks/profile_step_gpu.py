"""Where a decode step's time goes on the GPU machine: host (cProfile of LLM.generate) and device (torch.profiler
over steady-state decode steps). Dummy weights.

    python benchmarks/profile_step_gpu.py [--preset llama-3.1-8b] [--num-requests 256] [--in 128] [--out 128]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import sys
import time

import torch

from kvflight import LLM, SamplingParams
from kvflight.types import Request


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--in", dest="n_in", type=int, default=128)
    ap.add_argument("--out", dest="n_out", type=int, default=128)
    ap.add_argument("--eager", action="store_true")
    args = ap.parse_args()
    llm = LLM(args.preset, load_format="dummy", max_seq_len=8192, enable_kv_cache_reuse=False,
              enforce_eager=args.eager)
    vocab = llm.engine.arch.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(100, vocab - 100) for _ in range(args.n_in)] for _ in range(args.num_requests)]
    sp = SamplingParams(temperature=0.0, max_tokens=args.n_out, ignore_eos=True)
    llm.generate(prompts[:8], sp)  # warm-up
    # host profile of a whole offline run
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    llm.generate(prompts, sp)
    prof.disable()
    wall = time.perf_counter() - t
    print(f"generate {args.num_requests} x {args.n_in}/{args.n_out}: {wall:.2f} s, {args.num_requests / wall:.1f} req/s")
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(22)
    print(s.getvalue()[-6000:])
    # engine-only steady-state decode: add requests, step until all decode, then time steps
    eng = llm.engine
    for i, p in enumerate(prompts):
        eng.add_request(Request(request_id=f"p{i}", prompt_token_ids=p, sampling_params=sp))
    while eng.scheduler.num_waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                           for r in eng.scheduler._running):
        eng.step()
    torch.cuda.synchronize()
    n = 20
    timings = {"schedule": 0.0, "execute": 0.0, "update": 0.0}
    sched, runner = eng.scheduler, eng.runner
    for _ in range(n):
        t0 = time.perf_counter()
        out = sched.schedule()
        t1 = time.perf_counter()
        result = runner.execute(out)
        t2 = time.perf_counter()
        sched.update(out, result.token_ids)
        t3 = time.perf_counter()
        timings["schedule"] += t1 - t0
        timings["execute"] += t2 - t1
        timings["update"] += t3 - t2
    print(f"steady decode batch {len(out.scheduled)}: " + " | ".join(f"{k} {v / n * 1e3:.2f} ms" for k, v in
                                                                     timings.items()))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as p:
        for _ in range(5):
            out = sched.schedule()
            result = runner.execute(out)
            sched.update(out, result.token_ids)
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    if runner.graphs is not None:
        size = runner.graphs.padded_size(len(out.scheduled))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        runner.graphs.replay(size)
        start.record()
        for _ in range(20):
            runner.graphs.replay(size)
        end.record()
        torch.cuda.synchronize()
        print(f"graph replay alone, batch {size}: {start.elapsed_time(end) / 20:.2f} ms")
    eng.abort_requests([f"p{i}" for i in range(len(prompts))])
    eng.step()
    # batch-1 decode: device profile of graph replays
    eng.add_request(Request(request_id="b1", prompt_token_ids=prompts[0], sampling_params=sp))
    for _ in range(4):
        eng.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
        for _ in range(10):
            eng.step()
        torch.cuda.synchronize()
    print("batch-1 decode, 10 steps:")
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    eng.abort_requests(["b1"])
    eng.step()
    # one 4096-token prefill, device profile
    long = [rng.randrange(100, vocab - 100) for _ in range(4096)]
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    llm.generate([long], one)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
        llm.generate([long], one)
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
