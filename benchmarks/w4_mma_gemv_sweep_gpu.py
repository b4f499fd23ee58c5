"""GPU sweep of the tensor-core 4-bit GEMV (kernels/w4_mma_gemv.py) on the Llama-3.1-8B linears at 1..8 rows,
against what those calls used before (one row: the CUDA-core GEMV wo_gemv; more: the Triton W4A16 matmul): weight
bandwidth as a share of the copy bandwidth measured in the same run, timed as CUDA graphs of 20 launches with the
weights rotated past L2. Run on the device machine:

    python benchmarks/w4_mma_gemv_sweep_gpu.py [--rows 1,2,4,8] [--shapes qkv,o,gate_up,down] [--quick]
"""

from __future__ import annotations

import argparse
import itertools

import torch

from kvflight.bench.limits import copy_bandwidth_bytes_per_s
from kvflight.kernels.w4_mma_gemv import MmaGemvConfig, choose_mma_gemv_config, w4_mma_gemv
from kvflight.kernels.w4a16_matmul import w4a16_matmul
from kvflight.kernels.wo_gemv import wo_gemv
from wo_matmul_sweep_gpu import SHAPES, dequantized, graph_time_us, make_weights


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--quick", action="store_true", help="a smaller config grid")
    ap.add_argument("--grid", default="", help="m_tiles/warps/splits/prefetch lists, e.g. 1,2/4,8/4,8/1,2,3,4")
    ap.add_argument("--all", action="store_true", help="print every config's time")
    ap.add_argument("--top", type=int, default=4, help="configs of the first row count retried at the others")
    args = ap.parse_args()
    bw = copy_bandwidth_bytes_per_s()
    print(f"device {torch.cuda.get_device_name()} | copy {bw / 1e12:.2f} TB/s")
    print(f"{'linear':<8} {'M':>2} {'before':>17} {'mma default':>17} {'mma best':>17}  best (m_tiles, warps, split, "
          "wpl, prefetch)")
    tiles, warps, splits, prefetch = (1, 2, 4), (2, 4, 8), (1, 2, 4, 8, 16), (1, 2, 3)
    if args.quick:
        tiles, warps, splits, prefetch = (1, 2), (4, 8), (2, 4, 8), (2,)
    if args.grid:
        tiles, warps, splits, prefetch = (tuple(int(v) for v in part.split(",")) for part in args.grid.split("/"))
    rows = [int(r) for r in args.rows.split(",") if r]
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        weights, nbytes = make_weights("int4", n, k)
        wd = dequantized("int4", weights)
        copies = [weights] + [tuple(t.clone() for t in weights) for _ in range(min(7, 200_000_000 // nbytes))]
        spans = k // 128
        grid = [MmaGemvConfig(r, w, s, 4, p) for r, w, s, p in itertools.product(tiles, warps, splits, prefetch)
                if spans % s == 0 and spans // s <= 32]
        ranked: list[tuple[float, MmaGemvConfig]] = []
        for i, m in enumerate(rows):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ wd.float().t()

            def rotating(fn, cfg=None):
                state = [0]

                def call():
                    state[0] = (state[0] + 1) % len(copies)
                    q, s, z = copies[state[0]]
                    return fn(x, q, s, z, cfg)
                return call

            def before(x_, q, s, z, cfg):
                return wo_gemv(x_, q, s, z, 128) if m == 1 else w4a16_matmul(x_, q, s, z, 128)

            def mma(x_, q, s, z, cfg):
                return w4_mma_gemv(x_, q, s, z, 128, config=cfg)

            t_before = graph_time_us(rotating(before))
            t_default = graph_time_us(rotating(mma))
            results = []
            for cfg in grid if i == 0 else [c for _, c in ranked[:args.top]]:
                try:
                    out = mma(x, *weights, cfg)
                    err = ((out.float() - ref).norm() / ref.norm()).item()
                    if err > 4e-3:
                        print(f"  {name} M={m} {tuple(cfg)}: WRONG (relative error {err:.3g})")
                        continue
                    results.append((graph_time_us(rotating(mma, cfg)), cfg))
                except Exception as exc:  # noqa: BLE001 - a config that does not compile is reported and skipped
                    print(f"  {name} M={m} {tuple(cfg)}: {type(exc).__name__}: {str(exc)[:200]}")
            results.sort(key=lambda r: r[0])
            if args.all:
                print(f"  {name} M={m}: " + " ".join(f"{tuple(c)[:3] + (c.prefetch,)}={t:.1f}" for t, c in results))
            if i == 0:
                ranked = results
            best_t, best_cfg = results[0] if results else (float("inf"), None)

            def pct(t: float) -> str:
                return f"{t:7.1f}us {nbytes / (t * 1e-6) / bw:5.0%}bw"

            print(f"{name:<8} {m:>2} {pct(t_before):>17} {pct(t_default):>17} {pct(best_t):>17}  "
                  f"{tuple(best_cfg) if best_cfg else '-'}  default {tuple(choose_mma_gemv_config(m, n, k, 128))}",
                  flush=True)
        weights = wd = copies = None  # free this linear's copies before the next
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
