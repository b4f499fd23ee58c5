"""ModelRunner owns the device: the model, the paged KV tensors, input preparation, forward and sampling."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import torch

from kvflight.config import ConfigError, EngineConfig
from kvflight.kernels.device import num_sms
from kvflight.model.arch import ModelArch
from kvflight.model.attention import AttentionMetadata
from kvflight.model.loader import ResolvedModel, load_model, resolve_device, resolve_dtype
from kvflight.runner.cuda_graphs import DecodeGraphs, MixedGraphs, capture_sizes, mixed_token_buckets
from kvflight.runner.input_buffers import InputBuffers, StepInputs
from kvflight.runner.kv_offload import KVOffloader
from kvflight.runner.sampler import Sampler, logprobs_table, token_logprobs_from_table
from kvflight.tune.planner import (GRAPHS_DO_NOT_FIT, KV_TOO_SMALL, NO_MEMORY_LEFT, MeasuredMemory,
                                   plan_memory)
from kvflight.types import SchedulerOutput, TokenLogprobs

logger = logging.getLogger("kvflight.runner")



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
    kv_cache_dtype: str = ""  # the cache's element type (e.g. bfloat16, int8, float8_e4m3fn)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_blocks * self.tokens_per_block

    def describe(self) -> str:
        gib = 1 << 30
        return (f"memory: total {self.total_bytes / gib:.2f} GiB | weights {self.weights_bytes / gib:.2f} GiB | "
                f"activations (profiled peak) {self.activation_peak_bytes / gib:.2f} GiB | KV cache "
                f"{self.kv_cache_bytes / gib:.2f} GiB = {self.num_blocks} blocks x {self.tokens_per_block} tokens "
                f"({self.kv_bytes_per_block / 1024:.1f} KiB/block) = {self.kv_capacity_tokens} tokens"
                + (f" | KV dtype {self.kv_cache_dtype}" if self.kv_cache_dtype else ""))


@dataclass
class RunnerOutput:
    """Sampled tokens of one step, in the order of the scheduled requests that sample."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None] | None


@dataclass
class LaunchedStep:
    """A step whose forward and sampling are queued on the device; resolve() waits for its tokens.

    rows: the requests that sample, in order (row i of the sampled tensors). The host copies land in pinned
    memory; `ready` is recorded after them, `started` before the step's first copy (both timing events; None on
    the CPU, where everything already ran). shape: what the step's device time depends on most (decode graph
    size, mixed-step graph tokens, or an eager step's tokens rounded up to 64), for the launch timer.
    """

    rows: list
    token_ids_host: torch.Tensor | None = None  # [rows] int64 (pinned on CUDA)
    logprobs_host: torch.Tensor | None = None  # [rows, 3 + 2 * k_max] float64, see logprobs_table
    ready: torch.cuda.Event | None = None
    started: torch.cuda.Event | None = None
    shape: tuple = ()

    def gpu_seconds(self) -> float | None:
        """The step's device time (first copy to last), once it has completed; None before, or on the CPU."""
        if self.started is None or self.ready is None or not self.ready.query():
            return None
        return self.started.elapsed_time(self.ready) / 1e3


class ModelRunner:
    def __init__(self, config: EngineConfig, resolved: ResolvedModel, arch: ModelArch, max_seq_len: int) -> None:
        self.config = config
        self.arch = arch
        self.max_seq_len = max_seq_len
        self.device = resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        self.tokens_per_block = config.cache.tokens_per_block
        from kvflight.model.layers import get_tp_size
        # this rank's KV heads (all of them at tp 1; replicated, one per rank, when fewer than the ranks)
        tp = get_tp_size()
        self.num_kv_heads = arch.num_kv_heads if tp == 1 else max(1, arch.num_kv_heads // tp)
        self._last_sampled: torch.Tensor | None = None  # [rows] int64: the last launch's sampled ids (device)
        self._token_host: list[torch.Tensor | None] = [None, None]  # pinned landing buffers, used in turn
        self._turn = 0
        self.skip_sampling = False  # tensor-parallel workers (ranks > 0): forward and logits only, rank 0 samples
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            self._free_before_load, self._total = torch.cuda.mem_get_info(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        mem0 = self._allocated()
        self.model_name = resolved.name or "the model"
        self.model = load_model(resolved, arch, self.dtype, self.device, config.model.seed,
                                quantization=config.model.quantization,
                                quantize_lm_head=config.model.quantize_lm_head)
        self.model.eval()
        self.kernel_backend = resolve_kernel_backend(config.runtime.kernel_backend, self.device)
        self.model.set_kernel_backend(self.kernel_backend)
        self.weights_bytes = self._allocated() - mem0 if self.device.type == "cuda" else sum(
            p.numel() * p.element_size() for p in self.model.parameters())
        self.sampler = Sampler(self.device, seed=config.model.seed)
        self._init_kv_cache_dtype(resolved)
        self.kv_caches: list[torch.Tensor] = []
        self.kv_offloader: KVOffloader | None = None
        self.plan: MemoryPlan | None = None
        sched = config.scheduler
        graph_max = 0
        if self.device.type == "cuda" and self.kernel_backend == "triton" and not config.runtime.enforce_eager:
            graph_max = min(sched.max_batch_size, config.runtime.cuda_graph_max_batch_size or 512)
        self.graphs: DecodeGraphs | None = None
        if graph_max:
            self.graphs = DecodeGraphs(capture_sizes(graph_max), self.device, self._graph_split_options)
        # steps carrying prompt tokens replay a graph per padded token count up to cuda_graph_max_num_tokens (the
        # default shrinks to what the KV cache leaves: set by plan_kv_cache)
        self.mixed_graphs: MixedGraphs | None = None
        self.buffers = InputBuffers(max(sched.max_num_tokens, graph_max), sched.max_batch_size,
                                    math.ceil(max_seq_len / self.tokens_per_block), self.tokens_per_block,
                                    self.device)
        self._num_sms = num_sms(self.device) if self.device.type == "cuda" else 1

    # ---- memory -------------------------------------------------------------------------------------------

    def _allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0

    @property
    def kv_bytes_per_block(self) -> int:
        if self.num_kv_heads != self.arch.num_kv_heads:  # tensor parallel: this rank's heads
            return self.tokens_per_block * 2 * self.arch.num_layers * self.num_kv_heads * self.arch.head_dim * \
                self.kv_dtype.itemsize
        return self.tokens_per_block * self.arch.kv_bytes_per_token(self.kv_dtype.itemsize)

    def _init_kv_cache_dtype(self, resolved: ResolvedModel) -> None:
        """kv_cache_dtype: auto = the compute dtype (or the kv_cache_dtype a `kvflight quantize --kv-cache-dtype`
        checkpoint records); int8 / fp8: 1-byte cache tensors and per-layer, per-KV-head K / V scales on each
        Attention (the checkpoint's calibrated ones, else a short calibration prefill now)."""
        name = self.config.cache.kv_cache_dtype
        self.kv_cache_dtype = name
        self.kv_dtype = self.dtype
        if name == "auto":
            from kvflight.quant.kv_cache import checkpoint_kv_cache_dtype
            recorded = checkpoint_kv_cache_dtype(resolved.path) if resolved.path else None
            if recorded is None:
                return
            logger.info("kv_cache_dtype auto: the checkpoint records kv_cache_dtype=%s", recorded)
            import dataclasses
            name = self.kv_cache_dtype = recorded
            self.config = dataclasses.replace(self.config, cache=dataclasses.replace(self.config.cache,
                                                                                     kv_cache_dtype=recorded))
        from kvflight.model.loader import load_tokenizer
        from kvflight.quant.kv_cache import kv_cache_torch_dtype, resolve_kv_scales, set_kv_scales
        self.kv_dtype = kv_cache_torch_dtype(name, self.dtype)
        scales, source = resolve_kv_scales(
            self.model, name, resolved.path, lambda: load_tokenizer(resolved, self.config.model.tokenizer),
            self.arch.vocab_size, self.config.model.seed)
        set_kv_scales(self.model, scales)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        logger.info("KV cache %s (%s): per-layer K / V scales per KV head from %s; K scale range %.3g..%.3g, "
                    "V %.3g..%.3g", name, str(self.kv_dtype).replace("torch.", ""), source,
                    float(scales[:, 0].min()), float(scales[:, 0].max()), float(scales[:, 1].min()),
                    float(scales[:, 1].max()))

    def plan_kv_cache(self) -> MemoryPlan:
        """Size the KV pool with the planner's arithmetic (the same as `kvflight plan`), fed with what was measured
        here: on the GPU the weights and other allocations, the profiled activation peak and memory outside torch;
        on the CPU an explicit budget. Refuses, with the planner's message, a config where one max_seq_len request
        cannot fit."""
        per_block = self.kv_bytes_per_block
        if self.device.type == "cuda":
            activation_peak = self._profile_peak_activation_bytes()
            free_bytes, total = torch.cuda.mem_get_info(self.device)
            allocated = torch.cuda.memory_allocated(self.device)
            reserved = torch.cuda.memory_reserved(self.device)
            measured = MeasuredMemory(weights_bytes=allocated, activation_bytes=activation_peak,
                                      non_torch_bytes=total - free_bytes - reserved)
            report = plan_memory(self.arch, self.config, total, max_seq_len=self.max_seq_len, measured=measured,
                                 model_name=self.model_name, gpu_name=torch.cuda.get_device_name(self.device))
        else:
            total, activation_peak = 0, 0
            report = plan_memory(self.arch, self.config, None, max_seq_len=self.max_seq_len,
                                 model_name=self.model_name)
        if report.verdict in (KV_TOO_SMALL, NO_MEMORY_LEFT):
            raise ConfigError(report.refusal_message())
        if report.verdict == GRAPHS_DO_NOT_FIT:  # an estimate: warn
            logger.warning(report.refusal_message())
        if self.graphs is not None and report.cuda_graph_max_num_tokens > 0:
            self.mixed_graphs = MixedGraphs(mixed_token_buckets(report.cuda_graph_max_num_tokens), self.device)
        elif self.graphs is not None and self.config.runtime.cuda_graph_max_num_tokens is None:
            logger.info("no mixed-step CUDA graphs: what the KV cache leaves holds only the decode graphs")
        num_blocks = report.num_blocks * report.kv_bytes_per_block // per_block
        return MemoryPlan(total, self.weights_bytes, activation_peak, num_blocks * per_block, per_block,
                          num_blocks, self.tokens_per_block, str(self.kv_dtype).replace("torch.", ""))

    @torch.inference_mode()
    def _profile_peak_activation_bytes(self) -> int:
        """Run a forward of max_num_tokens tokens (plus logits of max_batch_size rows); return its peak bytes."""
        sched = self.config.scheduler
        num_tokens = min(sched.max_num_tokens, max(self.max_seq_len, 1) * sched.max_batch_size)
        num_seqs = max(1, min(sched.max_batch_size, num_tokens))
        lens = [num_tokens // num_seqs + (1 if i < num_tokens % num_seqs else 0) for i in range(num_seqs)]
        lens = [n for n in lens if n > 0]
        tables = [[0] * math.ceil(n / self.tokens_per_block) for n in lens]  # all write block 0: scratch
        # the Triton backend reads K/V from the cache, so the profile gets a scratch cache (not counted)
        scratch = self._alloc_kv(max(len(t) for t in tables), num_tensors=1) if self.kernel_backend == "triton" \
            else None
        torch.cuda.synchronize(self.device)
        base = self._allocated()
        torch.cuda.reset_peak_memory_stats(self.device)
        inputs = self.buffers.prepare([0] * len(lens), lens, tables, [True] * len(lens), [[0] * n for n in lens])
        meta = self._metadata(inputs, max_query_len=max(lens), num_splits=1)
        caches = None if scratch is None else scratch * self.arch.num_layers
        hidden = self.model(inputs.input_ids, inputs.positions, caches, meta)
        logits = self.model.compute_logits(hidden.index_select(0, inputs.logits_indices))
        probs_sorted = torch.sort(torch.softmax(logits, dim=-1), dim=-1)  # ~ the sampler's top-p peak
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del hidden, logits, meta, probs_sorted, scratch, caches
        torch.cuda.empty_cache()
        return int(peak)

    def _alloc_kv(self, num_blocks: int, num_tensors: int | None = None) -> list[torch.Tensor]:
        a = self.arch
        # one extra scratch block at the end: padded slots write there, real blocks are never touched
        shape = (2, num_blocks + 1, self.tokens_per_block, self.num_kv_heads, a.head_dim)
        count = a.num_layers if num_tensors is None else num_tensors
        return [torch.empty(shape, dtype=self.kv_dtype, device=self.device) for _ in range(count)]

    def allocate_kv_cache(self, plan: MemoryPlan, num_host_blocks: int = 0) -> None:
        """The device KV pool, the host tier (num_host_blocks pinned blocks; 0 = none), then kernel warm-up and
        CUDA graphs (both need the pool)."""
        self.plan = plan
        self.kv_caches = self._alloc_kv(plan.num_blocks)
        self.kv_offloader = KVOffloader(self.kv_caches, num_host_blocks)
        logger.info(plan.describe())
        if self.device.type == "cuda" and self.kernel_backend == "triton":
            self._warm_up_kernels()
        if self.graphs is not None:
            self._capture_graphs()
        if self.mixed_graphs is not None:
            self._capture_mixed_graphs()

    @torch.inference_mode()
    def _warm_up_kernels(self) -> None:
        """Compile the attention kernel's tile variants (picked by the step's longest query, and for decodes by the
        batch size) before the first request instead of during it: one small forward per variant, all in the
        scratch block."""
        scratch_block = self.plan.num_blocks if self.plan else 0
        for query_len in (1, 2, 4, 8, 16, 32, 64, 256):
            if query_len > min(self.buffers.max_num_tokens, self.max_seq_len):
                break
            tables = [[scratch_block] * math.ceil(query_len / self.tokens_per_block)]
            inputs = self.buffers.prepare([0], [query_len], tables, [True], [[0] * query_len])
            meta = self._metadata(inputs, query_len, 1)
            self.model(inputs.input_ids, inputs.positions, self.kv_caches, meta)
        # decode batches at the tile-rule boundaries (paged_attention._launch_config: programs per SM); eager steps
        # (enforce_eager, batches past the largest graph) would otherwise compile them mid-serving
        from kvflight.kernels.paged_attention import MANY_PROGRAMS_PER_SM, SOME_PROGRAMS_PER_SM

        for programs_per_sm in (SOME_PROGRAMS_PER_SM, MANY_PROGRAMS_PER_SM):
            size = math.ceil(programs_per_sm * self._num_sms / self.num_kv_heads)
            if size > min(self.buffers.max_num_seqs, self.buffers.max_num_tokens):
                break
            inputs = self._scratch_decode_inputs(size)
            meta = self._metadata(inputs, 1, self._num_splits(size, 1, None))
            self.model(inputs.input_ids, inputs.positions, self.kv_caches, meta)
        torch.cuda.synchronize(self.device)

    # ---- CUDA graphs --------------------------------------------------------------------------------------

    def _num_splits(self, num_seqs: int, max_query_len: int, max_seq_len: int | None) -> int:
        if self.kernel_backend != "triton":
            return 1
        from kvflight.kernels.paged_attention import choose_num_splits
        return choose_num_splits(num_seqs, self.num_kv_heads, max_query_len, max_seq_len, self._num_sms,
                                 self.config.runtime.multi_block_mode)

    def _graph_split_options(self, size: int) -> list[int]:
        """num_splits values to capture at this decode batch size: split-K (sized for any context length) when the
        heuristic may split, and no split unless multi_block_mode forces it on."""
        mode = self.config.runtime.multi_block_mode
        split = self._num_splits(size, 1, None)
        if split == 1:
            return [1]
        return [split] if mode == "on" else [1, split]

    def _scratch_decode_inputs(self, size: int) -> StepInputs:
        """size one-token sequences, each with a one-token context in the scratch block (warm-up and capture)."""
        scratch_block = self.plan.num_blocks if self.plan else 0
        return self.buffers.prepare([0] * size, [1] * size, [[scratch_block]] * size, [True] * size, [[0]] * size)

    @torch.inference_mode()
    def _capture_graphs(self) -> None:
        assert self.graphs is not None
        prepared: dict[int, StepInputs] = {}

        def prepare(size: int) -> None:
            # values are irrelevant: each replay's step fills every input first
            prepared[size] = self._scratch_decode_inputs(size)

        def run_forward(size: int, num_splits: int) -> torch.Tensor:
            inputs = prepared[size]
            meta = self._metadata(inputs, max_query_len=1, num_splits=num_splits)
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, meta)  # [size, hidden]
            return self.model.lm_head.compute_logits(hidden)  # [size, vocab] model dtype (cast by the graph's copy)

        self.graphs.capture(prepare, run_forward)

    @torch.inference_mode()
    def _capture_mixed_graphs(self) -> None:
        assert self.mixed_graphs is not None
        prepared: dict[int, StepInputs] = {}
        max_seqs = self.buffers.max_num_seqs

        def prepare(tokens: int) -> None:
            # every sequence and token padding (nothing read or written in the cache): each replay's step fills
            # every input first
            prepared[tokens] = self.buffers.prepare([], [], [], [], [], pad_num_seqs=max_seqs, pad_num_tokens=tokens)

        def run_forward(tokens: int) -> torch.Tensor:
            inputs = prepared[tokens]
            # max_query_len: any bound >= every sequence's new tokens is valid; the padded count keeps one
            # attention launch shape per graph whatever the step holds
            meta = self._metadata(inputs, max_query_len=tokens, num_splits=1)
            return self.model(inputs.input_ids, inputs.positions, self.kv_caches, meta)  # [tokens, hidden]

        self.mixed_graphs.capture(prepare, run_forward, pool=self.graphs.pool if self.graphs is not None else None)
        torch.cuda.empty_cache()  # the eager warm-ups' blocks

    # ---- one step: inputs ---------------------------------------------------------------------------------

    def _metadata(self, inputs: StepInputs, max_query_len: int, num_splits: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=inputs.slot_mapping, query_start_loc=inputs.query_start_loc, seq_lens=inputs.seq_lens,
            block_tables=inputs.block_tables, max_query_len=max_query_len,
            max_seq_len=int(inputs.seq_lens_host.max()) if len(inputs.seq_lens_host) else 0,
            query_lens_cpu=inputs.query_lens.tolist(), seq_lens_cpu=inputs.seq_lens_host.tolist(),
            num_splits=num_splits)


    # ---- one step -----------------------------------------------------------------------------------------

    def graph_for(self, num_tokens: int, num_seqs: int) -> tuple[int | None, int | None]:
        """(decode graph size, mixed-step graph tokens) a step of num_tokens tokens over num_seqs sequences
        replays: at most one is not None; both None means an eager launch."""
        if num_tokens == num_seqs:  # decode only
            return (self.graphs.padded_size(num_seqs) if self.graphs is not None else None), None
        return None, (self.mixed_graphs.padded_tokens(num_tokens) if self.mixed_graphs is not None else None)

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Run one step and wait for its tokens (launch + resolve)."""
        return self.resolve(self.launch(out))

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput) -> LaunchedStep:
        """Queue one step's host-tier copies, forward and sampling on the device without waiting for them.

        A scheduled token not yet in its request's all_token_ids (request.num_pending_tokens) is the previous
        launch's sample at row request.pending_row: it is scattered into the inputs on the device.
        """
        started = None
        if self.device.type == "cuda":
            started = torch.cuda.Event(enable_timing=True)
            started.record()
        # host-tier copies first (offloads, then loads), on the stream the forward runs on
        if out.kv_offloads or out.kv_loads:
            self.kv_offloader.apply(out.kv_offloads, out.kv_loads)
        sched = out.scheduled
        num_seqs = len(sched)
        num_new = [s.num_new_tokens for s in sched]
        graph_size, mixed_size = self.graph_for(out.num_scheduled_tokens, num_seqs)
        token_ids, pending = self._input_token_ids(sched)
        inputs = self.buffers.prepare([s.start_pos for s in sched], num_new, [s.block_ids for s in sched],
                                      [s.do_sample for s in sched], token_ids,
                                      pad_num_seqs=self.buffers.max_num_seqs if mixed_size else graph_size,
                                      pending=pending, pad_num_tokens=mixed_size)
        rows = [s.request for s in sched if s.do_sample]
        if graph_size is not None:
            want_split = self._num_splits(graph_size, 1, int(inputs.seq_lens_host.max())) > 1
            shape: tuple = ("decode", graph_size, want_split)
            logits = self.graphs.replay(graph_size, want_split)  # [graph_size, vocab] float32: row i = sequence i
            if not rows:
                return self._launched_without_samples(started, shape)
            logits = logits[:num_seqs] if len(rows) == num_seqs else logits.index_select(0, inputs.logits_indices)
        elif mixed_size is not None:
            assert self.mixed_graphs is not None
            shape = ("mixed", mixed_size)
            hidden = self.mixed_graphs.replay(mixed_size)  # [mixed_size, hidden]
            if not rows:
                return self._launched_without_samples(started, shape)
            logits = self.model.compute_logits(hidden.index_select(0, inputs.logits_indices))  # [samples, vocab]
        else:
            max_query_len = max(num_new)
            meta = self._metadata(inputs, max_query_len, self._num_splits(num_seqs, max_query_len,
                                                                          int(inputs.seq_lens_host.max())))
            shape = ("eager", -(-out.num_scheduled_tokens // 64) * 64)
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, meta)  # [T, hidden]
            if not rows:
                return self._launched_without_samples(started, shape)
            logits = self.model.compute_logits(hidden.index_select(0, inputs.logits_indices))  # [samples, vocab]
        if self.skip_sampling:
            return self._launched_without_samples(started, shape)
        sampled = self.sampler(logits, rows)
        self._last_sampled = sampled.token_ids  # [rows] int64: the next launch's pending tokens
        for i, r in enumerate(rows):  # sampled on the device; the next launch may read it before update() appends it
            r.pending_row = i
        table = logprobs_table(sampled) if any(r.sampling_params.logprobs is not None for r in rows) else None
        if self.device.type != "cuda":
            return LaunchedStep(rows, sampled.token_ids, table)
        self._turn ^= 1
        host = self._token_host[self._turn]
        if host is None or host.numel() < len(rows):
            host = self._token_host[self._turn] = torch.empty(max(len(rows), self.config.scheduler.max_batch_size),
                                                              dtype=torch.int64, pin_memory=True)
        host = host[:len(rows)]
        host.copy_(sampled.token_ids, non_blocking=True)
        table_host = None
        if table is not None:
            table_host = torch.empty(table.shape, dtype=table.dtype, pin_memory=True)
            table_host.copy_(table, non_blocking=True)
        ready = torch.cuda.Event(enable_timing=True)
        ready.record()
        return LaunchedStep(rows, host, table_host, ready, started, shape)

    def _launched_without_samples(self, started: torch.cuda.Event | None, shape: tuple) -> LaunchedStep:
        self._last_sampled = None
        ready = None
        if started is not None:
            ready = torch.cuda.Event(enable_timing=True)
            ready.record()
        return LaunchedStep([], ready=ready, started=started, shape=shape)

    def _input_token_ids(self, sched: list) -> tuple[list[list[int]], tuple[list[int], list[int], torch.Tensor] |
                                                      None]:
        """Each row's input token ids; a pending token (not on the host yet) is a 0 placeholder plus an entry of
        (flat token index, row of the last launch's sampled tokens)."""
        token_ids: list[list[int]] = []
        dst: list[int] = []
        src: list[int] = []
        flat = 0
        for s in sched:
            n = s.num_new_tokens
            ids = s.token_ids  # a new list (tensor-parallel workers get look-alikes carrying the ids)
            if len(ids) < n:  # only the last token can be pending: the previous step sampled it
                req, start = s.request, s.start_pos
                if len(ids) != n - 1 or not req.num_pending_tokens or self._last_sampled is None:
                    raise RuntimeError(f"request {req.request_id!r}: step needs tokens [{start}, {start + n}) but "
                                       f"only {len(req.all_token_ids)} are known and "
                                       f"{req.num_pending_tokens} pending (scheduler/runner out of step: a bug)")
                ids.append(0)
                dst.append(flat + n - 1)
                src.append(req.pending_row)
            token_ids.append(ids)
            flat += n
        return token_ids, ((dst, src, self._last_sampled) if dst else None)

    def resolve(self, step: LaunchedStep) -> RunnerOutput:
        """Wait for a launched step's sampled tokens (the step's one host sync) and return them."""
        if not step.rows:
            return RunnerOutput([], None)
        if step.ready is not None:
            step.ready.synchronize()
        assert step.token_ids_host is not None
        token_ids = step.token_ids_host.tolist()
        logprobs = None
        if step.logprobs_host is not None:
            logprobs = token_logprobs_from_table(step.logprobs_host.tolist(), step.rows)
        return RunnerOutput(token_ids, logprobs)


def resolve_kernel_backend(name: str, device: torch.device) -> str:
    """'auto' -> 'triton' on CUDA, 'torch' elsewhere; 'triton' off CUDA needs TRITON_INTERPRET=1 (tests)."""
    if name == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if name not in ("triton", "torch"):
        raise ConfigError(f"kernel_backend={name!r}: expected auto, triton or torch")
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"kernel_backend=triton needs a CUDA device (the model is on {device}); use "
                          "kernel_backend=torch or auto, or set TRITON_INTERPRET=1 to run the kernels interpreted")
    return name
