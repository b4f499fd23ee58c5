"""`kvflight serve` as a user runs it: a real server subprocess on the embedded SmolLM2 GGUF, driven by the official
openai client and plain httpx (OpenAI API, Triton-style /v2, errors, streaming, load, disconnects, SIGTERM drain)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Iterator

import httpx
import pytest

pytestmark = pytest.mark.slow

SERVER_FLAGS = ["--device", "cpu", "--dtype", "float32", "--max-seq-len", "1024", "--kv-cache-bytes", "256MiB"]
STARTUP_TIMEOUT_S = 240.0
MODEL = "SmolLM2-135M-Instruct"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *extra: str, env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = f"/tmp/kvflight-test-server-{self.port}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "kvflight.server.cli", "serve", *SERVER_FLAGS,
                                      "--host", "127.0.0.1", "--port", str(self.port), *extra],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not healthy after {STARTUP_TIMEOUT_S} s:\n{self.logs()}")

    def logs(self) -> str:
        self.log.flush()
        with open(self.log_path) as fh:
            return fh.read()[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    srv = Server("--max-queue-len", "64")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(client: Any, content: str, **kw: Any) -> Any:
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          temperature=0, **kw)


def _chat_streamed(client: Any, content: str, **kw: Any) -> tuple[str, list[Any]]:
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                                 temperature=0, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


# ---- OpenAI API ---------------------------------------------------------------------------------------------------
def test_models_and_health(server: Server, client: Any) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    r = httpx.get(f"{server.url}/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["message"].startswith("Not Found")


def test_chat_streamed_equals_non_streamed(client: Any) -> None:
    full = _chat(client, "What is the capital of France?", max_tokens=24)
    text = full.choices[0].message.content
    assert "Paris" in text and full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.completion_tokens > 0 and full.usage.total_tokens == full.usage.prompt_tokens + \
        full.usage.completion_tokens
    streamed, chunks = _chat_streamed(client, "What is the capital of France?", max_tokens=24,
                                      stream_options={"include_usage": True})
    assert streamed == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason


def test_chat_max_completion_tokens_and_logprobs(client: Any) -> None:
    out = _chat(client, "Count from one to twenty.", max_completion_tokens=5, logprobs=True, top_logprobs=3)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-4  # greedy: sampled is the top one


def test_completions_n_seed(client: Any) -> None:
    kw: dict[str, Any] = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, n=2, seed=1234, temperature=1.0)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same samples
    assert 2 <= a.usage.completion_tokens <= 16


def test_completions_stop_and_logprobs(client: Any) -> None:
    base = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
    text = base.choices[0].text
    assert "." in text, text
    stopped = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12,
                                        temperature=0, stop=["."])
    assert stopped.choices[0].text == text[: text.index(".")]
    assert stopped.choices[0].finish_reason == "stop"
    lp = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0,
                                   logprobs=2)
    logprobs = lp.choices[0].logprobs
    assert len(logprobs.tokens) == 4 == lp.usage.completion_tokens
    assert "".join(logprobs.tokens) == lp.choices[0].text
    assert all(len(t) == 2 for t in logprobs.top_logprobs)


def test_all_sampling_fields_accepted(client: Any) -> None:
    out = client.completions.create(
        model=MODEL, prompt=[504, 3575, 282, 4649, 314], max_tokens=6, temperature=0.7, top_p=0.9, seed=5,
        presence_penalty=0.5, frequency_penalty=0.5,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 6, "ignore_eos": True,
                    "stop_token_ids": [2]})
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == 6
    assert out.choices[0].finish_reason == "length"


def test_completions_stream_stop_string(client: Any) -> None:
    """Streamed text never leaks a stop string (held back while it could still be one)."""
    kw: dict[str, Any] = dict(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0,
                              stop=[".\n", "answer"])
    full = client.completions.create(**kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
    assert streamed == full and "answer" not in full


def test_prefix_cache_reports_cached_tokens(client: Any) -> None:
    prompt = "Here is a long story about a lighthouse keeper who lived alone by the sea. " * 6
    first = client.completions.create(model=MODEL, prompt=prompt + "First:", max_tokens=2, temperature=0)
    second = client.completions.create(model=MODEL, prompt=prompt + "Second:", max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens > 64
    assert second.usage.prompt_tokens_details.cached_tokens > 0


def test_unicode_streamed_equals_non_streamed(client: Any) -> None:
    prompt = "请用中文回答，并加上表情符号 😀🎉：你好吗？"
    full = _chat(client, prompt, max_tokens=24).choices[0].message.content
    streamed, chunks = _chat_streamed(client, prompt, max_tokens=24)
    assert streamed == full
    for c in chunks:
        if c.choices and c.choices[0].delta.content:
            assert "\ufffd" not in c.choices[0].delta.content


# ---- Triton-style /v2 ---------------------------------------------------------------------------------------------
def test_v2_generate_and_stream(server: Server) -> None:
    body = {"text_input": "The capital of France is", "max_tokens": 8, "temperature": 0.0, "pad_id": 2,
            "stop_words": ["answer"]}
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model_name"] == MODEL and "Paris" in out["text_output"]
    pieces = []
    with httpx.stream("POST", f"{server.url}/v2/models/ensemble/generate_stream", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                assert "error" not in event, event
                pieces.append(event["text_output"])
    assert "".join(pieces) == out["text_output"]
    # as Triton's examples send it: `curl -d '{...}'`, form-urlencoded content type
    r = httpx.post(f"{server.url}/v2/models/ensemble/generate", content=json.dumps(body).encode(),
                   headers={"content-type": "application/x-www-form-urlencoded"}, timeout=120)
    assert r.status_code == 200 and r.json()["text_output"] == out["text_output"], r.text
    r = httpx.post(f"{server.url}/v2/models/nope/generate", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model_name"


# ---- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path,content,param,needle", [
    ("/v1/completions", b"{not json", None, "malformed JSON"),
    ("/v1/completions", {"model": "gpt-9", "prompt": "hi"}, "model", "gpt-9"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature", "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p", "top_p"),
    ("/v1/completions", {"prompt": "hello " * 1100}, "prompt", "max_input_len"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "lots"}, "max_tokens", "max_tokens"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages", "messages"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 5000}, "prompt", "max_seq_len"),
    ("/v2/models/ensemble/generate", {"text_input": "hi", "top_k": -3}, "top_k", "top_k"),
])
def test_bad_requests_are_400(server: Server, path: str, content: Any, param: str | None, needle: str) -> None:
    if isinstance(content, bytes):
        r = httpx.post(server.url + path, content=content, headers={"content-type": "application/json"}, timeout=30)
    else:
        r = httpx.post(server.url + path, json=content, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert needle in err["message"]
    assert httpx.get(f"{server.url}/health").status_code == 200  # the engine is still alive


def test_openai_client_sees_bad_request(client: Any) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hi", temperature=-1)
    assert "temperature" in str(info.value)


# ---- load, disconnects, metrics -----------------------------------------------------------------------------------
async def _stream_completion(http: httpx.AsyncClient, prompt: str, max_tokens: int, model: str = MODEL,
                             headers: dict[str, str] | None = None) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    text = []
    async with http.stream("POST", "/v1/completions", json=body, headers=headers) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text.extend(c["text"] for c in chunk["choices"])
    return "".join(text)


def test_concurrent_streams_match_one_by_one(server: Server) -> None:
    prompts = [f"Question {i}: what is {i} plus {i + 1}? Answer:" for i in range(8)]
    max_tokens = 6

    async def run() -> tuple[list[str], list[str]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=180,
                                     limits=httpx.Limits(max_connections=64)) as http:
            alone = [await _stream_completion(http, p, max_tokens) for p in prompts]
            together = await asyncio.gather(*(_stream_completion(http, prompts[i % 8], max_tokens)
                                              for i in range(32)))
            return alone, list(together)

    alone, together = asyncio.run(run())
    assert together == [alone[i % 8] for i in range(32)]


def _kv(server: Server) -> dict[str, Any]:
    return httpx.get(f"{server.url}/v1/admin/kv", timeout=10).json()


def _wait_blocks_released(server: Server, timeout_s: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    kv = _kv(server)
    while time.monotonic() < deadline:
        kv = _kv(server)
        if kv["used_blocks"] == 0 and kv["num_running"] == 0 and kv["num_waiting"] == 0:
            return kv
        time.sleep(0.2)
    raise AssertionError(f"KV blocks still held: {kv}")


def test_disconnect_mid_stream_frees_blocks(server: Server) -> None:
    body = {"model": MODEL, "prompt": "Write a very long essay about the ocean." * 4, "max_tokens": 400,
            "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            n = 0
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    n += 1
                if n >= 3:
                    break
    kv = _wait_blocks_released(server)
    assert kv["free_blocks"] == kv["total_blocks"] and kv["in_flight"] == 0


def test_metrics_exposed(server: Server) -> None:
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("kvflight:time_to_first_token_seconds", "kvflight:time_per_output_token_seconds",
                 "kvflight:inter_token_latency_seconds", "kvflight:e2e_request_latency_seconds",
                 "kvflight:request_queue_time_seconds", "kvflight:num_requests_running",
                 "kvflight:num_requests_waiting", "kvflight:kv_cache_usage_perc", "kvflight:prefix_cache_hit_rate",
                 "kvflight:num_preemptions_total", "kvflight:prompt_tokens_total",
                 "kvflight:generation_tokens_total"):
        assert name in text, name
    gen = [line for line in text.splitlines() if line.startswith("kvflight:generation_tokens_total")]
    assert float(gen[0].split()[-1]) > 0


# ---- a second server: auth, asynchronous scheduling and SIGTERM drain -----------------------------------------------
@pytest.fixture(scope="module")
def keyed_server() -> Iterator[Server]:
    # asynchronous scheduling (the GPU default; off on CPU unless asked): the engine core keeps a step in flight
    trace = f"/tmp/kvflight-test-trace-{os.getpid()}.jsonl"
    if os.path.exists(trace):
        os.remove(trace)
    srv = Server("--api-key", "sekret", "--served-model-name", "smol", "--async-scheduling", "on",
                 env={"KVFLIGHT_REQUEST_TRACE": trace})
    srv.trace_path = trace  # type: ignore[attr-defined]
    yield srv
    srv.stop()


def test_async_scheduling_server_matches_and_frees_blocks(server: Server, keyed_server: Server) -> None:
    headers = {"Authorization": "Bearer sekret"}
    prompts = [f"Question {i}: name {i + 2} colours. Answer:" for i in range(6)]
    max_tokens = 8

    async def run() -> tuple[list[str], list[str]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=180) as sync_http, \
                httpx.AsyncClient(base_url=keyed_server.url, timeout=180,
                                  limits=httpx.Limits(max_connections=64)) as async_http:
            alone = [await _stream_completion(sync_http, p, max_tokens) for p in prompts]
            together = await asyncio.gather(*(_stream_completion(async_http, prompts[i % 6], max_tokens, "smol",
                                                                 headers) for i in range(18)))
            return alone, list(together)

    alone, together = asyncio.run(run())
    assert together == [alone[i % 6] for i in range(18)]
    # a client gone mid-stream: its request is aborted while its next step may be in flight; nothing stays held
    body = {"model": "smol", "prompt": "Write a very long essay about rivers." * 4, "max_tokens": 300,
            "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=keyed_server.url, timeout=60, headers=headers) as http:
        with http.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            for n, line in enumerate(ln for ln in resp.iter_lines() if ln.startswith("data: ")):
                if n >= 3:
                    break
        deadline = time.monotonic() + 30
        kv = http.get("/v1/admin/kv").json()
        while time.monotonic() < deadline and not (kv["used_blocks"] == 0 and kv["num_running"] == 0):
            time.sleep(0.2)
            kv = http.get("/v1/admin/kv").json()
    assert kv["used_blocks"] == 0 and kv["num_running"] == 0 and kv["free_blocks"] == kv["total_blocks"], kv


def test_request_trace_orders_each_first_token(keyed_server: Server) -> None:
    # KVFLIGHT_REQUEST_TRACE: one line per request at its first token, the stages in time order from its arrival
    headers = {"Authorization": "Bearer sekret"}
    before = open(keyed_server.trace_path).read().count("\n") if os.path.exists(keyed_server.trace_path) else 0
    for i in range(3):
        r = httpx.post(f"{keyed_server.url}/v1/completions", headers=headers, timeout=60,
                       json={"model": "smol", "prompt": [1, 2, 3, 4 + i], "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200, r.text
    lines = open(keyed_server.trace_path).read().splitlines()[before:]
    assert len(lines) == 3, lines
    for line in lines:
        t = json.loads(line)
        assert t["prompt_tokens"] == 4 and t["request_id"].startswith("cmpl-") and t["arrival_s"] > 0
        assert 0 <= t["scheduled"] <= t["engine_sent"] <= t["api_received"] <= t["api_handled"], t


def test_api_key(keyed_server: Server) -> None:
    body = {"model": "smol", "prompt": "hi", "max_tokens": 2}
    r = httpx.post(f"{keyed_server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(f"{keyed_server.url}/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    r = httpx.post(f"{keyed_server.url}/v1/completions", json=body, headers={"Authorization": "Bearer sekret"},
                   timeout=60)
    assert r.status_code == 200 and r.json()["model"] == "smol"
    assert httpx.get(f"{keyed_server.url}/health").status_code == 200  # health needs no key


def test_sigterm_drains_in_flight(keyed_server: Server) -> None:
    headers = {"Authorization": "Bearer sekret"}
    max_tokens = 48

    async def one(http: httpx.AsyncClient, i: int, stream: bool) -> dict[str, Any]:
        body = {"model": "smol", "prompt": f"Tell me a story number {i}.", "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": stream}
        if not stream:
            r = await http.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return {"finish": r.json()["choices"][0]["finish_reason"],
                    "tokens": r.json()["usage"]["completion_tokens"]}
        finish, done = None, False
        async with http.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    finish = chunk["choices"][0]["finish_reason"] or finish
        return {"finish": finish, "done": done}

    async def run() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=keyed_server.url, headers=headers, timeout=120) as http:
            tasks = [asyncio.create_task(one(http, i, stream=i % 2 == 0)) for i in range(4)]
            # wait until the engine has them, then SIGTERM
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                kv = (await http.get("/v1/admin/kv")).json()
                if kv["in_flight"] >= 4:
                    break
                await asyncio.sleep(0.05)
            keyed_server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            try:  # a new request is refused (listening socket closed, or 503 while draining)
                async with httpx.AsyncClient(base_url=keyed_server.url, headers=headers, timeout=10) as fresh:
                    late = await fresh.post("/v1/completions", json={"model": "smol", "prompt": "hi"})
                assert late.status_code == 503, late.text
            except httpx.ConnectError:
                pass
            results = await asyncio.gather(*tasks)
            return results

    results = asyncio.run(run())
    for r in results:
        assert r["finish"] == "length", results
        if "tokens" in r:
            assert r["tokens"] == max_tokens
        else:
            assert r["done"]
    assert keyed_server.proc.wait(60) == 0, keyed_server.logs()


# ---- a third server: a bounded queue, request timeouts, a dying engine core --------------------------------------
@pytest.fixture(scope="module")
def tight_server() -> Iterator[Server]:
    srv = Server("--max-queue-len", "2", "--request-timeout", "3")
    yield srv
    srv.stop()


def _long_body(stream: bool, max_tokens: int = 900) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Tell me everything about the history of Rome.", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream}


async def _read_events(http: httpx.AsyncClient, body: dict[str, Any]) -> list[Any]:
    events: list[Any] = []
    async with http.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                events.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
    return events


def test_queue_full_and_request_timeout(tight_server: Server) -> None:
    async def run() -> tuple[list[list[Any]], httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=tight_server.url, timeout=60) as http:
            streams = [asyncio.create_task(_read_events(http, _long_body(True))) for _ in range(2)]
            deadline = time.monotonic() + 20
            while (await http.get("/v1/admin/kv")).json()["in_flight"] < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            refused = await http.post("/v1/completions", json=_long_body(False, 4))
            events = await asyncio.gather(*streams)
            timed_out = await http.post("/v1/completions", json=_long_body(False))
            return list(events), refused, timed_out

    events, refused, timed_out = asyncio.run(run())
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "queue_full"
    assert "--max-queue-len" in refused.json()["error"]["message"]
    for ev in events:  # each stream: some text, then an error event naming the timeout, then [DONE]
        assert ev[-1] == "[DONE]" and ev[-2]["error"]["code"] == "request_timeout", ev[-3:]
    assert timed_out.status_code == 504 and "--request-timeout" in timed_out.json()["error"]["message"]
    _wait_blocks_released(tight_server)


def test_non_streamed_disconnect_frees_blocks(server: Server) -> None:
    """No --request-timeout here: only noticing the disconnect can stop this 900-token request early."""
    t0 = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=_long_body(False), timeout=1.0)
    kv = _wait_blocks_released(server, timeout_s=10)
    assert kv["in_flight"] == 0 and time.monotonic() - t0 < 8


def _engine_core_pid(server_pid: int) -> int:
    with open(f"/proc/{server_pid}/task/{server_pid}/children") as fh:
        children = [int(p) for p in fh.read().split()]
    for pid in children:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            if b"spawn_main" in fh.read():
                return pid
    raise AssertionError(f"no engine core among the children {children}")


def test_engine_death_fails_pending_and_health(tight_server: Server) -> None:
    async def run() -> list[Any]:
        async with httpx.AsyncClient(base_url=tight_server.url, timeout=60) as http:
            stream = asyncio.create_task(_read_events(http, _long_body(True, 60)))
            deadline = time.monotonic() + 20
            while (await http.get("/v1/admin/kv")).json()["in_flight"] < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            os.kill(_engine_core_pid(tight_server.proc.pid), signal.SIGKILL)
            return await stream

    events = asyncio.run(run())
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "engine_dead", events[-3:]
    r = httpx.get(f"{tight_server.url}/health")
    assert r.status_code == 503
    r = httpx.post(f"{tight_server.url}/v1/completions", json=_long_body(False, 4), timeout=10)
    assert r.status_code == 503 and "engine" in r.json()["error"]["message"]
    assert tight_server.proc.poll() is None  # the API process stays up to answer


def test_bad_config_exits_2_with_message() -> None:
    res = subprocess.run([sys.executable, "-m", "kvflight.server.cli", "serve", "--device", "cpu",
                          "--max-seq-len", "100000", "--port", str(_free_port())],
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 2, res.stderr
    assert "max_seq_len=100000" in res.stderr and "Traceback" not in res.stderr


# ---- the serving benchmark against this server ------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["openai-completions", "openai-chat", "triton"])
def test_bench_serve_against_kvflight(server: Server, backend: str, tmp_path) -> None:
    """`kvflight bench serve` as a user runs it, against the real server: every request completes and the
    report's token counts are the exact ones the server reported."""
    result = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "kvflight.server.cli", "bench", "serve", "--backend", backend,
           "--base-url", server.url, "--num-requests", "6", "--input-len", "24", "--output-len", "6",
           "--request-rate", "inf",
           "--max-concurrency", "3", "--disable-progress", "--result-json", str(result),
           "--plot", str(tmp_path / "plot.png")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    run = json.loads(result.read_text())["runs"][0]
    assert (run["backend"], run["completed"], run["failed"]) == (backend, 6, 0), run
    assert run["total_output_tokens"] == 6 * 6  # ignore_eos: every request produced exactly --output-len tokens
    assert run["mean_ttft_ms"] > 0 and run["mean_tpot_ms"] > 0 and run["p99_e2e_ms"] >= run["p99_ttft_ms"]
    assert "Successful requests:" in res.stdout
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
