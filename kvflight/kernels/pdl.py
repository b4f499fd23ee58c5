"""Programmatic dependent launch (PDL, Hopper and later): the decode kernels start before the kernel ahead of them ends.

A kernel launched with PDL may begin as soon as every program of the kernel ahead has signalled (`pdl_trigger`,
which the decode kernels do first thing) instead of when it has finished; it then runs only what reads no other
kernel's output (a GEMV's first weight tile) and blocks in `pdl_wait` until the kernel ahead has finished and its
writes are visible (that kernel in turn waited for the one ahead of it, so everything earlier is finished too).
What this hides is the gap between two kernels plus the new kernel's start-up and first memory round trip: about
0.7-0.8 us per kernel boundary on an H100 inside a CUDA graph (benchmarks/pdl_probe_gpu.py: a bf16 GEMV + norm pair
15.77 -> 14.37 us), over 300 boundaries in a batch-1 decode step of an 8B model (fp8: 3.73 -> 3.47 ms per graph).

Rules for a kernel that takes PDL: before pdl_wait it reads only tensors no kernel writes during a forward (weights,
the step's input metadata copied in before it, KV-cache entries of earlier steps: paged attention's first tile) and
writes nothing; pdl_trigger may come first. Launch it with `**launch_kwargs(tensor, name)`, which asks for a
plain launch (PDL=False) on CPU, under the interpreter, before sm_90, with KVFLIGHT_PDL=0 (or the name listed in
KVFLIGHT_PDL_SKIP), or on a Triton without it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kvflight.kernels.device import capability_at_least

try:  # Triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAVE_GDC = True
except ImportError:  # pragma: no cover - older Triton: plain launches
    HAVE_GDC = False

    @triton.jit
    def gdc_wait():  # type: ignore[no-redef]
        pass

    @triton.jit
    def gdc_launch_dependents():  # type: ignore[no-redef]
        pass


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Block until the kernel ahead has finished and its writes are visible (nothing without PDL)."""
    if PDL:
        gdc_wait()


@triton.jit
def pdl_trigger(PDL: tl.constexpr):
    """Let the next kernel start launching (nothing without PDL)."""
    if PDL:
        gdc_launch_dependents()


def enabled(t: torch.Tensor) -> bool:
    """Whether kernels on t's device launch with PDL."""
    if not (HAVE_GDC and t.is_cuda) or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if os.environ.get("KVFLIGHT_PDL", "1") == "0":
        return False
    return capability_at_least(t.device, 9)


def launch_kwargs(t: torch.Tensor, kernel: str) -> dict:
    """Extra launch arguments for the PDL-aware `kernel` whose tensors live where t does: PDL=True plus Triton's
    launch_pdl=True where enabled, else PDL=False. KVFLIGHT_PDL_SKIP=name,name launches those kernels plainly."""
    if not enabled(t) or kernel in os.environ.get("KVFLIGHT_PDL_SKIP", "").split(","):
        return {"PDL": False}
    return {"PDL": True, "launch_pdl": True}
