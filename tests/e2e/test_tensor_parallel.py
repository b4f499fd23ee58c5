"""Tensor parallelism on CPU (gloo): tp > 1 gives the greedy tokens of tp = 1; a dead rank raises, never hangs."""

from __future__ import annotations

import os
import signal
import time

import pytest

from kvflight import LLM, SamplingParams
from kvflight.config import ConfigError, EngineConfig
from kvflight.model.layers import get_tp_size
from kvflight.runner.tp_workers import TensorParallelError, decode_step, encode_step
from tiny_models import CASES, VOCAB, write_hf_checkpoint

BASE = dict(dtype="float32", device="cpu", max_seq_len=96, tokens_per_block=8, kv_cache_bytes=4 << 20,
            max_num_tokens=32)  # max_num_tokens 32: the longer prompts are chunked (context chunks + decode mixed)
TINY_PROMPTS = [[(7 * i + 3 * j) % (VOCAB - 3) + 3 for j in range(n)] for i, n in enumerate((5, 19, 40, 2))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """name -> (HF directory, tokenizer) for the tiny cases used here (the SmolLM2 tokenizer: the ids are ours)."""
    root = tmp_path_factory.mktemp("tp_models")
    out = {}
    for name in ("llama_mha", "llama_gqa"):
        write_hf_checkpoint(name, root / name)
        out[name] = str(root / name)
    return out


def _greedy(model: str, prompts: list[list[int]], max_tokens: int, **settings) -> tuple[list[list[int]], int]:
    llm = LLM(model, **{**BASE, **settings})
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
        return [o.outputs[0].token_ids for o in outs], llm.engine.kv.num_blocks
    finally:
        llm.engine.shutdown()
        assert get_tp_size() == 1  # the process's TP state is reset for the next engine


def test_tiny_4_kv_heads_tp2_matches_tp1(tiny, smollm2_path):
    assert CASES["llama_mha"][1]["num_key_value_heads"] == 4
    ref, blocks1 = _greedy(tiny["llama_mha"], TINY_PROMPTS, 12, tokenizer=smollm2_path)
    got, blocks2 = _greedy(tiny["llama_mha"], TINY_PROMPTS, 12, tokenizer=smollm2_path, tensor_parallel_size=2)
    assert got == ref
    assert blocks2 == 2 * blocks1  # each rank holds half the KV heads: twice the blocks in the same budget


def test_dummy_weights_tp2_are_slices_of_tp1(tiny, smollm2_path):
    """load_format=dummy draws every unsharded checkpoint tensor from its own seeded generator, so a tp=2 rank holds
    exactly its slice of the tp=1 weights: the same tokens (the GPU benchmark's 8B check relies on it)."""
    ref, _ = _greedy(tiny["llama_mha"], TINY_PROMPTS, 8, tokenizer=smollm2_path, load_format="dummy")
    got, _ = _greedy(tiny["llama_mha"], TINY_PROMPTS, 8, tokenizer=smollm2_path, load_format="dummy",
                     tensor_parallel_size=2)
    assert got == ref
    other, _ = _greedy(tiny["llama_mha"], TINY_PROMPTS, 8, tokenizer=smollm2_path, load_format="dummy", seed=1)
    assert other != ref  # the seed reaches the weights


_CUSTOM_ALL_REDUCE_SCRIPT = """
import json, sys
from kvflight import LLM, SamplingParams
from kvflight.model.layers import get_custom_all_reduce

model, tokenizer, prompts, base = json.loads(sys.argv[1])
params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
out = {}
for name, extra in (("tp1", {}), ("custom", {"tensor_parallel_size": 2, "use_custom_all_reduce": "on"})):
    llm = LLM(model, tokenizer=tokenizer, **base, **extra)
    try:
        out[name + "_strategy"] = getattr(llm.engine.tp_workers, "all_reduce_strategy", "-")
        out[name] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        car = get_custom_all_reduce()
        out[name + "_calls"] = 0 if car is None else int(car.counters[0].max())
    finally:
        llm.engine.shutdown()
out["closed"] = get_custom_all_reduce() is None
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_tiny_tp2_custom_all_reduce_matches_tp1(tiny, smollm2_path):
    """use_custom_all_reduce=on on CPU runs the one-shot kernel interpreted over shared memory in both ranks: the
    set-up on every rank, the layers' routing and the per-step error check, end to end. In a fresh process, since
    Triton must be imported with TRITON_INTERPRET=1 already set."""
    import json
    import subprocess
    import sys

    args = json.dumps([tiny["llama_mha"], smollm2_path, TINY_PROMPTS[:2], BASE])
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _CUSTOM_ALL_REDUCE_SCRIPT, args], env=env, capture_output=True,
                          text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["custom_strategy"] == "custom"
    assert out["custom_calls"] >= 2 * 2 * 4  # 2 per layer, 2 layers, at least one per generated token
    assert out["custom"] == out["tp1"]
    assert out["closed"]  # the engine's shutdown closed the shared regions


@pytest.mark.slow
def test_tiny_replicated_kv_heads_tp4_matches_tp1(tiny, smollm2_path):
    """8 query heads, 2 KV heads over 4 ranks: each KV head lives on two ranks."""
    ref, _ = _greedy(tiny["llama_gqa"], TINY_PROMPTS[:2], 6, tokenizer=smollm2_path)
    got, _ = _greedy(tiny["llama_gqa"], TINY_PROMPTS[:2], 6, tokenizer=smollm2_path, tensor_parallel_size=4)
    assert got == ref


@pytest.mark.slow
def test_smollm2_tp3_matches_tp1(smollm2_path, smollm2_tokenizer):
    """SmolLM2 has 9 heads / 3 KV heads: 3 is its only tensor-parallel size above 1."""
    prompts = [smollm2_tokenizer.encode(t) for t in ("The capital of France is", "def fibonacci(n):")]
    ref, _ = _greedy(smollm2_path, prompts, 6, kv_cache_bytes=16 << 20)
    got, _ = _greedy(smollm2_path, prompts, 6, kv_cache_bytes=16 << 20, tensor_parallel_size=3)
    assert got == ref


def test_smollm2_tp2_refused_with_the_valid_sizes(smollm2_path):
    with pytest.raises(ConfigError, match=r"num_heads=9 is not divisible by 2.*use one of 1, 3"):
        LLM(smollm2_path, **BASE, tensor_parallel_size=2)
    assert get_tp_size() == 1


def test_config_validation():
    with pytest.raises(ConfigError, match="tensor_parallel_size=0"):
        EngineConfig.from_flat({"tensor_parallel_size": 0})
    with pytest.raises(ConfigError, match="use_custom_all_reduce"):
        EngineConfig.from_flat({"use_custom_all_reduce": "maybe"})
    cfg = EngineConfig.from_flat({"tp": 2, "use_custom_all_reduce": "off"})
    assert cfg.parallel.tensor_parallel_size == 2 and cfg.parallel.use_custom_all_reduce == "off"


def test_step_diff_round_trip():
    from kvflight.types import Request, ScheduledRequest, SchedulerOutput

    req = Request("a", [5, 6, 7], SamplingParams(max_tokens=2))
    req.all_token_ids = [5, 6, 7]
    out = SchedulerOutput([ScheduledRequest(req, 1, 2, [4, 9], True, True)], 2, kv_offloads=[(1, 0)],
                          kv_loads=[(0, 2)])
    diff = encode_step(out)
    assert diff == (2, [(1, 2, [4, 9], True, [6, 7], True)], [(1, 0)], [(0, 2)])
    back = decode_step(diff).scheduled[0]
    assert (back.start_pos, back.num_new_tokens, back.block_ids, back.do_sample, back.token_ids) == \
        (1, 2, [4, 9], True, [6, 7])


def test_dead_worker_raises_not_hangs(tiny, smollm2_path):
    llm = LLM(tiny["llama_mha"], **BASE, tokenizer=smollm2_path, tensor_parallel_size=2)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        assert len(llm.generate([TINY_PROMPTS[0]], params)[0].outputs[0].token_ids) == 4
        worker = llm.engine.tp_workers.processes[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
        t0 = time.monotonic()
        with pytest.raises(TensorParallelError, match=r"rank 1 .*exited with code -9"):
            llm.generate([TINY_PROMPTS[1]], params)
        assert time.monotonic() - t0 < 10
    finally:
        llm.engine.shutdown()
    assert get_tp_size() == 1


def test_worker_load_failure_comes_back_with_its_traceback(tiny):
    """A rank that cannot build its model reports the error (not a collective timeout on rank 0)."""
    import dataclasses

    from kvflight.model.loader import load_arch, resolve_model
    from kvflight.runner.tp_workers import TPWorkerGroup

    config = EngineConfig.from_flat({**BASE, "model": tiny["llama_mha"], "tensor_parallel_size": 2})
    resolved = resolve_model(tiny["llama_mha"], "auto")
    arch = load_arch(resolved)
    broken = dataclasses.replace(resolved, path=resolved.path + "-missing")
    group = TPWorkerGroup(config, broken, arch, 96)
    try:
        assert get_tp_size() == 2
        with pytest.raises(TensorParallelError, match=r"rank 1 \(pid \d+\) failed:\n.*Traceback"):
            group.wait_loaded()
    finally:
        group.shutdown()
    assert get_tp_size() == 1
