"""GPU smoke benchmark of the engine core (reference attention, eager): one table, each row with its ratio to
the hardware limit measured in the same run. Run on the device machine:

    python benchmarks/engine_smoke_gpu.py
"""

from __future__ import annotations

import random
import sys
import time

import torch

from kvflight import LLM, SamplingParams


def copy_bandwidth_bytes_per_s() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - t)  # read + write


def matmul_flops() -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - t)


def rand_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


def timed_generate(llm: LLM, prompts, max_tokens: int) -> float:
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate(prompts, sp)
    torch.cuda.synchronize()
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
    return time.perf_counter() - t


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--presets", default="smollm2-135m,llama-3.1-8b")
    ap.add_argument("--offline-requests", type=int, default=64)
    args = ap.parse_args()
    bw = copy_bandwidth_bytes_per_s()
    flops = matmul_flops()
    print(f"device {torch.cuda.get_device_name()} | copy {bw / 1e12:.2f} TB/s | bf16 matmul {flops / 1e12:.0f} TFLOP/s")
    rows = []
    print(f"{'model':<14} {'workload':<26} {'measured':<18} {'reference':<20} ratio")

    class Rows(list):
        def append(self, r):
            print(f"{r[0]:<14} {r[1]:<26} {r[2]:<18} {r[3]:<20} {r[4]}")

    rows = Rows()
    for preset in args.presets.split(","):
        batch_offline, n_in, n_out = args.offline_requests, 256, args.decode_tokens
        # no prefix reuse: repeated prompts must be computed again to be timed
        llm = LLM(preset, load_format="dummy", max_seq_len=8192, max_batch_size=256, max_num_tokens=8192,
                  enable_kv_cache_reuse=False)
        arch = llm.engine.arch
        weight_bytes = llm.engine.runner.weights_bytes
        vocab = arch.vocab_size
        p1 = rand_prompts(1, 128, vocab)
        timed_generate(llm, p1, 4)  # warm-up
        t1 = timed_generate(llm, p1, 1)
        t256 = timed_generate(llm, p1, args.decode_tokens)
        ms_tok = (t256 - t1) / (args.decode_tokens - 1) * 1e3
        limit_ms = weight_bytes / bw * 1e3  # one read of the weights per token at copy bandwidth
        rows.append((preset, f"batch-1 decode 128/{args.decode_tokens}", f"{ms_tok:.2f} ms/token", f"limit {limit_ms:.2f} ms",
                     f"{limit_ms / ms_tok:.0%}"))
        pp = rand_prompts(batch_offline, n_in, vocab, seed=1)
        t = timed_generate(llm, pp, n_out)
        rows.append((preset, f"offline {batch_offline} x {n_in}/{n_out}", f"{batch_offline / t:.1f} req/s",
                     f"{batch_offline * n_out / t:.0f} out tok/s", ""))
        long = rand_prompts(1, 4096, vocab, seed=2)
        timed_generate(llm, long, 1)
        tp = timed_generate(llm, long, 1)
        fl = 2 * arch.num_params() * 4096
        rows.append((preset, "prefill 4096, batch 1", f"{tp * 1e3:.1f} ms", f"{fl / tp / 1e12:.0f} TFLOP/s",
                     f"{fl / tp / flops:.0%} of matmul"))
        rows.append((preset, "KV capacity", f"{llm.engine.plan.kv_capacity_tokens} tokens",
                     f"{llm.engine.plan.kv_cache_bytes / 2**30:.1f} GiB", ""))
        del llm
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
