"""GPU benchmark of the quantized KV cache: Llama-3.1-8B shape (dummy weights, bf16 compute), kv_cache_dtype auto
(bf16) vs fp8 vs int8 side by side: the KV capacity the engine plans (blocks / tokens; the planner's figure from
`kvflight plan` beside it), batch-1 decode ms/token and offline N x 128 in / 1024 out throughput. Run on the
device machine:

    python benchmarks/kv_quant_gpu.py                           # auto,fp8,int8; 500 x 128/1024
    python benchmarks/kv_quant_gpu.py --kv-dtypes auto,fp8 --requests 200 --no-decode

Issue 9's target: fp8 KV doubles the planner's KV capacity and raises the 128/1024 throughput (more sequences
fit at once: the max_utilization scheduler preempts less). With dummy weights the online scale calibration runs on
random token ids (the K / V ranges of random weights), which is what the speed needs.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from kvflight import LLM
from kvflight.bench.offline import rand_prompts, timed_generate
from kvflight.tune.planner import plan_memory


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--kv-dtypes", default="auto,fp8,int8")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=1024)
    ap.add_argument("--max-seq-len", type=int, default=8192)
    ap.add_argument("--max-batch-size", type=int, default=512)
    ap.add_argument("--no-decode", action="store_true", help="skip the batch-1 decode row")
    args = ap.parse_args()
    print(f"device {torch.cuda.get_device_name()} | {args.model} dummy bf16 | offline {args.requests} x "
          f"{args.input_len}/{args.output_len} | max_batch_size {args.max_batch_size}")
    print(f"{'kv_cache_dtype':<15} {'KiB/block':>9} {'blocks':>8} {'KV tokens':>10} {'plan tokens':>11} "
          f"{'x auto':>6} {'start s':>7} {'decode ms/tok':>13} {'offline tok/s':>13} {'x auto':>6}")
    base_tokens = base_tps = None
    for kv in args.kv_dtypes.split(","):
        t0 = time.perf_counter()
        llm = LLM(args.model, load_format="dummy", max_seq_len=args.max_seq_len, kv_cache_dtype=kv,
                  max_batch_size=args.max_batch_size, enable_kv_cache_reuse=False)
        start_s = time.perf_counter() - t0
        plan = llm.engine.plan
        runner = llm.engine.runner
        report = plan_memory(llm.engine.arch, runner.config, torch.cuda.get_device_properties(0).total_memory,
                             max_seq_len=args.max_seq_len)
        vocab = llm.engine.arch.vocab_size
        decode = float("nan")
        if not args.no_decode:
            p1 = rand_prompts(1, 128, vocab)
            timed_generate(llm, p1, 8)
            t1 = min(timed_generate(llm, p1, 1) for _ in range(3))
            tn = timed_generate(llm, p1, 256)
            decode = (tn - t1) / 255 * 1e3
        prompts = rand_prompts(args.requests, args.input_len, vocab, seed=1)
        timed_generate(llm, prompts[:8], 16)  # warm-up
        t = timed_generate(llm, prompts, args.output_len)
        tps = args.requests * args.output_len / t
        if base_tokens is None:
            base_tokens, base_tps = plan.kv_capacity_tokens, tps
        print(f"{kv:<15} {plan.kv_bytes_per_block / 1024:>9.1f} {plan.num_blocks:>8} {plan.kv_capacity_tokens:>10} "
              f"{report.num_blocks * report.inputs.tokens_per_block:>11} "
              f"{plan.kv_capacity_tokens / base_tokens:>6.2f} {start_s:>7.1f} {decode:>13.2f} {tps:>13.0f} "
              f"{tps / base_tps:>6.2f}", flush=True)
        del llm, runner
        gc.collect()
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
