"""On the GPU: greedy SmolLM2 outputs of the Triton kernels + CUDA graphs vs the plain-torch backend (eager).

    python benchmarks/greedy_equality_gpu.py MODEL.gguf [--tokens 64]

float32: the token ids must be equal (exit 1 if not). bfloat16: prints how many tokens agree before the first
difference (different summation orders may flip a near-tie in bf16; that is reported, not hidden).
"""

from __future__ import annotations

import argparse
import sys

import torch

from kvflight import LLM, SamplingParams

PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about the sea.",
    "List three prime numbers greater than 100.",
    "用中文介绍一下长城。",
    "Explain what a paged KV cache is to a five-year-old.",
    "Translate 'good morning' into Spanish, German and Japanese.",
    "Write a Python function that reverses a string.",
    "Give me a short story opening with an emoji 🚀.",
]


def run(model: str, backend: str, dtype: str, eager: bool, tokens: int, async_scheduling: str) -> list[list[int]]:
    llm = LLM(model, kernel_backend=backend, dtype=dtype, enforce_eager=eager, max_seq_len=2048,
              max_batch_size=8, max_num_tokens=512, async_scheduling=async_scheduling)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    outs = llm.chat([[{"role": "user", "content": p}] for p in PROMPTS], params)
    ids = [o.outputs[0].token_ids for o in outs]
    del llm
    import gc; gc.collect()
    torch.cuda.empty_cache()
    return ids


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    failed = False
    print(f"{'dtype':<9} {'torch eager sync vs':<30} {'equal sequences':<16} tokens agreeing before first difference")
    for dtype in ("float32", "bfloat16"):
        ref = run(args.model, "torch", dtype, True, args.tokens, "off")
        for label, eager, mode in (("triton eager", True, "off"), ("triton + CUDA graphs", False, "off"),
                                   ("triton + CUDA graphs + async", False, "on")):
            got = run(args.model, "triton", dtype, eager, args.tokens, mode)
            agree = []
            for a, b in zip(ref, got):
                n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                agree.append(n)
            equal = sum(a == b for a, b in zip(ref, got))
            print(f"{dtype:<9} {label:<30} {equal}/{len(ref):<14} {agree}")
            if dtype == "float32" and equal != len(ref):
                failed = True
    print("FAIL: float32 outputs differ" if failed else "OK: float32 outputs equal token for token")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
