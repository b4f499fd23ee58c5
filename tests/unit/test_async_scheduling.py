"""Asynchronous scheduling (step N+1 scheduled and launched before step N's tokens reach the host) gives exactly the
synchronous engine's tokens: greedy and seeded sampling, stop tokens mid-run, preemption, prefix reuse with the host
tier, penalties (which force a synchronous step), logprobs, aborts while a step is in flight; no block leaks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvflight import LLM, SamplingParams
from kvflight.types import FinishReason, Request
from tiny_models import VOCAB, write_hf_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny_async") / "llama_gqa"
    write_hf_checkpoint("llama_gqa", path)
    smollm2_tokenizer.save_pretrained(path)
    return path


def _prompts(seed: int = 3, lens: tuple[int, ...] = (5, 23, 40, 9, 17)) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lens]
    prompts.append(prompts[2][:33] + [7, 8])  # a prefix hit on the third prompt
    return prompts


def _llm(path: Path, mode: str, **settings) -> LLM:
    base = dict(device="cpu", dtype="float32", tokens_per_block=4, max_num_tokens=32, max_batch_size=4,
                kv_cache_bytes=1 << 20)
    base.update(settings)
    return LLM(str(path), async_scheduling=mode, **base)


def _run(path: Path, mode: str, params, prompts=None, **settings):
    llm = _llm(path, mode, **settings)
    assert llm.engine.async_scheduling is (mode == "on")
    outs = llm.generate(prompts or _prompts(), params)
    eng = llm.engine
    eng.check_integrity()
    assert not eng.has_unfinished_requests()
    assert eng.kv.num_used_blocks == 0
    return outs, eng


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_greedy_equal_with_stop_tokens_mid_run(tiny: Path) -> None:
    ref, _ = _run(tiny, "off", SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    ref_tokens = _tokens(ref)
    # stop tokens that end two requests early (their next step was already launched: its row is wasted)
    stops = [ref_tokens[0][3], ref_tokens[3][6]]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=stops)
    sync, _ = _run(tiny, "off", params)
    asyn, _ = _run(tiny, "on", params)
    assert _tokens(asyn) == _tokens(sync)
    assert [o.outputs[0].finish_reason for o in asyn] == [o.outputs[0].finish_reason for o in sync]
    assert sum(o.outputs[0].finish_reason == "stop" for o in asyn) >= 2
    assert any(len(t) < 12 for t in _tokens(asyn)) and any(len(t) == 12 for t in _tokens(asyn))


def test_preemption_and_host_tier_equal(tiny: Path) -> None:
    # a cache of 24 blocks x 4 tokens for six requests growing to ~50 tokens: max_utilization preempts
    settings = dict(kv_cache_bytes=24 * 1024, max_seq_len=64, kv_host_cache_bytes=64 * 1024)
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    sync, eng_sync = _run(tiny, "off", params, **settings)
    asyn, eng_async = _run(tiny, "on", params, **settings)
    assert _tokens(asyn) == _tokens(sync)
    assert all(len(t) == 14 for t in _tokens(asyn))
    assert eng_async.scheduler.iteration_stats()["num_preemptions_total"] > 0
    assert eng_sync.scheduler.iteration_stats()["num_preemptions_total"] > 0


def test_seeded_sampling_penalties_and_logprobs_equal(tiny: Path) -> None:
    prompts = _prompts()
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=11 + i, max_tokens=10, ignore_eos=True, logprobs=2)
              for i in range(len(prompts))]
    # two requests read their past tokens: steps holding them run synchronously, the rest overlap
    params[1] = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, repetition_penalty=1.3,
                               frequency_penalty=0.5)
    params[4] = SamplingParams(temperature=0.0, max_tokens=10, min_tokens=4)
    sync, _ = _run(tiny, "off", params, prompts=prompts)
    asyn, _ = _run(tiny, "on", params, prompts=prompts)
    assert _tokens(asyn) == _tokens(sync)
    for a, s in zip(asyn, sync):
        la, ls = a.outputs[0].logprobs, s.outputs[0].logprobs
        assert (la is None) == (ls is None)
        if la is not None:
            assert [x.sampled.token_id for x in la] == [x.sampled.token_id for x in ls]
            assert [round(x.sampled.logprob, 5) for x in la] == [round(x.sampled.logprob, 5) for x in ls]
            assert [[t.token_id for t in x.top] for x in la] == [[t.token_id for t in x.top] for x in ls]


def test_abort_while_a_step_is_in_flight_leaks_nothing(tiny: Path) -> None:
    llm = _llm(tiny, "on")
    eng = llm.engine
    prompts = _prompts()
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    for i, p in enumerate(prompts[:4]):
        eng.add_request(Request(request_id=f"r{i}", prompt_token_ids=p, sampling_params=params))
    got: dict[str, list[int]] = {f"r{i}": [] for i in range(4)}
    finished: dict[str, str] = {}
    aborted = False
    for _ in range(200):
        if not eng.has_unfinished_requests():
            break
        for so in eng.step():
            got[so.request_id] += so.new_token_ids
            if so.finish_reason is not None:
                finished[so.request_id] = so.finish_reason.value
        eng.check_integrity()
        if not aborted and len(got["r1"]) >= 3:
            assert eng._inflight is not None  # r1's next step is launched: the abort lands mid-flight
            eng.abort_requests(["r1"])
            aborted = True
    assert aborted and not eng.has_unfinished_requests()
    assert eng.kv.num_used_blocks == 0
    assert "r1" not in finished and 3 <= len(got["r1"]) < 10
    assert all(finished[r] == "length" and len(got[r]) == 10 for r in ("r0", "r2", "r3"))
    # the survivors' tokens are the synchronous engine's
    ref, _ = _run(tiny, "off", params, prompts=[prompts[0], prompts[2], prompts[3]])
    assert [got["r0"], got["r2"], got["r3"]] == _tokens(ref)


def test_never_schedules_past_max_tokens(tiny: Path) -> None:
    # a request whose pending token is its last is not scheduled again: exactly max_tokens decode rows run
    llm = _llm(tiny, "on", max_batch_size=1)
    eng = llm.engine
    eng.add_request(Request(request_id="a", prompt_token_ids=_prompts()[0],
                            sampling_params=SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)))
    steps = 0
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
        steps += 1
    assert [len(o.new_token_ids) for o in outs] == [1] * 5
    assert outs[-1].finish_reason == FinishReason.LENGTH
    assert eng.iteration == 5  # one prefill + four decode launches; the fifth token needs no further step
    assert steps == 6  # the last call only completes the fifth launch


def test_async_on_with_tensor_parallel_is_refused(tiny: Path) -> None:
    from kvflight.config import ConfigError

    with pytest.raises(ConfigError, match="async_scheduling=on needs tensor_parallel_size 1"):
        _llm(tiny, "on", tensor_parallel_size=2)
