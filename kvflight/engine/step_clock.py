"""When the step on the device will end: device time per step learned from the steps that ran (late launch).

With asynchronous scheduling, step N+1 is launched while step N runs, so a request that arrives after N+1 was
scheduled waits for all of N+1 before its first step: at 16 req/s and 8192-token steps that is tens of milliseconds
of TTFT. The server's engine core instead waits (reading new requests) until the running step is predicted to end
within `lead_s`, and only then schedules and launches the next one: arrivals until then join it, and the GPU still
finds the next step queued when it finishes (a prediction that is too short costs a late arrival one step, one that
is too long leaves the GPU idle for the difference; predictions are scaled down by `SAFETY` for that reason).

Model: a step's device time = base (decode rows, weights) + per_token x its context (prefill) tokens, each an
exponential moving average over the steps whose end the host saw (it was waiting when the step finished).
"""

from __future__ import annotations

import time

SAFETY = 0.8  # launch when 80% of the predicted time has passed (less the lead): err towards a busy GPU
_ALPHA = 0.2  # weight of the newest observation


class StepClock:
    def __init__(self) -> None:
        self.base_s: float | None = None  # a decode-only step's device time
        self.per_token_s: float | None = None  # one context token's share of a mixed step
        self.launch_cost_s = 0.0  # host time from starting a step to its launch (schedule + prepare + enqueue)
        self._last_end_s = 0.0  # when the previous step was seen to finish

    def predict_s(self, num_context_tokens: int) -> float | None:
        """Predicted device time of a step with this many context tokens; None until a decode step was seen."""
        if self.base_s is None:
            return None
        if num_context_tokens and self.per_token_s is not None:
            return self.base_s + num_context_tokens * self.per_token_s
        return self.base_s if not num_context_tokens else None

    def observe_end(self, launched_at_s: float, num_context_tokens: int, finished_at_s: float) -> None:
        """A step launched at `launched_at_s` was seen finishing at `finished_at_s` (the host waited for it): it ran
        from its launch or from the previous step's end, whichever came later."""
        duration = finished_at_s - max(launched_at_s, self._last_end_s)
        self._last_end_s = finished_at_s
        if duration <= 0:
            return
        if not num_context_tokens:
            self.base_s = duration if self.base_s is None else (1 - _ALPHA) * self.base_s + _ALPHA * duration
        elif self.base_s is not None:
            per = max(0.0, duration - self.base_s) / num_context_tokens
            self.per_token_s = per if self.per_token_s is None else (1 - _ALPHA) * self.per_token_s + _ALPHA * per

    def note_unseen_end(self, now_s: float) -> None:
        """The previous step had already finished when the host looked: its end time is unknown (at most now)."""
        self._last_end_s = now_s

    def note_launch_cost(self, cost_s: float) -> None:
        self.launch_cost_s = cost_s if not self.launch_cost_s else (1 - _ALPHA) * self.launch_cost_s + _ALPHA * cost_s

    def remaining_s(self, launched_at_s: float, num_context_tokens: int, now_s: float | None = None) -> float | None:
        """Predicted time until the step launched at `launched_at_s` ends, scaled by SAFETY; None when unknown."""
        predicted = self.predict_s(num_context_tokens)
        if predicted is None:
            return None
        now_s = time.perf_counter() if now_s is None else now_s
        started = max(launched_at_s, self._last_end_s)
        return SAFETY * predicted - (now_s - started)
