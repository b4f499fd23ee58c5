"""Where one decode step's GPU time goes, per kernel, for each weight scheme (Llama-3.1-8B shape, dummy).

For every scheme: the engine step's wall time, the decode CUDA graph's replay time alone, the kernels' summed busy
time per step (torch.profiler over graph replays) and the rest (gaps between kernels inside the graph), then one row
per kernel name: launches per step and microseconds per step.

    python benchmarks/decode_breakdown_gpu.py [--schemes none,fp8,int4_awq] [--steps 20] [--rows 16] [--batch 1]
        [--int4-rows2] [--max-batch-size N] [--multi-block-mode auto|on|off]
        [--variants "nopdl:KVFLIGHT_PDL=0;unpack:KVFLIGHT_GEMV_ASM=0"] [--gemv-sweep [--gemv-sweep-kind 4|8|mma] ...]

--gemv-sweep: variants of KVFLIGHT_GEMV_CONFIG for one GEMV kind (--gemv-sweep-kind) on each linear (one linear at a
time, the others at their defaults), so launches are tuned by the whole step's replay time rather than in isolation.

--variants: after each scheme's table, the decode graphs are captured again under each variant's environment (read by
the kernels' launch code at capture) and replayed; one line per variant with its replay time, the default first and
again last (the two default lines show how far the GPU drifted over the sweep).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
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


SWEEP_AXES = {  # per GEMV kind: the launch fields in KVFLIGHT_GEMV_CONFIG order and their default sweep values
    "4": {"bn": (32, 64, 128), "bk": (256, 512), "split": (4, 8), "warps": (4,), "stages": (3,), "rows2": (0, 1)},
    "8": {"bn": (16, 32), "bk": (512, 1024), "split": (1, 2), "warps": (4, 8), "stages": (3,), "rows2": (0,)},
    "mma": {"tiles": (1, 2), "warps": (4, 8), "split": (2, 4, 8), "wpl": (4,), "prefetch": (1, 2, 4)},
}


def gemv_sweep_variants(arch, linears: str = "qkv,o,gate_up,down", grid: str = "", base: str = "",
                        kind: str = "4") -> list[str]:
    """NAME:KVFLIGHT_GEMV_CONFIG=... variants: per linear (N, K) of one GEMV kind (4 / 8: wo_gemv at one row, mma:
    w4_mma_gemv at 2..8 rows), a grid of launches (SWEEP_AXES[kind], axes replaced by grid, e.g.
    "bn=16,32;split=2,4"); base: KVFLIGHT_GEMV_CONFIG items every variant keeps (the other linears' launches)."""
    h, d = arch.hidden_size, arch.head_dim
    shapes = {"qkv": ((arch.num_heads + 2 * arch.num_kv_heads) * d, h), "o": (arch.num_heads * d, h),
              "gate_up": (2 * arch.intermediate_size, h), "down": (h, arch.intermediate_size)}
    axes = dict(SWEEP_AXES[kind])
    for item in filter(None, grid.split(";")):
        key, _, values = item.partition("=")
        if key not in axes:
            raise SystemExit(f"--gemv-sweep-grid: unknown axis {key!r} for kind {kind} (axes: {', '.join(axes)})")
        axes[key] = tuple(int(v) for v in values.split(","))
    out = []
    for name in linears.split(","):
        n, k = shapes[name]
        for launch in itertools.product(*axes.values()):
            fields = dict(zip(axes, launch))
            if kind != "mma" and k // fields["split"] < fields["bk"]:
                continue  # a split shorter than one tile
            spec = ",".join(str(v) for v in launch)
            out.append(f"{name}-{spec.replace(',', '-')}:KVFLIGHT_GEMV_CONFIG={base};{kind}:{n}:{k}={spec}")
    return out


def replay_graph_ms(eng, size: int, steps: int) -> float:
    """Capture the decode graphs again (under the current environment), refill their inputs with the running
    requests' state (two engine steps) and time `steps` replays of batch `size`."""
    runner = eng.runner
    runner._capture_graphs()
    eng.step()
    eng.step()
    for _ in range(3):
        runner.graphs.replay(size)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        runner.graphs.replay(size)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


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
    ap.add_argument("--variants", default="", help="NAME:ENV=VALUE|ENV=VALUE;NAME:... environments to recapture "
                    "the decode graphs under and replay")
    ap.add_argument("--gemv-sweep", action="store_true", help="add GEMV launch variants per linear (at --batch rows)")
    ap.add_argument("--gemv-sweep-kind", default="4", choices=sorted(SWEEP_AXES),
                    help="4: int4 schemes at one row, 8: fp8 / int8_wo at one row, mma: int4 at 2..8 rows")
    ap.add_argument("--gemv-sweep-linears", default="qkv,o,gate_up,down")
    ap.add_argument("--gemv-sweep-grid", default="", help='e.g. "bn=16,32;bk=512;split=2,4;warps=4,8"')
    ap.add_argument("--gemv-sweep-base", default="", help="KVFLIGHT_GEMV_CONFIG items kept in every sweep variant")
    ap.add_argument("--multi-block-mode", default="auto", choices=("auto", "on", "off"),
                    help="split-K decode attention (on: the graphs capture only the split launch)")
    ap.add_argument("--max-batch-size", type=int, default=0, help="engine max_batch_size (default max(8, batch))")
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
                  max_batch_size=args.max_batch_size or max(8, args.batch),
                  enable_kv_cache_reuse=False, multi_block_mode=args.multi_block_mode)
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
        variants = [v for v in args.variants.split(";") if v]
        if args.gemv_sweep:
            variants += gemv_sweep_variants(eng.arch, args.gemv_sweep_linears, args.gemv_sweep_grid,
                                            args.gemv_sweep_base, args.gemv_sweep_kind)
        if variants and size is not None:
            print(f"{'variant':<12} {'replay ms':>9}  environment")
            for variant in ["default:"] + variants + ["default-end:"]:
                name, _, env = variant.partition(":")
                pairs = dict(kv.split("=", 1) for kv in env.split("|") if kv)
                saved = {k: os.environ.get(k) for k in pairs}
                os.environ.update(pairs)
                try:
                    print(f"{name:<12} {replay_graph_ms(eng, size, args.steps):>9.3f}  {env}")
                except ValueError as e:  # a launch the kernel refuses (e.g. a split that cuts a group)
                    print(f"{name:<12} {'refused':>9}  {env}: {e}")
                finally:
                    for k, v in saved.items():
                        if v is None:
                            os.environ.pop(k, None)
                        else:
                            os.environ[k] = v
            runner._capture_graphs()  # back to the default environment's graphs
        eng.abort_requests(ids)
        eng.step()
        del llm, eng, runner
        gc.collect()
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
