"""Prefix caching on the real SmolLM2 (float32, CPU): greedy outputs are identical with reuse off, reuse on, and reuse
on with a GPU pool so small that the shared prefix is evicted to the host tier and loaded back."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvflight import LLM, SamplingParams
from kvflight.runner import model_runner

SYSTEM = ("You are a careful assistant for a small bakery in Lyon. You answer questions about opening hours, "
          "bread, pastries and cakes in short, friendly sentences, and you never invent prices. If you do not know "
          "an answer, you say so and suggest calling the shop. ")  # 54 tokens: 3 full blocks of 16
QUESTIONS = ["When do you open on Sunday?", "Which croissants do you sell?", "Can I order a birthday cake?"]
OTHER = ("The history of the printing press begins in the fifteenth century, when movable metal type made books "
         "cheaper to produce, and within fifty years presses were working in more than two hundred European cities. "
         "Printers spread news, pamphlets and scientific works, and literacy grew as books reached merchants, "
         "artisans and students who could never have afforded a hand-copied manuscript before. Governments soon "
         "tried to license the presses, and censors read every page, but cheap books kept crossing the borders.")
# 94 tokens + 8 generated: 7 blocks of 16


@pytest.fixture
def one_weights_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """The three engines of the test share one copy of the weights (the model holds no per-engine state)."""
    load = getattr(model_runner, "load_model", None)
    if load is None:
        return
    cache: dict[tuple, object] = {}

    def load_once(resolved, arch, *args, **kwargs):
        key = (str(resolved.path), repr(args), repr(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = load(resolved, arch, *args, **kwargs)
        return cache[key]

    monkeypatch.setattr(model_runner, "load_model", load_once)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny forwards run fastest on one intra-op thread; with two on a shared 2-core machine, the OpenMP threads
    wait for each other behind other processes (20x slower here)."""
    import torch

    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


def _workload(llm: LLM) -> tuple[list[list[int]], list[int]]:
    """Three rounds: one question after the shared system text; an unrelated prompt that fills a small pool; then
    two more questions (one with n=2) that reuse the system text. Returns every completion's token ids and every
    prompt's cached tokens, in order."""
    tok = llm.tokenizer
    system_ids = tok.encode(SYSTEM)
    assert len(system_ids) >= 48  # at least three full 16-token blocks to share
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    greedy_n2 = SamplingParams(n=2, temperature=0.0, max_tokens=8, ignore_eos=True)
    rounds = [
        ([system_ids + tok.encode(QUESTIONS[0])], [greedy]),
        ([tok.encode(OTHER)], [greedy]),
        ([system_ids + tok.encode(QUESTIONS[1]), system_ids + tok.encode(QUESTIONS[2])], [greedy, greedy_n2]),
    ]
    completions: list[list[int]] = []
    cached_tokens: list[int] = []
    for prompts, params in rounds:
        assert all(len(p) + 8 <= 128 for p in prompts)
        for out in llm.generate(prompts, params):
            completions.extend(c.token_ids for c in out.outputs)
            cached_tokens.append(out.num_cached_tokens)
    llm.engine.check_integrity()
    return completions, cached_tokens


def test_outputs_identical_with_reuse_off_on_and_through_the_host_tier(smollm2_path,
                                                                       one_weights_load, one_thread):
    common = dict(dtype="float32", device="cpu", max_seq_len=128, tokens_per_block=16, enable_chunked_context=True,
                  max_num_tokens=32)  # prompts of ~50-90 tokens run in chunks of 32
    off = LLM(smollm2_path, enable_kv_cache_reuse=False, batch_scheduler_policy="guaranteed_no_evict",
              max_tokens_in_paged_kv_cache=1024, **common)
    expected, cached = _workload(off)
    assert cached == [0, 0, 0, 0] and off.engine.kv.stats()["reused_blocks"] == 0
    del off

    on = LLM(smollm2_path, max_tokens_in_paged_kv_cache=1024, **common)
    completions, cached = _workload(on)
    assert completions == expected
    assert cached[:2] == [0, 0] and min(cached[2:]) >= 48, cached
    assert on.engine.kv.stats()["host_hit_blocks"] == 0
    del on

    # 8 GPU blocks: the unrelated prompt evicts the system text's blocks; the host tier keeps them for round 3
    tiny = LLM(smollm2_path, max_tokens_in_paged_kv_cache=128, kv_host_cache_bytes=32 * 720 * 1024,
               batch_scheduler_policy="max_utilization", **common)
    assert tiny.engine.kv.num_blocks == 8 and tiny.engine.kv.num_host_blocks == 32
    completions, cached = _workload(tiny)
    assert completions == expected
    assert min(cached[2:]) >= 48, cached
    stats = tiny.engine.kv.stats()
    # system block 0 stays on the GPU (evicted last), blocks 1 and 2 come back from the host
    assert stats["offloaded_blocks"] >= 3 and stats["host_hit_blocks"] >= 2, stats
    it = tiny.engine.iteration_stats()
    assert it["Host KV cache hits"] == stats["host_hit_blocks"] and it["Max host KV cache blocks"] == 32
    assert it["Reused KV cache blocks"] >= it["Host KV cache hits"]
