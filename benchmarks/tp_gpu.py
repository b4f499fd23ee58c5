"""Tensor parallelism on two GPUs: the all-reduce strategies side by side, the 8B shape at tp=2 against tp=1
(greedy tokens, float32 dummy weights), and one table of batch-1 decode latency and offline throughput.

    python benchmarks/tp_gpu.py [--only allreduce,equal,bench] [--requests 500]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import time

import torch

SIZES_BYTES = [8 << 10, 32 << 10, 128 << 10, 512 << 10, 2 << 20, 8 << 20]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time_us(fn, iters: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / iters


def _graph_us(fn, iters: int, per_graph: int = 20) -> float:
    """Mean time of fn replayed inside a CUDA graph of `per_graph` calls (what a decode step's graph sees)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    return _time_us(graph.replay, max(1, iters // per_graph)) / per_graph


def _allreduce_rank(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    from kvflight.kernels.all_reduce import reference_all_reduce
    from kvflight.runner.custom_all_reduce import create_custom_all_reduce

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    car, why = create_custom_all_reduce(rank, world, torch.device("cuda", rank), capacity_bytes=max(SIZES_BYTES))
    rows = []
    for nbytes in SIZES_BYTES:
        n = nbytes // 2
        x = torch.randn(n, device="cuda", generator=torch.Generator("cuda").manual_seed(rank)).bfloat16()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        ref = reference_all_reduce(parts)
        buf = x.clone()
        row = {"bytes": nbytes}
        row["nccl"] = _time_us(lambda: dist.all_reduce(buf), 200)
        try:
            row["nccl_graph"] = _graph_us(lambda: dist.all_reduce(buf), 200)
        except Exception as exc:  # noqa: BLE001
            row["nccl_graph"] = float("nan")
            row["nccl_graph_error"] = str(exc)[:80]
        if car is not None:
            for strategy in ("one_shot", "two_shot"):
                got = car.all_reduce(x.clone(), strategy)
                row[f"{strategy}_err"] = (got.float() - ref.float()).abs().max().item()
                row[strategy] = _time_us(lambda: car.all_reduce(buf, strategy), 200)
                row[f"{strategy}_graph"] = _graph_us(lambda: car.all_reduce(buf, strategy), 200)
        rows.append(row)
    if car is not None:
        car.check()
    if rank == 0:
        queue.put((why, rows))
    dist.barrier()
    dist.destroy_process_group()


def bench_allreduce() -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_allreduce_rank, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    why, rows = queue.get(timeout=300)
    for p in procs:
        p.join(60)
    print(f"\n== all-reduce of bf16 messages, 2 ranks (custom set-up: {why}); microseconds per call ==")
    print(f"{'size':>8} {'NCCL':>8} {'NCCL graph':>11} {'one-shot':>9} {'graph':>7} {'two-shot':>9} {'graph':>7} "
          f"{'best graph':>11} {'max err':>8}")
    for r in rows:
        size = f"{r['bytes'] >> 10} KiB" if r["bytes"] < (1 << 20) else f"{r['bytes'] >> 20} MiB"
        custom = [(r.get("one_shot_graph", float("inf")), "one-shot"), (r.get("two_shot_graph", float("inf")), "two-shot")]
        best = min(custom + [(r["nccl_graph"], "NCCL")])
        print(f"{size:>8} {r['nccl']:8.1f} {r['nccl_graph']:11.1f} {r.get('one_shot', float('nan')):9.1f} "
              f"{r.get('one_shot_graph', float('nan')):7.1f} {r.get('two_shot', float('nan')):9.1f} "
              f"{r.get('two_shot_graph', float('nan')):7.1f} {best[1]:>11} "
              f"{max(r.get('one_shot_err', 0), r.get('two_shot_err', 0)):8.3g}", flush=True)


def _llm(tp: int, custom: str, dtype: str, max_batch_size: int, max_seq_len: int = 4096):
    from kvflight import LLM

    return LLM("llama-3.1-8b", load_format="dummy", dtype=dtype, tensor_parallel_size=tp,
               use_custom_all_reduce=custom, max_batch_size=max_batch_size, max_num_tokens=8192,
               max_seq_len=max_seq_len, enable_kv_cache_reuse=False)


def check_equal(tokens: int) -> None:
    from kvflight import SamplingParams
    from kvflight.bench.offline import rand_prompts

    prompts = rand_prompts(6, 96, 128256, seed=7)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    print(f"\n== 8B shape, float32 dummy weights, greedy {len(prompts)} x {tokens} tokens: tp=2 vs tp=1 ==")
    results = {}
    for name, tp, custom in (("tp=1", 1, "auto"), ("tp=2 custom", 2, "on"), ("tp=2 nccl", 2, "off")):
        t0 = time.perf_counter()
        try:
            llm = _llm(tp, custom, "float32", 8)
        except Exception as exc:  # noqa: BLE001
            print(f"{name:<12} failed to start: {type(exc).__name__}: {exc}", flush=True)
            continue
        strategy = getattr(llm.engine.tp_workers, "all_reduce_strategy", "-")
        outs = llm.generate(prompts, params)
        results[name] = [o.outputs[0].token_ids for o in outs]
        llm.engine.shutdown()
        del llm
        torch.cuda.empty_cache()
        ref = results.get("tp=1")
        same = "-" if ref is None or name == "tp=1" else sum(a == b for a, b in zip(results[name], ref))
        prefix = "" if ref is None or name == "tp=1" else [
            next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a)) for a, b in zip(results[name], ref)]
        print(f"{name:<12} all-reduce {strategy:<7} start+run {time.perf_counter() - t0:5.1f} s  equal to tp=1: "
              f"{same}/{len(prompts)} {prefix}", flush=True)


def bench(requests: int) -> None:
    from kvflight.bench.offline import rand_prompts, timed_generate

    print(f"\n== 8B shape, bf16 dummy weights: batch-1 decode 128/256 and offline {requests} x 256/256 ==")
    print(f"{'config':<14} {'all-reduce':<10} {'decode ms/token':>16} {'offline req/s':>14} {'out tok/s':>10} "
          f"{'KV tokens':>10}")
    base = {}
    for name, tp, custom in (("tp=1", 1, "auto"), ("tp=2 nccl", 2, "off"), ("tp=2 custom", 2, "on")):
        try:
            llm = _llm(tp, custom, "bfloat16", 256, 8192)
        except Exception as exc:  # noqa: BLE001
            print(f"{name:<14} failed to start: {type(exc).__name__}: {exc}", flush=True)
            continue
        strategy = getattr(llm.engine.tp_workers, "all_reduce_strategy", "-")
        p1 = rand_prompts(1, 128, 128256)
        timed_generate(llm, p1, 8)
        t1 = min(timed_generate(llm, p1, 1) for _ in range(3))
        tn = timed_generate(llm, p1, 256)
        decode_ms = (tn - t1) / 255 * 1e3
        prompts = rand_prompts(requests, 256, 128256, seed=1)
        timed_generate(llm, prompts[:32], 16)
        elapsed = timed_generate(llm, prompts, 256)
        rps = requests / elapsed
        kv_tokens = llm.engine.kv.num_blocks * llm.engine.config.cache.tokens_per_block
        base.setdefault("decode", decode_ms)
        base.setdefault("rps", rps)
        print(f"{name:<14} {strategy:<10} {decode_ms:10.2f} ({base['decode'] / decode_ms:4.2f}x) "
              f"{rps:8.1f} ({rps / base['rps']:4.2f}x) {rps * 256:10.0f} {kv_tokens:10d}", flush=True)
        llm.engine.shutdown()
        del llm
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="allreduce,equal,bench")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    only = set(args.only.split(","))
    from kvflight.tune.topo import custom_allreduce_pays

    print(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()} | torch {torch.__version__} | P2P 0->1 "
          f"{torch.cuda.can_device_access_peer(0, 1)} | topo: {custom_allreduce_pays([0, 1])} | "
          f"NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}", flush=True)
    if "allreduce" in only:
        bench_allreduce()
    if "equal" in only:
        check_equal(args.tokens)
    if "bench" in only:
        bench(args.requests)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
