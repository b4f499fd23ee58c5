"""DecodeGraphs owns the CUDA graphs of decode batches: capture per padded batch size, replay, memory used.

A decode batch (every sequence computes one token) of n sequences replays the graph of the smallest captured size
>= n; the extra rows are padding (query_len 0, seq_len 0, slot -1: they read and write no KV). The graph covers
the whole forward and the logits of every row; sampling runs after it, on the same stream.

Small batches whose attention may split long contexts (multi_block_mode) get two graphs per size: one without
split-K (short contexts: no merge pass, no idle split programs) and one with it; the step's longest context
picks which one replays.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Callable

import torch

logger = logging.getLogger("kvflight.runner")


_CAPTURE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _capture_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every capture in the process (a new stream per engine kept its own
    cuBLAS workspace alive: ~28 MiB left behind by each engine built and dropped in one process)."""
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
    return _CAPTURE_STREAMS[device]


def smallest_at_least(sizes: list[int], n: int) -> int | None:
    """The smallest of the sorted captured sizes that is >= n (the graph a step of n pads up to), or None."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


def capture_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, then multiples of 8 up to max_batch_size (which is always included)."""
    sizes = [s for s in (1, 2, 4) if s <= max_batch_size]
    sizes += list(range(8, max_batch_size + 1, 8))
    if max_batch_size not in sizes:
        sizes.append(max_batch_size)
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(self, sizes: list[int], device: torch.device,
                 split_options: Callable[[int], list[int]] = lambda size: [1]) -> None:
        """split_options(size): the num_splits values to capture a graph for at this batch size."""
        self.sizes = sorted(sizes)
        self.device = device
        self.split_options = split_options
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._logits: torch.Tensor | None = None  # [max_size, vocab] float32: every graph writes its rows here
        self.pool_bytes = 0
        self.capture_seconds = 0.0
        self.pool = None  # the memory pool the graphs were captured in (mixed-step graphs share it)

    @property
    def max_size(self) -> int:
        return self.sizes[-1] if self.sizes else 0

    def padded_size(self, num_seqs: int) -> int | None:
        """The captured size a batch of num_seqs decode sequences replays, or None when it is too large."""
        return smallest_at_least(self.sizes, num_seqs)

    def capture(self, prepare: Callable[[int], None], run_forward: Callable[[int, int], torch.Tensor]) -> None:
        """prepare(size) fills the persistent inputs with `size` valid decode rows (outside the graph: the copies
        belong to each step, not to the graph); run_forward(size, num_splits) runs the model on those inputs and
        returns logits [size, vocab] in any float dtype (the graph casts them into its float32 output buffer); it is
        called once eagerly (warm-up: compiles kernels) and once under capture."""
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        logits_buffer: list[torch.Tensor] = []
        pool = self.pool = torch.cuda.graph_pool_handle()
        stream = _capture_stream(self.device)
        # largest first: later (smaller) graphs reuse the pool's blocks
        for size in sorted(self.sizes, reverse=True):
            for splits in self.split_options(size):
                prepare(size)
                logits = run_forward(size, splits)  # warm-up outside capture
                if not logits_buffer:  # one output buffer for all graphs (outputs kept per graph would add up)
                    logits_buffer.append(torch.empty((self.max_size, logits.shape[1]), dtype=torch.float32,
                                                     device=self.device))
                del logits
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    logits_buffer[0][:size].copy_(run_forward(size, splits))
                self._graphs[(size, splits)] = graph
        self._logits = logits_buffer[0] if logits_buffer else None
        torch.cuda.synchronize(self.device)
        self.pool_bytes = max(0, free_before - torch.cuda.mem_get_info(self.device)[0])
        self.capture_seconds = time.perf_counter() - start
        logger.info("captured %d decode CUDA graphs (batch sizes %d..%d) in %.1f s, %.2f GiB", len(self._graphs),
                    self.sizes[0] if self.sizes else 0, self.max_size, self.capture_seconds, self.pool_bytes / 2**30)

    def replay(self, size: int, want_split: bool = False) -> torch.Tensor:
        """Replay the graph of `size` rows (the split-K one when want_split and one was captured); returns its
        logits buffer [size, vocab] (valid until the next replay)."""
        options = self.split_options(size)
        splits = max(options) if want_split else min(options)
        self._graphs[(size, splits)].replay()
        assert self._logits is not None
        return self._logits[:size]


def mixed_token_buckets(max_tokens: int) -> list[int]:
    """Padded token counts of the mixed-step graphs: 16, 32, multiples of 64 up to 2048, then multiples of 256 up
    to max_tokens (always included). A step pads to the next one: at most 63 wasted tokens up to 2048 (1044 -> 1088,
    where multiples of 128 gave 1152: ~6% of a 1024-token prefill's matmuls)."""
    sizes = [s for s in (16, 32) if s < max_tokens]
    sizes += list(range(64, min(max_tokens, 2048) + 1, 64))
    sizes += list(range(2048 + 256, max_tokens + 1, 256))
    if max_tokens > 0 and max_tokens not in sizes:
        sizes.append(max_tokens)
    return sorted(set(sizes))


class MixedGraphs:
    """CUDA graphs of steps that carry prompt tokens (prefills, chunks, mixed with decodes): one per padded token
    count, every graph over max_num_seqs sequences (padding ones have query_len 0), so a step costs one replay
    instead of a few hundred kernel launches from Python. The graph ends at the final norm's hidden states
    [padded_tokens, hidden]; the rows to sample are picked and projected to logits after it (their number varies)."""

    def __init__(self, buckets: list[int], device: torch.device) -> None:
        self.buckets = sorted(buckets)
        self.device = device
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._hidden: torch.Tensor | None = None  # [max bucket, hidden]: every graph writes its rows here
        self.pool_bytes = 0
        self.capture_seconds = 0.0

    def padded_tokens(self, num_tokens: int) -> int | None:
        """The bucket a step of num_tokens tokens pads up to, or None when it is too large."""
        return smallest_at_least(self.buckets, num_tokens)

    def capture(self, prepare: Callable[[int], None], run_forward: Callable[[int], torch.Tensor],
                pool=None) -> None:
        """prepare(tokens) fills the persistent inputs for a step of that many padded tokens; run_forward(tokens)
        returns the hidden states [tokens, hidden] (called once eagerly, once under capture)."""
        start = time.perf_counter()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        pool = torch.cuda.graph_pool_handle() if pool is None else pool
        stream = _capture_stream(self.device)
        for size in sorted(self.buckets, reverse=True):  # largest first: the smaller ones reuse its blocks
            prepare(size)
            hidden = run_forward(size)
            if self._hidden is None:
                self._hidden = torch.empty((self.buckets[-1], hidden.shape[1]), dtype=hidden.dtype,
                                           device=self.device)
            del hidden
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self._hidden[:size].copy_(run_forward(size))
            self._graphs[size] = graph
        torch.cuda.synchronize(self.device)
        self.pool_bytes = max(0, free_before - torch.cuda.mem_get_info(self.device)[0])
        self.capture_seconds = time.perf_counter() - start
        logger.info("captured %d mixed-step CUDA graphs (%d..%d tokens) in %.1f s, %.2f GiB", len(self._graphs),
                    self.buckets[0], self.buckets[-1], self.capture_seconds, self.pool_bytes / 2**30)

    def replay(self, size: int) -> torch.Tensor:
        """Replay the graph of `size` padded tokens; its hidden states [size, hidden] (valid until the next one)."""
        self._graphs[size].replay()
        assert self._hidden is not None
        return self._hidden[:size]
