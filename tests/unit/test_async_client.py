"""The API process's output routing (AsyncEngineClient._handle_outputs), without an engine-core process: a step's
first tokens reach their consumers before the running streams' next tokens; the request trace's line."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

pytest.importorskip("zmq")

from kvflight.engine.output import OutputProcessor  # noqa: E402
from kvflight.server.async_client import AsyncEngineClient, RequestTrace, _Tracked  # noqa: E402
from kvflight.server.engine_core import StepOutputs  # noqa: E402
from kvflight.types import SamplingParams, StepOutput  # noqa: E402


def _client(names: list[str]) -> AsyncEngineClient:
    client = AsyncEngineClient({}, tokenizer=None)
    client.processor = OutputProcessor(None, frozenset())
    for name in names:
        client.processor.add_request(name, None, [1, 2, 3], SamplingParams(max_tokens=8))
        tracked = _Tracked(name, asyncio.Queue(), [name], time.monotonic(), 3)
        client._tracked[name] = tracked
        client._by_engine_id[name] = tracked
    return client


def test_first_tokens_go_to_their_consumers_first(tmp_path: Path) -> None:
    async def main() -> list[str]:
        client = _client(["old1", "old2", "new"])
        client.trace = RequestTrace(str(tmp_path / "trace.jsonl"))
        woke: list[str] = []

        async def consume(name: str) -> None:
            while True:
                await client._tracked[name].queue.get()
                woke.append(name)

        tasks = [asyncio.create_task(consume(n)) for n in ("old1", "old2", "new")]
        await asyncio.sleep(0)

        def step(tokens: dict[str, int]) -> None:
            outs = [StepOutput(request_id=n, new_token_ids=[t]) for n, t in tokens.items()]
            client._handle_outputs(StepOutputs(outs, sent_s=time.monotonic()), time.monotonic())

        step({"old1": 5, "old2": 6})  # both first tokens: the engine's order
        for _ in range(3):
            await asyncio.sleep(0)
        step({"old1": 7, "old2": 8, "new": 9})  # "new" is the only first token: it goes first
        for _ in range(3):
            await asyncio.sleep(0)
        for t in tasks:
            t.cancel()
        client.trace.close()
        return woke

    woke = asyncio.run(main())
    assert woke == ["old1", "old2", "new", "old1", "old2"]
    lines = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert [t["request_id"] for t in lines] == ["old1", "old2", "new"]  # one line per request, at its first token
    for t in lines:
        assert t["arrival_s"] > 0 and 0 <= t["engine_sent"] <= t["api_received"] <= t["api_handled"]
