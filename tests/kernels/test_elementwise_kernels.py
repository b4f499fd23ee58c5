"""Triton elementwise kernels (RMSNorm, SiLU-and-mul, RoPE, KV write) equal their plain-torch references."""

from __future__ import annotations

import pytest
import torch

from kvflight.kernels import reference
from kvflight.kernels.rms_norm import rms_norm
from kvflight.kernels.rotary import rotary_embedding
from kvflight.kernels.silu_and_mul import silu_and_mul
from kvflight.kernels.write_kv import write_kv_cache

F32 = dict(atol=1e-5, rtol=1e-5)
BF16 = dict(atol=1e-2, rtol=1.6e-2)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cache(max_position: int, rotary_dim: int, device: str, base: float = 10000.0) -> torch.Tensor:
    """[max_position, rotary_dim] float32: cos | sin, as RotaryEmbedding builds it."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)


# ---- RMSNorm -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("hidden", [96, 576, 64])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(num_tokens: int, hidden: int, with_residual: bool, device: str) -> None:
    g = torch.Generator().manual_seed(num_tokens * 1000 + hidden)
    x = torch.randn(num_tokens, hidden, generator=g).to(device)
    weight = (1.0 + 0.1 * torch.randn(hidden, generator=g)).to(device)
    residual = torch.randn(num_tokens, hidden, generator=g).to(device) if with_residual else None
    x_before = x.clone()
    out, new_res = rms_norm(x, weight, 1e-6, residual)
    ref_out, ref_res = reference.rms_norm(x, weight, 1e-6, residual)
    torch.testing.assert_close(out, ref_out, **F32)
    torch.testing.assert_close(new_res, ref_res, **F32)
    torch.testing.assert_close(x, x_before, atol=0, rtol=0)  # inputs untouched
    if residual is None:
        assert new_res is x


def test_rms_norm_keeps_leading_dims(device: str) -> None:
    x = torch.randn(2, 3, 96).to(device)
    residual = torch.randn(2, 3, 96).to(device)
    weight = torch.rand(96).to(device)
    out, new_res = rms_norm(x, weight, 1e-5, residual)
    ref_out, ref_res = reference.rms_norm(x, weight, 1e-5, residual)
    assert out.shape == new_res.shape == (2, 3, 96)
    torch.testing.assert_close(out, ref_out, **F32)
    torch.testing.assert_close(new_res, ref_res, **F32)


def test_rms_norm_strided_rows(device: str) -> None:
    """A row-strided view (e.g. a slice of a wider buffer) is read in place."""
    wide = torch.randn(7, 200).to(device)
    x = wide[:, :96]
    weight = torch.rand(96).to(device)
    out, _ = rms_norm(x, weight, 1e-6)
    torch.testing.assert_close(out, reference.rms_norm(x, weight, 1e-6)[0], **F32)


# ---- SiLU-and-mul ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("inter", [96, 1500, 64])  # 1500 > BLOCK (1024): two column programs, the last partial
def test_silu_and_mul_matches_reference(num_tokens: int, inter: int, device: str) -> None:
    g = torch.Generator().manual_seed(num_tokens * 7 + inter)
    x = (3 * torch.randn(num_tokens, 2 * inter, generator=g)).to(device)
    out = silu_and_mul(x)
    assert out.shape == (num_tokens, inter)
    torch.testing.assert_close(out, reference.silu_and_mul(x), **F32)


def test_silu_and_mul_leading_dims(device: str) -> None:
    x = torch.randn(2, 3, 2 * 48).to(device)
    torch.testing.assert_close(silu_and_mul(x), reference.silu_and_mul(x), **F32)


# ---- rotary ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (6, 1), (3, 3)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("flat", [False, True])
def test_rotary_matches_reference(num_tokens: int, num_heads: int, num_kv_heads: int, head_dim: int,
                                  flat: bool, device: str) -> None:
    g = torch.Generator().manual_seed(num_tokens + 31 * num_heads + head_dim)
    cache = _cache(4096, head_dim, device)
    positions = torch.randint(0, 4096, (num_tokens,), generator=g).to(device)
    shape_q = (num_tokens, num_heads * head_dim) if flat else (num_tokens, num_heads, head_dim)
    shape_k = (num_tokens, num_kv_heads * head_dim) if flat else (num_tokens, num_kv_heads, head_dim)
    q = torch.randn(shape_q, generator=g).to(device)
    k = torch.randn(shape_k, generator=g).to(device)
    q_before, k_before = q.clone(), k.clone()
    rq, rk = rotary_embedding(positions, q, k, cache)
    eq, ek = reference.rotary_embedding(positions, q, k, cache)
    assert rq.shape == q.shape and rk.shape == k.shape
    torch.testing.assert_close(rq, eq, **F32)
    torch.testing.assert_close(rk, ek, **F32)
    torch.testing.assert_close(q, q_before, atol=0, rtol=0)  # out of place by default, like the reference
    torch.testing.assert_close(k, k_before, atol=0, rtol=0)


def test_rotary_partial_rotary_dim_flat(device: str) -> None:
    """rotary_dim (32) < head_dim (64), flattened inputs: the tail dims pass through untouched."""
    num_tokens, head_dim = 7, 64
    cache = _cache(128, 32, device)
    positions = torch.arange(num_tokens).to(device) * 5
    q = torch.randn(num_tokens, 4 * head_dim).to(device)
    k = torch.randn(num_tokens, 2 * head_dim).to(device)
    rq, rk = rotary_embedding(positions, q, k, cache, head_dim)
    eq, ek = reference.rotary_embedding(positions, q, k, cache, head_dim)
    torch.testing.assert_close(rq, eq, **F32)
    torch.testing.assert_close(rk, ek, **F32)


def test_rotary_inplace_on_qkv_views(device: str) -> None:
    """inplace=True rotates strided views of a fused qkv buffer in place and leaves v alone."""
    num_tokens, hq, hkv, d = 7, 4, 2, 64
    qkv = torch.randn(num_tokens, (hq + 2 * hkv) * d).to(device)
    original = qkv.clone()
    q = qkv[:, : hq * d]
    k = qkv[:, hq * d: (hq + hkv) * d]
    cache = _cache(64, d, device)
    positions = torch.arange(num_tokens).to(device)
    eq, ek = reference.rotary_embedding(positions, q.clone(), k.clone(), cache)
    rq, rk = rotary_embedding(positions, q, k, cache, inplace=True)
    assert rq.data_ptr() == q.data_ptr() and rk.data_ptr() == k.data_ptr()
    torch.testing.assert_close(qkv[:, : hq * d], eq, **F32)
    torch.testing.assert_close(qkv[:, hq * d: (hq + hkv) * d], ek, **F32)
    torch.testing.assert_close(qkv[:, (hq + hkv) * d:], original[:, (hq + hkv) * d:], atol=0, rtol=0)


# ---- KV write ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(2, 64), (1, 128), (3, 96)])
def test_write_kv_matches_reference(num_tokens: int, num_kv_heads: int, head_dim: int, device: str) -> None:
    g = torch.Generator().manual_seed(num_tokens * 13 + head_dim)
    num_blocks, tokens_per_block = 12, 4
    last = num_blocks * tokens_per_block - 1  # last slot of the last block
    # distinct slots (duplicates would make the write order, and so the result, unspecified), the last one at `last`
    slots = torch.cat([torch.randperm(last, generator=g)[: num_tokens - 1], torch.tensor([last])])
    if num_tokens > 1:
        slots[::3] = -1  # padding tokens
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(device)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g).to(device)
    init = torch.randn(2, num_blocks, tokens_per_block, num_kv_heads, head_dim, generator=g).to(device)
    ours, theirs = init.clone(), init.clone()
    slot_mapping = slots.to(device)
    write_kv_cache(k, v, ours, slot_mapping)
    reference.write_kv_cache(k, v, theirs, slot_mapping)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_write_kv_block_boundaries_and_padding(device: str) -> None:
    """Slots at the first / last offset of several blocks land there; negative slots change nothing."""
    num_blocks, tokens_per_block, hkv, d = 5, 16, 2, 64
    slot_mapping = torch.tensor([0, 15, 16, 31, -1, 79, -5, 48], dtype=torch.int64).to(device)
    k = torch.randn(8, hkv, d).to(device)
    v = torch.randn(8, hkv, d).to(device)
    cache = torch.zeros(2, num_blocks, tokens_per_block, hkv, d).to(device)
    write_kv_cache(k, v, cache, slot_mapping)
    for i, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            torch.testing.assert_close(cache[0, slot // 16, slot % 16], k[i], atol=0, rtol=0)
            torch.testing.assert_close(cache[1, slot // 16, slot % 16], v[i], atol=0, rtol=0)
    written = {s for s in slot_mapping.tolist() if s >= 0}
    untouched = [s for s in range(num_blocks * tokens_per_block) if s not in written]
    assert cache.view(2, -1, hkv, d)[:, untouched].abs().sum().item() == 0
    expected = cache.clone()
    write_kv_cache(k[4:5], v[4:5], cache, slot_mapping[4:5])  # a lone padding token
    torch.testing.assert_close(cache, expected, atol=0, rtol=0)


def test_write_kv_casts_to_cache_dtype_and_int32_slots(device: str) -> None:
    # float32 values that bf16 holds exactly: the Triton interpreter casts float32 -> bf16 by truncation, the GPU
    # rounds to nearest (test_gpu_write_kv_rounds_like_torch covers that).
    k = torch.randn(7, 2, 64).to(torch.bfloat16).float().to(device)
    v = torch.randn(7, 2, 64).to(torch.bfloat16).float().to(device)
    ours = torch.zeros(2, 4, 4, 2, 64, dtype=torch.bfloat16).to(device)
    theirs = ours.clone()
    slots = torch.tensor([3, -1, 0, 9, 15, -1, 4], dtype=torch.int32).to(device)
    write_kv_cache(k, v, ours, slots)
    reference.write_kv_cache(k, v, theirs, slots.long())
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_write_kv_rejects_bad_shapes(device: str) -> None:
    cache = torch.zeros(2, 4, 4, 2, 64).to(device)
    with pytest.raises(ValueError):
        write_kv_cache(torch.zeros(3, 2, 32), torch.zeros(3, 2, 32), cache, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError):
        write_kv_cache(torch.zeros(3, 2, 64), torch.zeros(3, 2, 64), cache, torch.zeros(4, dtype=torch.int64))


# ---- GPU, bf16, real shapes (Llama-3-8B-like) --------------------------------------------------------------------
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("with_residual", [False, True])
def test_gpu_rms_norm_bf16(with_residual: bool) -> None:
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn_like(x) if with_residual else None
    weight = (1.0 + 0.1 * torch.randn(4096, device="cuda")).to(torch.bfloat16)
    out, new_res = rms_norm(x, weight, 1e-5, residual)
    ref_out, ref_res = reference.rms_norm(x, weight, 1e-5, residual)
    torch.testing.assert_close(out, ref_out, **BF16)
    torch.testing.assert_close(new_res, ref_res, atol=0, rtol=0)


@pytest.mark.gpu
@gpu
def test_gpu_silu_and_mul_bf16() -> None:
    x = torch.randn(2048, 2 * 14336, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(silu_and_mul(x), reference.silu_and_mul(x), **BF16)


@pytest.mark.gpu
@gpu
def test_gpu_rotary_bf16() -> None:
    num_tokens, hq, hkv, d = 4096, 32, 8, 128
    cache = _cache(8192, d, "cuda", base=500000.0)
    positions = torch.randint(0, 8192, (num_tokens,), device="cuda")
    qkv = torch.randn(num_tokens, (hq + 2 * hkv) * d, device="cuda", dtype=torch.bfloat16)
    q, k = qkv[:, : hq * d], qkv[:, hq * d: (hq + hkv) * d]
    eq, ek = reference.rotary_embedding(positions, q, k, cache)
    rq, rk = rotary_embedding(positions, q, k, cache)
    torch.testing.assert_close(rq, eq, **BF16)
    torch.testing.assert_close(rk, ek, **BF16)
    rotary_embedding(positions, q, k, cache, inplace=True)
    torch.testing.assert_close(q, eq, **BF16)
    torch.testing.assert_close(k, ek, **BF16)


@pytest.mark.gpu
@gpu
def test_gpu_write_kv_bf16() -> None:
    num_tokens, hkv, d, num_blocks, tokens_per_block = 4096, 8, 128, 512, 16
    k = torch.randn(num_tokens, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slots = torch.randperm(num_blocks * tokens_per_block, device="cuda")[:num_tokens]
    slots[::7] = -1
    ours = torch.zeros(2, num_blocks, tokens_per_block, hkv, d, device="cuda", dtype=torch.bfloat16)
    theirs = ours.clone()
    write_kv_cache(k, v, ours, slots)
    reference.write_kv_cache(k, v, theirs, slots)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


@pytest.mark.gpu
@gpu
def test_gpu_write_kv_rounds_like_torch() -> None:
    """float32 K/V into a bf16 cache round to nearest, exactly as .to(bfloat16)."""
    k = torch.randn(333, 8, 128, device="cuda")
    v = torch.randn_like(k)
    ours = torch.zeros(2, 32, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    theirs = ours.clone()
    slots = torch.randperm(32 * 16, device="cuda")[:333]
    write_kv_cache(k, v, ours, slots)
    reference.write_kv_cache(k, v, theirs, slots)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
