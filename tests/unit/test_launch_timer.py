"""Late scheduling: the launch timer's prediction, and the server loop that waits on it while taking requests."""

from __future__ import annotations

import os
import pickle
import threading
import time
from dataclasses import dataclass

import pytest

from kvflight.engine.launch_timer import MARGIN_S, LaunchTimer
from kvflight.server import engine_core


def test_unknown_shapes_launch_at_once() -> None:
    timer = LaunchTimer()
    timer.observe_lead(0.002)
    timer.plan(("mixed", 1088), gpu_start_s=100.0)
    assert timer.launch_at_s is None and timer.delay_s(100.0) == 0.0


def test_launch_at_the_predicted_end_less_the_lead() -> None:
    timer = LaunchTimer()
    for seconds in (0.030, 0.012, 0.011, 0.013):
        timer.observe_duration(("decode", 32, False), seconds)
    for seconds in (0.0015, 0.002, 0.001):
        timer.observe_lead(seconds)
    # the shortest recent duration (errs early), the longest recent lead plus the margin
    assert timer.expected_seconds(("decode", 32, False)) == 0.011
    assert timer.lead_s == pytest.approx(0.002 + MARGIN_S)
    timer.plan(("decode", 32, False), gpu_start_s=100.0)
    assert timer.launch_at_s == pytest.approx(100.0 + 0.011 - 0.002 - MARGIN_S)
    assert timer.delay_s(100.001) == pytest.approx(0.011 - 0.002 - MARGIN_S - 0.001)
    assert timer.delay_s(100.02) == 0.0
    # only the last few durations count: a slow shape that became fast is predicted fast
    for _ in range(4):
        timer.observe_duration(("decode", 32, False), 0.020)
    assert timer.expected_seconds(("decode", 32, False)) == 0.020
    assert timer.expected_seconds(("decode", 64, False)) is None


def test_a_lead_longer_than_the_step_launches_at_once() -> None:
    timer = LaunchTimer()
    timer.observe_duration(("eager", 1088), 0.025)
    timer.observe_lead(0.030)  # host-bound: launching takes longer than the GPU's work
    timer.plan(("eager", 1088), gpu_start_s=5.0)
    assert timer.delay_s(5.0) == 0.0


@dataclass
class _Req:
    request_id: str
    first_scheduled_time: float | None = None
    arrival_time: float = 0.0
    is_finished: bool = False


class _FakeEngine:
    """A step in flight until `due`; the next step() is late-scheduled for then."""

    def __init__(self, due_s: float) -> None:
        self.due_s = due_s
        self.added: list[tuple[str, float]] = []  # (request id, when the loop handed it over)
        self.steps: list[tuple[float, list[str]]] = []  # (when step() ran, requests known then)

    def has_unfinished_requests(self) -> bool:
        return len(self.steps) < 2

    def launch_delay_s(self) -> float:
        return max(0.0, self.due_s - time.perf_counter())

    def add_request(self, req: _Req) -> None:
        self.added.append((req.request_id, time.perf_counter()))

    def abort_requests(self, ids, reason) -> None:  # noqa: ANN001
        pass

    def step(self) -> list:
        self.steps.append((time.perf_counter(), [rid for rid, _ in self.added]))
        self.due_s = time.perf_counter() + 0.05
        return []


def test_the_server_loop_waits_for_the_launch_and_takes_requests_meanwhile(monkeypatch) -> None:
    zmq = pytest.importorskip("zmq")
    monkeypatch.setattr(engine_core, "engine_stats", lambda engine: engine_core.EngineStats())
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.bind("inproc://late-scheduling")
    push.connect("inproc://late-scheduling")
    start = time.perf_counter()
    engine = _FakeEngine(due_s=start + 0.4)
    sent: list = []
    loop = threading.Thread(target=engine_core._loop, args=(engine, pull, sent.append, os.getppid()), daemon=True)
    loop.start()
    time.sleep(0.1)
    push.send(pickle.dumps(engine_core.AddRequests([_Req("late")])))
    while len(engine.steps) < 2 and time.perf_counter() - start < 5:
        time.sleep(0.01)
    push.send(pickle.dumps(engine_core.Shutdown()))
    loop.join(5)
    ctx.destroy(linger=0)
    assert not loop.is_alive()
    (rid, added_s), = engine.added
    first_step_s, known = engine.steps[0]
    # the request was taken as it arrived (the wait wakes on a message), not when the wait ended ...
    assert rid == "late" and added_s - start < 0.3
    # ... and the next step ran no earlier than it was due, with the request in it
    assert first_step_s - start >= 0.4 - 0.002 and known == ["late"]
