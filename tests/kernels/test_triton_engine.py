"""The whole engine on the Triton kernels (interpreted on CPU) produces the plain-torch backend's greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvflight import LLM, SamplingParams
from tiny_models import VOCAB, write_hf_checkpoint


@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "llama_gqa"
    write_hf_checkpoint("llama_gqa", path)
    smollm2_tokenizer.save_pretrained(path)  # any tokenizer covering the tiny vocabulary's ids will do
    return path


def _generate(path: Path, backend: str, device: str, **settings) -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (5, 23, 40, 9)]
    prompts.append(prompts[2][:33] + [7, 8])  # shares 8 full blocks of 4 with the third prompt: a prefix hit
    llm = LLM(str(path), kernel_backend=backend, device=device, dtype="float32", tokens_per_block=4,
              max_num_tokens=32, max_batch_size=4, kv_cache_bytes=1 << 20, **settings)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


def test_triton_backend_equals_torch_backend(tiny_gqa: Path, device: str) -> None:
    # chunked context (32-token budget), mixed prefill + decode batches, a prefix-cache hit, 4-sequence batches
    # the Triton run also schedules asynchronously (its decode inputs take the pending tokens on the device)
    expected = _generate(tiny_gqa, "torch", device, async_scheduling="off")
    got = _generate(tiny_gqa, "triton", device, async_scheduling="on")
    assert got == expected
    assert all(len(t) == 6 for t in got)
