"""InputBuffers owns one step's flat model inputs: persistent pinned host staging, device mirrors, one copy per step.

Every step's inputs (token ids, positions, KV slots, query start offsets, context lengths, logits rows) live in
ONE int32 host buffer at fixed offsets and travel to the device in one non-blocking copy; the block tables
([max_num_seqs, max_blocks_per_seq] int32) travel in a second copy of only the rows and columns the step uses.
The device tensors never move, so CUDA graphs captured over views of them replay with new contents.

Two host staging sets are used in turn, so step N+1 can be prepared while step N's copy still waits in the stream
(asynchronous scheduling); the caller must not prepare step N+2 before step N's copy ran (the runner reads step N's
sampled tokens, which come after that copy on the stream, before preparing step N+2).

Asynchronous scheduling also leaves some input tokens on the device: a decode row whose token is the previous step's
sample gets it by one scatter from that step's sampled-token tensor (`pending`), after the copy, before the forward.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class StepInputs:
    """Device views of one step's inputs (padded to num_tokens / num_seqs when a CUDA graph replays)."""

    input_ids: torch.Tensor  # [num_tokens] int32
    positions: torch.Tensor  # [num_tokens] int32
    slot_mapping: torch.Tensor  # [num_tokens] int32, -1 = padding (not written)
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32 (only the columns a sequence needs are valid)
    logits_indices: torch.Tensor  # [num_samples] int32: rows of the hidden states to sample from
    query_lens: np.ndarray  # [num_real_seqs] host copy
    seq_lens_host: np.ndarray  # [num_real_seqs] host copy


class InputBuffers:
    def __init__(self, max_num_tokens: int, max_num_seqs: int, max_blocks_per_seq: int, tokens_per_block: int,
                 device: torch.device) -> None:
        self.max_num_tokens = max_num_tokens
        self.max_num_seqs = max_num_seqs
        self.max_blocks_per_seq = max_blocks_per_seq
        self.tokens_per_block = tokens_per_block
        self.device = device
        pin = device.type == "cuda"
        t, s = max_num_tokens, max_num_seqs
        # offsets of the regions in the flat buffer
        self._ids, self._pos, self._slots = 0, t, 2 * t
        self._qsl = 3 * t
        self._seq_lens = self._qsl + s + 1
        self._pend_dst = self._seq_lens + s  # token indices whose id is a previous step's sample on the device
        self._pend_src = self._pend_dst + s  # ... and the row of that step's sampled tokens holding it
        self._logits = self._pend_src + s
        size = self._logits + s
        self._hosts = [torch.zeros(size, dtype=torch.int32, pin_memory=pin) for _ in range(2)]  # [size] each
        self._host_tables = [torch.zeros((s, max_blocks_per_seq), dtype=torch.int32, pin_memory=pin)
                             for _ in range(2)]  # [max_num_seqs, max_blocks_per_seq] each
        self._turn = 0
        self.dev = torch.zeros(size, dtype=torch.int32, device=device)  # [size]
        self.dev_block_tables = torch.zeros((s, max_blocks_per_seq), dtype=torch.int32, device=device)
        self._arange = np.arange(max(t, s) + 1, dtype=np.int64)

    @property
    def nbytes(self) -> int:
        return (self.dev.numel() + self.dev_block_tables.numel()) * 4

    def views(self, num_tokens: int, num_seqs: int, num_samples: int) -> tuple[torch.Tensor, ...]:
        """Device views (ids, positions, slots, query_start_loc, seq_lens, block_tables, logits_indices)."""
        d = self.dev
        return (d[self._ids:self._ids + num_tokens], d[self._pos:self._pos + num_tokens],
                d[self._slots:self._slots + num_tokens], d[self._qsl:self._qsl + num_seqs + 1],
                d[self._seq_lens:self._seq_lens + num_seqs], self.dev_block_tables[:num_seqs],
                d[self._logits:self._logits + num_samples])

    def prepare(self, starts: list[int], num_new: list[int], tables: list[list[int]], do_sample: list[bool],
                token_ids: list[list[int]], pad_num_seqs: int | None = None,
                pending: tuple[list[int], list[int], torch.Tensor] | None = None,
                pad_num_tokens: int | None = None) -> StepInputs:
        """Fill the host staging for one step, copy it to the device, return device views.

        starts[i]: tokens of sequence i already in the cache; num_new[i]: its new tokens token_ids[i];
        tables[i]: its whole block table. pad_num_seqs: pad to this many one-token sequences (a CUDA graph
        batch); padding rows have query_len 0 and seq_len 0 and their tokens' slots are -1. pad_num_tokens: pad the
        tokens to this many instead (a mixed-step graph: padding tokens belong to no sequence).
        pending = (token_indices, source_rows, sampled): input token token_indices[j] (a placeholder in token_ids)
        is sampled[source_rows[j]], a device tensor of the previous step's sampled ids ([rows] int64).
        """
        num_seqs = len(starts)
        self._turn ^= 1
        host = self._hosts[self._turn]
        host_tables = self._host_tables[self._turn]
        if num_seqs > self.max_num_seqs:
            raise ValueError(f"{num_seqs} sequences exceed the input buffers' max_num_seqs={self.max_num_seqs}")
        tpb = self.tokens_per_block
        query_lens = np.asarray(num_new, dtype=np.int64)  # [S]
        qsl = np.zeros(num_seqs + 1, dtype=np.int64)  # [S + 1]
        np.cumsum(query_lens, out=qsl[1:])
        total = int(qsl[-1])
        padded_tokens = total if pad_num_seqs is None else pad_num_seqs
        if pad_num_tokens is not None:
            padded_tokens = pad_num_tokens
        padded_seqs = num_seqs if pad_num_seqs is None else pad_num_seqs
        if padded_tokens < total or padded_seqs < num_seqs:
            raise ValueError(f"padding to {padded_tokens} tokens / {padded_seqs} sequences: the step has {total} / "
                             f"{num_seqs}")
        if padded_tokens > self.max_num_tokens:
            raise ValueError(f"{padded_tokens} tokens exceed the input buffers' max_num_tokens={self.max_num_tokens}")
        seq_lens = np.asarray(starts, dtype=np.int64) + query_lens  # [S]
        table_lens = np.fromiter(map(len, tables), dtype=np.int64, count=num_seqs)  # [S]
        width = max(int(table_lens.max()) if num_seqs else 1, 1)
        if width > self.max_blocks_per_seq:
            raise ValueError(f"a block table of {width} blocks exceeds max_blocks_per_seq={self.max_blocks_per_seq}")
        bt = host_tables.numpy()
        # all rows at once: flat ids scattered to (row, column)
        flat_blocks = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int32, count=int(table_lens.sum()))
        table_rows = np.repeat(self._arange[:num_seqs], table_lens)
        table_cols = np.arange(len(flat_blocks)) - np.repeat(np.cumsum(table_lens) - table_lens, table_lens)
        bt[table_rows, table_cols] = flat_blocks
        h = host.numpy()
        if total == num_seqs:  # decode-only: one token per sequence
            positions = seq_lens - 1
            slots = bt[self._arange[:num_seqs], positions // tpb].astype(np.int64) * tpb + positions % tpb
            h[self._ids:self._ids + total] = [ids[0] for ids in token_ids]
        else:
            seq_of_token = np.repeat(self._arange[:num_seqs], query_lens)  # [T]
            positions = self._arange[:total] - qsl[:-1][seq_of_token] + np.asarray(starts, dtype=np.int64)[seq_of_token]
            slots = bt[seq_of_token, positions // tpb].astype(np.int64) * tpb + positions % tpb
            h[self._ids:self._ids + total] = np.fromiter((t for ids in token_ids for t in ids), dtype=np.int64,
                                                          count=total)
        h[self._pos:self._pos + total] = positions
        h[self._slots:self._slots + total] = slots
        h[self._qsl:self._qsl + num_seqs + 1] = qsl
        h[self._seq_lens:self._seq_lens + num_seqs] = seq_lens
        if padded_tokens > total:  # graph padding: tokens that belong to no sequence
            h[self._ids + total:self._ids + padded_tokens] = 0
            h[self._pos + total:self._pos + padded_tokens] = 0
            h[self._slots + total:self._slots + padded_tokens] = -1
        if padded_seqs > num_seqs:  # padding sequences: query_len 0, seq_len 0
            h[self._qsl + num_seqs + 1:self._qsl + padded_seqs + 1] = total
            h[self._seq_lens + num_seqs:self._seq_lens + padded_seqs] = 0
        logits_rows = (qsl[1:] - 1)[np.asarray(do_sample, dtype=bool)]
        num_samples = len(logits_rows)
        h[self._logits:self._logits + num_samples] = logits_rows
        num_pending = 0
        if pending is not None and pending[0]:
            num_pending = len(pending[0])
            h[self._pend_dst:self._pend_dst + num_pending] = pending[0]
            h[self._pend_src:self._pend_src + num_pending] = pending[1]
        # one copy of the flat region (up to the last byte this step uses), one of the block-table rows used
        end = self._logits + num_samples
        self.dev[:end].copy_(host[:end], non_blocking=True)
        self.dev_block_tables[:num_seqs, :width].copy_(host_tables[:num_seqs, :width], non_blocking=True)
        ids, pos, slot, qsl_d, lens_d, bt_d, logits_d = self.views(padded_tokens, padded_seqs, num_samples)
        if num_pending:
            assert pending is not None
            d = self.dev
            dst = d[self._pend_dst:self._pend_dst + num_pending]  # [P] int32
            src = d[self._pend_src:self._pend_src + num_pending]  # [P] int32
            ids[dst] = pending[2][src].to(torch.int32)
        return StepInputs(ids, pos, slot, qsl_d, lens_d, bt_d, logits_d, query_lens, seq_lens)
