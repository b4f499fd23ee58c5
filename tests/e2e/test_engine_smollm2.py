"""The engine on the real SmolLM2-135M-Instruct GGUF (float32, CPU) against transformers on the same file."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from kvflight import LLM, SamplingParams

CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence why the sky is blue.",
    "List three prime numbers.",
    "你好！请用中文介绍一下你自己。",
]


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(smollm2_path, dtype="float32", device="cpu", max_seq_len=1024, kv_cache_bytes=256 << 20,
               tokens_per_block=16)


def _hf_greedy(model, prompt_ids: list[int], num_tokens: int) -> list[int]:
    """Plain greedy decoding with transformers' KV cache (no EOS handling: it mirrors ignore_eos)."""
    out: list[int] = []
    past = None
    step_ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(num_tokens):
            res = model(input_ids=step_ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            step_ids = torch.tensor([[nxt]])
    return out


def test_greedy_chat_equals_transformers(llm, smollm2_hf_model):
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outs = llm.chat([[{"role": "user", "content": c}] for c in CHATS], params)
    for out in outs:
        ref = _hf_greedy(smollm2_hf_model, out.prompt_token_ids, 32)
        assert out.outputs[0].token_ids == ref, (out.prompt, out.outputs[0].text)
        assert out.outputs[0].finish_reason == "length"


def test_logprobs_equal_transformers(llm, smollm2_hf_model):
    out = llm.generate(["The quick brown fox"], SamplingParams(temperature=0.0, max_tokens=3, logprobs=5,
                                                               ignore_eos=True))[0]
    comp = out.outputs[0]
    ids = out.prompt_token_ids
    with torch.no_grad():
        logits = smollm2_hf_model(torch.tensor([ids + comp.token_ids])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)
    for i, lp in enumerate(comp.logprobs):
        row = ref[len(ids) - 1 + i]
        assert lp.sampled.token_id == comp.token_ids[i]
        assert math.isclose(lp.sampled.logprob, row[lp.sampled.token_id].item(), abs_tol=2e-3)
        assert lp.sampled.rank == 1  # greedy picks the most likely token
        top = torch.topk(row, 5)
        assert [t.token_id for t in lp.top] == top.indices.tolist()
        assert [t.rank for t in lp.top] == [1, 2, 3, 4, 5]


def test_eos_stops_and_text_matches_tokens(llm, smollm2_tokenizer):
    out = llm.chat([{"role": "user", "content": "Say only the word yes."}],
                   SamplingParams(temperature=0.0, max_tokens=64))[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] == smollm2_tokenizer.eos_token_id
    assert out.text == smollm2_tokenizer.decode(out.token_ids[:-1])


def test_stop_strings_n_and_seeds(llm):
    prompt = "Count: 1, 2, 3, 4,"
    base = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    assert " 6" in base.text
    cut = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, stop=[" 6"]))[0].outputs[0]
    assert cut.text == base.text[: base.text.index(" 6")]
    assert cut.finish_reason == "stop" and cut.stop_reason == " 6"
    sp = SamplingParams(temperature=1.0, n=3, seed=7, max_tokens=12, ignore_eos=True)
    a = llm.generate([prompt], sp)[0]
    b = llm.generate(["Another prompt in the same batch", prompt], [sp, sp])[1]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]  # seeded: batch does not matter
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1  # n completions differ
    assert [c.index for c in a.outputs] == [0, 1, 2]


def test_min_tokens_and_max_tokens(llm, smollm2_tokenizer):
    msgs = [{"role": "user", "content": "Say only the word yes."}]
    short = llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=64))[0].outputs[0]
    forced = llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=64, min_tokens=len(short.token_ids) + 3))
    forced = forced[0].outputs[0]
    assert len(forced.token_ids) >= len(short.token_ids) + 3
    assert smollm2_tokenizer.eos_token_id not in forced.token_ids[: len(short.token_ids) + 2]
    capped = llm.generate(["Once upon a time"], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    assert len(capped[0].outputs[0].token_ids) == 5 and capped[0].outputs[0].finish_reason == "length"


def test_bad_words_never_generated(llm, smollm2_tokenizer):
    prompt = "Count: 1, 2, 3, 4,"
    base = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    assert "5" in base.text
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                bad_words=["5"]))[0].outputs[0]
    assert "5" not in out.text


@pytest.mark.parametrize("params, prompt, words", [
    ({"max_tokens": 8}, "x " * 1500, ["max_input_len"]),
    ({"max_tokens": 2000}, "Hello", ["max_seq_len", "max_tokens"]),
    ({"max_tokens": 8}, "", ["empty"]),
    ({"max_tokens": 8}, [10**7], ["vocabulary"]),
], ids=["too-long", "max-tokens", "empty", "bad-token-id"])
def test_bad_input_names_the_limit(llm, params, prompt, words):
    with pytest.raises(ValueError) as info:
        llm.generate([prompt], SamplingParams(**params))
    for w in words:
        assert w in str(info.value)
    # the engine is still usable afterwards and leaked nothing
    assert not llm.engine.has_unfinished_requests()
    llm.engine.check_integrity()


def test_sampling_params_errors():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_iteration_stats_lines(smollm2_path, caplog):
    llm = LLM(smollm2_path, dtype="float32", device="cpu", max_seq_len=256, kv_cache_bytes=64 << 20,
              log_iteration_stats=True, max_num_tokens=64)
    with caplog.at_level(logging.INFO, logger="kvflight.iteration"):
        llm.generate(["a " * 100, "hello"], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "kvflight.iteration"]
    assert len(lines) >= 4
    for key in ("Timestamp", "Iteration Counter", "Active Request Count", "Context Requests",
                "Generation Requests", "Scheduled Requests", "Total Context Tokens", "Max KV cache blocks",
                "Free KV cache blocks", "Used KV cache blocks", "Tokens per KV cache block",
                "Reused KV cache blocks", "Runtime GPU Memory Usage", "Runtime CPU Memory Usage",
                "Iteration Latency (ms)"):
        assert key in lines[0], key
    assert [ln["Iteration Counter"] for ln in lines] == list(range(1, len(lines) + 1))
    assert all(ln["Total Context Tokens"] <= 64 for ln in lines)  # chunked at max_num_tokens
    assert lines[0]["Context Requests"] >= 1 and lines[0]["Runtime CPU Memory Usage"] > 100 << 20
    assert lines[-1]["Generation Requests"] >= 1
    assert all(ln["Used KV cache blocks"] + ln["Free KV cache blocks"] == ln["Max KV cache blocks"] for ln in lines)
