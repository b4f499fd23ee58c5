"""Engine: validates requests and runs iterations (schedule → execute → update); where sched/ and runner/ meet."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import weakref
from typing import Any, NamedTuple

from kvflight.cache.kv_manager import KVCacheManager
from kvflight.config import ConfigError, EngineConfig
from kvflight.engine.launch_timer import LaunchTimer
from kvflight.model.loader import ResolvedModel, load_arch, load_tokenizer, resolve_model
from kvflight.runner.model_runner import LaunchedStep, ModelRunner, RunnerOutput
from kvflight.runner.tp_workers import TensorParallelError, TPWorkerGroup, check_custom_all_reduce
from kvflight.sched.scheduler import Scheduler
from kvflight.types import FinishReason, Request, SchedulerOutput, StepOutput

logger = logging.getLogger("kvflight.engine")
stats_logger = logging.getLogger("kvflight.iteration")


def _rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class _Inflight(NamedTuple):
    """A launched step whose tokens are not applied yet."""

    out: SchedulerOutput
    launched: LaunchedStep
    needs_sync: bool  # a request in it reads its past tokens when sampling: complete it before scheduling the next


class Engine:
    """Owns one model replica: the KV pool, the scheduler and the runner. Single-sequence requests only
    (the front-end expands n > 1)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.resolved: ResolvedModel = resolve_model(config.model.model, config.model.load_format)
        self.arch = load_arch(self.resolved)
        self.tokenizer = load_tokenizer(self.resolved, config.model.tokenizer)
        sched = config.scheduler
        self.max_seq_len = sched.max_seq_len or self.arch.max_position_embeddings
        if self.max_seq_len > self.arch.max_position_embeddings:
            raise ConfigError(f"max_seq_len={self.max_seq_len} exceeds the model's context length "
                              f"({self.arch.max_position_embeddings}); lower max_seq_len")
        self.max_input_len = sched.max_input_len or self.max_seq_len - 1
        if self.max_input_len >= self.max_seq_len:
            raise ConfigError(f"max_input_len={self.max_input_len} must be < max_seq_len={self.max_seq_len}")
        if not sched.enable_chunked_context and self.max_input_len > sched.max_num_tokens:
            raise ConfigError(
                f"max_input_len={self.max_input_len} > max_num_tokens={sched.max_num_tokens} with "
                "enable_chunked_context off: such a prompt could never be scheduled; enable chunked context, "
                "raise max_num_tokens, or lower max_input_len")
        self.eos_token_ids = self._eos_token_ids()
        t0 = time.perf_counter()
        # tensor parallel: ranks 1..N-1 in worker processes, this process is rank 0 (before its model is built)
        self.tp_workers: TPWorkerGroup | None = None
        if config.parallel.tensor_parallel_size > 1:
            self.tp_workers = TPWorkerGroup(config, self.resolved, self.arch, self.max_seq_len)
            self._tp_finalizer = weakref.finalize(self, self.tp_workers.shutdown)
        try:
            self.runner = ModelRunner(config, self.resolved, self.arch, self.max_seq_len)
            if self.tp_workers is not None:
                self.tp_workers.wait_loaded()
            plan = self.runner.plan_kv_cache()
            if self.tp_workers is not None:  # one block id = the same slot on every rank: the smallest pool wins
                num_blocks = self.tp_workers.agree_num_blocks(plan.num_blocks)
                plan = dataclasses.replace(plan, num_blocks=num_blocks,
                                           kv_cache_bytes=num_blocks * plan.kv_bytes_per_block)
            self.plan = plan
            self.num_host_blocks = self._num_host_blocks(plan.kv_bytes_per_block)
            if self.tp_workers is not None:
                self.tp_workers.start_allocate(plan.num_blocks, self.num_host_blocks)
            # the runner allocates the pinned host blocks and runs each SchedulerOutput's kv_offloads / kv_loads
            self.runner.allocate_kv_cache(plan, num_host_blocks=self.num_host_blocks)
            if self.tp_workers is not None:
                self.tp_workers.wait_ready()
        except BaseException:
            self.shutdown()
            raise
        self.kv = KVCacheManager(plan.num_blocks, config.cache.tokens_per_block, config.cache.enable_kv_cache_reuse,
                                 num_host_blocks=self.num_host_blocks)
        self.scheduler = Scheduler(sched, self.kv, self.max_seq_len)
        self.iteration = 0
        self.async_scheduling = self._resolve_async_scheduling()
        self._inflight: _Inflight | None = None  # the launched step not yet completed (asynchronous scheduling)
        self.launch_timer = LaunchTimer()  # when the next step is due (late_scheduling; read by the server loop)
        logger.info("engine ready in %.1f s: %s, %s on %s, max_seq_len=%d, max_input_len=%d, max_batch_size=%d, "
                    "max_num_tokens=%d, policy=%s", time.perf_counter() - t0, self.resolved.name,
                    str(self.runner.dtype).removeprefix("torch."), self.runner.device, self.max_seq_len,
                    self.max_input_len, sched.max_batch_size, sched.max_num_tokens, sched.batch_scheduler_policy)

    def _resolve_async_scheduling(self) -> bool:
        mode = self.config.runtime.async_scheduling
        tp = self.config.parallel.tensor_parallel_size
        if mode == "on" and tp > 1:
            raise ConfigError(f"async_scheduling=on needs tensor_parallel_size 1 (got {tp}): the workers get each "
                              "step's token ids from rank 0's host; set async_scheduling to auto or off")
        if mode not in ("auto", "on", "off"):
            raise ConfigError(f"async_scheduling={mode!r}: expected auto, on or off")
        return mode == "on" or (mode == "auto" and tp == 1 and self.runner.device.type == "cuda")

    def _num_host_blocks(self, kv_bytes_per_block: int) -> int:
        """Host-tier blocks: kv_host_cache_bytes // KV bytes per block (0 without reuse: nothing would hit them)."""
        cache = self.config.cache
        if not cache.kv_host_cache_bytes:
            return 0
        if not cache.enable_kv_cache_reuse:
            logger.warning("kv_host_cache_bytes=%d is ignored: enable_kv_cache_reuse is off",
                           cache.kv_host_cache_bytes)
            return 0
        num_host_blocks = cache.kv_host_cache_bytes // kv_bytes_per_block
        if num_host_blocks < 1:
            raise ConfigError(f"kv_host_cache_bytes={cache.kv_host_cache_bytes} holds no KV block "
                              f"({kv_bytes_per_block} bytes each); raise it to at least {kv_bytes_per_block} or set "
                              "it to 0")
        logger.info("host KV tier: %d blocks x %.1f KiB = %.2f GiB pinned", num_host_blocks,
                    kv_bytes_per_block / 1024, num_host_blocks * kv_bytes_per_block / 2**30)
        return num_host_blocks

    def _eos_token_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        if self.arch.eos_token_ids:
            ids.update(self.arch.eos_token_ids)
        tok = self.tokenizer
        if tok is not None and tok.eos_token_id is not None:
            ids.add(int(tok.eos_token_id))
        return frozenset(ids)

    # ---- requests -----------------------------------------------------------------------------------------

    def validate(self, request: Request) -> None:
        """Raise ValueError naming the limit a request breaks; resolve its max_tokens."""
        n_prompt = request.num_prompt_tokens
        if n_prompt == 0:
            raise ValueError("the prompt is empty: send at least one token")
        vocab = self.arch.vocab_size
        bad = [t for t in request.prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if n_prompt > self.max_input_len:
            raise ValueError(f"the prompt has {n_prompt} tokens, more than max_input_len={self.max_input_len}; "
                             "shorten the prompt or raise max_input_len (and max_seq_len)")
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is None:
            max_tokens = self.max_seq_len - n_prompt
        elif n_prompt + max_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) = {n_prompt + max_tokens} "
                             f"exceeds max_seq_len={self.max_seq_len}; lower max_tokens to at most "
                             f"{self.max_seq_len - n_prompt} or raise max_seq_len")
        request.max_tokens = max_tokens
        if not request.eos_token_ids:
            request.eos_token_ids = self.eos_token_ids
        sp = request.sampling_params
        request.needs_token_history = bool(
            sp.repetition_penalty != 1.0 or sp.presence_penalty or sp.frequency_penalty or sp.min_tokens
            or request.bad_words_token_ids)

    def add_request(self, request: Request) -> None:
        self.validate(request)
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str], reason: FinishReason = FinishReason.ABORT) -> None:
        self.scheduler.finish_requests(request_ids, reason)

    def has_unfinished_requests(self) -> bool:
        """Requests queued or running, or a launched step not yet completed."""
        return self.scheduler.has_unfinished_requests() or self._inflight is not None

    # ---- one iteration ------------------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """One iteration: schedule, run, return what it produced.

        With asynchronous scheduling, a call schedules and launches step N+1 first, then waits for step N's tokens
        and returns step N's outputs: the host's work (scheduling, input preparation, stop checks, the caller's
        detokenization) overlaps the device's. Step N+1 counts each request's step-N token as known (pending) and
        reads it on the device; a request that stops at step N wastes its row of step N+1. A step whose requests'
        sampling reads their past tokens (penalties, bad words, min_tokens) is completed before the next is
        scheduled.
        """
        t0 = time.perf_counter()
        if not self.async_scheduling:
            out = self.scheduler.schedule()
            if out.is_empty:
                return []
            if self.tp_workers is None:
                result = self.runner.execute(out)
            else:
                result = self._execute_tensor_parallel(out)
            outputs = self._complete(out, result)
            self._log_stats(t0)
            return outputs
        outputs: list[StepOutput] = []
        prev, self._inflight = self._inflight, None
        if prev is not None and prev.needs_sync:
            outputs = self._complete(prev.out, self.runner.resolve(prev.launched))
            self._observe(prev)
            prev = None
        t_schedule = time.perf_counter()
        out = self.scheduler.schedule()
        launched = None
        gpu_start = time.perf_counter()  # the new step starts on the device no earlier than its launch
        if not out.is_empty:
            launched = self.runner.launch(out)
            if launched.shape[:1] != ("eager",):  # host-bound launches are never hidden: late_scheduling skips them
                self.launch_timer.observe_lead(time.perf_counter() - t_schedule)
            self._inflight = _Inflight(out, launched, any(r.needs_token_history for r in launched.rows))
        if prev is not None:
            prev_pending = prev.launched.ready is not None and not prev.launched.ready.query()
            outputs += self._complete(prev.out, self.runner.resolve(prev.launched))
            if prev_pending:
                gpu_start = time.perf_counter()  # ~ when prev ended (resolve waited for it), so the new step began
            self._observe(prev)
        if launched is not None:
            self.launch_timer.plan(launched.shape, gpu_start)
        if not out.is_empty:
            self._log_stats(t0)
        return outputs

    def _observe(self, done: _Inflight) -> None:
        seconds = done.launched.gpu_seconds()
        if seconds is not None:
            self.launch_timer.observe_duration(done.launched.shape, seconds)

    def launch_delay_s(self) -> float:
        """Seconds until the next step() should run (late_scheduling, asynchronous scheduling): the launched step's
        predicted end less the host's lead; 0 when it is done, must be completed first, or nothing is launched.
        The server's loop waits this long, taking new requests meanwhile; offline callers step at once."""
        inflight = self._inflight
        if not self.config.runtime.late_scheduling or inflight is None or inflight.needs_sync:
            return 0.0
        ready = inflight.launched.ready
        if ready is None or ready.query():
            return 0.0
        delay = self.launch_timer.delay_s(time.perf_counter())
        if delay > 0 and not self._next_step_replays_a_graph():
            return 0.0  # an eager launch takes longer than any lead: start it now, under the running step
        return delay

    def _next_step_replays_a_graph(self) -> bool:
        """Whether the next step would likely replay a CUDA graph (decode or mixed-step) rather than launch eagerly."""
        sched = self.scheduler
        num_seqs = sched.num_running + sched.num_waiting
        return any(size is not None for size in self.runner.graph_for(sched.next_step_tokens_bound(), num_seqs))

    def _complete(self, out: SchedulerOutput, result: RunnerOutput) -> list[StepOutput]:
        """Apply a step's sampled tokens to the scheduler; the StepOutputs of the requests that got one."""
        reqs = self.scheduler.update(out, result.token_ids)
        logprobs = result.logprobs
        if logprobs is not None and len(reqs) != len(result.token_ids):
            # some rows were dropped (aborted while the step ran): realign the logprobs with the kept rows
            kept = {id(r) for r in reqs}
            rows = [s.request for s in out.scheduled if s.do_sample]
            logprobs = [lp for r, lp in zip(rows, logprobs) if id(r) in kept]
        outputs = []
        for i, req in enumerate(reqs):
            lp = logprobs[i] if logprobs is not None else None
            outputs.append(StepOutput(
                request_id=req.request_id, new_token_ids=[req.all_token_ids[-1]],
                new_logprobs=[lp] if lp is not None else None,
                finish_reason=req.finish_reason, stop_reason=req.stop_reason,
                num_cached_tokens=req.num_cached_tokens))
        return outputs

    def _log_stats(self, t0: float) -> None:
        self.iteration += 1
        if self.config.runtime.log_iteration_stats:
            stats_logger.info(json.dumps(self.iteration_stats(time.perf_counter() - t0), sort_keys=True))

    def _execute_tensor_parallel(self, out: SchedulerOutput) -> RunnerOutput:
        """Send the step's diff to ranks 1..N-1, run rank 0's forward (collectives with them) and sample; a dead or
        failed worker raises TensorParallelError (the collectives time out after KVFLIGHT_TP_TIMEOUT_S)."""
        self.tp_workers.send_step(out)
        try:
            result = self.runner.execute(out)
            check_custom_all_reduce()  # a barrier that timed out on a dead peer: its step's tokens are garbage
            return result
        except Exception as exc:
            raise TensorParallelError(self.tp_workers.failure_message()) from exc

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers (no-op at tensor_parallel_size 1); also run when the engine is
        collected. The engine cannot step afterwards."""
        if getattr(self, "tp_workers", None) is not None:
            self.tp_workers.shutdown()

    def iteration_stats(self, latency_s: float | None = None) -> dict[str, Any]:
        """TensorRT-LLM's per-iteration fields (same names) plus ours."""
        s = self.scheduler.iteration_stats()
        gpu_bytes = 0
        if self.runner.device.type == "cuda":
            import torch

            gpu_bytes = torch.cuda.memory_allocated(self.runner.device)
        stats: dict[str, Any] = {
            "Timestamp": time.strftime("%m-%d-%Y %H:%M:%S"),
            "Iteration Counter": self.iteration,
            "Active Request Count": s["num_active_requests"],
            "Context Requests": s["num_context_requests"],
            "Generation Requests": s["num_gen_requests"],
            "Scheduled Requests": s["num_scheduled_requests"],
            "Waiting Request Count": s["num_queued_requests"],
            "Max Request Count": self.config.scheduler.max_batch_size,
            "Total Context Tokens": s["num_ctx_tokens"],
            "Scheduled Tokens": s["num_scheduled_tokens"],
            "Max KV cache blocks": self.kv.num_blocks,
            "Free KV cache blocks": self.kv.num_free_blocks,
            "Used KV cache blocks": self.kv.num_used_blocks,
            "Tokens per KV cache block": self.kv.tokens_per_block,
            "Reused KV cache blocks": s["reused_blocks"],
            "Missed KV cache blocks": s["missed_blocks"],
            "KV cache hit rate": round(s["cache_hit_rate"], 4),
            "Max host KV cache blocks": s["host_max_num_blocks"],
            "Cached host KV cache blocks": s["host_cached_blocks"],
            "Host KV cache hits": s["host_hit_blocks"],
            "Offloaded KV cache blocks": s["offloaded_blocks"],
            "KV blocks offloaded this iteration": s["num_kv_offloads"],
            "KV blocks loaded this iteration": s["num_kv_loads"],
            "Preempted Requests": s["num_preempted_requests"],
            "Total Preemptions": s["num_preemptions_total"],
            "Runtime GPU Memory Usage": gpu_bytes,
            "Runtime CPU Memory Usage": _rss_bytes(),
            "MicroBatch ID": 0,
        }
        if latency_s is not None:
            stats["Iteration Latency (ms)"] = round(latency_s * 1e3, 3)
        return stats

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()
