"""Static-batch latency benchmark (`kvflight bench latency`, like TensorRT-LLM's gptSessionBenchmark): for each
(batch size, input length, output length) send the whole batch at once to the in-process engine and time it.

Per case it reports (means over --num-runs after --warm-up runs):

* latency_ms: first request added → last request finished.
* ttft_ms: → the moment every request of the batch has its first token (the batch's context phase). With output
  length 1 this is the whole latency: the context latency.
* decode_step_ms: (latency − ttft) / (output_len − 1), the time of one generation step of the batch.
* output_tokens_per_s: batch × output_len / latency.
* decode_bandwidth_gbs: weight bytes (num_params × dtype bytes) / decode_step time: the weight-streaming rate a
  decode step achieves (KV reads not counted, so it is a lower bound on the memory traffic).
* context_tflops: 2 × num_params × batch × input_len / ttft; overall_tflops: 2 × num_params × tokens computed
  (batch × (input_len + output_len − 1)) / latency. Attention FLOPs are not counted.

Requests use random token ids (fresh each run, so no prefix-cache hits), greedy sampling and ignore_eos, so every
request makes exactly output_len tokens. max_batch_size and max_num_tokens default to what keeps the whole batch in
flight with its context in one step. The CLI: `add_latency_args(parser)` / `run_latency(args)`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger("kvflight.bench")

MAX_IDLE_STEPS = 1000  # consecutive empty steps with requests unfinished: the engine is stuck


@dataclass(frozen=True)
class LatencyCase:
    batch_size: int
    input_len: int
    output_len: int


@dataclass
class LatencyResult:
    """One case's numbers (means over the measured runs)."""

    batch_size: int
    input_len: int
    output_len: int
    num_runs: int
    latency_ms: float
    latency_min_ms: float
    ttft_ms: float
    decode_step_ms: float | None
    output_tokens_per_s: float
    decode_bandwidth_gbs: float | None
    context_tflops: float
    overall_tflops: float
    num_preemptions: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_batch_sizes(text: str) -> list[int]:
    """'1,8,64' → [1, 8, 64]."""
    sizes = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise ValueError(f"batch size {part!r} is not an integer: write --batch-size 1,8,64") from None
        if value < 1:
            raise ValueError(f"batch size {value}: must be >= 1")
        sizes.append(value)
    if not sizes:
        raise ValueError("no batch size given: e.g. --batch-size 1,8,64")
    return sizes


def parse_input_output_len(text: str) -> list[tuple[int, int]]:
    """'2048,128;3072,1' → [(2048, 128), (3072, 1)] (gptSessionBenchmark's --input_output_len)."""
    pairs = []
    for part in str(text).replace(" ", "").split(";"):
        if not part:
            continue
        pieces = part.split(",")
        try:
            if len(pieces) != 2:
                raise ValueError
            n_in, n_out = int(pieces[0]), int(pieces[1])
        except ValueError:
            raise ValueError(f"input/output length pair {part!r}: write INPUT,OUTPUT token counts, pairs separated "
                             "by ';', e.g. --input-output-len '2048,128;3072,1'") from None
        if n_in < 1 or n_out < 1:
            raise ValueError(f"input/output length pair {part!r}: both lengths must be >= 1")
        pairs.append((n_in, n_out))
    if not pairs:
        raise ValueError("no input/output lengths given: e.g. --input-output-len '2048,128;3072,1'")
    return pairs


def make_cases(batch_sizes: Sequence[int], io_lens: Sequence[tuple[int, int]]) -> list[LatencyCase]:
    return [LatencyCase(b, i, o) for (i, o), b in itertools.product(io_lens, batch_sizes)]


def engine_settings_for(cases: Sequence[LatencyCase], flat: dict[str, Any]) -> dict[str, Any]:
    """Engine settings that keep the largest batch in flight with its whole context in one step; settings the user
    gave win, and a given max_batch_size that is too small is an error."""
    out = dict(flat)
    max_batch = max(c.batch_size for c in cases)
    if out.get("max_batch_size") is not None and int(out["max_batch_size"]) < max_batch:
        raise ValueError(f"max_batch_size={out['max_batch_size']} < the largest --batch-size {max_batch}: the batch "
                         "would not be in flight at once; raise --max-batch-size or drop that batch size")
    out.setdefault("max_batch_size", max_batch)
    out.setdefault("max_num_tokens", max(max(c.batch_size * c.input_len for c in cases), max_batch))
    out.setdefault("enable_kv_cache_reuse", False)  # random prompts must not hit a cache from an earlier run
    return out


class LatencyRunner:
    """Runs cases on one Engine (made once for all cases)."""

    def __init__(self, engine: Any, seed: int = 0) -> None:
        self.engine = engine
        self.rng = np.random.default_rng(seed)
        vocab = int(engine.arch.vocab_size)
        excluded = np.fromiter(sorted(set(engine.eos_token_ids)), dtype=np.int64)
        self.allowed_ids = np.setdiff1d(np.arange(vocab, dtype=np.int64), excluded)
        self.num_params = int(engine.arch.num_params())
        self.dtype_bytes = int(getattr(engine.runner.dtype, "itemsize", 2))
        self._ids = itertools.count()

    def check(self, case: LatencyCase) -> None:
        eng = self.engine
        total = case.input_len + case.output_len
        if case.input_len > eng.max_input_len or total > eng.max_seq_len:
            raise ValueError(f"input {case.input_len} + output {case.output_len} tokens does not fit max_input_len="
                             f"{eng.max_input_len} / max_seq_len={eng.max_seq_len}; raise --max-seq-len (up to the "
                             "model's context length) or shorten the case")
        tpb = eng.kv.tokens_per_block
        need_blocks = case.batch_size * math.ceil(total / tpb)
        if need_blocks > eng.kv.num_blocks:
            logger.warning("batch %d x %d tokens needs %d KV blocks but the cache has %d: requests will be preempted "
                           "and the latency is not a static batch's; raise --kv-cache-bytes or lower the batch",
                           case.batch_size, total, need_blocks, eng.kv.num_blocks)

    def run_once(self, case: LatencyCase) -> tuple[float, float, int]:
        """One batch: returns (latency s, ttft s, preemptions)."""
        from kvflight.types import Request, SamplingParams

        eng = self.engine
        params = SamplingParams(max_tokens=case.output_len, temperature=0.0, ignore_eos=True)
        prompts = self.allowed_ids[self.rng.integers(0, self.allowed_ids.size,
                                                     size=(case.batch_size, case.input_len))].tolist()
        preempt0 = eng.scheduler.iteration_stats().get("num_preemptions_total", 0)
        first: dict[str, float] = {}
        pending: set[str] = set()
        t0 = time.perf_counter()
        for ids in prompts:
            rid = f"latency-{next(self._ids)}"
            eng.add_request(Request(request_id=rid, prompt_token_ids=ids, sampling_params=params))
            pending.add(rid)
        idle = 0
        t_end = t0
        while pending:
            iteration = eng.iteration
            outputs = eng.step()
            now = time.perf_counter()
            if eng.iteration == iteration and not outputs:  # nothing was scheduled or completed
                idle += 1
                if idle > MAX_IDLE_STEPS or not eng.has_unfinished_requests():
                    eng.abort_requests(list(pending))
                    raise RuntimeError(f"the engine stopped making progress with {len(pending)} of "
                                       f"{case.batch_size} requests unfinished (KV cache too small?)")
                continue
            idle = 0
            for so in outputs:
                if so.request_id not in pending:
                    continue
                if so.new_token_ids and so.request_id not in first:
                    first[so.request_id] = now
                if so.finish_reason is not None:
                    pending.discard(so.request_id)
                    t_end = now
        preempted = int(eng.scheduler.iteration_stats().get("num_preemptions_total", 0) - preempt0)
        return t_end - t0, max(first.values()) - t0, preempted

    def run_case(self, case: LatencyCase, num_runs: int, warm_up: int) -> LatencyResult:
        self.check(case)
        for _ in range(warm_up):
            self.run_once(case)
        runs = [self.run_once(case) for _ in range(num_runs)]
        lat = float(np.mean([r[0] for r in runs]))
        ttft = float(np.mean([r[1] for r in runs]))
        b, n_in, n_out = case.batch_size, case.input_len, case.output_len
        step = (lat - ttft) / (n_out - 1) if n_out >= 2 else None
        weight_bytes = self.num_params * self.dtype_bytes
        return LatencyResult(
            batch_size=b, input_len=n_in, output_len=n_out, num_runs=num_runs, latency_ms=lat * 1e3,
            latency_min_ms=min(r[0] for r in runs) * 1e3, ttft_ms=ttft * 1e3,
            decode_step_ms=None if step is None else step * 1e3,
            output_tokens_per_s=b * n_out / lat if lat > 0 else 0.0,
            decode_bandwidth_gbs=(weight_bytes / step / 1e9) if step else None,
            context_tflops=2 * self.num_params * b * n_in / ttft / 1e12 if ttft > 0 else 0.0,
            overall_tflops=2 * self.num_params * b * (n_in + n_out - 1) / lat / 1e12 if lat > 0 else 0.0,
            num_preemptions=sum(r[2] for r in runs))


def format_results(results: Sequence[LatencyResult]) -> str:
    """gptSessionBenchmark-style [BENCHMARK] lines, then a table."""
    lines = [f"[BENCHMARK] batch_size {r.batch_size} input_length {r.input_len} output_length {r.output_len} "
             f"latency(ms) {r.latency_ms:.2f} tokensPerSec {r.output_tokens_per_s:.2f}" for r in results]
    head = ("batch", "in", "out", "latency ms", "ttft ms", "step ms", "out tok/s", "decode GB/s", "ctx TFLOP/s",
            "TFLOP/s")
    rows = [head] + [(str(r.batch_size), str(r.input_len), str(r.output_len), f"{r.latency_ms:.2f}",
                      f"{r.ttft_ms:.2f}", "-" if r.decode_step_ms is None else f"{r.decode_step_ms:.2f}",
                      f"{r.output_tokens_per_s:.1f}",
                      "-" if r.decode_bandwidth_gbs is None else f"{r.decode_bandwidth_gbs:.1f}",
                      f"{r.context_tflops:.3f}", f"{r.overall_tflops:.3f}") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    table = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    table.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + [""] + table)


# ---- CLI ----------------------------------------------------------------------------------------------------------
def add_latency_args(parser: argparse.ArgumentParser) -> None:
    """`kvflight bench latency [MODEL] --batch-size 1,8 --input-output-len '2048,128;3072,1' ...` + engine flags."""
    parser.add_argument("model_pos", nargs="?", default=None, metavar="MODEL",
                        help="HF model directory, .gguf file, dummy preset name, or omitted for SmolLM2-135M")
    parser.add_argument("--model", default=None, help="the same as the positional MODEL")
    parser.add_argument("--batch-size", "--batch_size", default="1", metavar="B[,B..]",
                        help="batch sizes to time, e.g. 1,8,64")
    parser.add_argument("--input-output-len", "--input_output_len", default="128,32", metavar="IN,OUT[;IN,OUT..]",
                        help="token lengths to time, e.g. '2048,128;3072,1' (output 1 = context latency)")
    parser.add_argument("--warm-up", "--warm_up", type=int, default=2, metavar="N", help="untimed runs per case (2)")
    parser.add_argument("--num-runs", "--num_runs", type=int, default=10, metavar="N", help="timed runs per case (10)")
    parser.add_argument("--result-json", default=None, metavar="FILE", help="write the results as JSON")
    from kvflight.config import add_cli_args

    add_cli_args(parser)


def run_latency(args: argparse.Namespace) -> int:
    """Build one engine, time every case, print the results; returns the exit code."""
    from kvflight.config import ConfigError, flat_from_args

    try:
        if args.model and args.model_pos and args.model != args.model_pos:
            raise ValueError(f"two different models given: positional '{args.model_pos}' and --model "
                             f"'{args.model}'; give one")
        if args.num_runs < 1 or args.warm_up < 0:
            raise ValueError(f"--num-runs={args.num_runs} must be >= 1 and --warm-up={args.warm_up} >= 0")
        cases = make_cases(parse_batch_sizes(args.batch_size), parse_input_output_len(args.input_output_len))
        flat = flat_from_args(args)
        model = args.model or args.model_pos
        if model is not None:
            flat["model"] = model
        settings = engine_settings_for(cases, flat)
        from kvflight.config import EngineConfig
        from kvflight.engine.engine import Engine

        engine = Engine(EngineConfig.from_flat(settings))
    except (ValueError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runner = LatencyRunner(engine, seed=settings.get("seed") or 0)
    results = []
    for case in cases:
        try:
            results.append(runner.run_case(case, args.num_runs, args.warm_up))
        except (ValueError, RuntimeError) as exc:
            print(f"error: batch {case.batch_size}, in {case.input_len}, out {case.output_len}: {exc}",
                  file=sys.stderr)
            return 2
        print(format_results(results[-1:]).splitlines()[0], flush=True)
    print()
    print(format_results(results).split("\n\n", 1)[1])
    if args.result_json:
        folder = os.path.dirname(os.path.abspath(args.result_json))
        os.makedirs(folder, exist_ok=True)
        doc = {"model": engine.resolved.name, "dtype": str(engine.runner.dtype).removeprefix("torch."),
               "device": str(engine.runner.device), "num_params": runner.num_params,
               "engine_settings": {k: v for k, v in settings.items()}, "results": [r.to_dict() for r in results]}
        with open(args.result_json, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2)
            fh.write("\n")
        print(f"results written to {args.result_json}", file=sys.stderr)
    return 0
