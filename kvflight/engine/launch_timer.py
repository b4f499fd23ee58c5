"""LaunchTimer owns when the server launches the next step under asynchronous scheduling (late scheduling).

With asynchronous scheduling, step N+1 is scheduled and launched while the GPU runs step N. Launched as soon as N
starts, N+1 misses every request that arrives while N runs: those wait for N+2, one whole step more of time to
first token. Launched shortly before N ends instead, N+1 takes them and the GPU still never waits, as long as the
launch is queued before N's last kernel finishes.

The timer predicts N's end from the GPU durations of recent steps of the same shape (a decode graph's batch size,
a mixed-step graph's padded tokens, an eager step's token count rounded up), the shortest of the last few, so a
prediction errs early (a late one would leave the GPU idle), and subtracts the host's own lead: the longest of
the recent schedule-and-launch times, plus a margin. Steps of a shape not seen yet are launched at once (the
plain asynchronous behaviour). All times are host monotonic seconds (time.perf_counter).
"""

from __future__ import annotations

from collections import deque
from typing import Hashable

HISTORY_STEPS = 4  # durations kept per step shape (the prediction is their minimum)
LEAD_STEPS = 8  # schedule-and-launch host times kept (the lead is their maximum)
MARGIN_S = 0.0005  # launch this much earlier again: the host's wake-up and the first copy


class LaunchTimer:
    def __init__(self, margin_s: float = MARGIN_S, history: int = HISTORY_STEPS) -> None:
        self.margin_s = margin_s
        self._history = history
        self._durations_s: dict[Hashable, deque[float]] = {}
        self._leads_s: deque[float] = deque(maxlen=LEAD_STEPS)
        self.launch_at_s: float | None = None  # when to launch the next step (None: at once)
        self.num_planned = 0  # steps followed by a timed launch
        self.num_unplanned = 0  # steps of a shape not seen yet (followed at once)
        self.planned_offset_s = 0.0  # sum over planned steps of (launch at - step start)

    def observe_duration(self, shape: Hashable, gpu_seconds: float) -> None:
        """A completed step of this shape ran gpu_seconds on the device (start event to end event)."""
        if gpu_seconds > 0:
            self._durations_s.setdefault(shape, deque(maxlen=self._history)).append(gpu_seconds)

    def observe_lead(self, host_seconds: float) -> None:
        """The host took host_seconds from the start of scheduling to the end of a launch."""
        self._leads_s.append(max(0.0, host_seconds))

    def expected_seconds(self, shape: Hashable) -> float | None:
        durations = self._durations_s.get(shape)
        return min(durations) if durations else None

    @property
    def lead_s(self) -> float:
        return (max(self._leads_s) if self._leads_s else 0.0) + self.margin_s

    def plan(self, shape: Hashable, gpu_start_s: float) -> None:
        """The step of this shape started (or starts) on the device at about gpu_start_s: launch the next one at
        its predicted end less the lead."""
        expected = self.expected_seconds(shape)
        self.launch_at_s = None if expected is None else gpu_start_s + expected - self.lead_s
        if expected is None:
            self.num_unplanned += 1
        else:
            self.num_planned += 1
            self.planned_offset_s += expected - self.lead_s

    def summary(self) -> str:
        mean_ms = 1e3 * self.planned_offset_s / max(1, self.num_planned)
        return (f"late scheduling: {self.num_planned} steps followed by a timed launch (mean {mean_ms:.2f} ms after "
                f"the step's start), {self.num_unplanned} at once (shape not timed yet); "
                f"lead {1e3 * self.lead_s:.2f} ms")

    def delay_s(self, now_s: float) -> float:
        """Seconds to wait before scheduling the next step (0: now)."""
        return 0.0 if self.launch_at_s is None else max(0.0, self.launch_at_s - now_s)
