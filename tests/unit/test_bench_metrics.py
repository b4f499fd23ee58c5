"""Benchmark metric maths on hand-made timestamps: TTFT, TPOT (first token excluded), ITL per gap, E2E,
percentiles, throughputs, goodput under SLO subsets, failures counted but kept out of latencies; parse_slo errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kvflight.bench.metrics import (SLO, BenchReport, LatencyStats, RequestRecord, build_report, format_report,
                                    format_sweep, parse_slo)


def rec(start: float, times: list[float], out: int, prompt: int = 10, ok: bool = True, kind: str = "") -> RequestRecord:
    r = RequestRecord(start_time_s=start, token_times_s=list(times), prompt_tokens=prompt, output_tokens=out,
                      success=ok, end_time_s=(times[-1] if times else start) + 0.001)
    if not ok:
        r.fail(kind or "HTTP 500", f"{kind} happened")
    return r


def test_per_request_definitions() -> None:
    r = rec(10.0, [10.5, 10.6, 10.8, 11.1], out=4)
    assert r.ttft_s == pytest.approx(0.5)
    assert r.e2e_s == pytest.approx(1.1)
    # TPOT excludes the first token: (1.1 - 0.5) / (4 - 1)
    assert r.tpot_s == pytest.approx(0.2)
    assert r.itls_s == pytest.approx([0.1, 0.2, 0.3])


def test_tpot_needs_two_tokens_and_chunks_count_as_one_gap() -> None:
    single = rec(0.0, [0.3], out=1)
    assert single.tpot_s is None and single.itls_s == [] and single.e2e_s == pytest.approx(0.3)
    # two chunks carrying 6 tokens in all: one ITL gap, but TPOT divides by the 5 tokens after the first
    chunky = rec(0.0, [0.2, 0.7], out=6)
    assert chunky.itls_s == pytest.approx([0.5])
    assert chunky.tpot_s == pytest.approx(0.1)


def test_report_aggregates_and_excludes_failures() -> None:
    records = [
        rec(0.0, [0.1, 0.2, 0.3], out=3, prompt=5),  # ttft 100, tpot 100, e2e 300, itl 100,100
        rec(0.0, [0.3, 0.5], out=2, prompt=7),  # ttft 300, tpot 200, e2e 500, itl 200
        rec(0.0, [0.05], out=5, prompt=100, ok=False, kind="HTTP 500"),
        rec(0.0, [], out=0, prompt=100, ok=False, kind="timeout"),
        rec(0.0, [], out=0, ok=False, kind="timeout"),
    ]
    report = build_report(records, duration_s=2.0)
    assert report.num_completed == 2 and report.num_failed == 3
    assert report.failure_reasons == {"timeout": 2, "HTTP 500": 1}
    assert report.total_input_tokens == 12 and report.total_output_tokens == 5
    assert report.request_throughput_rps == pytest.approx(1.0)
    assert report.output_token_throughput_tps == pytest.approx(2.5)
    assert report.total_token_throughput_tps == pytest.approx(8.5)
    assert report.ttft_ms.mean == pytest.approx(200.0) and report.ttft_ms.count == 2
    assert report.tpot_ms.mean == pytest.approx(150.0)
    assert report.e2e_ms.median == pytest.approx(400.0)
    assert report.itl_ms.count == 3 and report.itl_ms.mean == pytest.approx(400.0 / 3)


def test_percentiles_match_numpy_linear() -> None:
    values = [float(v) for v in range(1, 101)]
    stats = LatencyStats.of(values)
    assert stats.median == pytest.approx(50.5)
    assert stats.p90 == pytest.approx(np.percentile(values, 90))
    assert stats.p99 == pytest.approx(99.01)
    assert stats.mean == pytest.approx(50.5) and stats.min == 1.0 and stats.max == 100.0
    empty = LatencyStats.of([])
    assert empty.count == 0 and empty.mean is None and empty.p99 is None


def test_duration_defaults_to_first_start_last_end() -> None:
    records = [rec(1.0, [1.2, 1.4], out=2), rec(1.5, [2.0, 3.0], out=2)]
    report = build_report(records)
    assert report.duration_s == pytest.approx(3.001 - 1.0)


def test_goodput_with_slo_subsets() -> None:
    records = [
        rec(0.0, [0.1, 0.15, 0.2], out=3),  # ttft 100, tpot 50, e2e 200
        rec(0.0, [0.4, 0.42, 0.44], out=3),  # ttft 400, tpot 20, e2e 440
        rec(0.0, [0.1, 0.5, 0.9], out=3),  # ttft 100, tpot 400, e2e 900
        rec(0.0, [0.05], out=1),  # ttft 50, no tpot (passes a tpot bound), e2e 50
        rec(0.0, [0.01, 0.02], out=2, ok=False),  # failed: never good
    ]
    cases = {
        "ttft=200": 3,
        "tpot=100": 3,
        "e2e=500": 3,
        "ttft=200,tpot=100": 2,
        "ttft=500,tpot=100,e2e=300": 2,
        "ttft=1000,tpot=1000,e2e=1000": 4,
    }
    for text, good in cases.items():
        report = build_report(records, duration_s=2.0, slo=parse_slo(text))
        assert report.num_good == good, text
        assert report.goodput_rps == pytest.approx(good / 2.0), text
    assert build_report(records, duration_s=2.0).goodput_rps is None


def test_parse_slo_accepts_spellings() -> None:
    assert parse_slo("ttft=500,tpot=50,e2e=3000") == SLO(500.0, 50.0, 3000.0)
    assert parse_slo("TTFT:200ms tpot=7.5") == SLO(ttft_ms=200.0, tpot_ms=7.5)
    assert parse_slo("e2el:1000") == SLO(e2e_ms=1000.0)


@pytest.mark.parametrize("text, fragment", [
    ("", "empty SLO"),
    ("  ,", "empty SLO"),
    ("ttfb=100", "did you mean 'ttft'"),
    ("ttft", "has no value"),
    ("ttft=fast", "must be a number"),
    ("tpot=0", "positive"),
    ("e2e=-5", "positive"),
    ("ttft=1,ttft=2", "given twice"),
    ("ttft=inf", "positive"),
])
def test_parse_slo_errors(text: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_slo(text)


def test_report_dict_is_json_ready_and_table_prints() -> None:
    records = [rec(0.0, [0.1, 0.2], out=2), rec(0.0, [], out=0, ok=False, kind="broken stream")]
    report = build_report(records, duration_s=1.0, slo=parse_slo("ttft=150"),
                          labels={"request_rate": 4.0, "max_concurrency": None})
    d = report.to_dict()
    json.dumps(d)  # no exotic types
    for key in ("mean_ttft_ms", "median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "p99_tpot_ms", "mean_itl_ms",
                "p99_e2e_ms", "goodput_rps", "request_throughput_rps", "failure_reasons"):
        assert key in d
    assert d["failure_reasons"] == {"broken stream": 1} and d["request_rate"] == 4.0
    text = format_report(report)
    assert "Successful requests" in text and "broken stream" in text and "Goodput" in text
    other = build_report(records, duration_s=1.0, labels={"request_rate": math.inf})
    sweep = format_sweep([report, other])
    assert "inf" in sweep and len(sweep.splitlines()) == 5
    assert isinstance(report, BenchReport)
