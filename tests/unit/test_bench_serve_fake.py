"""The serving load generator against a deliberately slow and flaky fake server (uvicorn on 127.0.0.1, a free
port, in a thread): completions and failures counted with reasons, TTFT / ITL ordered as the fake's sleeps, the
run always finishes; the chat and Triton backends; the concurrency cap; emulated static batching (the group
scheduler on a fake clock, and end to end); the arrival process; the CLI entry point."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import socket
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np
import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402

from kvflight.bench.dataset import BenchRequest  # noqa: E402
from kvflight.bench.serve import (Backend, ServeSettings, StaticBatchScheduler, add_serve_args,  # noqa: E402
                                  arrival_offsets_s, benchmark, iter_lines, iter_sse_events, make_backend,
                                  parse_request_rates, plot_sweep, run_load, run_serve)
from kvflight.bench.metrics import RequestRecord  # noqa: E402

TTFT_S = 0.2  # the fake's delay before the first token
ITL_S = 0.04  # and between tokens
HANG_S = 4.0  # "hang" requests wait this long; the client gives up after CLIENT_TIMEOUT_S
CLIENT_TIMEOUT_S = 1.0


class Stats:
    """What the fake server saw (touched only from the server's event loop; read by the tests)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0
        self.bodies: list[dict[str, Any]] = []

    def reset(self) -> None:
        self.__init__()


STATS = Stats()


def _sse(obj: Any) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def _mode(prompt: Any) -> str:
    text = prompt if isinstance(prompt, str) else ""
    for mode in ("fail500", "broken", "hang", "nodone", "badjson", "errorevent"):
        if mode in text:
            return mode
    return "normal"


def make_app() -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    async def tracked(gen: AsyncIterator[str]) -> AsyncIterator[str]:
        STATS.in_flight += 1
        STATS.peak = max(STATS.peak, STATS.in_flight)
        try:
            async for item in gen:
                yield item
        finally:
            STATS.in_flight -= 1

    def stream(mode: str, n: int, chunk: Any, usage: dict | None, done: bool, first: list[str] = ()) -> Any:
        async def gen() -> AsyncIterator[str]:
            for item in first:  # sent at once (e.g. a role-only chat chunk)
                yield item
            await asyncio.sleep(HANG_S if mode == "hang" else TTFT_S)
            if mode == "badjson":
                yield "data: {not json\n\n"
                return
            if mode == "errorevent":
                yield _sse({"error": {"message": "model exploded", "code": 500}})
                return
            for i in range(n):
                if i:
                    await asyncio.sleep(ITL_S)
                yield _sse(chunk(i))
                if mode == "broken" and i == 1:
                    raise RuntimeError("fake server: connection dropped on purpose")
            if usage is not None:
                yield _sse({"choices": [], "usage": usage})
            if done and mode != "nodone":
                yield _sse("[DONE]")
        return StreamingResponse(tracked(gen()), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        STATS.bodies.append(body)
        mode = _mode(body.get("prompt"))
        if mode == "fail500":
            return JSONResponse({"error": {"message": "fake failure"}}, status_code=500)
        n = int(body["max_tokens"])
        prompt = body["prompt"]
        n_prompt = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n} \
            if (body.get("stream_options") or {}).get("include_usage") else None
        return stream(mode, n, lambda i: {"id": f"cmpl-{n_prompt}", "choices": [{"index": 0, "text": f" t{i}",
                                                                                   "finish_reason": None}]},
                      usage, done=True)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        STATS.bodies.append(body)
        mode = _mode(body["messages"][-1]["content"])
        if mode == "fail500":
            return JSONResponse({"error": {"message": "fake failure"}}, status_code=500)
        n = int(body["max_tokens"])
        role = _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3}
        return stream(mode, n, lambda i: {"choices": [{"index": 0, "delta": {"content": f" c{i}"}}]}, usage,
                      done=True, first=[role])

    @app.post("/v2/models/{name}/generate_stream")
    async def triton(name: str, request: Request) -> Any:
        body = await request.json()
        STATS.bodies.append({**body, "_model_in_path": name})
        mode = _mode(body["text_input"])
        if mode == "fail500":
            return JSONResponse({"error": "fake failure"}, status_code=500)
        n = int(body["max_tokens"])
        return stream(mode, n, lambda i: {"model_name": name, "text_output": f" x{i}"}, None, done=False)

    return app


@pytest.fixture(scope="module")
def server_url() -> Any:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(make_app(), log_level="critical", timeout_graceful_shutdown=1, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture(autouse=True)
def _reset_stats() -> None:
    STATS.reset()


def _requests(prompts: list[str], output_tokens: int = 5) -> list[BenchRequest]:
    return [BenchRequest(prompt=p, input_ids=None, output_tokens=output_tokens, task_id=i)
            for i, p in enumerate(prompts)]


def _run(settings: ServeSettings, requests: list[BenchRequest]) -> Any:
    return asyncio.run(benchmark(make_backend(settings), requests, settings))


# ---- HTTP backends ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("http_client", ["auto", "httpx"])  # auto: the lean client (http://)
def test_completions_counts_failures_and_timings(server_url: str, http_client: str) -> None:
    prompts = [f"normal {i}" for i in range(5)] + ["fail500", "broken", "hang", "nodone", "badjson", "errorevent"]
    settings = ServeSettings(backend="openai-completions", base_url=server_url, request_timeout_s=CLIENT_TIMEOUT_S,
                             progress=False, slo=None, http_client=http_client)
    t0 = time.perf_counter()
    (report,), (records,) = _run(settings, _requests(prompts))
    assert time.perf_counter() - t0 < HANG_S  # the hang was cut off by the client timeout
    assert report.num_completed == 5 and report.num_failed == 6
    assert report.failure_reasons == {"HTTP 500": 1, "broken stream": 1, "timeout": 1, "incomplete stream": 1,
                                      "malformed SSE": 1, "server error": 1}
    by_task = {r.task_id: r for r in records}
    assert "fake failure" in by_task[5].error and "model exploded" in by_task[10].error
    ok = [r for r in records if r.success]
    assert all(r.output_tokens == 5 and len(r.token_times_s) == 5 and r.prompt_tokens == 2 for r in ok)
    assert all(r.output_text == " t0 t1 t2 t3 t4" for r in ok)
    # ordering against the fake's sleeps (lower bounds and relations only: no flaky upper bounds)
    assert report.ttft_ms.median >= TTFT_S * 1e3 * 0.9
    assert report.itl_ms.median >= ITL_S * 1e3 * 0.8
    assert report.ttft_ms.median > report.itl_ms.median
    assert report.tpot_ms.median >= ITL_S * 1e3 * 0.8
    assert report.e2e_ms.min >= (TTFT_S + 4 * ITL_S) * 1e3 * 0.9
    assert report.itl_ms.count == 5 * 4
    assert report.duration_s >= CLIENT_TIMEOUT_S * 0.9
    assert report.total_output_tokens == 25
    assert all(r.response_id == "cmpl-2" for r in ok)  # the server's id, to join with its request trace
    body = STATS.bodies[0]
    assert body["stream"] is True and body["ignore_eos"] is True and body["temperature"] == 0.0
    assert body["stream_options"] == {"include_usage": True} and body["model"] == "fake-model"  # from /v1/models


@pytest.mark.parametrize("http_client", ["auto", "httpx"])
def test_connection_refused_is_recorded(server_url: str, http_client: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens here
    settings = ServeSettings(base_url=f"http://127.0.0.1:{port}", model="m", request_timeout_s=2, progress=False,
                             http_client=http_client)
    (report,), _ = _run(settings, _requests(["a", "b", "c"]))
    assert report.num_completed == 0 and report.failure_reasons == {"connection error": 3}
    assert report.ttft_ms.mean is None


def test_lean_client_reuses_connections_and_drops_half_read_ones(server_url: str) -> None:
    from kvflight.bench.http_stream import HttpStreamClient, HttpStreamError

    async def main() -> None:
        client = HttpStreamClient(server_url, {"User-Agent": "t"})
        body = json.dumps({"prompt": "normal x", "max_tokens": 3, "stream": True}).encode()
        for _ in range(3):  # one after another: the same keep-alive connection
            async with client.stream_post("/v1/completions", body) as resp:
                assert resp.status_code == 200
                data = (await resp.aread()).decode()
            assert data.count("data: ") == 4 and data.endswith("data: [DONE]\n\n")
        assert len(client._open) == 1 and len(client._idle) == 1
        async with client.stream_post("/v1/completions", json.dumps({"prompt": "fail500", "max_tokens": 1})
                                      .encode()) as resp:
            assert resp.status_code == 500 and b"fake failure" in await resp.aread()
        with pytest.raises(TimeoutError):  # given up mid-stream: that connection is closed, not pooled
            async with asyncio.timeout(TTFT_S + ITL_S / 2):
                async with client.stream_post("/v1/completions", body) as resp:
                    async for _ in resp.aiter_bytes():
                        pass
        assert len(client._idle) == 0 and len(client._open) == 0
        async with client.stream_post("/v1/completions", body) as resp:  # a fresh connection works
            assert (await resp.aread()).count(b"data: ") == 4
        await client.aclose()
        with pytest.raises(ValueError, match="plain http"):
            HttpStreamClient("https://example.com")
        refused = HttpStreamClient("http://127.0.0.1:9")  # the discard port: nobody listens
        with pytest.raises(HttpStreamError, match="cannot connect") as err:
            async with refused.stream_post("/x", b"{}"):
                pass
        assert err.value.kind == "connect"

    asyncio.run(main())


def test_chat_backend_skips_role_chunk(server_url: str) -> None:
    settings = ServeSettings(backend="openai-chat", base_url=server_url, model="fake-model", progress=False,
                             request_timeout_s=5)
    (report,), (records,) = _run(settings, _requests(["normal a", "normal b", "fail500"], output_tokens=4))
    assert report.num_completed == 2 and report.failure_reasons == {"HTTP 500": 1}
    # the role-only chunk came at once; TTFT is the first content chunk's
    assert report.ttft_ms.min >= TTFT_S * 1e3 * 0.9
    assert all(r.output_text == " c0 c1 c2 c3" and r.output_tokens == 4 for r in records if r.success)
    assert {"role": "user", "content": "normal a"} in [m for b in STATS.bodies for m in b["messages"]]


def test_triton_generate_stream(server_url: str) -> None:
    settings = ServeSettings(backend="triton", base_url=server_url, model="ensemble", progress=False,
                             request_timeout_s=5)
    reqs = _requests(["normal 1", "normal 2", "normal 3", "fail500", "broken"], output_tokens=3)
    (report,), (records,) = _run(settings, reqs)
    assert report.num_completed == 3
    assert report.failure_reasons == {"HTTP 500": 1, "broken stream": 1}
    ok = [r for r in records if r.success]
    assert all(r.output_tokens == 3 and r.output_text == " x0 x1 x2" for r in ok)  # one token per chunk
    assert report.ttft_ms.median > report.itl_ms.median >= ITL_S * 1e3 * 0.8
    assert "normal 1" in {b["text_input"] for b in STATS.bodies} and all(b["stream"] is True for b in STATS.bodies)
    # no --model: tensorrtllm_backend's pipeline name, as in the tuning guide's examples
    STATS.reset()
    (report,), _ = _run(ServeSettings(backend="triton", base_url=server_url, progress=False), reqs[:1])
    assert report.num_completed == 1 and STATS.bodies[0]["_model_in_path"] == "ensemble"


def test_max_concurrency_caps_in_flight(server_url: str) -> None:
    settings = ServeSettings(base_url=server_url, model="fake-model", max_concurrency=2, progress=False)
    (report,), _ = _run(settings, _requests([f"normal {i}" for i in range(6)], output_tokens=2))
    assert report.num_completed == 6 and STATS.peak <= 2
    STATS.reset()
    settings = ServeSettings(base_url=server_url, model="fake-model", progress=False)
    (report,), _ = _run(settings, _requests([f"normal {i}" for i in range(6)], output_tokens=2))
    assert report.num_completed == 6 and STATS.peak >= 3  # all at once without a cap


def test_static_emulated_batching_end_to_end(server_url: str) -> None:
    settings = ServeSettings(base_url=server_url, model="fake-model", static_batch_size=2, static_timeout_ms=50,
                             progress=False)
    (report,), (records,) = _run(settings, _requests([f"normal {i}" for i in range(5)], output_tokens=2))
    assert report.num_completed == 5 and STATS.peak <= 2
    groups = [records[0:2], records[2:4], records[4:5]]
    for prev, nxt in zip(groups, groups[1:]):  # the next group leaves only when the previous one is done
        assert min(r.start_time_s for r in nxt) >= max(r.end_time_s for r in prev)
    assert report.labels["static_emulated_batch_size"] == 2


# ---- pure logic ---------------------------------------------------------------------------------------------------
def test_static_batch_scheduler_fake_clock() -> None:
    s = StaticBatchScheduler(batch_size=3, timeout_s=1.0)
    assert s.next_group(0.0) is None and s.deadline_s() is None
    s.add(0, 0.0)
    assert s.next_group(0.5) is None and s.deadline_s() == 1.0
    s.add(1, 0.6)
    assert s.next_group(0.99) is None
    assert s.next_group(1.0) == [0, 1]  # timeout since its first request
    for i, t in ((2, 1.1), (3, 1.2), (4, 1.3), (5, 1.35)):
        s.add(i, t)
    assert s.next_group(1.35) == [2, 3, 4]  # full: leaves at once
    assert s.deadline_s() == pytest.approx(2.35) and s.next_group(2.0) is None
    s.add(6, 2.1)
    s.close()
    assert not s.done and s.next_group(2.1) == [5, 6]  # no more arrivals: the rest leaves
    assert s.done and s.next_group(3.0) is None
    with pytest.raises(RuntimeError, match="after close"):
        s.add(7, 3.0)


def test_static_batch_scheduler_without_timeout_and_backlog() -> None:
    s = StaticBatchScheduler(batch_size=2, timeout_s=None)
    for i in range(5):
        s.add(i, 0.0)
    assert s.next_group(100.0) == [0, 1] and s.next_group(100.0) == [2, 3]
    assert s.next_group(1e9) is None and s.deadline_s() is None  # waits for a full group without a timeout
    s.close()
    assert s.next_group(1e9) == [4]


class SleepyBackend(Backend):
    """No network: each request sleeps, and the backend remembers what was in flight together."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.in_flight: set[int] = set()
        self.launch_sets: list[frozenset[int]] = []

    async def send(self, req: BenchRequest, record: RequestRecord) -> None:
        self.in_flight.add(req.task_id)
        self.launch_sets.append(frozenset(self.in_flight))
        await asyncio.sleep(self.delay_s)
        record.token_times_s.append(time.perf_counter())
        record.output_tokens = 1
        self.in_flight.discard(req.task_id)


def test_static_groups_with_a_sleepy_backend() -> None:
    backend = SleepyBackend(0.03)
    reqs = _requests([str(i) for i in range(7)], output_tokens=1)
    records, _ = asyncio.run(run_load(backend, reqs, static_batch_size=3, static_timeout_ms=10_000))
    assert all(r.success for r in records) and len(records) == 7
    groups = [frozenset({0, 1, 2}), frozenset({3, 4, 5}), frozenset({6})]
    assert all(any(s <= g for g in groups) for s in backend.launch_sets)  # groups never overlap in time
    assert set(groups) <= set(backend.launch_sets)  # and each was in flight whole


def test_arrival_offsets() -> None:
    assert arrival_offsets_s(4, math.inf) == [0.0] * 4
    assert arrival_offsets_s(0, 3.0) == []
    poisson = np.diff(arrival_offsets_s(4000, 10.0, 1.0, seed=1))
    assert abs(poisson.mean() - 0.1) < 0.01 and abs(poisson.std() / poisson.mean() - 1.0) < 0.1
    bursty = np.diff(arrival_offsets_s(4000, 10.0, 0.25, seed=1))
    assert abs(bursty.mean() - 0.1) < 0.02 and bursty.std() / bursty.mean() > 1.5  # CV = 1/sqrt(shape) = 2
    assert arrival_offsets_s(50, 5.0, seed=3) == arrival_offsets_s(50, 5.0, seed=3)
    assert arrival_offsets_s(50, 5.0, seed=3) != arrival_offsets_s(50, 5.0, seed=4)


def test_parse_request_rates() -> None:
    assert parse_request_rates("1, 2,4,inf") == [1.0, 2.0, 4.0, math.inf]
    assert parse_request_rates("-1") == [math.inf]
    for bad, fragment in (("fast", "not a number"), ("0", "> 0"), ("", "no request rate")):
        with pytest.raises(ValueError, match=fragment):
            parse_request_rates(bad)
    with pytest.raises(ValueError, match="needs --static-emulated-batch-size"):
        ServeSettings(static_timeout_ms=10)
    with pytest.raises(ValueError, match="backend"):
        ServeSettings(backend="grpc")


def test_sse_parser() -> None:
    async def lines() -> AsyncIterator[str]:
        for line in [": keep-alive", "event: message", "data: {\"a\": 1}", "", "data:{\"b\":", "data: 2}", "",
                     "data: [DONE]"]:
            yield line

    async def collect() -> list[str]:
        return [payload async for payload, _ in iter_sse_events(lines())]

    assert asyncio.run(collect()) == ['{"a": 1}', '{"b":\n2}', "[DONE]"]


def test_line_splitter_keeps_characters_cut_between_chunks() -> None:
    text = "data: {\"t\": \"你好 🙂\"}\r\n\ndata: [DONE]\n\ntail"
    raw = text.encode("utf-8")

    async def collect(cuts: list[int]) -> list[str]:
        async def chunks() -> AsyncIterator[bytes]:
            prev = 0
            for c in [*cuts, len(raw)]:
                yield raw[prev:c]
                prev = c
        return [line async for line in iter_lines(chunks())]

    want = text.split("\n")
    for cuts in ([], [1], [14, 15, 16], list(range(1, len(raw)))):  # 14..16 cut inside the first CJK character
        assert asyncio.run(collect(cuts)) == want, cuts


def test_plot_needs_matplotlib_or_writes(tmp_path: Path) -> None:
    from kvflight.bench.metrics import build_report

    rep = build_report([RequestRecord(0.0, [0.1, 0.2], 3, 2, True)], 1.0, labels={"request_rate": 2.0})
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install matplotlib"):
            plot_sweep([rep], str(tmp_path / "p.png"))
    else:
        plot_sweep([rep], str(tmp_path / "p.png"))
        assert (tmp_path / "p.png").stat().st_size > 0


# ---- the CLI entry point ------------------------------------------------------------------------------------------
def _serve_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    return parser.parse_args(argv)


def test_run_serve_sweep_writes_results(server_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"normal {i}", "output_tokens": 2}) + "\n" for i in range(4)))
    out = tmp_path / "result.json"
    args = _serve_args(["--base-url", server_url, "--model", "fake-model", "--dataset", str(data),
                        "--request-rate", "inf,40", "--warm-up", "1", "--slo", "ttft=60000,tpot=60000",
                        "--result-json", str(out), "--save-detailed", "--disable-progress"])
    assert run_serve(args) == 0
    doc = json.loads(out.read_text())
    assert [run["request_rate"] for run in doc["runs"]] == ["inf", 40.0]
    assert all(run["completed"] == 4 and run["good_requests"] == 4 for run in doc["runs"])
    assert len(doc["runs"][0]["requests"]) == 4 and doc["settings"]["slo"] == {"ttft_ms": 60000.0, "tpot_ms": 60000.0}
    assert "api_key" not in doc["settings"]
    printed = capsys.readouterr().out
    assert printed.count("Serving Benchmark Result") == 2 and "(latencies in ms)" in printed
    assert len(STATS.bodies) == 1 + 4 + 4  # warm-up, then each rate


def test_run_serve_inline_random_ids(server_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = _serve_args(["--base-url", server_url, "--vocab-size", "100", "--num-requests", "3", "--input-mean",
                        "6", "--output-mean", "2", "--disable-progress"])
    assert run_serve(args) == 0
    prompts = [b["prompt"] for b in STATS.bodies]
    assert all(isinstance(p, list) and len(p) == 6 for p in prompts)  # token ids go to /v1/completions as-is
    assert "Successful requests:" in capsys.readouterr().out


def test_run_serve_reports_total_failure(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = _serve_args(["--base-url", f"http://127.0.0.1:{port}", "--model", "m", "--vocab-size", "50",
                        "--num-requests", "2", "--input-mean", "3", "--output-mean", "2", "--disable-progress"])
    assert run_serve(args) == 1
    assert "no request succeeded" in capsys.readouterr().err
    bad = _serve_args(["--request-rate", "zero"])
    assert run_serve(bad) == 2


# ---- in-process engine (dummy weights: no server, no files) -------------------------------------------------------
def test_engine_backend_records_per_step_arrivals() -> None:
    settings = ServeSettings(backend="engine", progress=False, request_timeout_s=120)
    backend = make_backend(settings, {"load_format": "dummy", "max_seq_len": 64, "max_batch_size": 4})
    reqs = [BenchRequest(prompt=None, input_ids=[5 + i] * 8, output_tokens=3, task_id=i) for i in range(3)]
    reqs.append(BenchRequest(prompt=None, input_ids=[7] * 100, output_tokens=3, task_id=3))  # > max_seq_len
    (report,), (records,) = asyncio.run(benchmark(backend, reqs, settings))
    assert report.num_completed == 3 and report.failure_reasons == {"rejected": 1}
    assert "max_input_len" in records[3].error
    for rec in records[:3]:
        assert rec.output_tokens == 3 and len(rec.token_times_s) == 3 and rec.prompt_tokens == 8
        assert rec.start_time_s < rec.token_times_s[0] < rec.token_times_s[1] < rec.token_times_s[2]


def test_latency_runs_on_dummy_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvflight.bench.latency import (add_latency_args, engine_settings_for, make_cases, parse_batch_sizes,
                                        parse_input_output_len, run_latency)

    assert parse_input_output_len("2048,128; 3072,1") == [(2048, 128), (3072, 1)]
    assert parse_batch_sizes("1,8,64") == [1, 8, 64]
    for bad in ("2048", "a,b", "0,5", ""):
        with pytest.raises(ValueError, match="input/output|INPUT,OUTPUT"):
            parse_input_output_len(bad)
    cases = make_cases([1, 8], [(100, 10)])
    assert engine_settings_for(cases, {})["max_num_tokens"] == 800
    with pytest.raises(ValueError, match="max_batch_size=4"):
        engine_settings_for(cases, {"max_batch_size": 4})
    parser = argparse.ArgumentParser()
    add_latency_args(parser)
    out = tmp_path / "lat.json"
    args = parser.parse_args(["--load-format", "dummy", "--batch-size", "2", "--input-output-len", "8,3;8,1",
                              "--warm-up", "0", "--num-runs", "1", "--result-json", str(out)])
    assert run_latency(args) == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["batch_size"], r["input_len"], r["output_len"]) for r in results] == [(2, 8, 3), (2, 8, 1)]
    assert results[0]["latency_ms"] > results[0]["ttft_ms"] > 0 and results[0]["decode_bandwidth_gbs"] > 0
    assert results[1]["latency_ms"] == pytest.approx(results[1]["ttft_ms"]) and results[1]["decode_step_ms"] is None
    assert "[BENCHMARK] batch_size 2 input_length 8 output_length 3 latency(ms)" in capsys.readouterr().out
