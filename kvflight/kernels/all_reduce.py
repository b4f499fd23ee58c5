"""Triton one-shot / two-shot all-reduce over buffers every rank can address (P2P-mapped peer memory): the kernel.

Where the buffers come from (CUDA IPC between GPUs, shared memory files on CPU) is kvflight/runner/custom_all_reduce.py;
the slow reference is `reference_all_reduce` below (and torch.distributed.all_reduce).

Layout, per rank (one region each, its address known to every rank through `ptr_table`):

    data   [2, capacity] elements   two halves, alternating call by call ("parity")
    flags  [NUM_PROGRAMS, W] int32  flags[pid, src] is written by rank src's program pid (a barrier count)

and, local to each rank, `counters` [2, NUM_PROGRAMS] int32 (calls, barriers passed) and an error word.

One program (pid) of rank r handles the chunks pid, pid + NUM_PROGRAMS, ... of the message on every rank, so a
barrier between the programs with the same pid (not the whole grid) is enough: program pid copies its chunks of the
input into rank r's data half, then signals (release, system scope) flags[pid, r] of every rank and waits (acquire)
until flags[pid, p] of its own region reached the same count for every p.

- one-shot: then sums its chunks over every rank's half (rank order 0..W-1, float32) into the output.
- two-shot: reduces only sub-slice r of each chunk, writes the sum back into its own half, passes a second barrier,
  then gathers sub-slice p of each chunk from rank p. Moves 2(W-1)/W of the message per rank instead of (W-1).

Why two halves: rank r may write call k+1's input while a peer still reads call k's (the peer passed k's barrier
but has not finished summing); call k+2 reuses k's half, and rank r gets there only after passing k+1's barrier, for
which every peer's program must have started k+1, that is finished its kernel for k (one stream, in order).
The grid is always NUM_PROGRAMS programs, so every program makes every call and the per-program counters stay equal.

A barrier that waits more than `max_spins` polls gives up: it sets the error word (host-visible memory on GPUs) and
returns; the caller raises instead of hanging on a dead rank. Every rank computes the same sum in the same order, so
the ranks' outputs are bitwise equal (the model's replicated activations must not drift apart).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NUM_PROGRAMS = 32  # grid size of every call (all co-resident on any GPU we run on)
BLOCK = 1024  # elements per program per loop step (8 bf16 per thread at 4 warps)
# Triton >= 3.6 has plain atomic loads / stores; older ones poll with an atomic add of 0 and signal with an exchange
_ATOMIC_LOAD_STORE: tl.constexpr = tl.constexpr(hasattr(tl, "atomic_load") and hasattr(tl, "atomic_store"))


@triton.jit
def _signal(ptr, value):
    if _ATOMIC_LOAD_STORE:
        tl.atomic_store(ptr, value, sem="release", scope="sys")
    else:
        tl.atomic_xchg(ptr, value, sem="release", scope="sys")


@triton.jit
def _poll(ptr):
    if _ATOMIC_LOAD_STORE:
        return tl.atomic_load(ptr, sem="acquire", scope="sys")
    else:
        return tl.atomic_add(ptr, 0, sem="acquire", scope="sys")


@triton.jit
def _barrier(flag_table_ptr, my_rank, pid, target, error_ptr, max_spins, W: tl.constexpr):
    """Signal flags[pid, my_rank] = target on every rank, then wait until own flags[pid, p] >= target for all p."""
    tl.debug_barrier()  # every thread of this program finished its stores before the signal
    for p in tl.static_range(W):
        peer_flags = tl.load(flag_table_ptr + p).to(tl.pointer_type(tl.int32))
        _signal(peer_flags + pid * W + my_rank, target)
    my_flags = tl.load(flag_table_ptr + my_rank).to(tl.pointer_type(tl.int32))
    for p in tl.static_range(W):
        spins = 0
        while (_poll(my_flags + pid * W + p) < target) & (spins < max_spins):
            spins += 1
        if spins >= max_spins:
            _signal(error_ptr, p + 1)  # p + 1: rank p never came (0: no error)
    tl.debug_barrier()  # no thread reads the peers' data before the wait is over


@triton.jit
def _rank_data(ptr_table, p, half, ELEM: tl.constexpr):
    """Rank p's data region, this call's half, as a pointer to ELEM."""
    return tl.load(ptr_table + p).to(tl.pointer_type(ELEM)) + half


@triton.jit
def _sum_over_ranks(ptr_table, half, offs, mask, ELEM: tl.constexpr, W: tl.constexpr):
    """The elements at `offs` of every rank's half, summed in rank order 0..W-1 in float32 (equal on every rank)."""
    acc = tl.zeros_like(offs).to(tl.float32)
    for p in tl.static_range(W):
        acc += tl.load(_rank_data(ptr_table, p, half, ELEM) + offs, mask=mask, other=0.0, volatile=True).to(tl.float32)
    return acc


@triton.jit
def _all_reduce_kernel(
    x_ptr,  # [n] input, this rank's partial sum
    out_ptr,  # [n] output (may be x_ptr)
    ptr_table,  # int64 [2 * W + 1]: data region of rank 0..W-1, flag region of rank 0..W-1, error word
    counters_ptr,  # int32 [2, NUM_PROGRAMS]: calls made, barriers passed (this rank, per program)
    n,
    capacity,  # elements in one half of a data region
    my_rank,
    max_spins,
    W: tl.constexpr,
    TWO_SHOT: tl.constexpr,
    NPROG: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    calls = tl.load(counters_ptr + pid)
    barriers = tl.load(counters_ptr + NPROG + pid)
    half = (calls % 2).to(tl.int64) * capacity  # element offset of this call's half
    elem = x_ptr.dtype.element_ty
    my_data = _rank_data(ptr_table, my_rank, half, elem)
    error_ptr = tl.load(ptr_table + 2 * W).to(tl.pointer_type(tl.int32))
    step = NPROG * BLOCK
    # 1. this rank's chunks of the input into its own half
    for start in range(pid * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(my_data + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)
    barriers += 1
    _barrier(ptr_table + W, my_rank, pid, barriers, error_ptr, max_spins, W)
    if TWO_SHOT:
        SUB: tl.constexpr = BLOCK // W
        # 2a. reduce sub-slice my_rank of each chunk over the ranks, in place in its own half
        for start in range(pid * BLOCK, n, step):
            offs = start + my_rank * SUB + tl.arange(0, SUB)
            mask = offs < n
            tl.store(my_data + offs, _sum_over_ranks(ptr_table, half, offs, mask, elem, W).to(elem), mask=mask)
        barriers += 1
        _barrier(ptr_table + W, my_rank, pid, barriers, error_ptr, max_spins, W)
        # 2b. gather sub-slice p of each chunk from rank p
        for start in range(pid * BLOCK, n, step):
            for p in tl.static_range(W):
                offs = start + p * SUB + tl.arange(0, SUB)
                mask = offs < n
                peer = _rank_data(ptr_table, p, half, elem)
                tl.store(out_ptr + offs, tl.load(peer + offs, mask=mask, volatile=True), mask=mask)
    else:
        # 2. sum this program's chunks over every rank's half
        for start in range(pid * BLOCK, n, step):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n
            tl.store(out_ptr + offs, _sum_over_ranks(ptr_table, half, offs, mask, elem, W).to(elem), mask=mask)
    tl.store(counters_ptr + pid, calls + 1)
    tl.store(counters_ptr + NPROG + pid, barriers)


def launch_all_reduce(x: torch.Tensor, out: torch.Tensor, ptr_table: torch.Tensor, counters: torch.Tensor,
                      capacity_elems: int, rank: int, world_size: int, two_shot: bool, max_spins: int) -> None:
    """Sum `x` over the ranks into `out` (same shape, contiguous, x.numel() <= capacity_elems). Every rank must make
    the same calls in the same order with the same sizes and `two_shot` choice."""
    n = x.numel()
    if n > capacity_elems:
        raise ValueError(f"all-reduce of {n} elements exceeds the shared buffer's {capacity_elems}")
    if two_shot and BLOCK % world_size:
        raise ValueError(f"two-shot all-reduce needs the world size ({world_size}) to divide {BLOCK}")
    _all_reduce_kernel[(NUM_PROGRAMS,)](
        x, out, ptr_table, counters, n, capacity_elems, rank, max_spins,
        W=world_size, TWO_SHOT=two_shot, NPROG=NUM_PROGRAMS, BLOCK=BLOCK, num_warps=4)


def reference_all_reduce(parts: list[torch.Tensor]) -> torch.Tensor:
    """What every rank's output must equal: the ranks' tensors summed in rank order in float32, in their dtype."""
    acc = torch.zeros(parts[0].shape, dtype=torch.float32, device=parts[0].device)
    for p in parts:
        acc += p.float()
    return acc.to(parts[0].dtype)
