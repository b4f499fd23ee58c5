"""Autotuner: searches max_batch_size, max_num_tokens, batch_scheduler_policy, enable_chunked_context and
tokens_per_block for the highest request rate that meets a latency SLO at p99 (goodput), by running the real engine
in-process on a workload; prints the trials, plots the Pareto front, writes the best config as YAML.

The search (coarse to fine, losers pruned early):

1. coarse: the defaults (the base config) and the grid max_batch_size x max_num_tokens, every trial on a screening
   share of the workload (its first ``screen_requests`` requests);
2. the best third of them (and the defaults) are measured again on the whole workload, the rest are pruned;
3. fine rounds: one change at a time around the best so far: max_batch_size and max_num_tokens halved / doubled,
   the other scheduler policy, chunked context toggled, the other tokens_per_block values; screened and confirmed
   the same way; another round around the new best while a round improves on it (at most 3).

A trial's goodput is found by rate search: first all requests at once (rate inf: the throughput ceiling); if that
misses the SLO, bisection over (0, ceiling] for ``rate_probes`` steps, each a Poisson run of the workload at that
rate. A run meets the SLO when every request completed and the p99 of each bounded metric (TTFT, TPOT, E2E) is
within its bound. Goodput = the highest rate that met it (the ceiling's measured throughput when rate inf met it).
Trials stop when ``budget_s`` would be exceeded (the defaults always run). The load generator, metrics and the
in-process engine backend are kvflight.bench's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from itertools import product
from typing import Any, Awaitable, Callable, Iterator, Sequence

from kvflight.bench.dataset import BenchRequest, DatasetError, detect_format, get_tokenizer, load_dataset
from kvflight.bench.metrics import SLO, BenchReport, build_report, parse_slo
from kvflight.config import ConfigError, EngineConfig, add_cli_args, flat_from_args, load_yaml, parse_size

logger = logging.getLogger("kvflight.tune")

TUNED_FIELDS: tuple[str, ...] = ("max_batch_size", "max_num_tokens", "batch_scheduler_policy",
                                 "enable_chunked_context", "tokens_per_block")
POLICIES: tuple[str, ...] = ("max_utilization", "guaranteed_no_evict")
DEFAULT_BATCH_GRID: tuple[int, ...] = (16, 64, 256)
DEFAULT_TOKEN_GRID: tuple[int, ...] = (2048, 8192, 16384)
DEFAULT_BLOCK_GRID: tuple[int, ...] = (16, 32, 64)
DEFAULT_RATE_PROBES = 3
DEFAULT_REQUEST_TIMEOUT_S = 600.0


# ---- the search space ------------------------------------------------------------------------------------------------
@dataclass
class SearchSpace:
    """Values each tuned field may take (coarse grid for the first two; every value for the rest)."""

    max_batch_size: list[int]
    max_num_tokens: list[int]
    batch_scheduler_policy: list[str] = field(default_factory=lambda: list(POLICIES))
    enable_chunked_context: list[bool] = field(default_factory=lambda: [True, False])
    tokens_per_block: list[int] = field(default_factory=lambda: list(DEFAULT_BLOCK_GRID))

    @classmethod
    def for_workload(cls, num_requests: int) -> "SearchSpace":
        """The default grid; batch sizes above the number of requests act the same, so they collapse into it."""
        batches = sorted({min(b, max(1, num_requests)) for b in DEFAULT_BATCH_GRID})
        return cls(max_batch_size=batches, max_num_tokens=list(DEFAULT_TOKEN_GRID))

    def override(self, items: Sequence[str]) -> "SearchSpace":
        """Apply `--search KEY=V1,V2` items (KEY one of TUNED_FIELDS)."""
        for item in items:
            key, sep, raw = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in TUNED_FIELDS:
                raise ValueError(f"--search {item!r}: write KEY=V1,V2 with KEY one of {', '.join(TUNED_FIELDS)}")
            values = [v.strip() for v in raw.split(",") if v.strip()]
            if not values:
                raise ValueError(f"--search {item!r}: give at least one value after '='")
            setattr(self, key, [_parse_value(key, v) for v in values])
        return self


def _parse_value(key: str, text: str) -> Any:
    if key == "batch_scheduler_policy":
        if text not in POLICIES:
            raise ValueError(f"--search batch_scheduler_policy={text!r}: one of {', '.join(POLICIES)}")
        return text
    if key == "enable_chunked_context":
        low = text.lower()
        if low not in ("true", "false", "on", "off", "1", "0"):
            raise ValueError(f"--search enable_chunked_context={text!r}: true or false")
        return low in ("true", "on", "1")
    try:
        value = parse_size(text)
    except ValueError:
        raise ValueError(f"--search {key}={text!r}: expected an integer") from None
    if value < 1:
        raise ValueError(f"--search {key}={text!r}: must be >= 1")
    return value


Knobs = dict  # {field: value} over TUNED_FIELDS


def knobs_key(knobs: Knobs) -> tuple:
    return tuple(knobs[f] for f in TUNED_FIELDS)


def coarse_candidates(default: Knobs, space: SearchSpace) -> list[Knobs]:
    """The defaults first, then the max_batch_size x max_num_tokens grid (other fields as the defaults)."""
    out = [dict(default)]
    for batch, tokens in product(space.max_batch_size, space.max_num_tokens):
        out.append({**default, "max_batch_size": batch, "max_num_tokens": tokens})
    return _unique(out)


def fine_candidates(best: Knobs, space: SearchSpace) -> list[Knobs]:
    """One change at a time around `best`: halve / double the two sizes, then the categorical fields."""
    out: list[Knobs] = []
    for key in ("max_batch_size", "max_num_tokens"):
        for value in (best[key] // 2, best[key] * 2):
            if min(space.__dict__[key]) // 2 <= value <= max(space.__dict__[key]) * 2 and value >= 1:
                out.append({**best, key: value})
    for key in ("batch_scheduler_policy", "enable_chunked_context", "tokens_per_block"):
        out += [{**best, key: value} for value in getattr(space, key) if value != best[key]]
    return _unique(out)


def _unique(cands: Sequence[Knobs]) -> list[Knobs]:
    seen: set[tuple] = set()
    out = []
    for c in cands:
        if knobs_key(c) not in seen:
            seen.add(knobs_key(c))
            out.append(c)
    return out


# ---- rate search -----------------------------------------------------------------------------------------------------
@dataclass
class RateProbe:
    """One run of the workload at one request rate."""

    rate_rps: float  # offered rate (inf = all at once)
    report: BenchReport
    meets_slo: bool

    @property
    def effective_rate_rps(self) -> float:
        """The offered rate, or for rate inf the measured request throughput."""
        return self.report.request_throughput_rps if math.isinf(self.rate_rps) else self.rate_rps


def meets_slo(report: BenchReport, slo: SLO) -> bool:
    """Every request completed and the p99 of each bounded metric is within its bound."""
    if report.num_failed or not report.num_completed:
        return False
    for bound, stats in ((slo.ttft_ms, report.ttft_ms), (slo.tpot_ms, report.tpot_ms), (slo.e2e_ms, report.e2e_ms)):
        if bound is not None and stats.p99 is not None and stats.p99 > bound:
            return False
    return True


async def find_slo_rate(measure: Callable[[float], Awaitable[BenchReport]], slo: SLO, rate_probes: int,
                        out_of_time: Callable[[], bool] = lambda: False) -> list[RateProbe]:
    """Probe rate inf, then bisect (0, ceiling] `rate_probes` times for the highest rate meeting the SLO."""
    first = await measure(math.inf)
    probes = [RateProbe(math.inf, first, meets_slo(first, slo))]
    ceiling = first.request_throughput_rps
    if probes[0].meets_slo or ceiling <= 0:
        return probes
    lo, hi = 0.0, ceiling
    for _ in range(rate_probes):
        if out_of_time():
            break
        rate = (lo + hi) / 2
        report = await measure(rate)
        probe = RateProbe(rate, report, meets_slo(report, slo))
        probes.append(probe)
        if probe.meets_slo:
            lo = rate
        else:
            hi = rate
    return probes


# ---- trials ----------------------------------------------------------------------------------------------------------
@dataclass(eq=False)  # identity: two trials of the same knobs are different measurements
class Trial:
    """One configuration measured at one fidelity (number of requests)."""

    index: int
    stage: str  # "coarse", "coarse/confirm", "fine1", "fine1/confirm", "fine2", ...
    knobs: Knobs
    num_requests: int
    probes: list[RateProbe] = field(default_factory=list)
    status: str = "ok"  # ok | pruned | failed: ... | skipped: budget
    duration_s: float = 0.0
    is_default: bool = False

    @property
    def measured(self) -> bool:
        return bool(self.probes)

    @property
    def best_probe(self) -> RateProbe | None:
        passing = [p for p in self.probes if p.meets_slo]
        return max(passing, key=lambda p: p.effective_rate_rps) if passing else None

    @property
    def goodput_rps(self) -> float:
        """The highest request rate that met the SLO (0 when none did)."""
        best = self.best_probe
        return best.effective_rate_rps if best is not None else 0.0

    @property
    def max_throughput_rps(self) -> float:
        return self.probes[0].report.request_throughput_rps if self.probes else 0.0

    @property
    def shown_probe(self) -> RateProbe | None:
        """The probe the table shows: the best passing one, else the ceiling run."""
        return self.best_probe or (self.probes[0] if self.probes else None)

    def score(self) -> tuple[float, float]:
        return (self.goodput_rps, self.max_throughput_rps)


TrialRunner = Callable[[Knobs, int, Callable[[], bool]], "list[RateProbe]"]  # (knobs, num_requests, out_of_time)


@dataclass
class TuneSettings:
    slo: SLO
    budget_s: float = 1800.0
    max_trials: int | None = None
    rate_probes: int = DEFAULT_RATE_PROBES
    screen_requests: int | None = None  # default: max(8, a quarter of the workload)
    keep_fraction: float = 1 / 3


class Tuner:
    """Runs the coarse-to-fine search; `run_trial(knobs, num_requests, out_of_time)` measures one config."""

    def __init__(self, run_trial: TrialRunner, default: Knobs,
                 space: SearchSpace, num_requests: int, settings: TuneSettings,
                 log: Callable[[str], None] = lambda line: None) -> None:
        self.run_trial, self.default, self.space = run_trial, dict(default), space
        self.num_requests, self.settings, self.log = num_requests, settings, log
        self.trials: list[Trial] = []
        self.start_s = time.perf_counter()
        self._cost_s: dict[int, list[float]] = {}  # num_requests -> durations of measured trials

    @property
    def screen_requests(self) -> int:
        n = self.settings.screen_requests or max(8, self.num_requests // 4)
        return min(n, self.num_requests)

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start_s

    def out_of_time(self) -> bool:
        return self.elapsed_s() > self.settings.budget_s

    def _affordable(self, num_requests: int) -> bool:
        measured = [t for t in self.trials if t.measured]
        if self.settings.max_trials is not None and len(measured) >= self.settings.max_trials:
            return False
        costs = self._cost_s.get(num_requests) or [c for cs in self._cost_s.values() for c in cs]
        estimate = sum(costs) / len(costs) if costs else 0.0
        return self.elapsed_s() + estimate <= self.settings.budget_s

    def measure(self, knobs: Knobs, stage: str, num_requests: int) -> Trial:
        trial = Trial(len(self.trials) + 1, stage, dict(knobs), num_requests,
                      is_default=knobs_key(knobs) == knobs_key(self.default))
        self.trials.append(trial)
        if not trial.is_default and not self._affordable(num_requests):
            trial.status = "skipped: budget"
            return trial
        t0 = time.perf_counter()
        try:
            trial.probes = self.run_trial(trial.knobs, num_requests, self.out_of_time)
        except (ConfigError, ValueError) as exc:  # the engine refused the config (e.g. it does not fit)
            trial.status = f"failed: {exc}"
        except Exception as exc:  # noqa: BLE001 - e.g. out of GPU memory: this config loses, the search goes on
            logger.exception("trial %d failed", trial.index)
            trial.status = f"failed: {type(exc).__name__}: {exc}"
        trial.duration_s = time.perf_counter() - t0
        if trial.measured:
            self._cost_s.setdefault(num_requests, []).append(trial.duration_s)
        self.log(format_trial_line(trial))
        return trial

    def run_stage(self, name: str, cands: Sequence[Knobs]) -> list[Trial]:
        """Screen every candidate, then confirm the best share on the whole workload; returns the final trials."""
        done = {knobs_key(t.knobs) for t in self.trials if t.measured}  # screened before: kept or pruned then
        cands = [c for c in cands if knobs_key(c) not in done]
        screened = [self.measure(c, name, self.screen_requests) for c in cands]
        ok = [t for t in screened if t.status == "ok"]
        if self.screen_requests >= self.num_requests:
            return ok
        keep = max(1, math.ceil(len(ok) * self.settings.keep_fraction))
        ranked = sorted(ok, key=lambda t: t.score(), reverse=True)
        winners = ranked[:keep] + [t for t in ranked[keep:] if t.is_default]
        for t in ranked:
            if t not in winners:
                t.status = "pruned"
        return [self.measure(t.knobs, f"{name}/confirm", self.num_requests) for t in winners]

    def run(self, max_fine_rounds: int = 3) -> "TuneResult":
        """The coarse grid, then fine rounds around the best so far while they improve it (and time is left)."""
        best = _best(self.run_stage("coarse", coarse_candidates(self.default, self.space)))
        for round_no in range(1, max_fine_rounds + 1):
            if best is None or self.out_of_time():
                break
            challenger = _best(self.run_stage(f"fine{round_no}", fine_candidates(best.knobs, self.space)))
            if challenger is None or challenger.score() <= best.score():
                break
            best = challenger
        return TuneResult(self.trials, self.settings.slo, self.num_requests, self.elapsed_s())


def _best(trials: Sequence[Trial]) -> Trial | None:
    ok = [t for t in trials if t.status == "ok" and t.measured]
    return max(ok, key=lambda t: t.score()) if ok else None


# ---- results ---------------------------------------------------------------------------------------------------------
@dataclass
class TuneResult:
    trials: list[Trial]
    slo: SLO
    num_requests: int
    elapsed_s: float

    def final_trials(self) -> list[Trial]:
        """Trials measured on the whole workload."""
        return [t for t in self.trials if t.measured and t.status == "ok" and t.num_requests == self.num_requests]

    @property
    def best(self) -> Trial | None:
        return _best(self.final_trials())

    @property
    def default(self) -> Trial | None:
        ds = [t for t in self.final_trials() if t.is_default]
        return ds[-1] if ds else None

    def front(self) -> list[Trial]:
        """Trials on the Pareto front of (goodput up, p99 TPOT at it down; p99 TTFT breaks ties)."""
        trials = [t for t in self.final_trials() if t.shown_probe is not None]
        points = [(t.goodput_rps, _latency_of(t)) for t in trials]
        return [trials[i] for i in pareto_front(points)]

    def summary(self) -> str:
        best, default = self.best, self.default
        lines = [f"SLO (p99): {_slo_text(self.slo)}; {len(self.trials)} trials in {self.elapsed_s:.1f} s"]
        if best is None:
            lines.append("no trial completed; see the failures above")
            return "\n".join(lines)
        lines.append(f"best: trial {best.index} {format_knobs(best.knobs)}: goodput {best.goodput_rps:.2f} req/s")
        if best.goodput_rps == 0:
            lines.append("no configuration met the SLO at any probed rate: loosen the SLO or add hardware")
        if default is not None:
            gain = (best.goodput_rps / default.goodput_rps - 1) * 100 if default.goodput_rps > 0 else math.inf
            on_front = any(t is default for t in self.front())
            lines.append(f"defaults: trial {default.index}: goodput {default.goodput_rps:.2f} req/s; best is "
                         f"{'+inf' if math.isinf(gain) else f'{gain:+.0f}'}% vs defaults; defaults on the Pareto "
                         f"front: {'yes' if on_front else 'no'}")
        return "\n".join(lines)


def _latency_of(t: Trial) -> float:
    p = t.shown_probe
    assert p is not None
    tpot = p.report.tpot_ms.p99
    ttft = p.report.ttft_ms.p99
    return tpot if tpot is not None else (ttft if ttft is not None else math.inf)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (x higher is better, y lower is better), by x."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((ox >= x and oy <= y) and (ox > x or oy < y) for j, (ox, oy) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _slo_text(slo: SLO) -> str:
    return ", ".join(f"{k}<={v:g} ms" for k, v in slo.to_dict().items())


def format_knobs(knobs: Knobs) -> str:
    return " ".join(f"{k}={v}" for k, v in knobs.items())


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_trial_line(t: Trial) -> str:
    p = t.shown_probe
    tail = "" if p is None else (f" goodput {t.goodput_rps:.2f} req/s (ceiling {t.max_throughput_rps:.2f}), "
                                 f"p99 ttft {_fmt(p.report.ttft_ms.p99)} ms tpot {_fmt(p.report.tpot_ms.p99)} ms")
    return f"trial {t.index} [{t.stage}, {t.num_requests} req] {format_knobs(t.knobs)}: {t.status}{tail}"


def format_trials(result: TuneResult) -> str:
    """The table of every trial (latencies at the goodput rate, else at rate inf)."""
    head = ("#", "stage", "reqs", "batch", "tokens", "policy", "chunked", "tpb", "ceil req/s", "goodput",
            "out tok/s", "ttft p99", "tpot p99", "status")
    rows = [head]
    best = result.best
    for t in result.trials:
        p = t.shown_probe
        rows.append((
            str(t.index) + ("*" if t is best else "") + ("d" if t.is_default else ""), t.stage, str(t.num_requests),
            str(t.knobs["max_batch_size"]), str(t.knobs["max_num_tokens"]),
            "no_evict" if t.knobs["batch_scheduler_policy"] == "guaranteed_no_evict" else "max_util",
            "on" if t.knobs["enable_chunked_context"] else "off", str(t.knobs["tokens_per_block"]),
            _fmt(t.max_throughput_rps, 2) if t.measured else "-", _fmt(t.goodput_rps, 2) if t.measured else "-",
            _fmt(p.report.output_token_throughput_tps) if p else "-", _fmt(p.report.ttft_ms.p99) if p else "-",
            _fmt(p.report.tpot_ms.p99) if p else "-", t.status[:60]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i not in (1, 13) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             .rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "(* best, d defaults; latencies in ms at the goodput rate, else at rate inf)\n" + "\n".join(lines)


def plot_pareto(result: TuneResult, path: str) -> None:
    """P99 TTFT and P99 TPOT against output token throughput: every probe of the final trials, the Pareto front of
    each panel joined, the SLO bound dashed, the best and the default trials marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    trials = result.final_trials()
    for ax, key, bound, title in ((axes[0], "ttft_ms", result.slo.ttft_ms, "P99 TTFT (ms)"),
                                  (axes[1], "tpot_ms", result.slo.tpot_ms, "P99 TPOT (ms)")):
        pts = [(p.report.output_token_throughput_tps, getattr(p.report, key).p99, t) for t in trials
               for p in t.probes if getattr(p.report, key).p99 is not None]
        ax.scatter([x for x, _, _ in pts], [y for _, y, _ in pts], s=18, color="0.6", label="trial runs")
        front = [pts[i] for i in pareto_front([(x, y) for x, y, _ in pts])]
        ax.plot([x for x, _, _ in front], [y for _, y, _ in front], color="tab:red", marker="o", label="Pareto front")
        for marker, trial, label in (("*", result.best, "best"), ("s", result.default, "defaults")):
            mine = [(x, y) for x, y, t in pts if t is trial]
            if mine:
                ax.scatter([x for x, _ in mine], [y for _, y in mine], marker=marker, s=110, zorder=3,
                           facecolors="none" if marker == "s" else "tab:green", edgecolors="k", label=label)
        if bound is not None:
            ax.axhline(bound, linestyle="--", color="tab:blue", label="SLO")
        ax.set_xlabel("output token throughput (tok/s)")
        ax.set_ylabel(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"kvflight tune: {len(trials)} configurations, SLO {_slo_text(result.slo)}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- running the engine ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def reuse_loaded_model() -> Iterator[None]:
    """While tuning, every Engine reuses the first one's architecture, tokenizer and weights (the tuned fields never
    change them), so a trial costs its measurement, not a model load. Patches the loader names the engine and the
    runner imported; restores them on exit. Without those names (another engine layout) nothing is reused."""
    import importlib

    targets = (("kvflight.engine.engine", "load_arch"), ("kvflight.engine.engine", "load_tokenizer"),
               ("kvflight.runner.model_runner", "load_model"))
    saved = []
    for module_name, attr in targets:
        module = importlib.import_module(module_name)
        original = getattr(module, attr, None)
        if original is None:
            continue
        saved.append((module, attr, original))
        setattr(module, attr, _memoized(original))
    try:
        yield
    finally:
        for module, attr, original in saved:
            setattr(module, attr, original)


def _memoized(fn: Callable[..., Any]) -> Callable[..., Any]:
    cache: dict[str, Any] = {}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        key = repr((args, sorted(kwargs.items())))
        if key not in cache:
            cache[key] = fn(*args, **kwargs)
        return cache[key]

    return wrapper


class EngineTrials:
    """Measures one config: builds an Engine from base settings + knobs, warms it up (the first `warm_up` requests
    at rate inf, unmeasured: Triton compiles each new shape / tokens_per_block on first use), runs the rate
    search with the bench load generator (Poisson arrivals, fixed seed), frees the engine."""

    def __init__(self, base: dict[str, Any], requests: Sequence[BenchRequest], settings: TuneSettings,
                 warm_up: int = 16, seed: int = 0, request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> None:
        self.base, self.requests, self.settings = dict(base), list(requests), settings
        self.warm_up, self.seed, self.request_timeout_s = warm_up, seed, request_timeout_s
        self.max_prompt_tokens = max((r.num_input_tokens or 0) for r in self.requests) if self.requests else 0

    def flat_for(self, knobs: Knobs) -> dict[str, Any]:
        flat = {**self.base, **knobs}
        if not knobs["enable_chunked_context"] and "max_input_len" not in self.base and self.max_prompt_tokens:
            flat["max_input_len"] = self.max_prompt_tokens  # a whole prompt must fit one iteration
        EngineConfig.from_flat(flat)  # invalid combinations fail here, before any model work
        return flat

    def __call__(self, knobs: Knobs, num_requests: int, out_of_time: Callable[[], bool]) -> list[RateProbe]:
        from kvflight.bench.serve import EngineBackend

        flat = self.flat_for(knobs)
        requests = self.requests[:num_requests]
        backend = None
        try:
            backend = EngineBackend.from_settings(flat)  # the engine refuses here when the config cannot fit
            return backend.run_in_this_thread(lambda: asyncio.run(self._probe(backend, requests, out_of_time)))
        finally:
            if backend is not None:
                backend.engine = None  # the next trial's engine plans its memory without this one's KV cache
            backend = None
            _free_device_memory()

    async def _probe(self, backend: Any, requests: list[BenchRequest], out_of_time: Callable[[], bool]
                     ) -> list[RateProbe]:
        from kvflight.bench.serve import finalize_records, run_load

        await backend.start()
        if self.warm_up:
            warm = [requests[i % len(requests)] for i in range(self.warm_up)]
            await run_load(backend, warm, math.inf, request_timeout_s=self.request_timeout_s)

        async def measure(rate: float) -> BenchReport:
            records, duration_s = await run_load(backend, requests, rate, seed=self.seed,
                                                 request_timeout_s=self.request_timeout_s)
            finalize_records(records, requests)
            return build_report(records, duration_s, self.settings.slo, {"request_rate": rate})

        return await find_slo_rate(measure, self.settings.slo, self.settings.rate_probes, out_of_time)


def _free_device_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


# ---- CLI -------------------------------------------------------------------------------------------------------------
def add_tune_args(parser: argparse.ArgumentParser) -> None:
    """`kvflight tune [MODEL] --dataset FILE --slo ttft=MS,tpot=MS [--budget-minutes N] [engine flags]`."""
    parser.add_argument("model", nargs="?", default=None,
                        help="HF model directory, .gguf file, dummy preset name, or omitted for SmolLM2-135M-Instruct")
    parser.add_argument("--config", default=None, metavar="FILE.yaml", help="base settings; flags override them")
    parser.add_argument("--dataset", required=True, metavar="FILE",
                        help="the workload: TensorRT-LLM JSONL / legacy JSON, ShareGPT JSON or prompt JSONL "
                             "(make one with `kvflight bench dataset`)")
    parser.add_argument("--max-num-samples", type=int, default=None, metavar="N", help="use the first N requests")
    parser.add_argument("--slo", required=True, metavar="ttft=MS,tpot=MS",
                        help="p99 latency bounds in ms (any of ttft, tpot, e2e)")
    search = parser.add_argument_group("search")
    search.add_argument("--budget-minutes", type=float, default=30.0, help="stop starting trials after this long")
    search.add_argument("--max-trials", type=int, default=None, help="stop after this many measured trials")
    search.add_argument("--search", action="append", default=[], metavar="KEY=V1,V2",
                        help=f"values to try for one field ({', '.join(TUNED_FIELDS)}); repeat for several "
                             f"(default: max_batch_size {','.join(map(str, DEFAULT_BATCH_GRID))}, max_num_tokens "
                             f"{','.join(map(str, DEFAULT_TOKEN_GRID))}, both policies, chunked on/off, "
                             f"tokens_per_block {','.join(map(str, DEFAULT_BLOCK_GRID))})")
    search.add_argument("--rate-probes", type=int, default=DEFAULT_RATE_PROBES,
                        help="bisection steps of the rate search after the rate-inf run")
    search.add_argument("--screen-requests", type=int, default=None, metavar="N",
                        help="requests per screening run (default: max(8, a quarter of the workload))")
    search.add_argument("--warm-up", type=int, default=16, metavar="N",
                        help="unmeasured requests at rate inf first in every trial (compiles the kernels of its "
                             "shapes; with too few, the first trials measure Triton's compile time)")
    search.add_argument("--arrival-seed", type=int, default=0, help="seed of the Poisson arrivals")
    search.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S, metavar="S")
    out = parser.add_argument_group("output")
    out.add_argument("--output-config", default=None, metavar="FILE.yaml", help="write the best config as YAML")
    out.add_argument("--plot", default=None, metavar="FILE.png", help="plot the Pareto front (matplotlib)")
    add_cli_args(parser, skip=("model",))


def _base_settings(args: argparse.Namespace) -> dict[str, Any]:
    flat = load_yaml(args.config) if args.config else {}
    flat.update(flat_from_args(args))
    if args.model is not None:
        flat["model"] = args.model
    EngineConfig.from_flat(flat)  # fail fast on a bad base config
    return flat


def _default_knobs(base: dict[str, Any]) -> Knobs:
    cfg = EngineConfig.from_flat(base)
    return {"max_batch_size": cfg.scheduler.max_batch_size, "max_num_tokens": cfg.scheduler.max_num_tokens,
            "batch_scheduler_policy": cfg.scheduler.batch_scheduler_policy,
            "enable_chunked_context": cfg.scheduler.enable_chunked_context,
            "tokens_per_block": cfg.cache.tokens_per_block}


def _load_requests(args: argparse.Namespace, base: dict[str, Any]) -> list[BenchRequest]:
    tokenizer = None
    if detect_format(args.dataset) == "sharegpt":
        tokenizer = get_tokenizer(base.get("tokenizer"), base.get("model"))
    requests = load_dataset(args.dataset, tokenizer, args.max_num_samples)
    if not requests:
        raise DatasetError(f"--dataset {args.dataset}: no requests in it")
    if any(r.input_ids is None for r in requests):  # tokenize once, outside the measured time
        tokenizer = tokenizer or get_tokenizer(base.get("tokenizer"), base.get("model"))
        for r in requests:
            if r.input_ids is None:
                r.input_ids = list(tokenizer.encode(r.prompt))
    return requests


def run_tune(args: argparse.Namespace) -> int:
    """Tune; print the trials and the verdict; write --output-config / --plot. Exit 0, 1 (no trial ran), 2 (input)."""
    try:
        slo = parse_slo(args.slo)
        base = _base_settings(args)
        requests = _load_requests(args, base)
        space = SearchSpace.for_workload(len(requests)).override(args.search)
        settings = TuneSettings(slo, budget_s=args.budget_minutes * 60, max_trials=args.max_trials,
                                rate_probes=args.rate_probes, screen_requests=args.screen_requests)
        default = _default_knobs(base)
        trials = EngineTrials(base, requests, settings, args.warm_up, args.arrival_seed, args.request_timeout)
    except (ValueError, OSError) as exc:
        print(f"kvflight tune: error: {exc}", file=sys.stderr)
        return 2
    with reuse_loaded_model():
        tuner = Tuner(trials, default, space, len(requests), settings, log=lambda line: print(line, file=sys.stderr))
        result = tuner.run()
    print(format_trials(result))
    print(result.summary())
    return _write_outputs(args, result, trials)


def _write_outputs(args: argparse.Namespace, result: TuneResult, trials: EngineTrials) -> int:
    if result.best is None:
        return 1
    if args.output_config:
        from kvflight.tune.planner import config_yaml, typed_settings

        best = result.best
        flat = typed_settings(trials.flat_for(best.knobs))
        header = [f"kvflight tune: goodput {best.goodput_rps:.2f} req/s under p99 {_slo_text(result.slo)} "
                  f"on {args.dataset} ({result.num_requests} requests)"]
        if result.default is not None:
            header.append(f"defaults: {result.default.goodput_rps:.2f} req/s")
        with open(args.output_config, "w", encoding="utf-8") as fh:
            fh.write(config_yaml(flat, header))
        print(f"best config written to {args.output_config}", file=sys.stderr)
    if args.plot:
        try:
            plot_pareto(result, args.plot)
            print(f"Pareto plot written to {args.plot}", file=sys.stderr)
        except RuntimeError as exc:
            print(f"kvflight tune: error: {exc}", file=sys.stderr)
            return 1
    return 0
