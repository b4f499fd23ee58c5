"""GPU benchmark of weight quantization: Llama-3.1-8B shape (dummy weights), bf16 against every scheme, one table
(plus a per-linear kernel table), every speed beside the hardware limit measured in the same run. Run on the
device machine:

    python benchmarks/quant_gpu.py                       # all schemes, both tables
    python benchmarks/quant_gpu.py --schemes none,fp8,int4_awq --offline-requests 200 --no-kernels
    python benchmarks/quant_gpu.py --schemes fp8,fp8+lmh8,int4_awq,int4_awq+lmhf   # +lmh8 / +lmhf: int8 / float head

Rows: batch-1 decode (128 in / 256 out; the median of 3 runs) in ms/token against the weight-read limit (weight
bytes / copy bandwidth), small-batch decode (--small-batch requests at once, 128 in / 256 out) in ms per step,
offline N x 256 in / 256 out in output tokens/s against our bf16 row, the weights and the KV
capacity the planner reports. int4_awq on dummy weights is int4 group-128 with the same kernel (AWQ changes values,
not speed); int8_sq at load time has no smoothing (same kernels as the calibrated checkpoint).
Needs the ModelRunner to pass `quantization` to load_model; the script stops with that message otherwise.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys

import torch

from kvflight import LLM
from kvflight.bench.offline import rand_prompts, timed_generate
from kvflight.bench.limits import copy_bandwidth_bytes_per_s, matmul_flops_per_s

SCHEMES = ("none", "fp8", "int8_sq", "int8_wo", "int4_wo", "int4_awq")
TARGETS = {"none": "vLLM 6.56 ms, 11.0k", "fp8": "<=3.5 ms, >=1.3x", "int4_awq": "<=2.5 ms"}  # issue 9
# Llama-3.1-8B linears (N out, K in) at TP 1, per decoder layer
LLAMA8B_LINEARS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def cuda_time_ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def decode_ms_per_step(llm: LLM, prompts, tokens: int) -> float:
    """Milliseconds per decode step with these prompts in flight: (median of 3 runs of `tokens` output tokens - best of
    3 runs of 1) / (tokens - 1), after a warm-up (runs vary ~3%)."""
    timed_generate(llm, prompts, 8)
    t1 = min(timed_generate(llm, prompts, 1) for _ in range(3))
    tn = statistics.median(timed_generate(llm, prompts, tokens) for _ in range(3))
    return (tn - t1) / (tokens - 1) * 1e3


def kernel_table(bw: float, flops: float, token_counts: list[int]) -> None:
    """One linear of each Llama-8B shape per scheme and token count: time, achieved weight bandwidth or FLOP/s."""
    from kvflight.quant.linear import make_linear_method, quantize_linear_
    from kvflight.quant.schemes import QuantConfig
    from kvflight.model.layers import ColumnParallelLinear

    print(f"\n{'linear':<8} {'tokens':>6} " + " ".join(f"{s:>18}" for s in SCHEMES))
    for name, (n, k) in LLAMA8B_LINEARS.items():
        layers = {}
        for scheme in SCHEMES:
            layer = ColumnParallelLinear(k, n, dtype=torch.bfloat16, device="cuda")
            layer.weight.data.uniform_(-0.02, 0.02)
            if scheme != "none":
                quantize_linear_(layer, make_linear_method(QuantConfig(scheme), k))
            layers[scheme] = layer
        for m in token_counts:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            cells = []
            for scheme, layer in layers.items():
                ms = cuda_time_ms(lambda: layer(x))
                weight_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
                if m <= 16:  # memory bound: weight bytes per second against the copy bandwidth
                    cells.append(f"{ms * 1e3:7.1f}us {weight_bytes / (ms / 1e3) / bw:5.0%}bw")
                else:
                    cells.append(f"{ms * 1e3:7.1f}us {2 * m * n * k / (ms / 1e3) / flops:5.0%}mm")
            print(f"{name:<8} {m:>6} " + " ".join(f"{c:>18}" for c in cells), flush=True)
        del layers
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--small-batch", type=int, default=4, help="the small-batch decode column's batch size")
    ap.add_argument("--offline-requests", type=int, default=1000)
    ap.add_argument("--offline-len", type=int, default=256, help="input and output tokens per offline request")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no CUDA graphs)")
    ap.add_argument("--kernel-backend", default="auto")
    ap.add_argument("--no-kernels", dest="kernels", action="store_false")
    ap.add_argument("--kernel-tokens", default="1,16,256,4096")
    args = ap.parse_args()
    from kvflight.quant.loading import describe_quantization

    bw = copy_bandwidth_bytes_per_s()
    flops = matmul_flops_per_s()
    print(f"device {torch.cuda.get_device_name()} | copy {bw / 1e12:.2f} TB/s | bf16 matmul {flops / 1e12:.0f} "
          f"TFLOP/s | torch {torch.__version__} | eager {args.eager} | backend {args.kernel_backend}")
    print(f"{'scheme':<9} {'weights GiB':>11} {'decode ms/tok':>13} {'limit ms':>9} {'of limit':>8} "
          f"{f'b{args.small_batch} ms/step':>12} {'offline req/s':>13} {'out tok/s':>10} {'vs bf16':>8} "
          f"{'KV tokens':>10} {'target':<20} linears",
          flush=True)
    bf16_tok_s = None
    for label in args.schemes.split(","):
        scheme, _, suffix = label.partition("+")
        heads = {"": "auto", "lmh8": "on", "lmhf": "off"}  # the LM head: as served by default, int8, float
        if suffix not in heads:
            raise SystemExit(f"--schemes {label!r}: the suffixes are +lmh8 (an int8 LM head) and +lmhf (a float "
                             "one); none: quantize_lm_head auto (int8 under int4 weights)")
        llm = LLM(args.preset, load_format="dummy", quantization=scheme, max_seq_len=8192, max_batch_size=256,
                  quantize_lm_head=heads[suffix],
                  max_num_tokens=8192, enable_kv_cache_reuse=False,  # repeats must be computed again to be timed
                  enforce_eager=args.eager, kernel_backend=args.kernel_backend)
        model = llm.engine.runner.model
        linears = describe_quantization(model)
        if scheme != "none" and not linears.startswith(scheme):
            print(f"{scheme}: the model's linears are '{linears}': the ModelRunner does not pass "
                  "config.model.quantization to load_model; wire it and rerun", file=sys.stderr)
            return 1
        arch = llm.engine.arch
        weight_bytes = llm.engine.runner.weights_bytes
        ms_tok = decode_ms_per_step(llm, rand_prompts(1, 128, arch.vocab_size), args.decode_tokens)
        limit_ms = weight_bytes / bw * 1e3
        batch_ms = decode_ms_per_step(llm, rand_prompts(args.small_batch, 128, arch.vocab_size, seed=2),
                                      args.decode_tokens)
        prompts = rand_prompts(args.offline_requests, args.offline_len, arch.vocab_size, seed=1)
        t = timed_generate(llm, prompts, args.offline_len)
        tok_s = args.offline_requests * args.offline_len / t
        if label == "none":
            bf16_tok_s = tok_s
        vs = f"{tok_s / bf16_tok_s:.2f}x" if bf16_tok_s else "-"
        print(f"{label:<9} {weight_bytes / 2**30:>11.2f} {ms_tok:>13.2f} {limit_ms:>9.2f} {limit_ms / ms_tok:>8.0%} "
              f"{batch_ms:>12.2f} {args.offline_requests / t:>13.1f} {tok_s:>10.0f} {vs:>8} "
              f"{llm.engine.plan.kv_capacity_tokens:>10} {TARGETS.get(scheme, ''):<20} {linears}", flush=True)
        del llm, model
        gc.collect()
        torch.cuda.empty_cache()
    if args.kernels:
        kernel_table(bw, flops, [int(m) for m in args.kernel_tokens.split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
