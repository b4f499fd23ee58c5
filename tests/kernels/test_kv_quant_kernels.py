"""Quantized KV cache (kv_cache_dtype int8 / fp8) in the Triton kernels: write_kv with scales equals the reference
quantized write exactly; paged attention over an int8 / fp8 cache equals the reference over the dequantized cache.
int8 runs under the interpreter on CPU; the Triton fp8 path needs a GPU (the interpreter has no e4m3 conversion),
so on CPU fp8 is covered through the torch reference (tests/unit/test_kv_cache_quant.py)."""

from __future__ import annotations

import math

import pytest
import torch

from kvflight.kernels import reference
from kvflight.kernels.paged_attention import paged_attention
from kvflight.kernels.write_kv import write_kv_cache

F32 = dict(atol=2e-5, rtol=2e-5)
CUDA = torch.cuda.is_available()


def _needs_gpu(dtype: torch.dtype, device: str) -> None:
    if dtype == torch.float8_e4m3fn and device != "cuda":
        pytest.skip("Triton fp8 (e4m3) conversion needs a GPU: the interpreter does not emulate it")


def _scales(num_kv_heads: int, per_head: bool, g: torch.Generator, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    n = num_kv_heads if per_head else 1
    return ((torch.rand(n, generator=g) * 0.05 + 0.01).to(device), (torch.rand(n, generator=g) * 0.03 + 0.004)
            .to(device))


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(3, 64), (1, 24)])
def test_write_kv_quantized_equals_reference(dtype, per_head, num_kv_heads, head_dim, device) -> None:
    _needs_gpu(dtype, device)
    g = torch.Generator().manual_seed(1)
    tokens_per_block, num_blocks = 16, 5
    k = (torch.randn(9, num_kv_heads, head_dim, generator=g) * 2).to(device)
    v = torch.randn(9, num_kv_heads, head_dim, generator=g).to(device)
    k[0, 0, :4] = torch.tensor([100.0, -100.0, 0.0, 1e-6])  # clamped, clamped, zero, tiny
    slots = torch.tensor([0, 1, 15, 16, -1, 33, 34, 79, -1], device=device)
    k_scale, v_scale = _scales(num_kv_heads, per_head, g, device)
    want = torch.zeros(2, num_blocks, tokens_per_block, num_kv_heads, head_dim, dtype=dtype, device=device)
    got = want.clone()
    reference.write_kv_cache(k, v, want, slots, k_scale, v_scale)
    write_kv_cache(k, v, got, slots, k_scale, v_scale)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert got.view(torch.uint8).count_nonzero() > 0
    # the old signature (float cache, no scales) is unchanged
    fcache = torch.zeros(2, num_blocks, tokens_per_block, num_kv_heads, head_dim, device=device)
    write_kv_cache(k, v, fcache, slots)
    assert torch.equal(fcache[0].view(-1, num_kv_heads, head_dim)[slots[slots >= 0]], k[slots >= 0])


def test_write_kv_quantized_rejects_missing_scales(device) -> None:
    k = torch.randn(2, 2, 16, device=device)
    cache = torch.zeros(2, 2, 16, 2, 16, dtype=torch.int8, device=device)
    slots = torch.tensor([0, 1], device=device)
    with pytest.raises(ValueError, match="k_scale"):
        write_kv_cache(k, k, cache, slots)
    with pytest.raises(ValueError, match="k_scale"):
        write_kv_cache(k, k, cache.float(), slots, torch.ones(2, device=device), torch.ones(2, device=device))


def _quant_batch(query_lens, seq_lens, num_heads, num_kv_heads, head_dim, tokens_per_block, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [max(1, math.ceil(s / tokens_per_block)) for s in seq_lens]
    num_blocks = 2 * sum(blocks_per_seq) + 2
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(len(seq_lens), max(blocks_per_seq) + 1, dtype=torch.int32)
    nxt = 0
    for i, n in enumerate(blocks_per_seq):
        table[i, :n] = perm[nxt:nxt + 2 * n:2]
        nxt += 2 * n
    q = torch.randn(sum(query_lens), num_heads, head_dim, generator=g)
    x = torch.randn(2, num_blocks, tokens_per_block, num_kv_heads, head_dim, generator=g)
    k_scale = torch.rand(num_kv_heads, generator=g) * 0.02 + 0.01
    v_scale = torch.rand(num_kv_heads, generator=g) * 0.02 + 0.01
    cache = torch.stack([reference.quantize_kv(x[0] * 1.5, k_scale, dtype),
                         reference.quantize_kv(x[1], v_scale, dtype)])
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return (q.to(device), cache.to(device), table.to(device), torch.tensor(starts, dtype=torch.int32, device=device),
            torch.tensor(list(seq_lens), dtype=torch.int32, device=device), k_scale.to(device), v_scale.to(device))


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("query_lens,seq_lens,num_splits", [
    ([1, 1, 1], [5, 37, 70], 1),  # decode
    ([4, 19, 1], [4, 40, 33], 1),  # mixed: prefill, chunk over a cached prefix, decode
    ([1, 1], [70, 130], 3),  # split-K
])
def test_paged_attention_quantized_cache(dtype, query_lens, seq_lens, num_splits, device) -> None:
    _needs_gpu(dtype, device)
    num_heads, num_kv_heads, head_dim, tpb = 6, 2, 32, 16
    q, cache, table, qsl, sl, ks, vs = _quant_batch(query_lens, seq_lens, num_heads, num_kv_heads, head_dim, tpb,
                                                    dtype, device)
    scale = 1.0 / math.sqrt(head_dim)
    got = paged_attention(q, cache, table, qsl, sl, scale, max_query_len=max(query_lens), num_splits=num_splits,
                          k_scale=ks, v_scale=vs)
    deq = torch.stack([reference.dequantize_kv(cache[0], ks), reference.dequantize_kv(cache[1], vs)])
    want = reference.paged_attention(q, deq, table, query_lens, seq_lens, scale)
    torch.testing.assert_close(got, want, **F32)
    # the reference's own dequantizing gather agrees too
    torch.testing.assert_close(reference.paged_attention(q, cache, table, query_lens, seq_lens, scale, ks, vs),
                               want, **F32)
    # per-tensor scales (one value for every head)
    got1 = paged_attention(q, cache, table, qsl, sl, scale, max_query_len=max(query_lens), num_splits=num_splits,
                           k_scale=ks[:1].clone(), v_scale=vs[:1].clone())
    deq1 = torch.stack([reference.dequantize_kv(cache[0], ks[:1]), reference.dequantize_kv(cache[1], vs[:1])])
    torch.testing.assert_close(got1, reference.paged_attention(q, deq1, table, query_lens, seq_lens, scale), **F32)


def test_paged_attention_quantized_cache_needs_scales(device) -> None:
    q, cache, table, qsl, sl, ks, vs = _quant_batch([1], [5], 4, 2, 16, 16, torch.int8, device)
    with pytest.raises(ValueError, match="k_scale"):
        paged_attention(q, cache, table, qsl, sl, 0.25, max_query_len=1)
    with pytest.raises(ValueError, match="k_scale"):
        paged_attention(q, cache, table, qsl, sl, 0.25, max_query_len=1, k_scale=torch.ones(3, device=device),
                        v_scale=torch.ones(3, device=device))


@pytest.mark.skipif(not CUDA, reason="bf16 real shapes on the GPU")
@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_paged_attention_quantized_bf16_gpu(dtype) -> None:
    """Llama-8B-like heads (32 q / 8 kv, D 128), bf16 q, decode and prefill, against the float32 reference."""
    for query_lens, seq_lens in (([1] * 8, [700, 33, 1025, 64, 5, 300, 2000, 128]), ([300, 1], [300, 900])):
        q, cache, table, qsl, sl, ks, vs = _quant_batch(query_lens, seq_lens, 32, 8, 128, 32, dtype, "cuda")
        got = paged_attention(q.bfloat16(), cache, table, qsl, sl, 128 ** -0.5, max_query_len=max(query_lens),
                              k_scale=ks, v_scale=vs)
        deq = torch.stack([reference.dequantize_kv(cache[0], ks), reference.dequantize_kv(cache[1], vs)])
        want = reference.paged_attention(q.bfloat16().float(), deq, table, query_lens, seq_lens, 128 ** -0.5)
        torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer):
    from tiny_models import write_hf_checkpoint

    path = tmp_path_factory.mktemp("tiny_kvq") / "llama_gqa"
    write_hf_checkpoint("llama_gqa", path)
    smollm2_tokenizer.save_pretrained(path)
    return path


def test_engine_int8_kv_triton_equals_torch(tiny_gqa, device) -> None:
    """The whole engine with an int8 KV cache: the Triton kernels (interpreted on CPU) give the torch reference
    backend's greedy tokens (chunked context, mixed batches, a prefix hit), with the same online-calibrated scales."""
    from kvflight import LLM, SamplingParams
    from tiny_models import VOCAB

    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (5, 23, 40)]
    prompts.append(prompts[2][:33] + [7, 8])
    results = {}
    for backend in ("torch", "triton"):
        llm = LLM(str(tiny_gqa), kernel_backend=backend, device=device, dtype="float32", tokens_per_block=4,
                  max_num_tokens=32, max_batch_size=4, kv_cache_bytes=1 << 20, kv_cache_dtype="int8")
        assert llm.engine.runner.kv_caches[0].dtype == torch.int8
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
        results[backend] = [o.outputs[0].token_ids for o in outs]
    assert results["triton"] == results["torch"]
