"""Hardware limits measured in the same run as a GPU benchmark: device copy bandwidth and the bf16 matmul rate."""

from __future__ import annotations

import time

import torch


def copy_bandwidth_bytes_per_s(num_bytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device-to-device copy of num_bytes, counted as read + write (bytes moved per second)."""
    x = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * num_bytes * repeats / (time.perf_counter() - t)


def matmul_flops_per_s(n: int = 8192, repeats: int = 20) -> float:
    """bf16 n x n x n matmul rate (FLOP/s)."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - t)
