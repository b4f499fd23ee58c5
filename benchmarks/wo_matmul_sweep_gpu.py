"""GPU sweep of the weight-only matmul kernels' tiles (W8A16 with int8 or fp8 weights, W4A16 group 128) on the
Llama-3.1-8B linears: per shape and token count, the heuristic's time and the best config's, as weight bandwidth
against the copy bandwidth measured in the same run; and for large token counts the kernel against dequantize +
cuBLAS. Timed as CUDA graphs of 20 launches (no host launch cost). Run on the device machine:

    python benchmarks/wo_matmul_sweep_gpu.py [--kinds int8,fp8,int4] [--tokens 1,16]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F

from kvflight.bench.limits import copy_bandwidth_bytes_per_s
from kvflight.kernels.dequant_weight import dequantize_8bit, dequantize_int4
from kvflight.kernels.w4a16_matmul import w4a16_matmul
from kvflight.kernels.w8a16_matmul import KernelConfig, choose_config, w8a16_matmul
from kvflight.quant import ops

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def graph_time_us(fn, iters: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        fn()  # warm the allocator on the capture stream
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(iters):
                fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (3 * iters)


def make_weights(kind: str, n: int, k: int):
    w = torch.empty(n, k, device="cuda", dtype=torch.bfloat16).uniform_(-0.02, 0.02)
    if kind == "int8":
        q, s = ops.quantize_int8_per_channel(w)
        return (q, s), q.numel()
    if kind == "fp8":
        q, s = ops.quantize_fp8(w, per_channel=True)
        return (q, s.reshape(-1).float().expand(n).contiguous() if s.numel() == 1 else s.reshape(n)), q.numel()
    q, scales, zeros = ops.quantize_int4_groupwise(w, 128, True)
    return (q, scales, zeros), q.numel() + scales.numel() * 2 + zeros.numel()


def run(kind: str, x: torch.Tensor, weights, cfg: KernelConfig | None):
    if kind == "int4":
        q, scales, zeros = weights
        return w4a16_matmul(x, q, scales, zeros, 128, config=cfg)
    q, s = weights
    return w8a16_matmul(x, q, s, config=cfg)


def dequantized(kind: str, weights) -> torch.Tensor:
    if kind == "int4":
        q, scales, zeros = weights
        return ops.dequantize_int4(q, scales, zeros, 128).to(torch.bfloat16)
    q, s = weights
    return ops.dequantize_int8(q, s).to(torch.bfloat16)


def triton_dequantized(kind: str, weights) -> torch.Tensor:
    if kind == "int4":
        q, scales, zeros = weights
        return dequantize_int4(q, scales, zeros, 128, torch.bfloat16)
    q, s = weights
    return dequantize_8bit(q, s, torch.bfloat16)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default="int8,fp8,int4")
    ap.add_argument("--tokens", default="1,16")
    ap.add_argument("--large-tokens", default="256,4096")
    args = ap.parse_args()
    bw = copy_bandwidth_bytes_per_s()
    print(f"device {torch.cuda.get_device_name()} | copy {bw / 1e12:.2f} TB/s")
    print(f"{'kind':<5} {'linear':<8} {'M':>5} {'heuristic':>18} {'best':>18}  best config (bm, bn, bk, split, warps, stages)")
    for kind in args.kinds.split(","):
        block_ks = (64, 128) if kind == "int4" else (128, 256)
        configs = [KernelConfig(16, bn, bk, sp, 4, st) for bn, bk, sp, st in
                   itertools.product((32, 64, 128), block_ks, (1, 2, 4, 8), (3, 4))]
        for name, (n, k) in SHAPES.items():
            weights, nbytes = make_weights(kind, n, k)
            for m in [int(t) for t in args.tokens.split(",") if t]:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = x @ dequantized(kind, weights).t()
                heur = graph_time_us(lambda: run(kind, x, weights, None))
                best = (float("inf"), None)
                for cfg in configs:
                    if cfg.split_k * cfg.block_k > k:
                        continue
                    try:
                        out = run(kind, x, weights, cfg)
                        if not torch.allclose(out.float(), ref.float(), atol=2e-2, rtol=2e-2):
                            print(f"  {kind} {name} {cfg}: WRONG result (max err {(out - ref).abs().max():.3g})")
                            continue
                        t = graph_time_us(lambda: run(kind, x, weights, cfg))
                    except Exception as exc:  # noqa: BLE001 - a config that does not compile is skipped
                        print(f"  {kind} {name} {tuple(cfg)}: {type(exc).__name__}")
                        continue
                    best = min(best, (t, cfg), key=lambda p: p[0])
                print(f"{kind:<5} {name:<8} {m:>5} {heur:>8.1f}us {nbytes / (heur * 1e-6) / bw:>5.0%}bw "
                      f"{best[0]:>8.1f}us {nbytes / (best[0] * 1e-6) / bw:>5.0%}bw  {tuple(best[1]) if best[1] else '-'}",
                      flush=True)
            wb = dequantized(kind, weights)
            assert torch.equal(triton_dequantized(kind, weights), wb)
            t_deq = graph_time_us(lambda: triton_dequantized(kind, weights))
            print(f"{kind:<5} {name:<8} one-pass dequantization {t_deq:8.1f}us = "
                  f"{(nbytes + wb.numel() * 2) / (t_deq * 1e-6) / bw:.0%} of copy bandwidth (read codes, write bf16)")
            for m in [int(t) for t in args.large_tokens.split(",") if t]:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                kern = graph_time_us(lambda: run(kind, x, weights, None))
                cublas = graph_time_us(lambda: F.linear(x, wb))
                deq = graph_time_us(lambda: F.linear(x, triton_dequantized(kind, weights)))
                print(f"{kind:<5} {name:<8} {m:>5} kernel {kern:8.1f}us | bf16 cuBLAS {cublas:8.1f}us | one-pass "
                      f"dequant + cuBLAS {deq:8.1f}us", flush=True)
            del weights
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
