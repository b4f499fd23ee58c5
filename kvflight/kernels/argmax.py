"""Triton row argmax for the sampler (greedy rows, and the exponential-race draw): a drop-in for x.argmax(dim=-1).

torch's reduction gives one 128k-wide row to one block (28 us for a batch-1 decode step's logits on an H100, as
long as a whole decoder layer's norms); here each row is cut into CHUNK-wide pieces, one program each, and the
program that finishes a row's last piece (an arrival counter, as in w8a16_matmul.split_k_store) picks the winner
among the pieces' maxima: one launch. Ties go to the lowest index, like torch. A NaN counts as +inf (torch ranks NaN
above +inf: the two differ only on a row holding both).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 4096  # columns per program
_COUNTERS: dict[str, torch.Tensor] = {}  # device -> [rows] int32 pieces done per row, zero at rest


@triton.jit
def _argmax_kernel(
    x_ptr,  # [rows, V] float
    out_ptr,  # [rows] int64
    piece_max_ptr,  # [rows, NUM_PIECES] float32 scratch
    piece_idx_ptr,  # [rows, NUM_PIECES] int32 scratch
    counter_ptr,  # [>= rows] int32, zero between calls
    V,
    stride_row,
    NUM_PIECES: tl.constexpr,
    PIECES_PAD: tl.constexpr,  # next power of two >= NUM_PIECES
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    piece = tl.program_id(1)
    cols = piece * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    x = tl.load(x_ptr + row * stride_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)  # NaN counts as +inf
    best = tl.max(x, axis=0)
    lane = tl.arange(0, BLOCK)
    where = tl.min(tl.where(x == best, lane, BLOCK), axis=0)  # the first lane holding the maximum
    tl.store(piece_max_ptr + row * NUM_PIECES + piece, best)
    tl.store(piece_idx_ptr + row * NUM_PIECES + piece, piece * BLOCK + where)
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr + row, 1, sem="acq_rel", scope="gpu")
    if arrived == NUM_PIECES - 1:  # the row's last piece: every piece's maximum is stored
        tl.debug_barrier()
        p = tl.arange(0, PIECES_PAD)
        ok = p < NUM_PIECES
        maxima = tl.load(piece_max_ptr + row * NUM_PIECES + p, mask=ok, other=float("-inf"), volatile=True)
        indices = tl.load(piece_idx_ptr + row * NUM_PIECES + p, mask=ok, other=0, volatile=True)
        winner = tl.min(tl.where(maxima == tl.max(maxima, axis=0), p, PIECES_PAD), axis=0)  # the first piece
        tl.store(out_ptr + row, tl.sum(tl.where(p == winner, indices, 0), axis=0).to(tl.int64))
        tl.atomic_xchg(counter_ptr + row, 0, sem="relaxed", scope="gpu")


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x [rows, V] float (V >= 1) -> [rows] int64, the first index of each row's maximum (x.argmax(dim=-1))."""
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"argmax_rows: x {tuple(x.shape)}: expected [rows, V] with V >= 1")
    if not x.is_floating_point():
        raise ValueError(f"argmax_rows: x dtype {x.dtype}: expected a float dtype")
    if x.stride(1) != 1:
        x = x.contiguous()
    rows, vocab = x.shape
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows == 0:
        return out
    block = min(CHUNK, triton.next_power_of_2(vocab))
    pieces = triton.cdiv(vocab, block)
    counters = _COUNTERS.get(str(x.device))
    if counters is None or counters.numel() < rows:
        counters = _COUNTERS[str(x.device)] = torch.zeros(max(rows, 1024), dtype=torch.int32, device=x.device)
    piece_max = torch.empty((rows, pieces), dtype=torch.float32, device=x.device)
    piece_idx = torch.empty((rows, pieces), dtype=torch.int32, device=x.device)
    _argmax_kernel[(rows, pieces)](x, out, piece_max, piece_idx, counters, vocab, x.stride(0),
                                   NUM_PIECES=pieces, PIECES_PAD=triton.next_power_of_2(pieces), BLOCK=block,
                                   num_warps=8 if block >= 4096 else 4)
    return out
