"""Where each request's time to first token went, client and server together: joins the server's request trace
(KVFLIGHT_REQUEST_TRACE=FILE) with a `kvflight bench serve --result-json R --save-detailed` file by response id.
Both sides' clocks are CLOCK_MONOTONIC on Linux (time.monotonic in the server, time.perf_counter in the client), so
the client's send and first-token times line up with the server's stages when both ran on one host.

    python benchmarks/ttft_split.py TRACE.jsonl RESULT.json

(a result file holds no warm-up requests: only measured ones join).

Prints percentiles of each stage's share, in ms:
  to_api      client send -> arrival in the API process (HTTP request, validation, tokenizing)
  queue       -> first scheduled in an engine step
  engine      -> the engine core sent the step's outputs (the step in flight + the request's own prefill step)
  api         -> detokenized and queued for its HTTP response in the API process
  to_client   -> the client read the first chunk with text (SSE writes, the client's own parsing)
  ttft        the client's time to first token
"""

from __future__ import annotations

import argparse
import json
import sys


def percentiles(values: list[float]) -> str:
    v = sorted(values)
    if not v:
        return "-"
    n = len(v)
    return (f"p10 {v[n // 10]:7.1f}  p50 {v[n // 2]:7.1f}  p90 {v[int(0.9 * n)]:7.1f}  p99 {v[int(0.99 * n)]:7.1f}"
            f"  mean {sum(v) / n:7.1f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("result")
    args = ap.parse_args()
    trace = {}
    with open(args.trace, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                t = json.loads(line)
                trace[t["request_id"]] = t
    with open(args.result, encoding="utf-8") as fh:
        doc = json.load(fh)
    stages: dict[str, list[float]] = {k: [] for k in ("to_api", "queue", "engine", "api", "to_client", "ttft")}
    joined = 0
    for run in doc["runs"]:
        for r in run.get("requests") or []:
            t = trace.get(r.get("response_id") or "")
            if t is None or r.get("first_token_s") is None or "arrival_s" not in t or t["scheduled"] is None:
                continue
            joined += 1
            arrival_ms = t["arrival_s"] * 1e3
            stages["to_api"].append(arrival_ms - r["start_s"] * 1e3)
            stages["queue"].append(t["scheduled"])
            stages["engine"].append(t["engine_sent"] - t["scheduled"])
            stages["api"].append(t["api_handled"] - t["engine_sent"])
            stages["to_client"].append(r["first_token_s"] * 1e3 - arrival_ms - t["api_handled"])
            stages["ttft"].append(r["ttft_ms"])
    if not joined:
        print("no request of the result file is in the trace: were both from the same run, with --save-detailed?")
        return 1
    print(f"{joined} requests joined (of {len(trace)} traced)")
    for name, values in stages.items():
        print(f"  {name:<10} {percentiles(values)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
