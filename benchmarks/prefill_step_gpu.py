"""Where a step that carries prefills goes on the GPU (Llama-3.1-8B shape, dummy): the server's time-to-first-token
is bounded by these steps when arrivals bunch.

For each mix (new prompts x prompt tokens, beside a number of running decodes): the step's wall time, the bf16
matmul work it holds as a floor (2 * tokens * linear weights / the measured matmul rate), and one row per kernel
(torch.profiler over the step, KVFLIGHT_PDL=0 so kernels do not overlap in the trace).

    python benchmarks/prefill_step_gpu.py [--preset llama-3.1-8b] [--mixes 1x1024,2x1024,1x4096] [--decodes 24]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

os.environ.setdefault("KVFLIGHT_PDL", "0")

import torch  # noqa: E402

from decode_breakdown_gpu import kernel_rows, step_until_decoding  # noqa: E402
from kvflight import LLM, SamplingParams  # noqa: E402
from kvflight.bench.limits import matmul_flops_per_s  # noqa: E402
from kvflight.types import Request  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--mixes", default="1x1024,2x1024,4x1024,1x4096")
    ap.add_argument("--decodes", type=int, default=24, help="running decode requests beside the prefills")
    ap.add_argument("--rows", type=int, default=14)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--host", action="store_true", help="also profile the host side of each mix's last step: the "
                    "busiest CPU ops by self time (what the GPU may wait on)")
    args = ap.parse_args()
    tflops = matmul_flops_per_s() / 1e12
    print(f"device {torch.cuda.get_device_name()} | bf16 matmul {tflops:.0f} TFLOP/s | "
          f"PDL {os.environ['KVFLIGHT_PDL']}")
    llm = LLM(args.preset, load_format="dummy", max_seq_len=8192, enable_kv_cache_reuse=False,
              async_scheduling="off")  # each step() is then the step it schedules
    eng = llm.engine
    arch = eng.arch
    linear_params = arch.num_layers * (
        arch.hidden_size * (arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim
        + arch.num_heads * arch.head_dim * arch.hidden_size + 3 * arch.hidden_size * arch.intermediate_size)
    rng = random.Random(0)
    vocab = arch.vocab_size
    sp = SamplingParams(temperature=0.0, max_tokens=6000, ignore_eos=True)
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    for i in range(args.decodes):
        eng.add_request(Request(request_id=f"d{i}", prompt_token_ids=[rng.randrange(100, vocab - 100)
                                                                       for _ in range(1024)], sampling_params=sp))
    step_until_decoding(eng)  # every decode's prompt is in
    for _ in range(4):
        eng.step()
    print(f"{'mix':>8} {'decodes':>7} {'step ms':>8} {'matmul floor ms':>15} {'of floor':>8}")
    profiles = []
    n = 0
    for mix in args.mixes.split(","):
        count, length = (int(x) for x in mix.split("x"))
        times = []
        for rep in range(args.repeats + 1):
            for j in range(count):
                n += 1
                eng.add_request(Request(request_id=f"p{n}", prompt_token_ids=[
                    rng.randrange(100, vocab - 100) for _ in range(length)], sampling_params=one))
            torch.cuda.synchronize()
            prof = None
            if rep == args.repeats:
                acts = [torch.profiler.ProfilerActivity.CUDA] + ([torch.profiler.ProfilerActivity.CPU] if args.host
                                                                  else [])
                prof = torch.profiler.profile(activities=acts)
                prof.__enter__()
            t0 = time.perf_counter()
            eng.step()  # every mix fits max_num_tokens (8192): one step holds all its prefills
            torch.cuda.synchronize()
            got = eng.scheduler.iteration_stats()["num_ctx_tokens"]
            if got != count * length:
                raise SystemExit(f"{mix}: the step held {got} context tokens, not {count * length}")
            if prof is not None:
                prof.__exit__(None, None, None)
                profiles.append((mix, prof))
            elif rep > 0:
                times.append((time.perf_counter() - t0) * 1e3)
            for _ in range(2):  # the one-token requests finish; the decodes go on
                eng.step()
        step_ms = sorted(times)[len(times) // 2]
        floor_ms = 2 * (count * length + args.decodes) * linear_params / (tflops * 1e12) * 1e3
        print(f"{mix:>8} {args.decodes:>7} {step_ms:>8.2f} {floor_ms:>15.2f} {floor_ms / step_ms:>8.0%}   reps "
              + " ".join(f"{t:.1f}" for t in times))
    for mix, prof in profiles:
        rows = kernel_rows(prof, 1)
        busy = sum(r[2] for r in rows)
        print(f"\n== {mix} + {args.decodes} decodes: kernels busy {busy / 1e3:.2f} ms in {sum(r[1] for r in rows):.0f}"
              f" launches")
        print(f"{'us':>9} {'calls':>6} {'us/call':>8}  kernel")
        for name, calls, us in rows[:args.rows]:
            print(f"{us:>9.1f} {calls:>6.0f} {us / max(calls, 1e-9):>8.1f}  {name[:100]}")
        if args.host:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                            max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
