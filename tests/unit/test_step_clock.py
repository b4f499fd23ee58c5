"""The step clock: device time per step learned from observed ends, and the late-launch wait it gives the engine."""

from __future__ import annotations

from kvflight.engine.step_clock import SAFETY, StepClock


def test_learns_decode_base_and_context_rate():
    clock = StepClock()
    assert clock.predict_s(0) is None and clock.remaining_s(0.0, 0, now_s=1.0) is None
    t = 0.0
    for _ in range(40):  # decode-only steps of 10 ms, back to back (launched before the previous one ended)
        clock.observe_end(t - 0.005, 0, t + 0.010)
        t += 0.010
    assert abs(clock.predict_s(0) - 0.010) < 1e-6
    assert clock.predict_s(100) is None  # no mixed step seen yet: unknown, not a guess
    for _ in range(40):  # mixed steps: 10 ms + 1000 context tokens x 20 us
        clock.observe_end(t - 0.001, 1000, t + 0.030)
        t += 0.030
    assert abs(clock.predict_s(1000) - 0.030) < 1e-6 and abs(clock.predict_s(500) - 0.020) < 1e-6


def test_a_step_starts_when_the_previous_one_ends():
    clock = StepClock()
    clock.observe_end(0.0, 0, 0.010)  # first: ran from its launch
    assert abs(clock.base_s - 0.010) < 1e-9
    clock.observe_end(0.002, 0, 0.022)  # launched at 2 ms, queued behind the first: ran 10..22 = 12 ms
    assert abs(clock.base_s - (0.8 * 0.010 + 0.2 * 0.012)) < 1e-9
    clock.note_unseen_end(0.050)  # the host came late: no sample, but the next step starts no earlier than 50 ms
    before = clock.base_s
    clock.observe_end(0.045, 0, 0.060)
    assert abs(clock.base_s - (0.8 * before + 0.2 * 0.010)) < 1e-9


def test_remaining_time_is_scaled_down_and_counts_from_the_start():
    clock = StepClock()
    clock.observe_end(0.0, 0, 0.010)  # base 10 ms, last end at 10 ms
    # a step launched at 9 ms starts at 10 ms (queued): at 12 ms, SAFETY x 10 ms - 2 ms remain
    assert abs(clock.remaining_s(0.009, 0, now_s=0.012) - (SAFETY * 0.010 - 0.002)) < 1e-9
    assert clock.remaining_s(0.009, 0, now_s=0.030) < 0  # overdue: launch now
