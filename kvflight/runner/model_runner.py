"""ModelRunner owns the device: the model, the paged KV tensors, input preparation, forward and sampling."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from kvflight.config import ConfigError, EngineConfig
from kvflight.model.arch import ModelArch
from kvflight.model.attention import AttentionMetadata
from kvflight.model.loader import ResolvedModel, load_model, resolve_device, resolve_dtype
from kvflight.runner.sampler import Sampler, to_token_logprobs
from kvflight.types import SchedulerOutput, TokenLogprobs

logger = logging.getLogger("kvflight.runner")

CPU_DEFAULT_KV_CACHE_BYTES = 1 << 30


@dataclass
class MemoryPlan:
    """Where the device memory goes; logged at start (bytes)."""

    total_bytes: int
    weights_bytes: int
    activation_peak_bytes: int
    kv_cache_bytes: int
    kv_bytes_per_block: int
    num_blocks: int
    tokens_per_block: int

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_blocks * self.tokens_per_block

    def describe(self) -> str:
        gib = 1 << 30
        return (f"memory: total {self.total_bytes / gib:.2f} GiB | weights {self.weights_bytes / gib:.2f} GiB | "
                f"activations (profiled peak) {self.activation_peak_bytes / gib:.2f} GiB | KV cache "
                f"{self.kv_cache_bytes / gib:.2f} GiB = {self.num_blocks} blocks x {self.tokens_per_block} tokens "
                f"({self.kv_bytes_per_block / 1024:.1f} KiB/block) = {self.kv_capacity_tokens} tokens")


@dataclass
class RunnerOutput:
    """Sampled tokens of one step, in the order of the scheduled requests that sample."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None] | None


class ModelRunner:
    def __init__(self, config: EngineConfig, resolved: ResolvedModel, arch: ModelArch, max_seq_len: int) -> None:
        self.config = config
        self.arch = arch
        self.max_seq_len = max_seq_len
        self.device = resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        self.tokens_per_block = config.cache.tokens_per_block
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            self._free_before_load, self._total = torch.cuda.mem_get_info(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        mem0 = self._allocated()
        self.model = load_model(resolved, arch, self.dtype, self.device, config.model.seed)
        self.model.eval()
        self.weights_bytes = self._allocated() - mem0 if self.device.type == "cuda" else sum(
            p.numel() * p.element_size() for p in self.model.parameters())
        self.sampler = Sampler(self.device, seed=config.model.seed)
        self.kv_caches: list[torch.Tensor] = []
        self.plan: MemoryPlan | None = None

    # ---- memory -------------------------------------------------------------------------------------------

    def _allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0

    @property
    def kv_bytes_per_block(self) -> int:
        return self.tokens_per_block * self.arch.kv_bytes_per_token(self.dtype.itemsize)

    def plan_kv_cache(self) -> MemoryPlan:
        """Size the KV pool: GPU from profiled free memory, CPU from an explicit budget."""
        cache = self.config.cache
        per_block = self.kv_bytes_per_block
        if self.device.type == "cuda":
            activation_peak = self._profile_peak_activation_bytes()
            free_bytes, total = torch.cuda.mem_get_info(self.device)
            # memory our allocator keeps cached is free for the KV cache too
            free_bytes += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            usable = free_bytes - activation_peak
            if cache.gpu_memory_utilization is not None:
                used_by_others = total - free_bytes - self._allocated()
                usable = int(cache.gpu_memory_utilization * total) - used_by_others - self._allocated() \
                    - activation_peak
                budget = usable
            else:
                budget = int(cache.kv_cache_free_gpu_memory_fraction * usable)
            if cache.kv_cache_bytes is not None:
                budget = min(budget, cache.kv_cache_bytes)
        else:
            total = 0
            activation_peak = 0
            budget = cache.kv_cache_bytes if cache.kv_cache_bytes is not None else CPU_DEFAULT_KV_CACHE_BYTES
            if cache.kv_cache_bytes is None and cache.max_tokens_in_paged_kv_cache is not None:
                budget = math.ceil(cache.max_tokens_in_paged_kv_cache / self.tokens_per_block) * per_block
        num_blocks = max(0, budget // per_block)
        if cache.max_tokens_in_paged_kv_cache is not None:
            num_blocks = min(num_blocks, cache.max_tokens_in_paged_kv_cache // self.tokens_per_block)
        plan = MemoryPlan(total, self.weights_bytes, activation_peak, num_blocks * per_block, per_block,
                          num_blocks, self.tokens_per_block)
        need_blocks = math.ceil(self.max_seq_len / self.tokens_per_block)
        if num_blocks < need_blocks:
            raise ConfigError(
                f"the KV cache holds {num_blocks} blocks ({plan.kv_capacity_tokens} tokens) but one request of "
                f"max_seq_len={self.max_seq_len} needs {need_blocks} blocks ({per_block / 1024:.1f} KiB each): "
                f"lower max_seq_len, or give the KV cache more memory (kv_cache_free_gpu_memory_fraction, "
                f"kv_cache_bytes, max_tokens_in_paged_kv_cache), or lower max_num_tokens to shrink activations. "
                + plan.describe())
        return plan

    @torch.inference_mode()
    def _profile_peak_activation_bytes(self) -> int:
        """Run a forward of max_num_tokens tokens (plus logits of max_batch_size rows); return its peak bytes."""
        sched = self.config.scheduler
        num_tokens = min(sched.max_num_tokens, max(self.max_seq_len, 1) * sched.max_batch_size)
        num_seqs = max(1, min(sched.max_batch_size, num_tokens))
        lens = [num_tokens // num_seqs + (1 if i < num_tokens % num_seqs else 0) for i in range(num_seqs)]
        lens = [n for n in lens if n > 0]
        tables = [[0] * math.ceil(n / self.tokens_per_block) for n in lens]  # no KV cache: fresh prefills
        torch.cuda.synchronize(self.device)
        base = self._allocated()
        torch.cuda.reset_peak_memory_stats(self.device)
        meta, input_ids, positions, _ = self._build_inputs([0] * len(lens), lens, tables, [True] * len(lens),
                                                           token_ids=[[0] * n for n in lens])
        hidden = self.model(input_ids, positions, None, meta)
        logits = self.model.compute_logits(hidden[meta.query_start_loc[1:].long() - 1])
        probs_sorted = torch.sort(torch.softmax(logits, dim=-1), dim=-1)  # ~ the sampler's top-p peak
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del hidden, logits, meta, probs_sorted
        torch.cuda.empty_cache()
        return int(peak)

    def _alloc_kv(self, num_blocks: int) -> list[torch.Tensor]:
        a = self.arch
        # one extra scratch block at the end: padded slots write there, real blocks are never touched
        shape = (2, num_blocks + 1, self.tokens_per_block, a.num_kv_heads, a.head_dim)
        return [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(a.num_layers)]

    def allocate_kv_cache(self, plan: MemoryPlan) -> None:
        self.plan = plan
        self.kv_caches = self._alloc_kv(plan.num_blocks)
        logger.info(plan.describe())

    # ---- one step -----------------------------------------------------------------------------------------

    def _build_inputs(self, starts: list[int], num_new: list[int], tables: list[list[int]],
                      do_sample: list[bool], token_ids: list[list[int]]):
        """Flatten the batch. Returns metadata, input_ids [T], positions [T], logits_indices [num_samples]."""
        tpb = self.tokens_per_block
        num_seqs = len(starts)
        query_lens = np.asarray(num_new, dtype=np.int64)
        qsl = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(query_lens, out=qsl[1:])
        total = int(qsl[-1])
        seq_lens = np.asarray(starts, dtype=np.int64) + query_lens
        # positions: for each token, start of its sequence + its offset inside the chunk
        seq_of_token = np.repeat(np.arange(num_seqs), query_lens)
        positions = np.arange(total, dtype=np.int64) - qsl[:-1][seq_of_token] + np.asarray(starts)[seq_of_token]
        max_blocks = max(len(t) for t in tables)
        block_tables = np.zeros((num_seqs, max_blocks), dtype=np.int64)
        for i, t in enumerate(tables):
            block_tables[i, : len(t)] = t
        slot_mapping = block_tables[seq_of_token, positions // tpb] * tpb + positions % tpb
        flat_ids = np.fromiter((t for ids in token_ids for t in ids), dtype=np.int64, count=total)
        logits_idx = (qsl[1:] - 1)[np.asarray(do_sample, dtype=bool)]
        dev = self.device

        def put(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            return torch.from_numpy(x).to(dtype).to(dev, non_blocking=True)

        meta = AttentionMetadata(
            slot_mapping=put(slot_mapping, torch.int64),
            query_start_loc=put(qsl, torch.int32),
            seq_lens=put(seq_lens, torch.int32),
            block_tables=put(block_tables, torch.int32),
            max_query_len=int(query_lens.max()),
            max_seq_len=int(seq_lens.max()),
            query_lens_cpu=query_lens.tolist(),
            seq_lens_cpu=seq_lens.tolist(),
        )
        return meta, put(flat_ids, torch.int64), put(positions, torch.int64), put(logits_idx, torch.int64)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        sched = out.scheduled
        meta, input_ids, positions, logits_idx = self._build_inputs(
            [s.start_pos for s in sched], [s.num_new_tokens for s in sched], [s.block_ids for s in sched],
            [s.do_sample for s in sched], [s.token_ids for s in sched])
        hidden = self.model(input_ids, positions, self.kv_caches, meta)  # [T, hidden]
        rows = [s.request for s in sched if s.do_sample]
        if not rows:
            return RunnerOutput([], None)
        logits = self.model.compute_logits(hidden[logits_idx])  # [num_samples, vocab] float32
        sampled = self.sampler(logits, rows)
        token_ids = sampled.token_ids.tolist()  # the step's one host sync
        want_logprobs = any(r.sampling_params.logprobs is not None for r in rows)
        return RunnerOutput(token_ids, to_token_logprobs(sampled, rows) if want_logprobs else None)
