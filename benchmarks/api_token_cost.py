"""CPU cost of one streamed token in the API process: the OutputProcessor (incremental detokenization, stop checks,
outputs) plus one OpenAI completion chunk encoded as an SSE line, for a decode step of 256 streams (SmolLM2's
tokenizer, random ids), with each detokenizer, before and after the start-up objects are frozen out of the garbage
collector. Runs anywhere (CPU); the figure bounds how many tokens per second one API process can stream.

    python benchmarks/api_token_cost.py [--streams 256] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

from kvflight.engine import detokenizer
from kvflight.engine.output import OutputProcessor
from kvflight.model.loader import load_tokenizer, resolve_model
from kvflight.server.engine_core import freeze_startup_objects
from kvflight.types import SamplingParams, StepOutput


def run(tokenizer, streams: int, steps: int) -> tuple[float, float]:
    """(ms per step in the OutputProcessor, ms per step building and encoding the chunks)."""
    proc = OutputProcessor(tokenizer, frozenset([tokenizer.eos_token_id]))
    rng = random.Random(0)
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    for i in range(streams):
        proc.add_request(f"r{i}", None, [rng.randrange(100, 40000) for _ in range(32)], params)
    ids = [proc.engine_ids(f"r{i}")[0] for i in range(streams)]
    t_proc = t_sse = 0.0
    for _ in range(steps):
        outs = [StepOutput(request_id=eid, new_token_ids=[rng.randrange(100, 40000)]) for eid in ids]
        t0 = time.perf_counter()
        result = proc.process(outs)
        t1 = time.perf_counter()
        for out in result.outputs:
            chunk = {"id": out.request_id, "object": "text_completion", "created": 0, "model": "m",
                     "choices": [{"index": 0, "text": out.outputs[0].text[-8:], "logprobs": None,
                                  "finish_reason": None}]}
            f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode()
        t_proc += t1 - t0
        t_sse += time.perf_counter() - t1
    return t_proc / steps * 1e3, t_sse / steps * 1e3


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    tokenizer = load_tokenizer(resolve_model(None))
    print(f"{'detokenizer':<30} {'start-up objects':<17} {'process ms/step':>15} {'chunks ms/step':>14} "
          f"{'us/token':>9}")
    for frozen in (False, True):
        if frozen:  # what the server's two processes do once started (engine_core.freeze_startup_objects)
            freeze_startup_objects()
        for use_stream in (True, False):
            detokenizer.USE_DECODE_STREAM = use_stream
            proc_ms, sse_ms = run(tokenizer, args.streams, args.steps)
            name = "tokenizers DecodeStream" if use_stream else "windowed transformers decode"
            print(f"{name:<30} {'gc.freeze' if frozen else 'collected':<17} {proc_ms:>15.2f} {sse_ms:>14.2f} "
                  f"{(proc_ms + sse_ms) / args.streams * 1e3:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
