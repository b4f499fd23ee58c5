"""Where one decode step's GPU time goes, per kernel, for each weight scheme (Llama-3.1-8B shape, dummy).

For every scheme: the engine step's wall time, the decode CUDA graph's replay time alone, the kernels' summed busy
time per step (torch.profiler over graph replays) and the rest (gaps between kernels inside the graph), then one row
per kernel name: launches per step and microseconds per step.

    python benchmarks/decode_breakdown_gpu.py [--schemes none,fp8,int4_awq] [--steps 20] [--rows 16] [--batch 1] [--int4-rows2]
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from collections import defaultdict

import torch

from kvflight import LLM, SamplingParams
from kvflight.types import Request


def kernel_rows(prof: torch.profiler.profile, steps: int) -> list[tuple[str, float, float]]:
    """(kernel name, launches per step, microseconds per step), busiest first, from the device events only."""
    count: dict[str, int] = defaultdict(int)
    total_us: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = ev.name
        if name.startswith("Memcpy") or name.startswith("Memset"):
            name = name.split(" ")[0]
        count[name] += 1
        total_us[name] += ev.device_time
    rows = [(n, count[n] / steps, total_us[n] / steps) for n in total_us]
    return sorted(rows, key=lambda r: -r[2])


def step_until_decoding(eng) -> None:
    """Step the engine until no request waits or still has prompt tokens to prefill (every prompt is in)."""
    while True:
        stats = eng.scheduler.iteration_stats()
        if not (stats["num_queued_requests"] or stats["num_context_requests"]):
            return
        eng.step()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--schemes", default="none,fp8,int4_awq")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1, help="decoding requests per step (offline-like at 256)")
    ap.add_argument("--int4-rows2", action="store_true",
                    help="the 4-bit PTX chain with the two-rows-per-chain configs of the per-linear sweep (the "
                         "defaults are one row per chain: these lost in the decode graph, 3.202 vs 3.042 ms)")
    args = ap.parse_args()
    if args.int4_rows2:
        from kvflight.kernels import wo_gemv

        chosen = wo_gemv.choose_gemv_config

        def rows2(M, N, K, bits, group_size=128, asm=False):  # the per-linear sweep's winners (GemvConfig.rows2)
            if bits == 4 and asm:
                if N >= 16384:
                    return wo_gemv.GemvConfig(128, 2 * group_size, 2, 4, 3)
                if K >= 8192:
                    return wo_gemv.GemvConfig(32, 2 * group_size, 8, 4, 3, rows2=True)
                return (wo_gemv.GemvConfig(64, 4 * group_size, 4, 4, 3, True) if N > K
                        else wo_gemv.GemvConfig(32, 4 * group_size, 4, 8, 3, True))
            return chosen(M, N, K, bits, group_size, asm)

        wo_gemv.choose_gemv_config = rows2
    print(f"device {torch.cuda.get_device_name()} | torch {torch.__version__}")
    for scheme in args.schemes.split(","):
        llm = LLM(args.preset, load_format="dummy", quantization=scheme, max_seq_len=4096,
                  max_batch_size=max(8, args.batch),
                  enable_kv_cache_reuse=False)
        eng = llm.engine
        runner = eng.runner
        vocab = eng.arch.vocab_size
        rng = random.Random(0)
        prompt = [rng.randrange(100, vocab - 100) for _ in range(128)]
        sp = SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True)
        ids = [f"b{i}" for i in range(args.batch)]
        for rid in ids:
            eng.add_request(Request(request_id=rid, prompt_token_ids=prompt, sampling_params=sp))
        step_until_decoding(eng)
        for _ in range(8):  # warm decode steps
            eng.step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            eng.step()
        torch.cuda.synchronize()
        step_ms = (time.perf_counter() - t0) / args.steps * 1e3
        replay_ms = float("nan")
        size = runner.graphs.padded_size(args.batch) if runner.graphs is not None else None
        if size is not None:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.steps):
                runner.graphs.replay(size)
            end.record()
            torch.cuda.synchronize()
            replay_ms = start.elapsed_time(end) / args.steps
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                eng.step()
            torch.cuda.synchronize()
        rows = kernel_rows(prof, args.steps)
        busy_ms = sum(r[2] for r in rows) / 1e3
        launches = sum(r[1] for r in rows)
        print(f"\n== {scheme}: engine step {step_ms:.3f} ms | graph replay {replay_ms:.3f} ms | kernels busy "
              f"{busy_ms:.3f} ms in {launches:.0f} launches/step | gaps {step_ms - busy_ms:.3f} ms "
              f"({(step_ms - busy_ms) / max(launches, 1) * 1e3:.2f} us/launch)")
        print(f"{'us/step':>9} {'calls':>6} {'us/call':>8}  kernel")
        for name, calls, us in rows[:args.rows]:
            print(f"{us:>9.1f} {calls:>6.1f} {us / max(calls, 1e-9):>8.2f}  {name[:110]}")
        rest = rows[args.rows:]
        if rest:
            print(f"{sum(r[2] for r in rest):>9.1f} {sum(r[1] for r in rest):>6.1f} {'':>8}  "
                  f"({len(rest)} more kernels)")
        eng.abort_requests(ids)
        eng.step()
        del llm, eng, runner
        gc.collect()
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
