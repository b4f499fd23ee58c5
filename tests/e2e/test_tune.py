"""Autotuner: the rate search and the coarse-to-fine search on a synthetic system (exact trial sequence), then
`kvflight tune` end to end on the real SmolLM2 engine on CPU with a tiny workload and budget: a table of trials, a
best-config YAML that EngineConfig loads, a Pareto plot. No timing is asserted."""

import asyncio
import json
import math

import pytest

from kvflight.bench.metrics import SLO, RequestRecord, build_report
from kvflight.config import EngineConfig, load_yaml
from kvflight.server.cli import main
from kvflight.tune.tuner import (
    SearchSpace,
    Tuner,
    TuneSettings,
    coarse_candidates,
    find_slo_rate,
    fine_candidates,
    format_trials,
    meets_slo,
    pareto_front,
    plot_pareto,
)

DEFAULT = {"max_batch_size": 256, "max_num_tokens": 8192, "batch_scheduler_policy": "max_utilization",
           "enable_chunked_context": True, "tokens_per_block": 32}


def fake_report(rate: float, ttft_ms: float, tpot_ms: float, throughput_rps: float, slo: SLO, n: int = 20):
    """n requests of 5 output tokens with the given latencies, over n / throughput seconds."""
    records = []
    for i in range(n):
        t0 = float(i)
        first = t0 + ttft_ms / 1e3
        times = [first + k * tpot_ms / 1e3 for k in range(5)]
        records.append(RequestRecord(start_time_s=t0, token_times_s=times, prompt_tokens=10, output_tokens=5,
                                     success=True, end_time_s=times[-1]))
    return build_report(records, n / throughput_rps, slo, {"request_rate": rate})


class Queue:
    """A synthetic server: latency grows as the offered rate nears capacity (an M/M/1-like curve)."""

    def __init__(self, capacity_rps: float, base_tpot_ms: float = 10.0) -> None:
        self.capacity, self.base_tpot = capacity_rps, base_tpot_ms
        self.rates: list[float] = []

    async def measure(self, rate: float, slo: SLO):
        self.rates.append(rate)
        load = 0.99 if math.isinf(rate) else min(rate / self.capacity, 0.99)
        tpot = self.base_tpot / (1 - load)
        return fake_report(rate, 4 * tpot, tpot, self.capacity if math.isinf(rate) else rate, slo)


def test_rate_search_bisects_to_the_slo_rate():
    slo = SLO(ttft_ms=200, tpot_ms=50)  # tpot = 10 / (1 - load) <= 50  <=>  load <= 0.8
    q = Queue(capacity_rps=10)
    probes = asyncio.run(find_slo_rate(lambda r: q.measure(r, slo), slo, rate_probes=4))
    assert q.rates == [math.inf, 5.0, 7.5, 8.75, 8.125]  # ceiling 10 req/s, then bisection of (0, 10]
    assert [p.meets_slo for p in probes] == [False, True, True, False, False]
    assert max(p.effective_rate_rps for p in probes if p.meets_slo) == 7.5
    # a loose SLO is met at rate inf: one probe, goodput = the measured ceiling
    loose = SLO(tpot_ms=10_000)
    q2 = Queue(capacity_rps=10)
    probes = asyncio.run(find_slo_rate(lambda r: q2.measure(r, loose), loose, rate_probes=4))
    assert len(probes) == 1 and probes[0].meets_slo and probes[0].effective_rate_rps == pytest.approx(10)
    # failures never meet an SLO
    rep = fake_report(1.0, 1, 1, 1, loose)
    rep.num_failed = 1
    assert not meets_slo(rep, loose)


def synthetic_trials(slo: SLO, log: list):
    """Capacity peaks at max_batch_size 64, max_num_tokens 4096, chunked on, 16 tokens per block, max_utilization."""

    def capacity(k) -> float:
        c = 20.0 - abs(math.log2(k["max_batch_size"] / 64)) * 3 - abs(math.log2(k["max_num_tokens"] / 4096))
        c -= 0 if k["enable_chunked_context"] else 2
        c -= 0 if k["batch_scheduler_policy"] == "max_utilization" else 1
        c += 0.5 if k["tokens_per_block"] == 16 else 0
        return c

    def run_trial(knobs, num_requests, out_of_time):
        log.append((dict(knobs), num_requests))
        q = Queue(capacity(knobs))
        return asyncio.run(find_slo_rate(lambda r: q.measure(r, slo), slo, 3, out_of_time))

    return run_trial


def test_tuner_coarse_to_fine_with_pruning():
    slo = SLO(tpot_ms=50)
    log: list = []
    space = SearchSpace(max_batch_size=[16, 64, 256], max_num_tokens=[2048, 8192], tokens_per_block=[16, 32])
    settings = TuneSettings(slo, budget_s=3600, screen_requests=25)
    result = Tuner(synthetic_trials(slo, log), DEFAULT, space, num_requests=100, settings=settings).run()
    coarse = [t for t in result.trials if t.stage == "coarse"]
    # the defaults, then the 3 x 2 grid, which holds the defaults' (256, 8192) already
    assert [t.knobs for t in coarse] == coarse_candidates(DEFAULT, space)
    assert coarse[0].is_default and len(coarse) == 6 and all(t.num_requests == 25 for t in coarse)
    confirmed = [t for t in result.trials if t.stage == "coarse/confirm"]
    # the best third of 6 (both max_batch_size 64 trials), plus the defaults, measured again on all 100 requests
    assert [(t.knobs["max_batch_size"], t.num_requests) for t in confirmed] == [(64, 100), (64, 100), (256, 100)]
    assert confirmed[-1].is_default and sum(t.status == "pruned" for t in coarse) == 3
    fine = [t for t in result.trials if t.stage == "fine1"]
    best_coarse = max(confirmed, key=lambda t: t.score())
    assert [t.knobs for t in fine] == fine_candidates(best_coarse.knobs, space)
    # round 1 finds max_num_tokens 4096, round 2 adds tokens_per_block 16, round 3 finds nothing better: the peak
    assert {t.stage for t in result.trials} >= {"fine1", "fine2", "fine3"}
    best = result.best
    assert {k: best.knobs[k] for k in ("max_batch_size", "max_num_tokens", "tokens_per_block")} == {
        "max_batch_size": 64, "max_num_tokens": 4096, "tokens_per_block": 16}
    assert best.goodput_rps > result.default.goodput_rps
    table = format_trials(result)
    assert "pruned" in table and "coarse/confirm" in table and "fine1/confirm" in table
    assert "best is" in result.summary() and "defaults on the Pareto front: no" in result.summary()
    assert best in result.front()


def test_tuner_budget_and_max_trials():
    slo = SLO(tpot_ms=50)
    log: list = []
    space = SearchSpace(max_batch_size=[16, 64], max_num_tokens=[4096])
    settings = TuneSettings(slo, budget_s=3600, max_trials=2)
    result = Tuner(synthetic_trials(slo, log), DEFAULT, space, num_requests=8, settings=settings).run()
    assert len(log) == 2  # the defaults and one more
    assert [t.status for t in result.trials if not t.measured] == ["skipped: budget"] * (len(result.trials) - 2)
    # a zero budget still measures the defaults
    log.clear()
    result = Tuner(synthetic_trials(slo, log), DEFAULT, space, 8, TuneSettings(slo, budget_s=0)).run()
    assert len(log) == 1 and result.default is not None and result.best is result.default


def test_pareto_front_and_plot(tmp_path):
    assert pareto_front([(1, 5), (2, 6), (2, 4), (3, 9), (0.5, 1)]) == [4, 2, 3]
    slo = SLO(ttft_ms=300, tpot_ms=50)
    space = SearchSpace(max_batch_size=[16, 64], max_num_tokens=[4096], batch_scheduler_policy=["max_utilization"],
                        enable_chunked_context=[True], tokens_per_block=[32])
    result = Tuner(synthetic_trials(slo, []), DEFAULT, space, 8, TuneSettings(slo)).run()
    path = tmp_path / "front.png"
    plot_pareto(result, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_search_overrides():
    space = SearchSpace.for_workload(num_requests=40)
    assert space.max_batch_size == [16, 40]  # 64 and 256 act like 40 when only 40 requests exist
    space.override(["max_num_tokens=1k,4096", "enable_chunked_context=off",
                    "batch_scheduler_policy=guaranteed_no_evict"])
    assert space.max_num_tokens == [1000, 4096] and space.enable_chunked_context == [False]
    with pytest.raises(ValueError, match="max_batch_size"):
        space.override(["max_batch=4"])
    with pytest.raises(ValueError, match="one of"):
        space.override(["batch_scheduler_policy=fastest"])


def test_tune_cli_on_smollm2_cpu(tmp_path, capsys, smollm2_path):
    """The real engine on CPU: three 6-token prompts of 2 output tokens, two measured trials (CPU steps are slow)."""
    dataset = tmp_path / "tiny.jsonl"
    with open(dataset, "w") as fh:
        for i in range(3):
            ids = [100 + i + k for k in range(6)]
            fh.write(json.dumps({"task_id": i, "input_ids": ids, "output_tokens": 2}) + "\n")
    best_yaml, plot = tmp_path / "best.yaml", tmp_path / "pareto.png"
    code = main(["tune", smollm2_path, "--dataset", str(dataset), "--slo", "ttft=600000,tpot=600000",
                 "--budget-minutes", "5", "--max-trials", "2", "--rate-probes", "1", "--warm-up", "0",
                 "--search", "max_batch_size=2", "--search", "max_num_tokens=64",
                 "--search", "batch_scheduler_policy=max_utilization", "--search", "enable_chunked_context=true",
                 "--search", "tokens_per_block=16",
                 "--device", "cpu", "--kv-cache-bytes", "16MiB", "--max-seq-len", "64",
                 "--output-config", str(best_yaml), "--plot", str(plot)])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "ceil req/s" in out.out and "goodput" in out.out and "best: trial" in out.out
    rows = [line for line in out.out.splitlines() if line.strip()[:1].isdigit()]
    measured = [r for r in rows if "skipped: budget" not in r]
    assert len(measured) == 2 and " 256 " in measured[0] and " 2 " in measured[1]  # the defaults, then the grid
    assert "skipped: budget" in out.out  # the fine round ran out of trials
    flat = load_yaml(best_yaml)
    cfg = EngineConfig.from_flat(flat)
    assert cfg.model.model == smollm2_path and cfg.model.device == "cpu" and cfg.scheduler.max_seq_len == 64
    assert flat["max_seq_len"] == 64 and flat["kv_cache_bytes"] == 16 * 2**20  # typed, not the flags' strings
    assert cfg.scheduler.max_batch_size in (2, 256) and cfg.cache.kv_cache_bytes == 16 * 2**20
    assert best_yaml.read_text().startswith("# kvflight tune: goodput")
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_tune_cli_input_errors(tmp_path, capsys):
    assert main(["tune", "--dataset", str(tmp_path / "none.jsonl"), "--slo", "ttft=10"]) == 2
    assert "none.jsonl" in capsys.readouterr().err
    (tmp_path / "d.jsonl").write_text(json.dumps({"input_ids": [1, 2], "output_tokens": 2}) + "\n")
    assert main(["tune", "--dataset", str(tmp_path / "d.jsonl"), "--slo", "ttfb=10"]) == 2
    assert "ttft" in capsys.readouterr().err
    assert main(["tune", "--dataset", str(tmp_path / "d.jsonl"), "--slo", "ttft=10", "--search", "tpb=4"]) == 2
    assert "tokens_per_block" in capsys.readouterr().err
