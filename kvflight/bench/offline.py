"""Offline GPU benchmark helpers: random token-id prompts and a timed greedy LLM.generate of a fixed output length."""

from __future__ import annotations

import random
import time
from typing import Any

import torch

from kvflight.types import SamplingParams


def rand_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n prompts of `length` token ids drawn from [100, vocab - 100) (no special tokens at either end)."""
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


def timed_generate(llm: Any, prompts: list[list[int]], max_tokens: int) -> float:
    """Seconds for llm.generate of exactly max_tokens greedy tokens per prompt (EOS ignored), device synced."""
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate(prompts, sp)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if not all(len(o.outputs[0].token_ids) == max_tokens for o in outs):
        raise RuntimeError(f"a request stopped before max_tokens={max_tokens}: the timing would be wrong")
    return time.perf_counter() - t
