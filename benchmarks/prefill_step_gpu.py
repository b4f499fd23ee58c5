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
    ap.add_argument("--timeline", action="store_true", help="per mix: the step's host phases (schedule, launch, "
                    "wait, complete; median of the timed repeats) and, in the profiled step, when the device first "
                    "started, its idle gaps over 100 us and the host phase each gap fell in")
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
    phases = timed_phases(eng) if args.timeline else None
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
                acts = [torch.profiler.ProfilerActivity.CUDA] + ([torch.profiler.ProfilerActivity.CPU]
                                                                  if args.host or args.timeline else [])
                prof = torch.profiler.profile(activities=acts)
                prof.__enter__()
            mark = phases.mark() if phases is not None else None
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
            if phases is not None and (rep == 0 or prof is not None):
                phases.truncate(mark)  # the warm-up and the profiled step do not count
            mark = phases.mark() if phases is not None else None
            for _ in range(2):  # the one-token requests finish; the decodes go on
                eng.step()
            if phases is not None:
                phases.truncate(mark)
        step_ms = sorted(times)[len(times) // 2]
        floor_ms = 2 * (count * length + args.decodes) * linear_params / (tflops * 1e12) * 1e3
        print(f"{mix:>8} {args.decodes:>7} {step_ms:>8.2f} {floor_ms:>15.2f} {floor_ms / step_ms:>8.0%}   reps "
              + " ".join(f"{t:.1f}" for t in times))
        if phases is not None:
            print("         host phases (median ms): " + phases.summary())
            mem = torch.cuda.memory_stats()
            print(f"         allocator since start: {mem.get('num_alloc_retries', 0)} retries (free-all + sync), "
                  f"{mem.get('num_device_alloc', 0)} cudaMalloc, {mem.get('num_device_free', 0)} cudaFree; "
                  f"reserved {torch.cuda.memory_reserved() / 2**30:.2f} GiB, free on device "
                  f"{torch.cuda.mem_get_info()[0] / 2**30:.2f} GiB")
    for mix, prof in profiles:
        rows = [r for r in kernel_rows(prof, 1) if not r[0].startswith("phase:")]
        busy = sum(r[2] for r in rows)
        print(f"\n== {mix} + {args.decodes} decodes: kernels busy {busy / 1e3:.2f} ms in {sum(r[1] for r in rows):.0f}"
              f" launches")
        print(f"{'us':>9} {'calls':>6} {'us/call':>8}  kernel")
        for name, calls, us in rows[:args.rows]:
            print(f"{us:>9.1f} {calls:>6.0f} {us / max(calls, 1e-9):>8.1f}  {name[:100]}")
        if args.timeline:
            print_device_gaps(prof)
        if args.host:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows,
                                            max_name_column_width=60))
    return 0


class timed_phases:
    """Wraps the synchronous step's host phases (scheduler.schedule, runner.launch, runner.resolve, engine._complete)
    with a wall clock and a profiler label each; truncate(mark()) drops what steps run in between recorded."""

    NAMES = ("schedule", "launch", "wait", "complete")

    def __init__(self, eng) -> None:
        self.times: dict[str, list[float]] = {n: [] for n in self.NAMES}
        for owner, attr, name in ((eng.scheduler, "schedule", "schedule"), (eng.runner, "launch", "launch"),
                                  (eng.runner, "resolve", "wait"), (eng, "_complete", "complete")):
            setattr(owner, attr, self._wrap(getattr(owner, attr), name))

    def _wrap(self, fn, name):
        def timed(*a, **kw):
            with torch.profiler.record_function(f"phase:{name}"):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    self.times[name].append((time.perf_counter() - t0) * 1e3)
        return timed

    def mark(self) -> dict[str, int]:
        return {n: len(v) for n, v in self.times.items()}

    def truncate(self, mark: dict[str, int]) -> None:
        for n, v in self.times.items():
            del v[mark[n]:]

    def summary(self) -> str:
        out = []
        for name, v in self.times.items():
            if v:
                out.append(f"{name} {sorted(v)[len(v) // 2]:.2f}")
            v.clear()
        return "  ".join(out)


def print_device_gaps(prof: torch.profiler.profile, min_gap_us: float = 100.0) -> None:
    """The profiled step on one time line: host phases (from timed_phases' labels), the device's first kernel, its
    idle gaps over min_gap_us and its last kernel, in ms from the step's first phase."""
    events = prof.events()
    phases = [(e.time_range.start, e.time_range.end, e.name[6:]) for e in events
              if e.name.startswith("phase:") and e.device_type == torch.autograd.DeviceType.CPU]
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events  # (the labels have device spans too)
                     if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("phase:"))
    if not phases or not kernels:
        print("   (no phases or kernels recorded)")
        return
    t0 = min(p[0] for p in phases)

    def phase_at(t: float) -> str:
        hits = [name for start, end, name in phases if start <= t < end]
        return hits[-1] if hits else "between phases"

    print("   host phases (ms from step start): " + "  ".join(f"{n} {(s - t0) / 1e3:.2f}-{(e - t0) / 1e3:.2f}"
                                                          for s, e, n in sorted(phases)))
    print(f"   device: first kernel at {(kernels[0][0] - t0) / 1e3:.2f} ms ({phase_at(kernels[0][0])}), last ends at "
          f"{(kernels[-1][1] - t0) / 1e3:.2f} ms; step ends {(max(p[1] for p in phases) - t0) / 1e3:.2f} ms")
    busy_end = kernels[0][1]
    gaps = []
    for start, end in kernels[1:]:
        if start - busy_end > min_gap_us:
            gaps.append((busy_end, start))
        busy_end = max(busy_end, end)
    idle = sum(b - a for a, b in gaps)
    print(f"   device idle gaps over {min_gap_us:.0f} us: {len(gaps)}, {idle / 1e3:.2f} ms in all")
    for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:8]:
        print(f"     {(a - t0) / 1e3:7.2f} ms  {(b - a) / 1e3:6.2f} ms idle  host in {phase_at(a)} .. {phase_at(b)}")


if __name__ == "__main__":
    sys.exit(main())
