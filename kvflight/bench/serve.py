"""The serving load generator (`kvflight bench serve`): sends a dataset to a server (OpenAI completions / chat,
Triton generate_stream) or to the in-process engine with a Poisson / gamma arrival process, a concurrency cap or
emulated static batching, records per-token arrival times, and reports throughput, latency and goodput per rate.

Timing: every time is time.perf_counter(). A request's start is the moment it is sent (after it got a
--max-concurrency slot, as vLLM measures); a token's arrival is when the client read the SSE line carrying it (HTTP)
or when the engine step that produced it returned (engine backend). Only chunks with non-empty text count as
arrivals (a role-only first chat chunk is not a token). Output token counts come from the server's `usage` when it
sends one, else from the tokenizer (when one is loaded), else one token per chunk.

Failures (HTTP errors, refused connections, timeouts, broken or malformed streams, error events) are recorded with a
short reason and never stop the run. The CLI: `add_serve_args(parser)` / `run_serve(args)`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import queue
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Callable, Sequence

import numpy as np

from kvflight.bench.dataset import (BenchRequest, DatasetError, add_generator_args, generate_from_args, get_tokenizer,
                                    load_dataset)
from kvflight.bench.http_stream import HttpStreamClient, HttpStreamError
from kvflight.bench.metrics import SLO, BenchReport, RequestRecord, build_report, format_report, format_sweep, parse_slo

logger = logging.getLogger("kvflight.bench")

BACKENDS: tuple[str, ...] = ("openai-completions", "openai-chat", "triton", "engine")
HTTP_CLIENTS: tuple[str, ...] = ("auto", "httpx")
DEFAULT_ENDPOINTS: dict[str, str] = {
    "openai-completions": "/v1/completions",
    "openai-chat": "/v1/chat/completions",
    "triton": "/v2/models/{model}/generate_stream",
}
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_REQUEST_TIMEOUT_S = 600.0


class RequestFailed(Exception):
    """A request went wrong in a way the run records (kind: the short reason that is counted)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class ServeSettings:
    """Everything one `bench serve` run needs besides the dataset."""

    backend: str = "openai-completions"
    base_url: str = DEFAULT_BASE_URL
    endpoint: str | None = None  # default: DEFAULT_ENDPOINTS[backend]
    model: str | None = None  # HTTP: the served model name (asked from /v1/models when None)
    api_key: str | None = None
    request_rates: list[float] = field(default_factory=lambda: [math.inf])
    burstiness: float = 1.0  # gamma shape of the interarrival times; 1 = Poisson
    max_concurrency: int | None = None
    warm_up: int = 0
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    ignore_eos: bool = True
    temperature: float = 0.0
    seed: int = 0  # of the arrival process
    static_batch_size: int | None = None
    static_timeout_ms: float | None = None
    slo: SLO | None = None
    progress: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)
    http_client: str = "auto"  # streamed POSTs: "auto" = the lean client for http://, httpx for https://; "httpx"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}: supported: {', '.join(BACKENDS)}")
        if self.http_client not in HTTP_CLIENTS:
            raise ValueError(f"http_client={self.http_client!r}: supported: {', '.join(HTTP_CLIENTS)}")
        if not self.request_rates or any(not r > 0 for r in self.request_rates):
            raise ValueError(f"request rates {self.request_rates}: each must be > 0 requests/s (or inf)")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness={self.burstiness}: must be > 0 (1 = Poisson; < 1 burstier; > 1 steadier)")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency={self.max_concurrency}: must be >= 1 (or unset for no cap)")
        if self.warm_up < 0:
            raise ValueError(f"warm_up={self.warm_up}: must be >= 0")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s={self.request_timeout_s}: must be > 0 seconds")
        if self.static_batch_size is not None and self.static_batch_size < 1:
            raise ValueError(f"static_emulated_batch_size={self.static_batch_size}: must be >= 1")
        if self.static_timeout_ms is not None:
            if self.static_timeout_ms < 0:
                raise ValueError(f"static_emulated_timeout={self.static_timeout_ms} ms: must be >= 0")
            if self.static_batch_size is None:
                raise ValueError("--static-emulated-timeout needs --static-emulated-batch-size")


# ---- arrival process ----------------------------------------------------------------------------------------------
def parse_request_rates(text: str) -> list[float]:
    """'1,2,4,inf' → [1.0, 2.0, 4.0, inf] (requests per second; inf or -1 = all at once)."""
    rates = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        if part in ("inf", "infinity", "-1"):
            rates.append(math.inf)
            continue
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"request rate {part!r} is not a number: give requests/s like '4' or 'inf', or a "
                             "sweep like '1,2,4,inf'") from None
        if not value > 0:
            raise ValueError(f"request rate {part}: must be > 0 requests/s (use inf to send all at once)")
        rates.append(value)
    if not rates:
        raise ValueError("no request rate given: e.g. --request-rate 4 or --request-rate 1,2,4,inf")
    return rates


def arrival_offsets_s(num_requests: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """When each request is sent, in seconds after the start: the first at 0, then gamma(shape=burstiness,
    mean=1/rate) gaps (exponential = Poisson when burstiness is 1). An infinite rate sends all at 0."""
    if num_requests <= 0:
        return []
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_requests - 1)
    return [0.0] + np.cumsum(gaps).tolist()


@dataclass
class StaticBatchScheduler:
    """Emulated static batching (gptManagerBenchmark's --static_emulated_batch_size / _timeout).

    Requests queue as they arrive. When the previous group is done, the next group leaves as soon as it is full
    (batch_size requests), or when timeout_s has passed since its first queued request arrived, or when no more
    requests will arrive; then it holds the "engine" until all of its requests are done. Pure logic: the caller
    passes the clock, so it is tested with a fake one.
    """

    batch_size: int
    timeout_s: float | None = None
    _queue: deque[tuple[int, float]] = field(default_factory=deque)
    closed: bool = False  # no more arrivals

    def add(self, index: int, now_s: float) -> None:
        if self.closed:
            raise RuntimeError("StaticBatchScheduler.add after close(): all arrivals were announced already")
        self._queue.append((index, now_s))

    def close(self) -> None:
        self.closed = True

    @property
    def num_pending(self) -> int:
        return len(self._queue)

    @property
    def done(self) -> bool:
        return self.closed and not self._queue

    def next_group(self, now_s: float) -> list[int] | None:
        """Call when no group is in flight: the request indices to launch now, or None to keep waiting."""
        if not self._queue:
            return None
        if len(self._queue) >= self.batch_size:
            return [self._queue.popleft()[0] for _ in range(self.batch_size)]
        expired = self.timeout_s is not None and now_s - self._queue[0][1] >= self.timeout_s
        if self.closed or expired:
            group = [i for i, _ in self._queue]
            self._queue.clear()
            return group
        return None

    def deadline_s(self) -> float | None:
        """When the oldest queued request's timeout expires (None: no timeout or nothing queued)."""
        if not self._queue or self.timeout_s is None:
            return None
        return self._queue[0][1] + self.timeout_s


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop where it is installed (as uvicorn picks for the server): the client's own per-event cost
    then stays small beside the server's, which is what the benchmark measures; None = asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


# ---- SSE ----------------------------------------------------------------------------------------------------------
async def iter_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """Lines (without the newline) of a byte stream cut anywhere, a UTF-8 character included: the stream is split
    on newline bytes only, so every line decodes whole. Cheaper per event than httpx's text line decoder, which
    keeps the client's own cost small beside the server's."""
    buf = b""
    async for chunk in chunks:
        buf = buf + chunk if buf else chunk
        start = 0
        while (end := buf.find(b"\n", start)) >= 0:
            yield buf[start:end].decode("utf-8", errors="replace")
            start = end + 1
        buf = buf[start:]
    if buf:
        yield buf.decode("utf-8", errors="replace")


async def iter_sse_events(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, float]]:
    """(data payload, arrival time) of each server-sent event; multi-line data is joined with newlines, comments
    and other fields are skipped. The arrival time is when the event's last data line was read."""
    data: list[str] = []
    t_last = 0.0
    async for line in lines:
        now = time.perf_counter()
        line = line.rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data), t_last
                data = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name != "data":
            continue
        data.append(value[1:] if value.startswith(" ") else value)
        t_last = now
        # servers terminate each event with a blank line; yield at once anyway when the payload is complete JSON or
        # [DONE] so a missing blank line never delays an arrival
        if len(data) == 1 and (data[0] == "[DONE]" or _is_complete_json(data[0])):
            yield data[0], t_last
            data = []
    if data:
        yield "\n".join(data), t_last


def _is_complete_json(text: str) -> bool:
    text = text.strip()
    return bool(text) and text[0] in "{[" and text[-1] in "}]"


def _loads_event(payload: str) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise RequestFailed("malformed SSE", f"an SSE data payload is not JSON ({exc}): {payload[:200]!r}") from None
    if not isinstance(obj, dict):
        raise RequestFailed("malformed SSE", f"an SSE data payload is not a JSON object: {payload[:200]!r}")
    return obj


def _error_text(err: Any) -> str:
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err)


# ---- backends -----------------------------------------------------------------------------------------------------
class Backend:
    """Sends one request and fills its RequestRecord (token arrival times, counts, text); raises RequestFailed."""

    name = "base"

    async def start(self) -> None:  # before the first request (inside the event loop)
        pass

    async def send(self, req: BenchRequest, record: RequestRecord) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


class HttpBackend(Backend):
    """Shared plumbing of the HTTP backends: one httpx.AsyncClient, streaming POSTs, error classification."""

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.base_url = settings.base_url.rstrip("/")
        self.model = settings.model
        self.client: Any = None
        self.stream_client: HttpStreamClient | None = None  # the lean client (http:// and http_client "auto")

    async def start(self) -> None:
        import httpx

        headers = {"User-Agent": "kvflight-bench"}
        api_key = self.settings.api_key
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        timeout = httpx.Timeout(self.settings.request_timeout_s, pool=None)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers, trust_env=False)
        if self.settings.http_client == "auto" and self.base_url.startswith("http://"):
            self.stream_client = HttpStreamClient(self.base_url, headers)
        if self.model is None:
            self.model = await self._discover_model()

    async def _discover_model(self) -> str:
        url = f"{self.base_url}/v1/models"
        try:
            resp = await self.client.get(url)
            resp.raise_for_status()
            models = resp.json().get("data") or []
            return str(models[0]["id"])
        except Exception as exc:  # noqa: BLE001 - any failure means: ask the user
            raise ValueError(f"no --model given and asking {url} for the served model failed ({exc!r}); pass "
                             "--model NAME (the server's model name) and check --base-url") from None

    def path(self) -> str:
        return (self.settings.endpoint or DEFAULT_ENDPOINTS[self.name]).replace("{model}", str(self.model))

    def url(self) -> str:
        return self.base_url + self.path()

    def body(self, req: BenchRequest) -> dict[str, Any]:
        raise NotImplementedError

    def handle_event(self, obj: dict[str, Any], record: RequestRecord, t_arrival: float, text: list[str]) -> None:
        raise NotImplementedError

    needs_done = True  # OpenAI streams end with data: [DONE]; one closing without it is broken

    async def send(self, req: BenchRequest, record: RequestRecord) -> None:
        import httpx

        text: list[str] = []
        got_done = False
        try:
            async with self._stream(req) as resp:
                if resp.status_code != 200:
                    detail = (await resp.aread()).decode("utf-8", errors="replace")
                    raise RequestFailed(f"HTTP {resp.status_code}", f"HTTP {resp.status_code} from {self.url()}: "
                                        f"{detail[:500]}")
                async for payload, t_arrival in iter_sse_events(iter_lines(resp.aiter_bytes())):
                    if payload.strip() == "[DONE]":
                        got_done = True
                        break
                    self.handle_event(_loads_event(payload), record, t_arrival, text)
        except httpx.TimeoutException as exc:
            raise RequestFailed("timeout", f"no response within {self.settings.request_timeout_s:g} s "
                                f"({type(exc).__name__})") from None
        except httpx.ConnectError as exc:
            raise RequestFailed("connection error", f"cannot connect to {self.url()}: {exc}; is the server "
                                "running? check --base-url") from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
            raise RequestFailed("broken stream", f"the connection broke mid-response: {exc!r}") from None
        except HttpStreamError as exc:
            if exc.kind == "connect":
                raise RequestFailed("connection error", f"{exc}; is the server running? check --base-url") from None
            raise RequestFailed("broken stream", str(exc)) from None
        finally:
            record.output_text = "".join(text)
        if self.needs_done and not got_done:
            raise RequestFailed("incomplete stream", "the stream closed without 'data: [DONE]'")

    def _stream(self, req: BenchRequest) -> Any:
        """An async context manager giving a response with status_code, aiter_bytes() and aread()."""
        if self.stream_client is not None:
            return self.stream_client.stream_post(self.path(), json.dumps(self.body(req)).encode())
        return self.client.stream("POST", self.url(), json=self.body(req))

    async def aclose(self) -> None:
        if self.stream_client is not None:
            await self.stream_client.aclose()
            self.stream_client = None
        if self.client is not None:
            await self.client.aclose()
            self.client = None


class OpenAICompletionsBackend(HttpBackend):
    name = "openai-completions"

    def body(self, req: BenchRequest) -> dict[str, Any]:
        prompt: str | list[int] = req.prompt if req.prompt is not None else list(req.input_ids or [])
        return self._streamed_body(req, {"prompt": prompt})

    def _streamed_body(self, req: BenchRequest, payload: dict[str, Any]) -> dict[str, Any]:
        """The fields every OpenAI-style request shares, around the prompt / messages payload."""
        body: dict[str, Any] = {"model": self.model, **payload, "max_tokens": req.output_tokens,
                                "temperature": self.settings.temperature, "stream": True,
                                "stream_options": {"include_usage": True}}
        if self.settings.ignore_eos:
            body["ignore_eos"] = True
        body.update(self.settings.extra_body)
        return body

    @staticmethod
    def chunk_text(choice: dict[str, Any]) -> str:
        return choice.get("text") or ""

    def handle_event(self, obj: dict[str, Any], record: RequestRecord, t_arrival: float, text: list[str]) -> None:
        if obj.get("error"):
            raise RequestFailed("server error", f"the server sent an error event: {_error_text(obj['error'])}")
        if not record.response_id and isinstance(obj.get("id"), str):
            record.response_id = obj["id"]
        choices = obj.get("choices") or []
        if choices and isinstance(choices[0], dict):
            piece = self.chunk_text(choices[0])
            if piece:
                record.token_times_s.append(t_arrival)
                text.append(piece)
        usage = obj.get("usage")
        if isinstance(usage, dict):
            record.prompt_tokens = int(usage.get("prompt_tokens") or record.prompt_tokens)
            record.output_tokens = int(usage.get("completion_tokens") or record.output_tokens)


class OpenAIChatBackend(OpenAICompletionsBackend):
    name = "openai-chat"

    def body(self, req: BenchRequest) -> dict[str, Any]:
        if req.prompt is None:
            raise RequestFailed("no text prompt", f"task_id={req.task_id} has token ids only; the chat API needs "
                                "text (pass a tokenizer so ids can be decoded)")
        return self._streamed_body(req, {"messages": [{"role": "user", "content": req.prompt}]})

    @staticmethod
    def chunk_text(choice: dict[str, Any]) -> str:
        delta = choice.get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")


class TritonBackend(HttpBackend):
    """Triton's generate_stream: POST {text_input, max_tokens, stream: true}; events `data: {"text_output": ..}`;
    the stream simply ends (no [DONE])."""

    name = "triton"
    needs_done = False

    async def start(self) -> None:
        if self.model is None:
            # tensorrtllm_backend's model repository serves the whole pipeline as "ensemble" (so does kvflight)
            logger.info("triton backend: no --model given, using 'ensemble' (/v2/models/ensemble/generate_stream)")
            self.model = "ensemble"
        await super().start()

    def body(self, req: BenchRequest) -> dict[str, Any]:
        if req.prompt is None:
            raise RequestFailed("no text prompt", f"task_id={req.task_id} has token ids only; generate_stream "
                                "needs text_input (pass a tokenizer so ids can be decoded)")
        body: dict[str, Any] = {"text_input": req.prompt, "max_tokens": req.output_tokens, "stream": True,
                                "temperature": self.settings.temperature}
        if self.settings.ignore_eos:
            body["ignore_eos"] = True
        body.update(self.settings.extra_body)
        return body

    def handle_event(self, obj: dict[str, Any], record: RequestRecord, t_arrival: float, text: list[str]) -> None:
        if obj.get("error"):
            raise RequestFailed("server error", f"the server sent an error event: {_error_text(obj['error'])}")
        piece = obj.get("text_output")
        if isinstance(piece, list):  # Triton may send a batch dimension
            piece = "".join(str(p) for p in piece)
        if piece:
            record.token_times_s.append(t_arrival)
            text.append(str(piece))
        for key in ("output_token_count", "num_output_tokens"):
            if isinstance(obj.get(key), int):
                record.output_tokens = obj[key]


class EngineBackend(Backend):
    """The in-process kvflight Engine, stepped by one thread; each step's tokens arrive when the step returns.

    Requests go to the thread through a queue; the thread adds them between steps (as the server's engine loop
    does), so queueing in front of the engine is part of the measured TTFT.
    """

    name = "engine"

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.tokenizer = getattr(engine, "tokenizer", None)
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ids = 0
        self.temperature = 0.0
        self.ignore_eos = True
        self.steps_in_caller = False  # True: run_in_this_thread() steps the engine, start() spawns no thread

    @classmethod
    def from_settings(cls, flat: dict[str, Any]) -> "EngineBackend":
        from kvflight.config import EngineConfig
        from kvflight.engine.engine import Engine

        return cls(Engine(EngineConfig.from_flat(flat)))

    async def start(self) -> None:
        if self.steps_in_caller:
            return
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="kvflight-bench-engine", daemon=True)
            self._thread.start()

    async def send(self, req: BenchRequest, record: RequestRecord) -> None:
        ids = req.input_ids
        if ids is None:
            if self.tokenizer is None:
                raise RequestFailed("no tokenizer", "a text prompt needs a tokenizer; this model has none")
            ids = list(self.tokenizer.encode(req.prompt))
        self._ids += 1
        rid = f"bench-{self._ids}"
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[list[float], list[int], str | None]] = loop.create_future()
        record.prompt_tokens = len(ids)
        self._inbox.put(("add", rid, ids, req.output_tokens, loop, fut))
        try:
            times, out_ids, error = await fut
        except asyncio.CancelledError:  # timeout or shutdown: stop the work in the engine too
            self._inbox.put(("abort", rid))
            raise
        record.token_times_s.extend(times)
        record.output_tokens = len(out_ids)
        if error is not None:
            kind, _, message = error.partition(": ")
            raise RequestFailed(kind, message)
        if self.tokenizer is not None:
            record.output_text = self.tokenizer.decode(out_ids, skip_special_tokens=True)

    def _loop(self) -> None:
        from kvflight.types import Request, SamplingParams

        engine = self.engine
        active: dict[str, tuple[list[float], list[int], Any, Any]] = {}

        def resolve(rid: str, error: str | None) -> None:
            times, out_ids, loop, fut = active.pop(rid)
            result = (times, out_ids, error)

            def _set() -> None:
                if not fut.done():
                    fut.set_result(result)
            loop.call_soon_threadsafe(_set)

        while not self._stop.is_set():
            idle = not engine.has_unfinished_requests()
            messages = []
            try:
                messages.append(self._inbox.get(timeout=0.02) if idle else self._inbox.get_nowait())
                while True:
                    messages.append(self._inbox.get_nowait())
            except queue.Empty:
                pass
            for msg in messages:
                if msg[0] == "abort":
                    if msg[1] in active:
                        engine.abort_requests([msg[1]])
                        resolve(msg[1], "aborted: the request timed out or the run stopped")
                    continue
                _, rid, ids, max_tokens, loop, fut = msg
                active[rid] = ([], [], loop, fut)
                try:
                    params = SamplingParams(max_tokens=max_tokens, temperature=self.temperature,
                                            ignore_eos=self.ignore_eos)
                    engine.add_request(Request(request_id=rid, prompt_token_ids=list(ids), sampling_params=params))
                except Exception as exc:  # noqa: BLE001 - validation (ValueError) or anything else: fail this one
                    resolve(rid, f"rejected: {exc}")
            if not engine.has_unfinished_requests():
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # noqa: BLE001 - fail what is in flight, keep serving
                logger.exception("engine step failed")
                for rid in list(active):
                    engine.abort_requests([rid])
                    resolve(rid, f"engine error: {type(exc).__name__}: {exc}")
                continue
            now = time.perf_counter()
            for so in outputs:
                entry = active.get(so.request_id)
                if entry is None:
                    continue
                if so.new_token_ids:
                    entry[0].append(now)
                    entry[1].extend(so.new_token_ids)
                if so.finish_reason is not None:
                    resolve(so.request_id, None)

    async def aclose(self) -> None:
        if self.steps_in_caller:
            self._stop.set()  # run_in_this_thread() returns once the loop sees it
        elif self._thread is not None:
            self._stop.set()
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def run_in_this_thread(self, work: Callable[[], Any]) -> Any:
        """Step the engine in the calling (main) thread while `work` (the asyncio load generator) runs in a
        helper thread; returns what `work` returns. Torch's CPU ops run several times slower from a non-main
        thread (its OpenMP pool spins in the main thread), which made the engine backend slower than the server.
        """
        self.steps_in_caller = True
        self._stop.clear()
        result: dict[str, Any] = {}

        def target() -> None:
            try:
                result["value"] = work()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                result["error"] = exc
            finally:
                self._stop.set()

        worker = threading.Thread(target=target, name="kvflight-bench-load", daemon=True)
        worker.start()
        try:
            self._loop()
        finally:
            self._stop.set()
            worker.join()
        if "error" in result:
            raise result["error"]
        return result["value"]


def make_backend(settings: ServeSettings, engine_settings: dict[str, Any] | None = None) -> Backend:
    """The backend `settings.backend` names (the engine backend builds an Engine from `engine_settings`)."""
    if settings.backend == "openai-completions":
        return OpenAICompletionsBackend(settings)
    if settings.backend == "openai-chat":
        return OpenAIChatBackend(settings)
    if settings.backend == "triton":
        return TritonBackend(settings)
    backend = EngineBackend.from_settings(dict(engine_settings or {}))
    backend.temperature = settings.temperature
    backend.ignore_eos = settings.ignore_eos
    return backend


# ---- the load generator -------------------------------------------------------------------------------------------
class _Progress:
    """tqdm when installed, else a line every 10%; silent when disabled."""

    def __init__(self, total: int, enabled: bool, desc: str) -> None:
        self.total, self.enabled, self.desc, self.count = total, enabled, desc, 0
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)
            except ImportError:
                pass

    def update(self) -> None:
        self.count += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self.enabled and self.total and (self.count * 10 // self.total) != ((self.count - 1) * 10 // self.total):
            print(f"{self.desc}: {self.count}/{self.total}", file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def _send_one(backend: Backend, req: BenchRequest, timeout_s: float) -> RequestRecord:
    record = RequestRecord(start_time_s=time.perf_counter(), task_id=req.task_id,
                           expected_output_tokens=req.output_tokens)
    try:
        async with asyncio.timeout(timeout_s):
            await backend.send(req, record)
        if not record.token_times_s:
            record.fail("empty output", "the response carried no output text")
        else:
            record.success = True
    except RequestFailed as exc:
        record.fail(exc.kind, str(exc))
    except TimeoutError:
        record.fail("timeout", f"the request took longer than {timeout_s:g} s (--request-timeout)")
    except Exception as exc:  # noqa: BLE001 - a benchmark records every failure, never crashes on one
        record.fail(type(exc).__name__, f"{type(exc).__name__}: {exc}")
    record.end_time_s = time.perf_counter()
    return record


async def run_load(backend: Backend, requests: Sequence[BenchRequest], request_rate: float = math.inf,
                   burstiness: float = 1.0, max_concurrency: int | None = None, seed: int = 0,
                   request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, static_batch_size: int | None = None,
                   static_timeout_ms: float | None = None, progress: bool = False,
                   desc: str = "requests") -> tuple[list[RequestRecord], float]:
    """Send `requests` on the arrival schedule; returns (records in request order, duration in s from the first
    send to the last response). The backend must be started."""
    n = len(requests)
    offsets = arrival_offsets_s(n, request_rate, burstiness, seed)
    records: list[RequestRecord | None] = [None] * n
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = _Progress(n, progress, desc)

    async def one(i: int) -> None:
        if sem is not None:
            async with sem:
                records[i] = await _send_one(backend, requests[i], request_timeout_s)
        else:
            records[i] = await _send_one(backend, requests[i], request_timeout_s)
        bar.update()

    t0 = time.perf_counter()
    try:
        if static_batch_size is None:
            tasks = []
            for i, offset in enumerate(offsets):
                delay = t0 + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
        else:
            timeout_s = None if static_timeout_ms is None else static_timeout_ms / 1e3
            sched = StaticBatchScheduler(static_batch_size, timeout_s)
            arrived = asyncio.Event()

            async def producer() -> None:
                for i, offset in enumerate(offsets):
                    delay = t0 + offset - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    sched.add(i, time.perf_counter())
                    arrived.set()
                sched.close()
                arrived.set()

            prod = asyncio.create_task(producer())
            try:
                while not sched.done:
                    arrived.clear()
                    group = sched.next_group(time.perf_counter())
                    if group:
                        await asyncio.gather(*(one(i) for i in group))
                        continue
                    deadline = sched.deadline_s()
                    wait_s = None if deadline is None else max(0.0, deadline - time.perf_counter())
                    try:
                        await asyncio.wait_for(arrived.wait(), wait_s)
                    except TimeoutError:
                        pass
            finally:
                prod.cancel()
    finally:
        bar.close()
    duration_s = time.perf_counter() - t0
    return [r for r in records if r is not None], duration_s


def finalize_records(records: Sequence[RequestRecord], requests: Sequence[BenchRequest],
                     tokenizer: Any | None = None) -> None:
    """Fill token counts the server did not report (records and requests in the same order): prompt tokens from
    the request's ids (or the tokenizer), output tokens from the tokenizer, else one per chunk."""
    for rec, req in zip(records, requests):
        if rec.prompt_tokens == 0:
            if req.input_ids is not None:
                rec.prompt_tokens = len(req.input_ids)
            elif tokenizer is not None and req.prompt is not None:
                rec.prompt_tokens = len(tokenizer.encode(req.prompt))
        if rec.output_tokens == 0 and rec.token_times_s:
            if tokenizer is not None and rec.output_text:
                rec.output_tokens = max(len(tokenizer.encode(rec.output_text, add_special_tokens=False)), 1)
            else:
                rec.output_tokens = len(rec.token_times_s)


async def benchmark(backend: Backend, requests: Sequence[BenchRequest], settings: ServeSettings,
                    tokenizer: Any | None = None) -> tuple[list[BenchReport], list[list[RequestRecord]]]:
    """Warm up, then one run per request rate; returns a report and the records of each run."""
    reports: list[BenchReport] = []
    all_records: list[list[RequestRecord]] = []
    try:
        await backend.start()
        if settings.warm_up > 0 and requests:
            warm = [requests[i % len(requests)] for i in range(settings.warm_up)]
            warm_records, _ = await run_load(backend, warm, math.inf, max_concurrency=settings.max_concurrency,
                                             request_timeout_s=settings.request_timeout_s,
                                             progress=settings.progress, desc="warm-up")
            failed = sum(1 for r in warm_records if not r.success)
            if failed:
                logger.warning("%d of %d warm-up requests failed (first: %s)", failed, len(warm_records),
                               next(r.error for r in warm_records if not r.success))
        for rate in settings.request_rates:
            records, duration_s = await run_load(
                backend, requests, rate, settings.burstiness, settings.max_concurrency, settings.seed,
                settings.request_timeout_s, settings.static_batch_size, settings.static_timeout_ms,
                settings.progress, desc=f"rate {rate:g}")
            finalize_records(records, requests, tokenizer)
            labels: dict[str, Any] = {"backend": settings.backend, "request_rate": rate,
                                      "burstiness": settings.burstiness, "max_concurrency": settings.max_concurrency}
            if settings.static_batch_size is not None:
                labels["static_emulated_batch_size"] = settings.static_batch_size
                labels["static_emulated_timeout_ms"] = settings.static_timeout_ms
            reports.append(build_report(records, duration_s, settings.slo, labels))
            all_records.append(records)
    finally:
        await backend.aclose()
    return reports, all_records


# ---- output -------------------------------------------------------------------------------------------------------
def json_safe(value: Any) -> Any:
    """Non-finite floats become the strings 'inf' / '-inf' / 'nan' so the file stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def record_to_dict(rec: RequestRecord) -> dict[str, Any]:
    def ms(v: float | None) -> float | None:
        return None if v is None else v * 1e3

    return {"task_id": rec.task_id, "response_id": rec.response_id, "start_s": rec.start_time_s,
            "first_token_s": rec.token_times_s[0] if rec.token_times_s else None,
            "success": rec.success, "error_kind": rec.error_kind, "error": rec.error,
            "prompt_tokens": rec.prompt_tokens, "output_tokens": rec.output_tokens, "ttft_ms": ms(rec.ttft_s),
            "tpot_ms": ms(rec.tpot_s), "e2e_ms": ms(rec.e2e_s), "itl_ms": [g * 1e3 for g in rec.itls_s]}


def write_result_json(path: str, reports: Sequence[BenchReport], settings: ServeSettings, num_requests: int,
                      records: Sequence[Sequence[RequestRecord]] | None = None) -> None:
    """Every rate's report (and, with `records`, every request's numbers) in one JSON file."""
    cfg = asdict(settings)
    cfg.pop("api_key", None)
    cfg["slo"] = settings.slo.to_dict() if settings.slo else None
    runs = []
    for i, rep in enumerate(reports):
        run = rep.to_dict()
        if records is not None:
            run["requests"] = [record_to_dict(r) for r in records[i]]
        runs.append(run)
    doc = {"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "num_requests": num_requests, "settings": cfg, "runs": runs}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(json_safe(doc), fh, indent=2)
        fh.write("\n")


def plot_sweep(reports: Sequence[BenchReport], path: str) -> None:
    """P99 TTFT and P99 TPOT against output token throughput, one point per run (matplotlib, imported here)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [r.output_token_throughput_tps for r in reports]
    for ax, key, title in ((axes[0], "ttft_ms", "P99 TTFT (ms)"), (axes[1], "tpot_ms", "P99 TPOT (ms)")):
        ys = [getattr(r, key).p99 for r in reports]
        pts = [(x, y, r) for x, y, r in zip(xs, ys, reports) if y is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        for x, y, r in pts:
            rate = r.labels.get("request_rate")
            ax.annotate("inf" if rate is None or math.isinf(rate) else f"{rate:g}/s", (x, y),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("output token throughput (tok/s)")
        ax.set_ylabel(title)
        ax.grid(True, alpha=0.3)
    fig.suptitle("kvflight bench serve: latency vs throughput (labels: request rate)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- CLI ----------------------------------------------------------------------------------------------------------
def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """`kvflight bench serve ...` flags (the engine backend's settings too)."""
    parser.add_argument("--backend", choices=BACKENDS, default="openai-completions",
                        help="openai-completions (/v1/completions), openai-chat (/v1/chat/completions), triton "
                             "(/v2/models/{model}/generate_stream) or engine (in-process, no server)")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help=f"server address ({DEFAULT_BASE_URL})")
    parser.add_argument("--endpoint", default=None, help="override the request path (default: the backend's)")
    parser.add_argument("--http-client", choices=HTTP_CLIENTS, default="auto",
                        help="streamed requests: auto (a lean asyncio + httptools client for http://, httpx for "
                             "https://) or httpx (always)")
    parser.add_argument("--model", default=None,
                        help="HTTP: the served model name (default: asked from /v1/models); engine: the model "
                             "(HF directory, .gguf, preset; default: the embedded SmolLM2)")
    parser.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY)")
    parser.add_argument("--dataset", default=None, metavar="FILE",
                        help="TensorRT-LLM JSONL / legacy JSON, ShareGPT JSON or prompt JSONL (default: random "
                             "token-norm-dist requests from the generation flags)")
    add_generator_args(parser)
    parser.add_argument("--max-num-samples", "--max_num_samples", type=int, default=None, metavar="N",
                        help="use at most N requests of the dataset")
    load = parser.add_argument_group("load")
    load.add_argument("--request-rate", "--request_rate", default="inf", metavar="R[,R..]",
                      help="requests/s of the arrival process (inf or -1 = all at once); a list sweeps: 1,2,4,inf")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape of the interarrival times (1 = Poisson, < 1 burstier, > 1 steadier)")
    load.add_argument("--max-concurrency", type=int, default=None, metavar="N", help="most requests in flight")
    load.add_argument("--warm-up", "--warm_up", type=int, default=0, metavar="N",
                      help="send N requests first, not measured")
    load.add_argument("--static-emulated-batch-size", "--static_emulated_batch_size", type=int, default=None,
                      metavar="S",
                      help="emulate static batching: send groups of S; the next group waits for the previous one")
    load.add_argument("--static-emulated-timeout", "--static_emulated_timeout", type=float, default=None, metavar="MS",
                      help="a group also leaves when its first request has waited this long (ms)")
    load.add_argument("--request-timeout", "--timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S, metavar="S",
                      help=f"per-request limit in seconds ({DEFAULT_REQUEST_TIMEOUT_S:g})")
    load.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    load.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                      help="generate exactly the requested output lengths (default: on)")
    load.add_argument("--extra-body", default=None, metavar="JSON", help="extra JSON fields for every request body")
    out = parser.add_argument_group("results")
    out.add_argument("--slo", default=None, metavar="ttft=MS,tpot=MS,e2e=MS",
                     help="report goodput: requests/s meeting every given bound")
    out.add_argument("--result-json", default=None, metavar="FILE", help="write every rate's report as JSON")
    out.add_argument("--save-detailed", action="store_true", help="with --result-json: every request's numbers too")
    out.add_argument("--plot", default=None, metavar="FILE.png", help="plot P99 TTFT / TPOT against throughput")
    out.add_argument("--disable-progress", "--disable-tqdm", action="store_true", help="no progress bar")
    from kvflight.config import add_cli_args

    add_cli_args(parser, skip=("model", "tokenizer", "seed"))  # engine backend settings


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    extra: dict[str, Any] = {}
    if args.extra_body:
        try:
            extra = json.loads(args.extra_body)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--extra-body is not valid JSON ({exc}); e.g. --extra-body "
                             "'{\"top_p\": 0.9}'") from None
        if not isinstance(extra, dict):
            raise ValueError("--extra-body must be a JSON object, e.g. '{\"top_p\": 0.9}'")
    return ServeSettings(
        backend=args.backend, base_url=args.base_url, endpoint=args.endpoint, model=args.model,
        api_key=args.api_key or os.environ.get("OPENAI_API_KEY"),
        request_rates=parse_request_rates(args.request_rate), burstiness=args.burstiness,
        max_concurrency=args.max_concurrency, warm_up=args.warm_up, request_timeout_s=args.request_timeout,
        ignore_eos=args.ignore_eos, temperature=args.temperature, seed=args.dataset_seed,
        static_batch_size=args.static_emulated_batch_size, static_timeout_ms=args.static_emulated_timeout,
        slo=parse_slo(args.slo) if args.slo else None, progress=not args.disable_progress, extra_body=extra,
        http_client=args.http_client)


class _LazyTokenizer:
    """Loads the dataset tokenizer only when something needs it (decoding ids for text APIs, counting tokens)."""

    def __init__(self, args: argparse.Namespace, preloaded: Any | None = None) -> None:
        self.args, self.value, self.loaded = args, preloaded, preloaded is not None

    def get(self) -> Any:
        if not self.loaded:
            model = self.args.model if self.args.backend == "engine" else None
            self.value = get_tokenizer(self.args.tokenizer, model)
            self.loaded = True
        return self.value


def requests_from_args(args: argparse.Namespace, tok: _LazyTokenizer) -> list[BenchRequest]:
    """The dataset of a `bench serve` command line: --dataset FILE or the inline token-norm-dist generator."""
    limit = args.max_num_samples
    if args.dataset:
        from kvflight.bench.dataset import detect_format

        needs_tok = detect_format(args.dataset) == "sharegpt"
        requests = load_dataset(args.dataset, tok.get() if needs_tok else None, limit, args.dataset_seed,
                                args.output_len or int(args.output_mean or 128))
        if args.output_len is not None:
            for req in requests:
                req.output_tokens = args.output_len
    else:
        if args.input_mean is None and args.input_len is None:
            args.input_mean = 1024.0
        if args.output_mean is None and args.output_len is None:
            args.output_mean = 128.0
        if args.num_requests is None:
            args.num_requests = limit or 200
        kind = "token-norm-dist" if args.input_mean is not None and args.output_mean is not None else "fixed"
        requests, _ = generate_from_args(args, kind, None if args.vocab_size else tok.get())
    return requests[:limit] if limit else requests


def run_serve(args: argparse.Namespace) -> int:
    """Run the benchmark a `bench serve` command line describes; print the report(s); returns the exit code."""
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    backend: Backend
    try:
        if settings.backend == "engine":
            from kvflight.config import flat_from_args

            flat = flat_from_args(args)
            flat.pop("model", None)
            if args.model is not None:
                flat["model"] = args.model
            if args.tokenizer is not None:
                flat["tokenizer"] = args.tokenizer
            backend = make_backend(settings, flat)
            tok = _LazyTokenizer(args, getattr(backend, "tokenizer", None))
        else:
            backend = make_backend(settings)
            tok = _LazyTokenizer(args)
        requests = requests_from_args(args, tok)
        if settings.backend in ("openai-chat", "triton"):
            for req in requests:  # text APIs: decode random ids once, before the clock runs
                if req.prompt is None and req.input_ids is not None:
                    req.prompt = tok.get().decode(req.input_ids, skip_special_tokens=False)
    except (DatasetError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not requests:
        print("error: the dataset is empty", file=sys.stderr)
        return 2
    try:
        def run() -> tuple[list[BenchReport], list[list[RequestRecord]]]:
            with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
                return runner.run(benchmark(backend, requests, settings, tok.value if tok.loaded else None))

        reports, records = backend.run_in_this_thread(run) if isinstance(backend, EngineBackend) else run()
    except ValueError as exc:  # setup problems found in start() (e.g. no --model)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for rep in reports:
        print(format_report(rep))
    if len(reports) > 1:
        print(format_sweep(reports))
    status = 0
    if args.result_json:
        write_result_json(args.result_json, reports, settings, len(requests),
                          records if args.save_detailed else None)
        print(f"results written to {args.result_json}", file=sys.stderr)
    if args.plot:
        try:
            plot_sweep(reports, args.plot)
            print(f"plot written to {args.plot}", file=sys.stderr)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
    if all(r.num_completed == 0 for r in reports):
        reasons = {k: v for r in reports for k, v in r.failure_reasons.items()}
        print(f"error: no request succeeded ({reasons}); is the server at {settings.base_url} running and serving "
              f"model {settings.model!r}?", file=sys.stderr)
        status = 1
    return status
