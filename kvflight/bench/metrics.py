"""Serving benchmark metrics: per-request records (RequestRecord) → a BenchReport of throughput, latency
percentiles and goodput under an SLO; as a JSON-ready dict or a printed table.

Definitions (all times from one monotonic clock, reported in ms):

* TTFT = arrival of the first output chunk − request start (the moment the request was sent).
* E2E = arrival of the last output chunk − request start.
* TPOT (per request) = (E2E − TTFT) / (output_tokens − 1): the mean time per output token after the first; only
  requests with >= 2 output tokens have one (the first token is the TTFT's, not a decode step's).
* ITL = every gap between consecutive chunk arrivals of a request, pooled over all requests. A chunk that carries
  k > 1 tokens counts as ONE gap (not k gaps of 1/k): the same choice as vLLM's `bench serve`, so the numbers
  compare. With one token per chunk (the usual case) mean ITL ≈ mean TPOT.
* Percentiles are numpy's linear interpolation (`np.percentile`), as vLLM reports them; median = p50.
* Failed requests are counted (with their reasons) but never enter latencies or token throughputs.
* Throughputs divide by the benchmark duration: first request start → last request end, unless given.
* Goodput = completed requests meeting every given SLO bound, per second of duration. A request with < 2 output
  tokens has no TPOT and passes a TPOT bound.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

PERCENTILES: tuple[int, ...] = (50, 90, 99)
SLO_KEYS: dict[str, str] = {"ttft": "ttft", "tpot": "tpot", "e2e": "e2e", "e2el": "e2e"}  # accepted → canonical


@dataclass
class RequestRecord:
    """What one benchmark request did. Times are seconds of time.perf_counter()."""

    start_time_s: float
    token_times_s: list[float] = field(default_factory=list)  # arrival of each chunk that carried output
    prompt_tokens: int = 0
    output_tokens: int = 0
    success: bool = False
    error: str = ""  # full text of what went wrong
    error_kind: str = ""  # short reason for counting: "HTTP 500", "timeout", "broken stream", ...
    output_text: str = ""
    end_time_s: float | None = None  # when the response was over (stream closed)
    task_id: int = 0
    expected_output_tokens: int = 0  # what was asked for (max_tokens)
    response_id: str = ""  # the server's id for it (OpenAI "id"), to join with the server's request trace

    def fail(self, kind: str, error: str) -> "RequestRecord":
        self.success = False
        self.error_kind = kind
        self.error = error
        return self

    @property
    def ttft_s(self) -> float | None:
        return self.token_times_s[0] - self.start_time_s if self.token_times_s else None

    @property
    def e2e_s(self) -> float | None:
        if self.token_times_s:
            return self.token_times_s[-1] - self.start_time_s
        return self.end_time_s - self.start_time_s if self.end_time_s is not None else None

    @property
    def tpot_s(self) -> float | None:
        ttft, e2e = self.ttft_s, self.e2e_s
        if ttft is None or e2e is None or self.output_tokens < 2:
            return None
        return (e2e - ttft) / (self.output_tokens - 1)

    @property
    def itls_s(self) -> list[float]:
        t = self.token_times_s
        return [b - a for a, b in zip(t, t[1:])]


@dataclass(frozen=True)
class SLO:
    """Latency bounds in ms; None = not bounded."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def met_by(self, record: RequestRecord) -> bool:
        if not record.success:
            return False
        checks = ((self.ttft_ms, record.ttft_s), (self.e2e_ms, record.e2e_s))
        for bound, value in checks:
            if bound is not None and (value is None or value * 1e3 > bound):
                return False
        tpot = record.tpot_s
        if self.tpot_ms is not None and tpot is not None and tpot * 1e3 > self.tpot_ms:
            return False
        return True

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def parse_slo(text: str) -> SLO:
    """'ttft=500,tpot=50,e2e=3000' (ms; any subset; ':' also separates, 'ms' suffix allowed) → SLO."""
    if text is None or not text.strip():
        raise ValueError("empty SLO: give bounds in ms like 'ttft=500,tpot=50,e2e=3000' (any subset)")
    values: dict[str, float] = {}
    for part in text.replace(" ", ",").split(","):
        if not part:
            continue
        sep = "=" if "=" in part else ":" if ":" in part else None
        if sep is None:
            raise ValueError(f"SLO item '{part}' has no value: write it as KEY=MS, e.g. ttft=500")
        key, _, raw = part.partition(sep)
        key = key.strip().lower()
        if key not in SLO_KEYS:
            close = difflib.get_close_matches(key, list(SLO_KEYS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"unknown SLO metric '{key}'{hint}; known: ttft, tpot, e2e")
        canonical = SLO_KEYS[key]
        if canonical in values:
            raise ValueError(f"SLO metric '{canonical}' is given twice; give each of ttft, tpot, e2e at most once")
        raw = raw.strip().lower().removesuffix("ms").strip()
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"SLO {key}={raw!r}: the bound must be a number of milliseconds, e.g. {key}=500") from None
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"SLO {key}={raw}: the bound must be a positive number of milliseconds")
        values[canonical] = value
    if not values:
        raise ValueError("empty SLO: give bounds in ms like 'ttft=500,tpot=50,e2e=3000' (any subset)")
    return SLO(ttft_ms=values.get("ttft"), tpot_ms=values.get("tpot"), e2e_ms=values.get("e2e"))


@dataclass
class LatencyStats:
    """Summary of one latency metric in ms (None when no request had a value)."""

    count: int
    mean: float | None
    median: float | None
    p90: float | None
    p99: float | None
    std: float | None = None
    min: float | None = None
    max: float | None = None

    @classmethod
    def of(cls, values_ms: Sequence[float]) -> "LatencyStats":
        if not len(values_ms):
            return cls(0, None, None, None, None, None, None, None)
        a = np.asarray(values_ms, dtype=np.float64)
        p50, p90, p99 = (float(x) for x in np.percentile(a, PERCENTILES))
        return cls(int(a.size), float(a.mean()), p50, p90, p99, float(a.std()), float(a.min()), float(a.max()))


@dataclass
class BenchReport:
    """The outcome of one benchmark run (one request rate)."""

    duration_s: float
    num_completed: int
    num_failed: int
    failure_reasons: dict[str, int]
    total_input_tokens: int
    total_output_tokens: int
    request_throughput_rps: float
    output_token_throughput_tps: float
    total_token_throughput_tps: float
    ttft_ms: LatencyStats
    tpot_ms: LatencyStats
    itl_ms: LatencyStats
    e2e_ms: LatencyStats
    slo: SLO | None = None
    num_good: int | None = None
    goodput_rps: float | None = None
    labels: dict[str, Any] = field(default_factory=dict)  # what the run was: request_rate, max_concurrency ...

    def to_dict(self) -> dict[str, Any]:
        """Flat, JSON-ready: mean_ttft_ms, median_ttft_ms, p90_ttft_ms, p99_ttft_ms ... (vLLM's key style)."""
        out: dict[str, Any] = dict(self.labels)
        out.update({
            "duration_s": self.duration_s, "completed": self.num_completed, "failed": self.num_failed,
            "failure_reasons": dict(self.failure_reasons), "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens, "request_throughput_rps": self.request_throughput_rps,
            "output_token_throughput_tps": self.output_token_throughput_tps,
            "total_token_throughput_tps": self.total_token_throughput_tps,
        })
        for name in ("ttft", "tpot", "itl", "e2e"):
            stats: LatencyStats = getattr(self, f"{name}_ms")
            for stat in ("mean", "median", "p90", "p99", "std", "min", "max"):
                out[f"{stat}_{name}_ms"] = getattr(stats, stat)
        if self.slo is not None:
            out["slo_ms"] = self.slo.to_dict()
            out["good_requests"] = self.num_good
            out["goodput_rps"] = self.goodput_rps
        return out


def build_report(records: Sequence[RequestRecord], duration_s: float | None = None, slo: SLO | None = None,
                 labels: dict[str, Any] | None = None) -> BenchReport:
    """Aggregate request records into a BenchReport (see the module docstring for the definitions)."""
    done = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    reasons: dict[str, int] = {}
    for r in failed:
        key = r.error_kind or (r.error[:80] if r.error else "unknown")
        reasons[key] = reasons.get(key, 0) + 1
    if duration_s is None:
        starts = [r.start_time_s for r in records]
        ends = [t for r in records for t in ([r.end_time_s] if r.end_time_s is not None else r.token_times_s[-1:])]
        duration_s = (max(ends) - min(starts)) if starts and ends else 0.0
    per_s = (1.0 / duration_s) if duration_s > 0 else 0.0
    n_in = sum(r.prompt_tokens for r in done)
    n_out = sum(r.output_tokens for r in done)
    ttfts = [r.ttft_s * 1e3 for r in done if r.ttft_s is not None]
    tpots = [r.tpot_s * 1e3 for r in done if r.tpot_s is not None]
    e2es = [r.e2e_s * 1e3 for r in done if r.e2e_s is not None]
    itls = [gap * 1e3 for r in done for gap in r.itls_s]
    num_good = goodput = None
    if slo is not None:
        num_good = sum(1 for r in done if slo.met_by(r))
        goodput = num_good * per_s
    return BenchReport(
        duration_s=duration_s, num_completed=len(done), num_failed=len(failed),
        failure_reasons=dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        total_input_tokens=n_in, total_output_tokens=n_out,
        request_throughput_rps=len(done) * per_s, output_token_throughput_tps=n_out * per_s,
        total_token_throughput_tps=(n_in + n_out) * per_s,
        ttft_ms=LatencyStats.of(ttfts), tpot_ms=LatencyStats.of(tpots), itl_ms=LatencyStats.of(itls),
        e2e_ms=LatencyStats.of(e2es), slo=slo, num_good=num_good, goodput_rps=goodput, labels=dict(labels or {}))


# ---- printing -----------------------------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_report(report: BenchReport, title: str = "Serving Benchmark Result") -> str:
    """A plain-text table of one report (the layout of vLLM's `bench serve` summary)."""
    width = 56
    lines = [f" {title} ".center(width, "=")]

    def row(label: str, value: Any) -> None:
        lines.append(f"{label:<40}{value:>16}")

    for key, value in report.labels.items():
        row(f"{key}:", "inf" if isinstance(value, float) and math.isinf(value) else str(value))
    row("Successful requests:", report.num_completed)
    row("Failed requests:", report.num_failed)
    for reason, count in report.failure_reasons.items():
        row(f"  {reason[:36]}:", count)
    row("Benchmark duration (s):", _fmt(report.duration_s))
    row("Total input tokens:", report.total_input_tokens)
    row("Total generated tokens:", report.total_output_tokens)
    row("Request throughput (req/s):", _fmt(report.request_throughput_rps))
    if report.slo is not None:
        row(f"Good requests ({', '.join(f'{k}<={v:g}' for k, v in report.slo.to_dict().items())}):"[:40],
            report.num_good)
        row("Goodput (req/s):", _fmt(report.goodput_rps))
    row("Output token throughput (tok/s):", _fmt(report.output_token_throughput_tps))
    row("Total token throughput (tok/s):", _fmt(report.total_token_throughput_tps))
    names = (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
             ("itl", "Inter-token Latency"), ("e2e", "End-to-end Latency"))
    for key, heading in names:
        stats: LatencyStats = getattr(report, f"{key}_ms")
        lines.append(f" {heading} ".center(width, "-"))
        row(f"Mean {key.upper()} (ms):", _fmt(stats.mean))
        row(f"Median {key.upper()} (ms):", _fmt(stats.median))
        row(f"P90 {key.upper()} (ms):", _fmt(stats.p90))
        row(f"P99 {key.upper()} (ms):", _fmt(stats.p99))
    lines.append("=" * width)
    return "\n".join(lines)


def format_sweep(reports: Sequence[BenchReport]) -> str:
    """One compact row per run (e.g. per request rate) for comparing a sweep."""
    head = ("rate", "conc", "ok", "fail", "req/s", "out tok/s", "ttft p50", "ttft p99", "tpot p50", "tpot p99",
            "itl p99", "e2e p99", "goodput")
    rows = [head]
    for r in reports:
        rate = r.labels.get("request_rate")
        rate_text = "inf" if rate is None or (isinstance(rate, float) and math.isinf(rate)) else f"{rate:g}"
        conc = r.labels.get("max_concurrency")
        rows.append((rate_text, "-" if conc is None else str(conc), str(r.num_completed), str(r.num_failed),
                     _fmt(r.request_throughput_rps), _fmt(r.output_token_throughput_tps, 1),
                     _fmt(r.ttft_ms.median, 1), _fmt(r.ttft_ms.p99, 1), _fmt(r.tpot_ms.median, 1),
                     _fmt(r.tpot_ms.p99, 1), _fmt(r.itl_ms.p99, 1), _fmt(r.e2e_ms.p99, 1), _fmt(r.goodput_rps)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    text = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "(latencies in ms)\n" + "\n".join(text)
