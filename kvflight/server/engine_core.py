"""The engine-core process: owns one Engine, steps it, and talks to the API process over ZMQ (PUSH/PULL each way).

Messages are plain dataclasses, pickled. API -> core: AddRequests, AbortRequests, StatsQuery, Shutdown.
Core -> API: Ready (or StartupError) once, then StepOutputs (each step's outputs, now and then a stats snapshot),
StatsReply, and Fatal if the loop dies (the process then exits non-zero).
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from kvflight.types import FinishReason, Request, StepOutput

logger = logging.getLogger("kvflight.engine_core")

STATS_INTERVAL_S: float = 0.5  # how often a stats snapshot rides along with the outputs
IDLE_POLL_MS: int = 200  # how long the loop blocks on the socket when there is no work
PARENT_CHECK_INTERVAL_S: float = 1.0  # the core exits when the API process is gone


# ---- messages: API -> core ---------------------------------------------------------------------------------
@dataclass
class AddRequests:
    requests: list[Request]


@dataclass
class AbortRequests:
    request_ids: list[str]
    reason: FinishReason = FinishReason.ABORT


@dataclass
class StatsQuery:
    query_id: int


@dataclass
class Shutdown:
    pass


# ---- messages: core -> API ---------------------------------------------------------------------------------
@dataclass
class ModelInfo:
    """What the API process needs to validate requests before sending them."""

    served_model_name: str
    max_seq_len: int
    max_input_len: int
    vocab_size: int
    eos_token_ids: frozenset[int]
    num_kv_blocks: int
    tokens_per_block: int


@dataclass
class Ready:
    info: ModelInfo


@dataclass
class StartupError:
    message: str


@dataclass
class EngineStats:
    """A snapshot for /metrics and /v1/admin/kv."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0  # fraction of blocks held by requests
    num_blocks: int = 0
    num_free_blocks: int = 0  # free or only cached (evictable)
    num_used_blocks: int = 0  # held by requests
    num_cached_blocks: int = 0
    prefix_reused_blocks: int = 0  # cumulative
    prefix_missed_blocks: int = 0  # cumulative
    prefix_host_hit_blocks: int = 0  # cumulative: of prefix_reused_blocks, those loaded from the host tier
    kv_offloaded_blocks: int = 0  # cumulative: blocks copied from the GPU to the host tier
    num_host_blocks: int = 0
    num_host_cached_blocks: int = 0
    num_preemptions_total: int = 0
    num_iterations: int = 0


@dataclass
class StepOutputs:
    outputs: list[StepOutput]
    queue_times_s: dict[str, float] = field(default_factory=dict)  # engine id -> arrival-to-first-scheduled
    rejected: dict[str, str] = field(default_factory=dict)  # engine id -> why Engine.add_request refused it
    stats: EngineStats | None = None
    sent_s: float = 0.0  # time.monotonic() when the core sent it (the API process's request trace)


@dataclass
class StatsReply:
    query_id: int
    stats: EngineStats


@dataclass
class Fatal:
    message: str


def engine_stats(engine: Any) -> EngineStats:
    s = engine.scheduler.iteration_stats()
    return EngineStats(
        num_running=int(s["num_active_requests"]), num_waiting=int(s["num_queued_requests"]),
        kv_usage=float(engine.kv.usage), num_blocks=int(engine.kv.num_blocks),
        num_free_blocks=int(engine.kv.num_free_blocks), num_used_blocks=int(engine.kv.num_used_blocks),
        num_cached_blocks=int(s.get("cached_blocks", 0)), prefix_reused_blocks=int(s.get("reused_blocks", 0)),
        prefix_missed_blocks=int(s.get("missed_blocks", 0)),
        prefix_host_hit_blocks=int(s.get("host_hit_blocks", 0)),
        kv_offloaded_blocks=int(s.get("offloaded_blocks", 0)), num_host_blocks=int(s.get("host_max_num_blocks", 0)),
        num_host_cached_blocks=int(s.get("host_cached_blocks", 0)),
        num_preemptions_total=int(s.get("num_preemptions_total", 0)), num_iterations=int(engine.iteration))


def freeze_startup_objects() -> None:
    """Collect once, then move every object alive now (the tokenizer, the imported libraries: ~300k objects) out of
    the cyclic garbage collector's reach (gc.freeze), so its full passes stop rescanning them. Those passes stalled
    the API process's event loop for about a millisecond per decode step of 256 streams (benchmarks/
    api_token_cost.py: 2.53 -> 1.39 ms per step in the output processor) and would stall the engine core's loop the
    same way. Called once by each of the two processes when its start-up is over."""
    gc.collect()
    gc.freeze()


def run_engine_core(flat_config: dict[str, Any], input_addr: str, output_addr: str, log_level: str) -> None:
    """Process entry point (spawn): build the Engine, report Ready / StartupError, then loop until Shutdown."""
    import zmq

    logging.basicConfig(level=log_level, stream=sys.stderr, format="[kvflight][core][%(levelname)s] %(message)s")
    # Ctrl-C / SIGTERM go to the API process, which drains and then sends Shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent_pid = os.getppid()
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(input_addr)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 2000)
    push.connect(output_addr)

    def send(msg: Any) -> None:
        push.send(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))

    try:
        from kvflight.config import EngineConfig
        from kvflight.engine.engine import Engine

        config = EngineConfig.from_flat(flat_config)
        engine = Engine(config)
        name = config.model.served_model_name or engine.resolved.name
        send(Ready(ModelInfo(served_model_name=name, max_seq_len=engine.max_seq_len,
                             max_input_len=engine.max_input_len, vocab_size=engine.arch.vocab_size,
                             eos_token_ids=engine.eos_token_ids, num_kv_blocks=engine.kv.num_blocks,
                             tokens_per_block=engine.kv.tokens_per_block)))
    except Exception as exc:  # a bad config / model: the serve command prints this and exits 2
        logger.debug("engine start failed", exc_info=True)
        send(StartupError(f"{exc}" if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"))
        push.close()
        ctx.term()
        sys.exit(2)

    freeze_startup_objects()  # the model, CUDA graphs and imports: never rescanned by the cyclic collector
    code = 0
    try:
        _loop(engine, pull, send, parent_pid)
    except Exception as exc:
        logger.error("engine core died: %s", traceback.format_exc())
        try:
            send(Fatal(f"the engine loop failed: {type(exc).__name__}: {exc}"))
        except Exception:
            pass
        code = 1
    finally:
        pull.close(linger=0)
        push.close()
        ctx.term()
    sys.exit(code)


def _loop(engine: Any, pull: Any, send: Any, parent_pid: int) -> None:
    import zmq

    poller = zmq.Poller()
    poller.register(pull, zmq.POLLIN)
    pending: dict[str, Request] = {}  # engine id -> request not scheduled yet (for queue time)
    last_stats_s = 0.0
    last_parent_check_s = time.monotonic()
    waits = 0  # loop turns spent waiting for a late-scheduled launch
    delay_s = 0.0  # late scheduling: how long the launched step is not due to be followed yet (end of last turn)
    while True:
        busy = engine.has_unfinished_requests()
        # busy: poll without blocking, or, while the next step is not due (late scheduling), block until it is,
        # taking requests that arrive meanwhile into the next step (zmq wakes on a message)
        wait_ms = int(delay_s * 1e3) if busy else IDLE_POLL_MS
        events = dict(poller.poll(wait_ms))
        rejected: dict[str, str] = {}
        if events.get(pull):
            while True:
                try:
                    raw = pull.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                msg = pickle.loads(raw)
                if isinstance(msg, AddRequests):
                    for req in msg.requests:
                        try:
                            engine.add_request(req)
                            pending[req.request_id] = req
                        except ValueError as exc:
                            rejected[req.request_id] = str(exc)
                elif isinstance(msg, AbortRequests):
                    engine.abort_requests(msg.request_ids, msg.reason)
                    for rid in msg.request_ids:
                        pending.pop(rid, None)
                elif isinstance(msg, StatsQuery):
                    send(StatsReply(msg.query_id, engine_stats(engine)))
                elif isinstance(msg, Shutdown):
                    timer = getattr(engine, "launch_timer", None)
                    logger.info("engine core shutting down%s (%d waits)",
                                f"; {timer.summary()}" if timer is not None else "", waits)
                    return
        now = time.monotonic()
        if now - last_parent_check_s > PARENT_CHECK_INTERVAL_S:
            last_parent_check_s = now
            if os.getppid() != parent_pid:
                logger.error("the API process is gone; the engine core exits")
                return
        delay_s = engine.launch_delay_s() if busy and not rejected else 0.0
        if delay_s > 0:
            waits += 1
            continue  # still early: wait on (sub-millisecond remainders spin)
        outputs: list[StepOutput] = []
        if engine.has_unfinished_requests():
            outputs = engine.step()
        queue_times: dict[str, float] = {}
        if pending:
            for rid in [r for r, req in pending.items() if req.first_scheduled_time is not None or req.is_finished]:
                req = pending.pop(rid)
                if req.first_scheduled_time is not None:
                    queue_times[rid] = max(0.0, req.first_scheduled_time - req.arrival_time)
        now = time.monotonic()
        stats = None
        if now - last_stats_s >= STATS_INTERVAL_S:
            stats = engine_stats(engine)
            last_stats_s = now
        if outputs or rejected or stats is not None or queue_times:
            send(StepOutputs(outputs, queue_times, rejected, stats, time.monotonic()))
