"""GPU fast-path benchmark (issue targets vs vLLM 0.26.0 on this H100): one table, each row with its ratio to the
hardware limit measured in the same run (device copy bandwidth, bf16 matmul rate). Dummy weights, bf16.

    python benchmarks/fast_path_gpu.py [--only decode,prefill,offline,small,memory] [--scale 0.25] [--eager]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from kvflight import LLM
from kvflight.bench.offline import rand_prompts, timed_generate
from kvflight.bench.limits import copy_bandwidth_bytes_per_s, matmul_flops_per_s


class Table:
    def __init__(self) -> None:
        print(f"{'model':<13} {'workload':<28} {'measured':<26} {'target':<12} {'vLLM':<12} {'vs vLLM':<8} of limit")

    def row(self, model: str, workload: str, measured: str, target: str = "", vllm: str = "", vs: str = "",
            limit: str = "") -> None:
        print(f"{model:<13} {workload:<28} {measured:<26} {target:<12} {vllm:<12} {vs:<8} {limit}", flush=True)


def decode_ms_per_token(llm: LLM, vocab: int, out_tokens: int = 256) -> float:
    p1 = rand_prompts(1, 128, vocab)
    timed_generate(llm, p1, 8)  # warm-up
    t1 = min(timed_generate(llm, p1, 1) for _ in range(3))
    tn = timed_generate(llm, p1, out_tokens)
    return (tn - t1) / (out_tokens - 1) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="memory,decode,prefill,offline,small")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the offline request counts to run")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no CUDA graphs)")
    ap.add_argument("--kernel-backend", default="auto")
    ap.add_argument("--max-batch-size", type=int, default=256)
    ap.add_argument("--max-num-tokens", type=int, default=8192)
    ap.add_argument("--async-scheduling", default="auto", choices=("auto", "on", "off"))
    args = ap.parse_args()
    only = set(args.only.split(","))
    bw = copy_bandwidth_bytes_per_s()
    flops = matmul_flops_per_s()
    print(f"device {torch.cuda.get_device_name()} | copy {bw / 1e12:.2f} TB/s | bf16 matmul {flops / 1e12:.0f} "
          f"TFLOP/s | backend {args.kernel_backend} | eager {args.eager} | max_batch_size {args.max_batch_size} "
          f"| max_num_tokens {args.max_num_tokens} | async_scheduling {args.async_scheduling}")
    table = Table()
    engine_args = dict(load_format="dummy", enforce_eager=args.eager, kernel_backend=args.kernel_backend,
                       max_batch_size=args.max_batch_size, max_num_tokens=args.max_num_tokens,
                       async_scheduling=args.async_scheduling,
                       enable_kv_cache_reuse=False)  # repeated prompts must be computed again to be timed
    if only & {"memory", "decode", "prefill", "offline"}:
        t0 = time.perf_counter()
        llm = LLM("llama-3.1-8b", max_seq_len=8192, **engine_args)
        start_s = time.perf_counter() - t0
        arch = llm.engine.arch
        vocab = arch.vocab_size
        name = "llama-3.1-8b"
        if "memory" in only:
            plan = llm.engine.plan
            graphs = llm.engine.runner.graphs
            graph_bytes = graphs.pool_bytes if graphs is not None else 0
            del graphs  # nothing may keep the engine alive past `del llm`
            free_now = torch.cuda.mem_get_info()[0]
            # what the KV cache could have had: free now + itself - what a step's activations need at run time
            left = plan.kv_cache_bytes + free_now - plan.activation_peak_bytes
            table.row(name, "KV capacity", f"{plan.kv_cache_bytes / 2**30:.1f} GiB {plan.kv_capacity_tokens} tok",
                      ">= 90%", "", "", f"{plan.kv_cache_bytes / left:.1%} of memory left")
            table.row(name, "start-up", f"{start_s:.1f} s (graphs {graph_bytes / 2**30:.2f} GiB)", "", "", "",
                      f"activations {plan.activation_peak_bytes / 2**30:.2f} GiB")
        if "decode" in only:
            ms = decode_ms_per_token(llm, vocab)
            limit_ms = llm.engine.runner.weights_bytes / bw * 1e3
            table.row(name, "batch-1 decode 128/256", f"{ms:.2f} ms/token", "<= 6.0", "6.56", f"{6.56 / ms:.2f}x",
                      f"{limit_ms / ms:.0%} (limit {limit_ms:.2f} ms)")
        if "prefill" in only:
            long = rand_prompts(1, 4096, vocab, seed=2)
            timed_generate(llm, long, 1)
            tp = min(timed_generate(llm, long, 1) for _ in range(3))
            fl = 2 * arch.num_params() * 4096
            table.row(name, "prefill 4096, batch 1", f"{tp * 1e3:.1f} ms", "<= 85", "103.7",
                      f"{103.7 / (tp * 1e3):.2f}x", f"{fl / tp / flops:.0%} of matmul rate")
        if "offline" in only:
            for n, n_in, n_out, target, peer in ((1000, 256, 256, 47, 43.0), (1000, 1024, 128, 31, 28.4),
                                                 (500, 128, 1024, 15.5, 14.3), (500, 2048, 128, 16.5, 15.1)):
                n_run = max(1, int(n * args.scale))
                prompts = rand_prompts(n_run, n_in, vocab, seed=n_in)
                t = timed_generate(llm, prompts, n_out)
                rate = n_run / t
                table.row(name, f"offline {n_run} x {n_in}/{n_out}",
                          f"{rate:.1f} req/s {n_run * (n_in + n_out) / t / 1e3:.1f}k tok/s", f">= {target}",
                          f"{peer}", f"{rate / peer:.2f}x",
                          f"{2 * arch.num_params() * n_run * (n_in + n_out) / t / flops:.0%} of matmul rate")
        del llm
        import gc
        gc.collect()
        torch.cuda.empty_cache()
    if "small" in only:
        name = "smollm2-135m"
        llm = LLM("smollm2-135m", max_seq_len=4096, **engine_args)
        vocab = llm.engine.arch.vocab_size
        ms = decode_ms_per_token(llm, vocab)
        limit_ms = llm.engine.runner.weights_bytes / bw * 1e3
        table.row(name, "batch-1 decode 128/256", f"{ms:.2f} ms/token", "<= 1.8", "1.97", f"{1.97 / ms:.2f}x",
                  f"{limit_ms / ms:.0%} (limit {limit_ms:.3f} ms)")
        n_run = max(1, int(2000 * args.scale))
        prompts = rand_prompts(n_run, 256, vocab, seed=7)
        t = timed_generate(llm, prompts, 256)
        table.row(name, f"offline {n_run} x 256/256", f"{n_run / t:.1f} req/s {n_run * 256 / t / 1e3:.1f}k out tok/s",
                  ">= 80", "75", f"{n_run / t / 75:.2f}x", "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
