"""The HTTP API (FastAPI): OpenAI /v1/completions, /v1/chat/completions, /v1/models, Triton-style /v2 generate and
generate_stream, /health, /metrics, /v1/admin/kv; admission control, auth, timeouts and the error shape."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvflight.server.async_client import AsyncEngineClient, EngineDeadError, RequestRejected
from kvflight.server.metrics import ServerMetrics
from kvflight.server.protocol import (ChatCompletionRequest, CompletionRequest, TritonGenerateRequest, error_body)
from kvflight.types import CompletionOutput, RequestOutput, SamplingParams, TokenLogprobs

TRITON_MODEL_ALIASES: tuple[str, ...] = ("ensemble", "tensorrt_llm", "tensorrt_llm_bls")
DISCONNECT_POLL_INTERVAL_S: float = 0.5
UNAUTHENTICATED_PATHS: tuple[str, ...] = ("/health", "/metrics", "/docs", "/openapi.json")


@dataclass
class ServerSettings:
    served_model_name: str
    api_key: str | None = None
    max_queue_len: int = 4096  # most requests in flight (admitted, not finished) before answering 503
    request_timeout_s: float | None = None  # None: no limit


class ApiError(Exception):
    """An error answered with the OpenAI error body."""

    def __init__(self, status_code: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | int | None = None) -> None:
        super().__init__(message)
        self.status_code, self.message, self.type, self.param, self.code = status_code, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status_code)


def _param_of(message: str) -> str | None:
    m = re.match(r"SamplingParams\.(\w+)=", message)
    return m.group(1) if m else None


def bad_request(exc: ValueError, default_param: str | None = None) -> ApiError:
    msg = str(exc)
    return ApiError(400, msg, param=_param_of(msg) or default_param)


class _State:
    def __init__(self, client: AsyncEngineClient, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.client = client
        self.settings = settings
        self.metrics = metrics
        self.draining = False
        self.in_flight = 0

    @contextlib.contextmanager
    def admit(self, check: bool = True) -> Any:
        """Count one request in flight, or refuse it with 503 (streams were checked before the response began)."""
        if check:
            self.check_admission()
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def check_admission(self) -> None:
        if self.draining:
            self.metrics.requests_rejected.inc()
            raise ApiError(503, "the server is shutting down and accepts no new requests; retry on another replica",
                           "service_unavailable")
        if not self.client.healthy:
            raise ApiError(503, f"the engine is not running: {self.client.dead_reason or 'not started'}",
                           "service_unavailable")
        if self.in_flight >= self.settings.max_queue_len:
            self.metrics.requests_rejected.inc()
            raise ApiError(503, f"the server is at capacity ({self.settings.max_queue_len} requests in flight, "
                                "--max-queue-len); retry later", "service_unavailable", code="queue_full")


# ---- helpers --------------------------------------------------------------------------------------------------
def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _TokenText:
    """Decoded text of single tokens (for logprobs), cached."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self.cache.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id]) if self.tokenizer is not None else f"<{token_id}>"
            self.cache[token_id] = s
        return s


def _completion_logprobs(lps: list[TokenLogprobs], tok: _TokenText, text_offset_start: int) -> dict[str, Any]:
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = text_offset_start
    for lp in lps:
        s = tok(lp.sampled.token_id)
        tokens.append(s)
        token_lps.append(lp.sampled.logprob)
        tops.append({tok(t.token_id): t.logprob for t in lp.top} if lp.top else None)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(lps: list[TokenLogprobs], tok: _TokenText) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        s = tok(token_id)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}

    return {"content": [{**entry(lp.sampled.token_id, lp.sampled.logprob),
                         "top_logprobs": [entry(t.token_id, t.logprob) for t in lp.top]} for lp in lps]}


async def _with_timeout(state: _State, outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """Re-yield outputs; past --request-timeout raise ApiError(504) (the inner generator aborts the request)."""
    timeout = state.settings.request_timeout_s
    deadline = None if timeout is None else time.monotonic() + timeout
    it = outputs.__aiter__()
    try:
        while True:
            try:
                if deadline is None:
                    out = await it.__anext__()
                else:
                    out = await asyncio.wait_for(it.__anext__(), max(0.0, deadline - time.monotonic()))
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise ApiError(504, f"the request took longer than --request-timeout={timeout:g} s and was aborted; "
                                    "lower max_tokens or raise the timeout", "timeout_error",
                               code="request_timeout") from None
            yield out
    finally:
        await it.aclose()  # type: ignore[attr-defined]


async def _until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work`, cancelling it (which aborts its requests) if the client goes away."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_INTERVAL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                raise ApiError(499, "the client disconnected", "invalid_request_error", code="client_closed")
    finally:
        if not task.done():
            task.cancel()


def _engine_error(exc: Exception) -> ApiError:
    if isinstance(exc, RequestRejected):
        return bad_request(exc)
    return ApiError(503, str(exc), "service_unavailable", code="engine_dead")


class _BearerAuth:
    """Pure ASGI middleware (BaseHTTPMiddleware would hide client disconnects from the endpoints)."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and not scope["path"].startswith(UNAUTHENTICATED_PATHS):
            given = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if given != self.expected:
                resp = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                                     "with the key given by --api-key", "authentication_error",
                                code="invalid_api_key").response()
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _JsonBody:
    """Pure ASGI middleware: every POST body is JSON, whatever Content-Type the client sent (`curl -d '{...}'`
    sends form-urlencoded, as Triton's own examples do)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope.get("method") == "POST":
            headers = [(k, v) for k, v in scope.get("headers") or () if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


# ---- the app --------------------------------------------------------------------------------------------------
def build_app(client: AsyncEngineClient, settings: ServerSettings, metrics: ServerMetrics) -> FastAPI:
    state = _State(client, settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await client.start_loops()
        yield
        state.draining = True
        await client.shutdown()

    app = FastAPI(title="kvflight", lifespan=lifespan)
    app.state.kvflight = state
    tokenizer = client.tokenizer
    tok_text = _TokenText(tokenizer)
    name = settings.served_model_name

    # ---- errors and auth ----------------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return ApiError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}; "
                                 "send a JSON object", code="json_invalid").response()
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        got = first.get("input")
        got_text = "" if got is None or isinstance(got, dict) else f" (got {json.dumps(got, default=str)[:100]})"
        where = f"{param}: " if param else "request body: "
        return ApiError(400, f"{where}{first.get('msg', 'invalid value')}{got_text}", param=param,
                        code=first.get("type")).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, f"{exc.detail}: see /docs for the routes",
                        code=exc.status_code).response()

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").response()

    app.add_middleware(_JsonBody)
    if settings.api_key:
        app.add_middleware(_BearerAuth, api_key=settings.api_key)

    def check_model(model: str | None) -> None:
        if model is not None and model != name:
            raise ApiError(400, f"model '{model}' is not served here; this server serves '{name}' (see /v1/models)",
                           param="model", code="model_not_found")

    def encode(prompt: str | list[int], param: str) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ApiError(400, "this model has no tokenizer: send token ids", param=param)
            return prompt, list(tokenizer.encode(prompt))
        return None, list(prompt)

    def validate(ids: list[int], params: SamplingParams, param: str) -> None:
        try:
            client.validate(ids, params)
        except ValueError as exc:
            raise bad_request(exc, param) from None

    def params_of(body: CompletionRequest | ChatCompletionRequest | TritonGenerateRequest) -> SamplingParams:
        try:
            return body.sampling_params()
        except ValueError as exc:
            raise bad_request(exc) from None

    def outputs(prompt: str | None, ids: list[int], params: SamplingParams,
                request_id: str) -> AsyncIterator[RequestOutput]:
        return _with_timeout(state, client.generate(request_id, prompt, ids, params))

    async def final_output(prompt: str | None, ids: list[int], params: SamplingParams,
                           request_id: str) -> RequestOutput:
        last: RequestOutput | None = None
        try:
            async for out in outputs(prompt, ids, params, request_id):
                last = out
        except (EngineDeadError, RequestRejected) as exc:
            raise _engine_error(exc) from None
        assert last is not None and last.finished
        return last

    # ---- info ---------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not client.healthy:
            return JSONResponse({"status": "engine dead", "reason": client.dead_reason}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prom_metrics() -> Response:
        metrics.update_engine_stats(client.stats)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        info = client.info
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(time.time()),
                                            "owned_by": "kvflight", "root": name,
                                            "max_model_len": info.max_seq_len if info else None}]}

    @app.get("/v1/admin/kv")
    async def admin_kv() -> dict[str, Any]:
        s = await client.get_stats()
        return {"total_blocks": s.num_blocks, "free_blocks": s.num_free_blocks, "used_blocks": s.num_used_blocks,
                "cached_blocks": s.num_cached_blocks, "usage": s.kv_usage, "num_running": s.num_running,
                "num_waiting": s.num_waiting, "in_flight": state.in_flight}

    # ---- /v1/completions ----------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        params = params_of(body)
        prompts: list[str | list[int]]
        p = body.prompt
        if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], int)):
            prompts = [p]  # type: ignore[list-item]
        else:
            prompts = list(p)  # type: ignore[arg-type]
        if not prompts:
            raise ApiError(400, "prompt: send a string, a list of token ids, or a list of those", param="prompt")
        encoded = [encode(x, "prompt") for x in prompts]
        for _, ids in encoded:
            validate(ids, params, "prompt")
        if body.stream and len(encoded) > 1:
            raise ApiError(400, "stream=true supports one prompt per request; send one request per prompt",
                           param="prompt")
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            state.check_admission()
            return StreamingResponse(_stream_completion(body, encoded[0], params, rid, created),
                                     media_type="text/event-stream")
        with state.admit():
            outs = await _until_disconnect(request, asyncio.gather(
                *(final_output(text, ids, params, f"{rid}-{i}") for i, (text, ids) in enumerate(encoded))))
        choices, n_prompt, n_completion, n_cached = [], 0, 0, 0
        for i, ((text, ids), out) in enumerate(zip(encoded, outs)):
            n_prompt += len(ids)
            n_cached += out.num_cached_tokens
            for c in out.outputs:
                n_completion += len(c.token_ids)
                prefix = (text or "") if body.echo else ""
                choices.append({"index": i * params.n + c.index, "text": prefix + c.text,
                                "logprobs": _completion_logprobs(c.logprobs, tok_text, len(prefix))
                                if c.logprobs is not None else None,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": name,
                             "choices": choices, "usage": _usage(n_prompt, n_completion, n_cached)})

    async def _stream_openai(obj: str, body: CompletionRequest | ChatCompletionRequest, text: str | None,
                             ids: list[int], params: SamplingParams, rid: str, created: int,
                             first_choices: list[dict[str, Any]],
                             make_choice: Callable[[Any, str, Any], dict[str, Any]]) -> AsyncIterator[str]:
        """SSE chunks of one streamed OpenAI request (completions or chat): `make_choice(completion, delta,
        logprobs)` shapes each choice; errors become an error event; usage and [DONE] close the stream."""
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
            c: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": name, "choices": choices}
            if include_usage:
                c["usage"] = None
            return c

        with state.admit(check=False):
            if first_choices:
                yield _sse(chunk(first_choices))
            sent_text = [""] * params.n
            sent_lps = [0] * params.n
            done = [False] * params.n
            last: RequestOutput | None = None
            try:
                async for out in outputs(text, ids, params, rid):
                    last = out
                    choices = []
                    for c in out.outputs:
                        choice = _delta(c, sent_text, sent_lps, done)
                        if choice is None:
                            continue
                        delta, lps = choice
                        choices.append({**make_choice(c, delta, lps),
                                        "finish_reason": c.finish_reason if done[c.index] else None})
                    if choices:
                        yield _sse(chunk(choices))
            except ApiError as exc:
                yield _sse(error_body(exc.message, exc.type, exc.param, exc.code))
            except (EngineDeadError, RequestRejected) as exc:
                e = _engine_error(exc)
                yield _sse(error_body(e.message, e.type, e.param, e.code))
            if include_usage and last is not None:
                yield _sse({"id": rid, "object": obj, "created": created, "model": name, "choices": [],
                            "usage": _usage(len(ids), sum(len(c.token_ids) for c in last.outputs),
                                            last.num_cached_tokens)})
            yield "data: [DONE]\n\n"

    def _stream_completion(body: CompletionRequest, encoded: tuple[str | None, list[int]],
                           params: SamplingParams, rid: str, created: int) -> AsyncIterator[str]:
        text, ids = encoded
        offsets = [0] * params.n  # text offset of each choice's next logprob token

        def make_choice(c: Any, delta: str, lps: Any) -> dict[str, Any]:
            lp_obj = None
            if lps is not None:
                lp_obj = _completion_logprobs(lps, tok_text, offsets[c.index])
                offsets[c.index] += sum(len(s) for s in lp_obj["tokens"])
            return {"index": c.index, "text": delta, "logprobs": lp_obj}

        echo = [{"index": i, "text": text, "logprobs": None, "finish_reason": None}
                for i in range(params.n)] if body.echo and text else []
        return _stream_openai("text_completion", body, text, ids, params, rid, created, echo, make_choice)

    # ---- /v1/chat/completions -----------------------------------------------------------------------------
    def chat_prompt(body: ChatCompletionRequest) -> tuple[str, list[int]]:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
        messages = []
        for m in body.messages:
            content = m.content
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") != "text":
                        raise ApiError(400, f"messages: content part type {part.get('type')!r} is not supported "
                                            "(text only)", param="messages")
                    parts.append(str(part.get("text", "")))
                content = "".join(parts)
            messages.append({"role": m.role, "content": content or ""})
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=body.add_generation_prompt,
                                                 **(body.chat_template_kwargs or {}))
        except Exception as exc:
            raise ApiError(400, f"messages: the chat template failed: {exc}", param="messages") from None
        return text, list(tokenizer.encode(text, add_special_tokens=False))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        params = params_of(body)
        text, ids = chat_prompt(body)
        validate(ids, params, "messages")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            state.check_admission()
            return StreamingResponse(_stream_chat(body, text, ids, params, rid, created),
                                     media_type="text/event-stream")
        with state.admit():
            out = await _until_disconnect(request, final_output(text, ids, params, rid))
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": _chat_logprobs(c.logprobs, tok_text) if c.logprobs is not None else None,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in out.outputs]
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": name,
                             "choices": choices, "usage": _usage(len(ids), sum(len(c.token_ids) for c in out.outputs),
                                                                 out.num_cached_tokens)})

    def _stream_chat(body: ChatCompletionRequest, text: str, ids: list[int], params: SamplingParams,
                     rid: str, created: int) -> AsyncIterator[str]:
        def make_choice(c: Any, delta: str, lps: Any) -> dict[str, Any]:
            return {"index": c.index, "delta": {"content": delta} if delta else {},
                    "logprobs": _chat_logprobs(lps, tok_text) if lps is not None else None}

        role = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(params.n)]
        return _stream_openai("chat.completion.chunk", body, text, ids, params, rid, created, role, make_choice)

    # ---- Triton-style /v2 ---------------------------------------------------------------------------------
    def triton_model(model_name: str) -> None:
        if model_name != name and model_name not in TRITON_MODEL_ALIASES:
            raise ApiError(400, f"unknown model '{model_name}': this server serves '{name}' (also reachable as "
                                f"{', '.join(TRITON_MODEL_ALIASES)})", param="model_name", code="model_not_found")

    def triton_prepare(body: TritonGenerateRequest) -> tuple[str, list[int], SamplingParams]:
        params = params_of(body)
        try:
            text = body.prompt_text()
        except ValueError as exc:
            raise bad_request(exc, "text_input") from None
        _, ids = encode(text, "text_input")
        validate(ids, params, "text_input")
        return text, ids, params

    async def _stream_triton(model_name: str, text: str, ids: list[int], params: SamplingParams,
                             rid: str) -> AsyncIterator[str]:
        with state.admit(check=False):
            sent = [""]
            sent_lps = [0]
            done = [False]
            try:
                async for out in outputs(text, ids, params, rid):
                    c = out.outputs[0]
                    choice = _delta(c, sent, sent_lps, done)
                    if choice is None:
                        continue
                    event: dict[str, Any] = {"model_name": model_name, "model_version": "1",
                                             "text_output": choice[0], "output_token_count": len(c.token_ids)}
                    if done[0]:
                        event["finish_reason"] = c.finish_reason
                    yield _sse(event)
            except ApiError as exc:
                yield _sse(error_body(exc.message, exc.type, exc.param, exc.code))
            except (EngineDeadError, RequestRejected) as exc:
                e = _engine_error(exc)
                yield _sse(error_body(e.message, e.type, e.param, e.code))

    @app.post("/v2/models/{model_name}/generate")
    async def triton_generate(model_name: str, body: TritonGenerateRequest, request: Request) -> Response:
        triton_model(model_name)
        text, ids, params = triton_prepare(body)
        rid = f"v2-{uuid.uuid4().hex}"
        if body.stream:
            state.check_admission()
            return StreamingResponse(_stream_triton(model_name, text, ids, params, rid),
                                     media_type="text/event-stream")
        with state.admit():
            out = await _until_disconnect(request, final_output(text, ids, params, rid))
        c = out.outputs[0]
        return JSONResponse({"model_name": model_name, "model_version": "1", "text_output": c.text,
                             "finish_reason": c.finish_reason, "output_token_count": len(c.token_ids),
                             "prompt_token_count": len(ids), "cached_token_count": out.num_cached_tokens})

    @app.post("/v2/models/{model_name}/generate_stream")
    async def triton_generate_stream(model_name: str, body: TritonGenerateRequest) -> Response:
        triton_model(model_name)
        text, ids, params = triton_prepare(body)
        state.check_admission()
        return StreamingResponse(_stream_triton(model_name, text, ids, params, f"v2-{uuid.uuid4().hex}"),
                                 media_type="text/event-stream")

    return app


def _delta(c: CompletionOutput, sent_text: list[str], sent_lps: list[int],
           done: list[bool]) -> tuple[str, list[TokenLogprobs] | None] | None:
    """The new text (and logprobs) of one completion since the last chunk; None if nothing to send.

    c.text is cumulative and never ends in a broken character or a possible stop-string prefix, so the delta is a
    plain suffix.
    """
    i = c.index
    if done[i]:
        return None
    prev = sent_text[i]
    delta = c.text[len(prev):] if c.text.startswith(prev) else ""
    lps = None
    if c.logprobs is not None:
        lps = c.logprobs[sent_lps[i]:]
        sent_lps[i] = len(c.logprobs)
    finished = c.finish_reason is not None
    if not delta and not finished and not lps:
        return None
    sent_text[i] = prev + delta
    done[i] = finished
    return delta, lps
