"""GPU check + benchmark of the Triton paged attention kernel (kernels/paged_attention.py). Run on the device:

    export PYTHONPATH=$PWD PYTHONUNBUFFERED=1; python3 benchmarks/attention_gpu.py [--tune] [--skip-check]

1. bf16 (and one fp16) correctness against reference.paged_attention at real shapes: GQA 1/3/4/8, head dims
   64/80/128, contexts 1..8k, block boundaries, mixed batches, split-K on/off, a CUDA-graph replay with new
   seq_lens. Prints max abs error per case; a failing case prints FAIL and the script exits 1.
2. Decode KV-read bandwidth (Llama-3.1-8B shape: 32 heads, 8 KV heads, D 128, tokens_per_block 32) for
   batch {1, 16, 64, 256} x context {512, 2048, 8192} with multi_block_mode auto, timed as CUDA-graph replays
   (each replay rotates over 16 block tables of random blocks, so small cases do not run from L2), against the
   device-to-device copy bandwidth measured in the same run.
3. Prefill, batch 1, 4096 tokens, same shape: TFLOP/s (causal flops = 2 * 2 * S * S / 2 * H * D) vs torch
   scaled_dot_product_attention(is_causal=True) and vs the bf16 matmul rate.
--tune sweeps tile configs for decode and prefill first (prints one line per config).
--batch-sweep sweeps the decode tile config at batches 32..256 and contexts 160..4096, then exits.
--prefill-sweep times fresh prefills (512..4096 tokens) per tile config beside torch SDPA, then exits.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys

import torch

from kvflight.bench.limits import copy_bandwidth_bytes_per_s, matmul_flops_per_s
from kvflight.kernels import paged_attention as pa
from kvflight.kernels import reference

HEADS, KV_HEADS, HEAD_DIM, TPB = 32, 8, 128, 32  # Llama-3.1-8B attention shape
DTYPE = torch.bfloat16
ROTATIONS = 16  # block tables per timed graph (one per captured call)


# ---- hardware limits --------------------------------------------------------------------------------------------
def time_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of fn() over iters, each timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


# ---- inputs -----------------------------------------------------------------------------------------------------
def make_batch(query_lens, seq_lens, heads, kv_heads, head_dim, tpb, dtype=DTYPE, seed=0):
    """Random q / cache with shuffled block ids. -> q, kv_cache, block_tables, query_start_loc, seq_lens (cuda)"""
    g = torch.Generator(device="cuda").manual_seed(seed)
    blocks = [max(1, math.ceil(s / tpb)) for s in seq_lens]
    num_blocks = sum(blocks) + 7
    perm = torch.randperm(num_blocks, device="cuda", generator=g).to(torch.int32)
    table = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32, device="cuda")
    used = 0
    for i, n in enumerate(blocks):
        table[i, :n] = perm[used:used + n]
        used += n
    q = torch.randn(sum(query_lens), heads, head_dim, device="cuda", generator=g).to(dtype)
    kv_cache = torch.randn(2, num_blocks, tpb, kv_heads, head_dim, device="cuda", generator=g).to(dtype)
    starts = torch.tensor([0] + list(query_lens), dtype=torch.int64).cumsum(0).to(torch.int32).cuda()
    return q, kv_cache, table, starts, torch.tensor(seq_lens, dtype=torch.int32, device="cuda")


# ---- 1. correctness ---------------------------------------------------------------------------------------------
CHECKS = [
    # name, query_lens, seq_lens, heads, kv_heads, head_dim, tpb, splits
    ("mha d64 decode boundaries", [1] * 7, [1, 15, 16, 17, 1000, 4097, 8192], 8, 8, 64, 16, [1, 4]),
    ("gqa4 d128 mixed", [1, 1, 1, 1, 512, 1024, 1], [31, 32, 33, 4096, 2012, 1024, 8191], 32, 8, 128, 32, [1, 3]),
    ("gqa8 d128 long decode", [1] * 4, [8192, 8000, 7, 4500], 32, 4, 128, 64, [1, 16, 64]),
    ("gqa3 d64 smollm2 mixed", [1, 37, 300, 1], [2049, 100, 300, 128], 9, 3, 64, 32, [1, 2]),
    ("gqa2 d80 mixed", [1, 64, 1], [513, 700, 65], 4, 2, 80, 16, [1, 5]),
    ("gqa4 d128 tpb128 prefill", [2048], [2048], 32, 8, 128, 128, [1, 2]),
    ("gqa4 d128 small chunks", [3, 8, 16, 5], [50, 1000, 16, 3000], 32, 8, 128, 32, [1, 2]),
]


def check_case(name, query_lens, seq_lens, heads, kv_heads, head_dim, tpb, num_splits, dtype=DTYPE) -> bool:
    q, kv_cache, table, qsl, sl = make_batch(query_lens, seq_lens, heads, kv_heads, head_dim, tpb, dtype)
    scale = head_dim ** -0.5
    out = torch.full_like(q, float("nan"))  # poison: every real row must be written
    pa.paged_attention(q, kv_cache, table, qsl, sl, scale, max_query_len=max(query_lens), num_splits=num_splits,
                       out=out)
    want = reference.paged_attention(q, kv_cache, table, query_lens, seq_lens, scale).float()
    err = (out.float() - want).abs().max().item()
    rel = ((out.float() - want).norm() / want.norm()).item()
    ok = bool(torch.isfinite(out).all()) and err < 2e-2 and rel < 1e-2
    print(f"  {'ok  ' if ok else 'FAIL'} {name:28s} {str(dtype)[6:]:8s} splits={num_splits:<3d} "
          f"max_abs_err={err:.2e} rel_err={rel:.2e}")
    return ok


def check_graph_replay() -> bool:
    """Capture a split-K decode once, replay it with other seq_lens and block tables: must match the reference."""
    batch, max_blocks = 4, 8192 // TPB
    q, kv_cache, table, qsl, sl = make_batch([1] * batch, [8192] * batch, HEADS, KV_HEADS, HEAD_DIM, TPB)
    out = torch.empty_like(q)
    num_splits = pa.choose_num_splits(batch, KV_HEADS, 1, None, torch.cuda.get_device_properties(0).multi_processor_count)
    run = lambda: pa.paged_attention(q, kv_cache, table, qsl, sl, HEAD_DIM ** -0.5, max_query_len=1,
                                     num_splits=num_splits, out=out)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    ok = True
    for trial, lens in enumerate([[8192, 1, 33, 4096], [17, 8191, 2, 256]]):
        sl.copy_(torch.tensor(lens, dtype=torch.int32))
        table.copy_(table[torch.randperm(batch, device="cuda")][:, torch.randperm(max_blocks, device="cuda")])
        out.fill_(float("nan"))
        graph.replay()
        want = reference.paged_attention(q, kv_cache, table, [1] * batch, lens, HEAD_DIM ** -0.5).float()
        err = (out.float() - want).abs().max().item()
        good = bool(torch.isfinite(out).all()) and err < 2e-2
        ok &= good
        print(f"  {'ok  ' if good else 'FAIL'} cuda-graph replay {trial} seq_lens={lens} splits={num_splits} "
              f"max_abs_err={err:.2e}")
    return ok


def run_checks() -> bool:
    ok = True
    for name, ql, sl, h, hkv, d, tpb, splits in CHECKS:
        for s in splits:
            ok &= check_case(name, ql, sl, h, hkv, d, tpb, s)
    ok &= check_case("gqa4 d128 mixed", CHECKS[1][1], CHECKS[1][2], 32, 8, 128, 32, 1, dtype=torch.float16)
    ok &= check_case("gqa4 d64 mixed f32", [1, 100], [300, 200], 8, 2, 64, 16, 2, dtype=torch.float32)
    ok &= check_graph_replay()
    return ok


# ---- 2. decode bandwidth ----------------------------------------------------------------------------------------
class DecodeBench:
    """One 8B-shaped cache big enough for batch 256 x 8192 tokens; each case draws random block tables."""

    def __init__(self, max_tokens: int) -> None:
        self.num_blocks = max_tokens // TPB
        self.kv_cache = torch.empty(2, self.num_blocks, TPB, KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
        self.kv_cache.normal_()
        self.num_sms = torch.cuda.get_device_properties(0).multi_processor_count

    def time_us(self, batch: int, context: int, num_splits: int) -> float:
        blocks_per_seq = context // TPB
        tables = [torch.randperm(self.num_blocks, device="cuda")[:batch * blocks_per_seq].to(torch.int32)
                  .view(batch, blocks_per_seq) for _ in range(ROTATIONS)]
        q = torch.randn(batch, HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
        out = torch.empty_like(q)
        qsl = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
        sl = torch.full((batch,), context, dtype=torch.int32, device="cuda")

        def step():
            for table in tables:
                pa.paged_attention(q, self.kv_cache, table, qsl, sl, HEAD_DIM ** -0.5, max_query_len=1,
                                   num_splits=num_splits, out=out)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return time_ms(graph.replay, iters=10) * 1e3 / ROTATIONS


def decode_table(copy_bw: float) -> list[str]:
    bench = DecodeBench(256 * 8192)
    rows = []
    for batch in (1, 16, 64, 256):
        for context in (512, 2048, 8192):
            splits = pa.choose_num_splits(batch, KV_HEADS, 1, context, bench.num_sms, "auto")
            us = bench.time_us(batch, context, splits)
            us_off = bench.time_us(batch, context, 1) if splits > 1 else us
            kv_bytes = batch * context * KV_HEADS * HEAD_DIM * 2 * 2  # K and V, bf16
            bw = kv_bytes / (us * 1e-6)
            rows.append(f"| decode b={batch:<3d} ctx={context:<5d} | splits {splits:<3d} | {us:8.1f} us "
                        f"(splits off {us_off:8.1f}) | {bw / 1e12:5.2f} TB/s | {bw / copy_bw:6.1%} of copy |")
            print(rows[-1])
    del bench
    torch.cuda.empty_cache()
    return rows


# ---- 3. prefill -------------------------------------------------------------------------------------------------
def prefill_table(matmul_rate: float, seq: int = 4096) -> list[str]:
    q, kv_cache, table, qsl, sl = make_batch([seq], [seq], HEADS, KV_HEADS, HEAD_DIM, TPB, seed=1)
    out = torch.empty_like(q)
    ms = time_ms(lambda: pa.paged_attention(q, kv_cache, table, qsl, sl, HEAD_DIM ** -0.5, max_query_len=seq,
                                            out=out))
    k, v = reference.gather_kv(kv_cache, table[0], seq)  # [S, Hkv, D]
    group = HEADS // KV_HEADS
    qs = q.transpose(0, 1)[None]  # [1, H, S, D]
    ks = k.repeat_interleave(group, dim=1).transpose(0, 1)[None].contiguous()
    vs = v.repeat_interleave(group, dim=1).transpose(0, 1)[None].contiguous()
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
    ms_sdpa = time_ms(sdpa)
    flops = 2 * 2 * seq * seq / 2 * HEADS * HEAD_DIM
    rows = [f"| prefill S={seq} kvflight   | {ms * 1e3:8.1f} us | {flops / ms * 1e-9:6.1f} TFLOP/s | "
            f"{flops / ms * 1e3 / matmul_rate:6.1%} of bf16 matmul |",
            f"| prefill S={seq} torch sdpa | {ms_sdpa * 1e3:8.1f} us | {flops / ms_sdpa * 1e-9:6.1f} TFLOP/s | "
            f"{flops / ms_sdpa * 1e3 / matmul_rate:6.1%} of bf16 matmul |"]
    for r in rows:
        print(r)
    return rows


# ---- tuning sweep -----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def launch_config(**updates):
    """paged_attention with these keys of its launch config replaced (BLOCK_Q follows a given BLOCK_M: BLOCK_M //
    group), the kernel's own choice for the rest; restored on exit."""
    original = pa._launch_config

    def cfg(group, *args, **kwargs):
        c = original(group, *args, **kwargs)
        c.update(updates)
        if "BLOCK_M" in updates:
            c["BLOCK_Q"] = updates["BLOCK_M"] // group
        return c
    pa._launch_config = cfg
    try:
        yield
    finally:
        pa._launch_config = original


def tune() -> None:
    bench = DecodeBench(64 * 8192)
    decode_cases = [(16, 2048, 1), (64, 8192, 1), (16, 2048, 4), (1, 8192, 4)]
    decode_configs = [(n, 4, st) for n in (32, 64, 128) for st in (3, 5, 7)] + [(64, 8, 5), (128, 8, 5)]
    for block_n, warps, stages in decode_configs:
        try:
            with launch_config(BLOCK_N=block_n, num_warps=warps, num_stages=stages):
                times = [bench.time_us(*case) for case in decode_cases]
            print(f"tune decode N={block_n} w={warps} st={stages}: "
                  + " ".join(f"{b}x{c}/s{s}={t:.1f}us" for (b, c, s), t in zip(decode_cases, times)))
        except Exception as e:  # out of shared memory etc.
            print(f"tune decode N={block_n} w={warps} st={stages}: {type(e).__name__} {e}"[:200])
    del bench
    torch.cuda.empty_cache()
    seq = 4096
    q, kv_cache, table, qsl, sl = make_batch([seq], [seq], HEADS, KV_HEADS, HEAD_DIM, TPB, seed=1)
    flops = 2 * seq * seq * HEADS * HEAD_DIM
    prefill_configs = [(128, n, 8, st) for n in (64, 128) for st in (2, 3, 4)] + [(128, 64, 4, 3), (64, 64, 4, 3),
                                                                                   (64, 64, 4, 4)]
    for block_m, block_n, warps, stages in prefill_configs:
        try:
            with launch_config(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages):
                ms = time_ms(lambda: pa.paged_attention(q, kv_cache, table, qsl, sl, HEAD_DIM ** -0.5,
                                                        max_query_len=seq), iters=5)
            print(f"tune prefill M={block_m} N={block_n} w={warps} st={stages}: {ms * 1e3:.0f} us "
                  f"{flops / ms * 1e-9:.0f} TFLOP/s")
        except Exception as e:
            print(f"tune prefill M={block_m} N={block_n} w={warps} st={stages}: {type(e).__name__} {e}"[:200])


def short_context_sweep(batches: tuple[int, ...] = (1, 4, 16), contexts: tuple[int, ...] = (128, 256, 512, 1024),
                        block_ns: tuple[int, ...] = (16, 32, 64, 128), stage_counts: tuple[int, ...] = (3, 5)) -> None:
    """Decode at small batches: no split against split-K (as many splits as a captured graph uses) with other KV
    tiles. Microseconds per call (CUDA-graph replays, block tables rotated past L2)."""
    bench = DecodeBench(max(batches) * max(max(contexts), 8192))
    for batch in batches:
        splits = max(2, math.ceil(pa.TARGET_PROGRAMS_PER_SM * bench.num_sms / (batch * KV_HEADS)))
        for context in contexts:
            cells = [f"off {bench.time_us(batch, context, 1):6.2f}"]
            for block_n in block_ns:
                for stages in stage_counts:
                    try:
                        with launch_config(BLOCK_N=block_n, num_stages=stages):
                            cells.append(f"n{block_n}/st{stages} {bench.time_us(batch, context, splits):6.2f}")
                    except Exception as e:
                        cells.append(f"n{block_n}/st{stages} {type(e).__name__}")
            print(f"short b={batch:<2d} ctx={context:<5d} splits={splits:<3d} us/call: " + " | ".join(cells),
                  flush=True)
    del bench
    torch.cuda.empty_cache()


def batch_sweep(batches: tuple[int, ...] = (32, 64, 128, 256), contexts: tuple[int, ...] = (160, 320, 640, 1280, 4096),
                block_ns: tuple[int, ...] = (32, 64, 128), stage_counts: tuple[int, ...] = (1, 3, 5),
                warp_counts: tuple[int, ...] = (2, 4)) -> None:
    """Decode at large batches (programs >> SMs, no split): KV tile, pipelining and warps, us per call (CUDA-graph
    replays, block tables rotated past L2), the current default first; KV read rate as a share of copy bandwidth."""
    copy_bw = copy_bandwidth_bytes_per_s()
    bench = DecodeBench(max(batches) * max(contexts) + 64 * TPB)
    configs = [(n, st, w) for n in block_ns for st in stage_counts for w in warp_counts]
    print(f"large-batch decode sweep (copy {copy_bw / 1e12:.2f} TB/s); cells: BLOCK_N/num_stages/warps us")
    for batch in batches:
        for context in contexts:
            base = bench.time_us(batch, context, 1)
            cells = []
            for block_n, stages, warps in configs:
                try:
                    with launch_config(BLOCK_N=block_n, num_stages=stages, num_warps=warps):
                        cells.append((bench.time_us(batch, context, 1), f"{block_n}/{stages}/{warps}"))
                except Exception as e:  # noqa: BLE001 - out of shared memory etc.
                    cells.append((float("inf"), f"{block_n}/{stages}/{warps} {type(e).__name__}"))
            best = min(cells)
            kv_bytes = batch * context * KV_HEADS * HEAD_DIM * 2 * 2

            def share(us: float) -> str:
                return f"{kv_bytes / (us * 1e-6) / copy_bw:5.1%}"
            print(f"b={batch:<4d} ctx={context:<5d} default {base:7.1f} ({share(base)}) | best {best[1]} "
                  f"{best[0]:7.1f} ({share(best[0])}) | " + " ".join(f"{name}={us:.1f}" for us, name in cells),
                  flush=True)
    del bench
    torch.cuda.empty_cache()


def prefill_sweep(seqs: tuple[int, ...] = (512, 1024, 2048, 4096)) -> None:
    """Fresh prefills (batch 1, no cached prefix, causal): tile configs at each length, TFLOP/s, the current default
    and torch SDPA (flash) first."""
    configs = [(m, n, w, st) for m in (64, 128) for n in (64, 128) for w in (4, 8) for st in (2, 3, 4)]
    for seq in seqs:
        q, kv_cache, table, qsl, sl = make_batch([seq], [seq], HEADS, KV_HEADS, HEAD_DIM, TPB, seed=1)
        flops = 2 * seq * seq * HEADS * HEAD_DIM  # causal: half of 4 * S^2 * H * D

        def run():
            return pa.paged_attention(q, kv_cache, table, qsl, sl, HEAD_DIM ** -0.5, max_query_len=seq)
        base = time_ms(run, iters=10) * 1e3
        k, v = reference.gather_kv(kv_cache, table[0], seq)
        group = HEADS // KV_HEADS
        qs = q.transpose(0, 1)[None]
        ks = k.repeat_interleave(group, dim=1).transpose(0, 1)[None].contiguous()
        vs = v.repeat_interleave(group, dim=1).transpose(0, 1)[None].contiguous()
        sdpa = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True),
                       iters=10) * 1e3
        cells = []
        for block_m, block_n, warps, stages in configs:
            try:
                with launch_config(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages):
                    cells.append((time_ms(run, iters=10) * 1e3, f"{block_m}/{block_n}/{warps}/{stages}"))
            except Exception as e:  # noqa: BLE001 - out of shared memory etc.
                cells.append((float("inf"), f"{block_m}/{block_n}/{warps}/{stages} {type(e).__name__}"))
        best = min(cells)
        tf = lambda us: flops / (us * 1e-6) / 1e12  # noqa: E731
        print(f"prefill S={seq:<5d} default {base:7.1f} us ({tf(base):4.0f} TF) | sdpa {sdpa:7.1f} ({tf(sdpa):4.0f}) | "
              f"best M/N/w/st {best[1]} {best[0]:7.1f} ({tf(best[0]):4.0f}) | "
              + " ".join(f"{name}={us:.0f}" for us, name in cells), flush=True)


def mixed_sweep(decodes: int = 24, context: int = 1100, prompts: tuple[int, ...] = (1, 2), length: int = 1024) -> None:
    """A server step's attention: `prompts` fresh prefills of `length` tokens beside `decodes` decodes of `context`
    tokens. Times the one mixed launch the engine makes, each part alone, the parts one after the other and the parts
    on two streams at once (us per call, CUDA-graph replays: no host time)."""
    from wo_matmul_sweep_gpu import graph_time_us
    for count in prompts:
        qlens = [1] * decodes + [length] * count
        slens = [context] * decodes + [length] * count
        q, kv_cache, table, qsl, sl = make_batch(qlens, slens, HEADS, KV_HEADS, HEAD_DIM, TPB, seed=2)
        qd, qp = q[:decodes], q[decodes:]  # decode rows come first (one each), the prefill rows after
        qsl_d = qsl[:decodes + 1]
        qsl_p = (qsl[decodes:] - decodes).contiguous()
        out = torch.empty_like(q)
        scale = HEAD_DIM ** -0.5
        side = torch.cuda.Stream()

        def mixed():
            pa.paged_attention(q, kv_cache, table, qsl, sl, scale, max_query_len=length, out=out)

        def decode_part():
            pa.paged_attention(qd, kv_cache, table[:decodes], qsl_d, sl[:decodes], scale, max_query_len=1,
                               out=out[:decodes])

        def prefill_part():
            pa.paged_attention(qp, kv_cache, table[decodes:], qsl_p, sl[decodes:], scale, max_query_len=length,
                               out=out[decodes:])

        def sequential():
            prefill_part()
            decode_part()

        def two_streams():
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                decode_part()
            prefill_part()
            torch.cuda.current_stream().wait_stream(side)

        mixed()
        ref = out.clone()
        two_streams()
        torch.cuda.synchronize()
        err = (out.float() - ref.float()).abs().max().item()
        cells = {name: graph_time_us(fn, iters=10) for name, fn in (
            ("mixed", mixed), ("prefill", prefill_part), ("decode", decode_part), ("sequential", sequential),
            ("two_streams", two_streams))}
        print(f"mixed {count}x{length} + {decodes} decodes at {context}: "
              + " | ".join(f"{k} {v:6.1f}" for k, v in cells.items()) + f" us | max diff {err:.2e}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prefill-sweep", action="store_true", help="prefill tile sweep at 512..4096, then exit")
    parser.add_argument("--batch-sweep", action="store_true", help="large-batch decode tile sweep, then exit")
    parser.add_argument("--short-sweep", action="store_true", help="small-batch decode: split-K tile sweep, then exit")
    parser.add_argument("--contexts", default="128,256,512,1024", help="--short-sweep contexts")
    parser.add_argument("--batches", default="1,4,16", help="--short-sweep batch sizes")
    parser.add_argument("--mixed-sweep", action="store_true",
                        help="prefill + decode step: one launch vs its parts, then exit")
    parser.add_argument("--tune", action="store_true", help="sweep tile configs first")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--only-tune", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    if args.prefill_sweep:
        prefill_sweep()
        return 0
    if args.batch_sweep:
        batch_sweep()
        return 0
    if args.mixed_sweep:
        for decodes, context in ((24, 1100), (16, 600), (48, 1100)):
            mixed_sweep(decodes, context)
        return 0
    if args.short_sweep:
        short_context_sweep(tuple(int(b) for b in args.batches.split(",")),
                            tuple(int(c) for c in args.contexts.split(",")))
        return 0
    if args.tune or args.only_tune:
        print(f"copy bandwidth {copy_bandwidth_bytes_per_s() / 1e12:.2f} TB/s")
        tune()
        if args.only_tune:
            return 0
    ok = True
    if not args.skip_check:
        print("correctness (vs reference.paged_attention, float32 math on the same inputs):")
        ok = run_checks()
    copy_bw = copy_bandwidth_bytes_per_s()
    matmul_rate = matmul_flops_per_s()
    rows = [f"| device-to-device copy | {copy_bw / 1e12:.2f} TB/s (read + write) | bf16 matmul "
            f"{matmul_rate / 1e12:.0f} TFLOP/s |"]
    rows += decode_table(copy_bw)
    rows += prefill_table(matmul_rate)
    print("\nkvflight paged attention on", torch.cuda.get_device_name(0))
    print("\n".join(rows))
    if not ok:
        print("\nFAIL: at least one correctness case above is wrong")
        return 1
    print("\nall correctness cases passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
