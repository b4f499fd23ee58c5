"""A request's greedy output is the same alone and inside a batch of 16, whatever the scheduling."""

from __future__ import annotations

import pytest

from kvflight import LLM, SamplingParams

TOPICS = ["the moon", "bread", "rivers", "chess", "volcanoes", "music", "bees", "glass", "trains", "salt",
          "clouds", "maps", "paper", "owls", "tea", "bridges"]


def _prompts(tokenizer) -> list[list[int]]:
    out = []
    for i, topic in enumerate(TOPICS):
        text = f"Tell me about {topic}." + " Please be detailed and precise." * (i * 3 % 17)
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                            add_generation_prompt=True)
        out.append(tokenizer.encode(ids, add_special_tokens=False))
    return out


MAX_TOKENS = [8 + (i * 5) % 17 for i in range(16)]
BASE = dict(dtype="float32", device="cpu", max_seq_len=512, tokens_per_block=16)


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer):
    p = _prompts(smollm2_tokenizer)
    assert min(map(len, p)) < 40 < 120 < max(map(len, p))  # mixed lengths
    return p


@pytest.fixture(scope="module")
def alone(smollm2_path, prompts):
    llm = LLM(smollm2_path, kv_cache_bytes=128 << 20, **BASE)
    return [llm.generate([p], SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True))[0].outputs[0].token_ids
            for p, m in zip(prompts, MAX_TOKENS)]


@pytest.mark.slow
@pytest.mark.parametrize("name, settings", [
    ("chunked, max_utilization", dict(max_num_tokens=64, enable_chunked_context=True)),
    ("no chunking", dict(max_num_tokens=512, enable_chunked_context=False)),
    ("guaranteed_no_evict", dict(max_num_tokens=128, batch_scheduler_policy="guaranteed_no_evict")),
    ("preemption (small pool)", dict(max_num_tokens=256, max_tokens_in_paged_kv_cache=640,
                                     enable_kv_cache_reuse=False)),
])
def test_batch_invariance(smollm2_path, prompts, alone, name, settings):
    llm = LLM(smollm2_path, **{**dict(kv_cache_bytes=128 << 20), **BASE, **settings})
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in MAX_TOKENS]
    outs = llm.generate(prompts, params)
    for i, out in enumerate(outs):
        assert out.outputs[0].token_ids == alone[i], f"{name}: request {i} differs"
    stats = llm.engine.scheduler.iteration_stats()
    if "small pool" in name:
        assert stats["num_preemptions_total"] > 0, "the small pool should have forced preemption"
    if name == "guaranteed_no_evict":
        assert stats["num_preemptions_total"] == 0
    assert not llm.engine.has_unfinished_requests()
    llm.engine.check_integrity()
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_blocks
