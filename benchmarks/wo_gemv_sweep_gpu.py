"""GPU sweep of the weight-only decode GEMV (kernels/wo_gemv.py) against the tensor-core matmul kernels on the
Llama-3.1-8B linears at one row: weight bandwidth as a share of the copy bandwidth measured in the same run,
timed as CUDA graphs of 20 launches. Run on the device machine:

    python benchmarks/wo_gemv_sweep_gpu.py [--kinds int4,fp8,int8] [--quick] [--shapes qkv,o] [--block-ns 32,64]
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch

from kvflight.bench.limits import copy_bandwidth_bytes_per_s
from kvflight.kernels.wo_gemv import GemvConfig, choose_gemv_config, wo_gemv
from wo_matmul_sweep_gpu import SHAPES, dequantized, graph_time_us, make_weights, run


def gemv(kind: str, x: torch.Tensor, weights, cfg: GemvConfig | None) -> torch.Tensor:
    if kind == "int4":
        q, scales, zeros = weights
        return wo_gemv(x, q, scales, zeros, 128, config=cfg)
    q, s = weights
    return wo_gemv(x, q, s, config=cfg)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default="int4,fp8,int8")
    ap.add_argument("--tokens", default="1")
    ap.add_argument("--top", type=int, default=6, help="configs of the first token count retried at the others")
    ap.add_argument("--quick", action="store_true", help="a smaller config grid (36 4-bit / 27 8-bit configs)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="linears to time: " + ",".join(SHAPES))
    ap.add_argument("--block-ns", default="", help="block_n values to sweep (comma list)")
    ap.add_argument("--block-ks", default="", help="block_k values to sweep (comma list)")
    args = ap.parse_args()
    asm = os.environ.get("KVFLIGHT_GEMV_ASM", "1") != "0"  # 4-bit: the PTX chain (KVFLIGHT_GEMV_ASM=0: Triton unpack)
    bw = copy_bandwidth_bytes_per_s()
    print(f"device {torch.cuda.get_device_name()} | copy {bw / 1e12:.2f} TB/s")
    print(f"{'kind':<5} {'linear':<8} {'M':>2} {'matmul kernel':>17} {'gemv default':>17} {'gemv best':>17}  "
          "best (block_n, block_k, split, warps, stages)")
    tokens = [int(t) for t in args.tokens.split(",") if t]
    for kind in args.kinds.split(","):
        block_ks = (64, 128) if kind == "int4" else (128, 256, 512)
        block_ns = (16, 32, 64, 128) if kind == "int4" else (8, 16, 32)
        splits, launches = (1, 2, 4, 8), ((4, 3), (4, 4), (8, 3))
        if kind == "int4" and asm:
            block_ks = (128, 256, 512)  # the PTX chain's tiles may span whole groups
        if args.block_ks:
            block_ks = tuple(int(b) for b in args.block_ks.split(","))
        if args.block_ns:
            block_ns = tuple(int(b) for b in args.block_ns.split(","))
        if args.quick:
            block_ns = block_ns[1:]
            splits, launches = (2, 4, 8) if kind == "int4" else (1, 2, 4), ((4, 3), (8, 3))
        rows2 = (False, True) if kind == "int4" and asm else (False,)  # the PTX chain: one or two rows per chain
        grid = [GemvConfig(bn, bk, sp, w, st, r2) for bn, bk, sp, (w, st), r2 in
                itertools.product(block_ns, block_ks, splits, launches, rows2)]
        for name, (n, k) in SHAPES.items():
            if name not in args.shapes.split(","):
                continue
            weights, nbytes = make_weights(kind, n, k)
            wd = dequantized(kind, weights)
            # copies enough to overflow the 50 MB L2: each launch of a graph reads another copy, as a decode step
            # reads another layer's weights (without this a 25 MB weight is timed from L2, above copy bandwidth)
            copies = [weights] + [tuple(t.clone() for t in weights) for _ in range(min(7, 200_000_000 // nbytes))]
            ranked: list[tuple[float, GemvConfig]] = []
            for i, m in enumerate(tokens):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = x.float() @ wd.float().t()
                def rotating(fn, cfg):
                    state = [0]

                    def call():
                        state[0] = (state[0] + 1) % len(copies)
                        return fn(kind, x, copies[state[0]], cfg)
                    return call

                t_mm = graph_time_us(rotating(run, None))
                t_def = graph_time_us(rotating(gemv, None))
                configs = grid if i == 0 else [c for _, c in ranked[:args.top]]
                results = []
                for cfg in configs:
                    try:
                        out = gemv(kind, x, weights, cfg)
                        if not torch.allclose(out.float(), ref, atol=3e-2, rtol=3e-2):
                            err = (out.float() - ref).abs().max()
                            print(f"  {kind} {name} {tuple(cfg)}: WRONG (max err {err:.3g})")
                            continue
                        results.append((graph_time_us(rotating(gemv, cfg)), cfg))
                    except Exception as exc:  # noqa: BLE001 - a config that does not compile is skipped
                        print(f"  {kind} {name} {tuple(cfg)}: {type(exc).__name__}")
                results.sort(key=lambda r: r[0])
                if i == 0:
                    ranked = results
                best_t, best_cfg = results[0] if results else (float("inf"), None)

                def pct(t: float) -> str:
                    return f"{t:7.1f}us {nbytes / (t * 1e-6) / bw:5.0%}bw"

                default = choose_gemv_config(m, n, k, 4 if kind == "int4" else 8, asm=kind == "int4" and asm)
                print(f"{kind:<5} {name:<8} {m:>2} {pct(t_mm):>17} {pct(t_def):>17} {pct(best_t):>17}  "
                      f"{tuple(best_cfg) if best_cfg else '-'}  default {tuple(default)}", flush=True)
            del weights, wd, copies
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
