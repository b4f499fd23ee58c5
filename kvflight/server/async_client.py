"""The API process's handle on the engine core: starts it, routes its outputs to per-request asyncio queues
through an OutputProcessor (tokenizer, stop strings, n-way expansion), and aborts requests whose consumer left."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import multiprocessing
import os
import pickle
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from kvflight.engine.output import OutputProcessor
from kvflight.server.engine_core import (AbortRequests, AddRequests, EngineStats, Fatal, ModelInfo, Ready, Shutdown,
                                        StartupError, StatsQuery, StatsReply, StepOutputs, run_engine_core)
from kvflight.server.metrics import ServerMetrics
from kvflight.types import FinishReason, Request, RequestOutput, SamplingParams

logger = logging.getLogger("kvflight.server")

DEFAULT_STARTUP_TIMEOUT_S: float = 900.0
SHUTDOWN_JOIN_TIMEOUT_S: float = 10.0
PROCESS_WATCH_INTERVAL_S: float = 0.5


class EngineStartError(RuntimeError):
    """The engine core could not start (bad config, model, or it crashed while loading)."""


class EngineDeadError(RuntimeError):
    """The engine core process died; pending and new requests fail with this."""


class RequestRejected(ValueError):
    """The engine core refused a request (a limit the API process did not check)."""


@dataclass
class _Tracked:
    """A request in flight as the client sees it."""

    request_id: str
    queue: asyncio.Queue
    engine_ids: list[str]
    arrival_s: float  # time.monotonic()
    num_prompt_tokens: int
    last_token_s: float | None = None
    num_output_tokens: int = 0
    finished: bool = False
    queue_s: float | None = None  # arrival to first scheduled, from the engine core (None: not scheduled yet)
    got_token: bool = False  # an output with a token went to its consumer (and, tracing, to the request trace)


class RequestTrace:
    """KVFLIGHT_REQUEST_TRACE=FILE: one JSON line per request at its first token, saying where its time to first
    token went, in ms from its arrival in the API process (time.monotonic is one clock across both processes):
    scheduled (first in an engine step), engine_sent (the core sent the step's outputs), api_received (the
    API process read them), api_handled (detokenized and queued for the HTTP response)."""

    def __init__(self, path: str) -> None:
        try:
            self._file = open(path, "a", buffering=1, encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"KVFLIGHT_REQUEST_TRACE={path!r}: cannot open it for writing ({exc})") from None

    def first_token(self, tracked: _Tracked, sent_s: float, received_s: float, handled_s: float) -> None:
        a = tracked.arrival_s
        ms = lambda t: round((t - a) * 1e3, 3)  # noqa: E731
        self._file.write(json.dumps({
            "request_id": tracked.request_id, "prompt_tokens": tracked.num_prompt_tokens, "arrival_s": round(a, 6),
            "scheduled": None if tracked.queue_s is None else round(tracked.queue_s * 1e3, 3),
            "engine_sent": ms(sent_s), "api_received": ms(received_s), "api_handled": ms(handled_s)}) + "\n")

    def close(self) -> None:
        self._file.close()


class AsyncEngineClient:
    """Owns the engine-core process and the ZMQ sockets. One instance per API process."""

    def __init__(self, flat_config: dict[str, Any], tokenizer: Any, metrics: ServerMetrics | None = None,
                 log_level: str = "INFO") -> None:
        self.flat_config = flat_config
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.log_level = log_level
        self.info: ModelInfo | None = None
        self.processor: OutputProcessor | None = None
        self.stats = EngineStats()
        self.dead_reason: str | None = None
        self._tracked: dict[str, _Tracked] = {}
        self._by_engine_id: dict[str, _Tracked] = {}
        self._stats_waiters: dict[int, asyncio.Future] = {}
        self._query_ids = itertools.count()
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._tmpdir: str | None = None
        self._ctx: Any = None
        self._push: Any = None
        self._pull: Any = None
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        trace_path = os.environ.get("KVFLIGHT_REQUEST_TRACE")
        self.trace = RequestTrace(trace_path) if trace_path else None

    # ---- lifecycle ----------------------------------------------------------------------------------------
    def start_process(self) -> None:
        """Spawn the core and bind the sockets (synchronous part; call before the event loop serves)."""
        import zmq

        self._tmpdir = tempfile.mkdtemp(prefix="kvflight-ipc-")
        in_addr = f"ipc://{os.path.join(self._tmpdir, 'to_core')}"
        out_addr = f"ipc://{os.path.join(self._tmpdir, 'from_core')}"
        self._ctx = zmq.Context()
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.bind(in_addr)
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.bind(out_addr)
        mp = multiprocessing.get_context("spawn")
        self._proc = mp.Process(target=run_engine_core, name="kvflight-engine-core",
                                args=(self.flat_config, in_addr, out_addr, self.log_level), daemon=True)
        self._proc.start()

    def wait_ready(self, timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S) -> ModelInfo:
        """Block until the core says Ready; raise EngineStartError with its message otherwise."""
        import zmq

        assert self._proc is not None and self._pull is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._pull.poll(200, zmq.POLLIN):
                msg = pickle.loads(self._pull.recv())
                if isinstance(msg, Ready):
                    self.info = msg.info
                    self.processor = OutputProcessor(self.tokenizer, msg.info.eos_token_ids)
                    return msg.info
                if isinstance(msg, StartupError):
                    self._proc.join(5)
                    raise EngineStartError(msg.message)
                continue
            if not self._proc.is_alive():
                raise EngineStartError(f"the engine core exited with code {self._proc.exitcode} while starting; "
                                       "see the log above")
        raise EngineStartError(f"the engine core did not become ready in {timeout_s:.0f} s")

    async def start_loops(self) -> None:
        """Start the output reader and the process watcher (call inside the serving event loop)."""
        self._tasks = [asyncio.create_task(self._output_loop(), name="kvflight-output-loop"),
                       asyncio.create_task(self._watch_process(), name="kvflight-process-watch")]

    async def shutdown(self) -> None:
        """Stop the core (after the server drained) and release the sockets."""
        self._closing = True
        if self._proc is not None and self._proc.is_alive():
            try:
                self._send(Shutdown())
            except Exception:
                pass
            deadline = time.monotonic() + SHUTDOWN_JOIN_TIMEOUT_S
            while self._proc.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(5)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self.close_sockets()

    def close_sockets(self) -> None:
        for sock in (self._push, self._pull):
            if sock is not None:
                sock.close(linger=0)
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        self._push = self._pull = None
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        if self.trace is not None:
            self.trace.close()
            self.trace = None

    def kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)

    @property
    def healthy(self) -> bool:
        return self.dead_reason is None and self._proc is not None and self._proc.is_alive()

    @property
    def num_in_flight(self) -> int:
        return len(self._tracked)

    # ---- requests -----------------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """The engine's own checks, done here so a bad request never reaches the core. Raises ValueError."""
        assert self.info is not None
        info = self.info
        n_prompt = len(prompt_token_ids)
        if n_prompt == 0:
            raise ValueError("the prompt is empty: send at least one token")
        bad = [t for t in prompt_token_ids if not 0 <= t < info.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {info.vocab_size})")
        if n_prompt > info.max_input_len:
            raise ValueError(f"the prompt has {n_prompt} tokens, more than max_input_len={info.max_input_len}; "
                             "shorten the prompt or raise max_input_len (and max_seq_len)")
        if params.max_tokens is not None and n_prompt + params.max_tokens > info.max_seq_len:
            raise ValueError(f"prompt ({n_prompt} tokens) + max_tokens ({params.max_tokens}) = "
                             f"{n_prompt + params.max_tokens} exceeds max_seq_len={info.max_seq_len}; lower "
                             f"max_tokens to at most {info.max_seq_len - n_prompt}")

    async def generate(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Cumulative RequestOutputs until the finished one. Leaving early (break, cancel, timeout) aborts the
        request in the engine so its KV blocks are freed. Raises EngineDeadError if the core dies."""
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        assert self.processor is not None
        self.validate(prompt_token_ids, params)
        requests: list[Request] = self.processor.add_request(request_id, prompt, prompt_token_ids, params)
        tracked = _Tracked(request_id, asyncio.Queue(), [r.request_id for r in requests], time.monotonic(),
                           len(prompt_token_ids))
        self._tracked[request_id] = tracked
        for r in requests:
            self._by_engine_id[r.request_id] = tracked
        try:
            self._send(AddRequests(requests))
            while True:
                item = await tracked.queue.get()
                if isinstance(item, BaseException):
                    raise item
                out: RequestOutput = item
                if out.finished:
                    tracked.finished = True
                yield out
                if out.finished:
                    return
        finally:
            if not tracked.finished:
                self.abort(request_id)
            self._forget(tracked)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> None:
        """Abort a user request in the engine and drop it here."""
        tracked = self._tracked.get(request_id)
        if self.processor is not None:
            ids = self.processor.engine_ids(request_id)
            self.processor.abort(request_id)
            if ids and self.dead_reason is None:
                try:
                    self._send(AbortRequests(ids, reason))
                except Exception:
                    logger.warning("could not send abort for %s", request_id, exc_info=True)
        if tracked is not None:
            tracked.finished = True
            self._forget(tracked)

    def _forget(self, tracked: _Tracked) -> None:
        self._tracked.pop(tracked.request_id, None)
        for eid in tracked.engine_ids:
            self._by_engine_id.pop(eid, None)

    async def get_stats(self, timeout_s: float = 5.0) -> EngineStats:
        """A fresh snapshot straight from the core (falls back to the last one if it does not answer)."""
        if self.dead_reason is not None:
            return self.stats
        qid = next(self._query_ids)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._stats_waiters[qid] = fut
        self._send(StatsQuery(qid))
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            return self.stats
        finally:
            self._stats_waiters.pop(qid, None)

    def _send(self, msg: Any) -> None:
        if self._push is None:
            raise EngineDeadError("the engine client is closed")
        self._push.send(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))

    # ---- background tasks ---------------------------------------------------------------------------------
    async def _output_loop(self) -> None:
        import zmq.asyncio

        apull = zmq.asyncio.Socket.from_socket(self._pull)  # shares the bound socket; awaitable recv
        try:
            while True:
                msg = pickle.loads(await apull.recv())
                if isinstance(msg, StepOutputs):
                    self._handle_outputs(msg, time.monotonic())
                elif isinstance(msg, StatsReply):
                    self.stats = msg.stats
                    fut = self._stats_waiters.get(msg.query_id)
                    if fut is not None and not fut.done():
                        fut.set_result(msg.stats)
                elif isinstance(msg, Fatal):
                    self._fail_all(f"the engine core failed: {msg.message}")
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never let routing die silently
            logger.exception("output loop failed")
            self._fail_all(f"the API process's output loop failed: {type(exc).__name__}: {exc}")

    def _handle_outputs(self, msg: StepOutputs, received_s: float) -> None:
        assert self.processor is not None
        if msg.stats is not None:
            self.stats = msg.stats
            if self.metrics is not None:
                self.metrics.update_engine_stats(msg.stats)
        for eid, queue_s in msg.queue_times_s.items():  # a request's first queue time (of its n sequences)
            tracked = self._by_engine_id.get(eid)
            if tracked is not None and tracked.queue_s is None:
                tracked.queue_s = queue_s
                if self.metrics is not None:
                    self.metrics.queue_time.observe(queue_s)
        for eid, why in msg.rejected.items():
            tracked = self._by_engine_id.get(eid)
            if tracked is not None:
                self.abort(tracked.request_id)
                tracked.queue.put_nowait(RequestRejected(why))
        result = self.processor.process(msg.outputs)
        if result.stop_string_hits:
            self._send(AbortRequests([eid for eid, _ in result.stop_string_hits], FinishReason.STOP))
        now = time.monotonic()
        for out in sorted(result.outputs, key=self._not_first_token):
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue
            if not tracked.got_token and any(c.token_ids for c in out.outputs):
                tracked.got_token = True
                if self.trace is not None:
                    self.trace.first_token(tracked, msg.sent_s, received_s, now)
            if self.metrics is not None:
                self._observe_tokens(tracked, out, now)
            tracked.queue.put_nowait(out)

    def _not_first_token(self, out: RequestOutput) -> bool:
        """Sort key: a step's first tokens go to their consumers before the other streams' next tokens (a stable
        sort keeps the engine's order within each group). Each consumer then writes its chunk in this order, so
        the requests waiting for their first token are not queued behind every running stream's chunk: with ~30
        streams per step the API process and the client each spend milliseconds writing / reading one step's
        chunks."""
        tracked = self._tracked.get(out.request_id)
        return tracked is None or tracked.got_token

    def _observe_tokens(self, tracked: _Tracked, out: RequestOutput, now: float) -> None:
        m = self.metrics
        assert m is not None
        total = sum(len(c.token_ids) for c in out.outputs)
        new = total - tracked.num_output_tokens
        if new > 0:
            if tracked.last_token_s is None:
                m.ttft.observe(now - tracked.arrival_s)
                m.prompt_tokens.inc(tracked.num_prompt_tokens)
            else:
                m.inter_token_latency.observe((now - tracked.last_token_s) / new)
            m.generation_tokens.inc(new)
            tracked.last_token_s = now
            tracked.num_output_tokens = total
        if out.finished:
            e2e = now - tracked.arrival_s
            m.e2e_latency.observe(e2e)
            first = out.metrics.get("ttft_s")
            if total > 1 and first is not None:
                m.time_per_output_token.observe(max(0.0, e2e - first) / max(1, total - 1))

    def _fail_all(self, reason: str) -> None:
        if self.dead_reason is None:
            self.dead_reason = reason
            logger.error("%s", reason)
        for tracked in list(self._tracked.values()):
            tracked.queue.put_nowait(EngineDeadError(reason))
        for fut in self._stats_waiters.values():
            if not fut.done():
                fut.set_result(self.stats)

    async def _watch_process(self) -> None:
        while True:
            await asyncio.sleep(PROCESS_WATCH_INTERVAL_S)
            if self._proc is not None and not self._proc.is_alive() and not self._closing:
                await asyncio.sleep(0.2)  # let a Fatal message arrive first
                self._fail_all(f"the engine core process exited (code {self._proc.exitcode}); restart the server")
                return
