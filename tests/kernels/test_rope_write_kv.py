"""The fused RoPE + paged KV write (rope_write_kv) equals reference.rotary_embedding then reference.write_kv_cache,
and bit for bit the two Triton kernels it replaces; the triton attention backend and the model take it."""

from __future__ import annotations

import pytest
import torch

from kvflight.kernels import reference
from kvflight.kernels.rope_write_kv import rotary_write_kv_cache
from kvflight.kernels.rotary import rotary_embedding
from kvflight.kernels.write_kv import write_kv_cache

F32 = dict(atol=1e-5, rtol=1e-5)
BF16 = dict(atol=1e-2, rtol=1.6e-2)
EXACT = dict(atol=0, rtol=0)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NUM_BLOCKS, TOKENS_PER_BLOCK = 6, 4
# one token per kind: block starts / ends, a padding slot (-1), the last slot of the last block
SLOTS = [0, 5, -1, 11, 16, 23]
POSITIONS = [0, 1, 7, 42, 63, 100]  # position 0 (identity rotation) and several real rotations


def _cos_sin(max_position: int, rotary_dim: int, device: str) -> torch.Tensor:
    """[max_position, rotary_dim] float32: cos | sin, as RotaryEmbedding builds it."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)


def _qkv_views(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: str, seed: int = 0,
               flat: bool = False) -> tuple[torch.Tensor, ...]:
    """qkv [T, (Hq + 2 Hkv) * D] and its q, k, v views (split along the last dim, rows strided by the full width),
    [T, H, D] each (flat: [T, H * D])."""
    g = torch.Generator().manual_seed(seed)
    num_tokens = len(SLOTS)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=g).to(device, dtype)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    if not flat:
        q = q.view(num_tokens, num_heads, head_dim)
        k = k.view(num_tokens, num_kv_heads, head_dim)
        v = v.view(num_tokens, num_kv_heads, head_dim)
    return qkv, q, k, v


def _run_three_ways(num_heads, num_kv_heads, head_dim, rotary_dim, dtype, cache_dtype, device, scales=None,
                    flat=False):
    """The same inputs through (fused kernel, rotary + write_kv Triton kernels, the references).

    returns {way: (q [T, Hq, D], k [T, Hkv, D], kv_cache, qkv)}, the untouched inputs (qkv, v) and the slots."""
    cos_sin = _cos_sin(128, rotary_dim, device)
    positions = torch.tensor(POSITIONS, device=device)
    slots = torch.tensor(SLOTS, device=device)
    g = torch.Generator().manual_seed(7)
    init = torch.randn(2, NUM_BLOCKS, TOKENS_PER_BLOCK, num_kv_heads, head_dim, generator=g)  # cache garbage
    init = (reference.quantize_kv(init, 0.05, cache_dtype) if cache_dtype in (torch.int8, torch.float8_e4m3fn)
            else init.to(cache_dtype)).to(device)
    k_scale, v_scale = scales if scales is not None else (None, None)
    original, *_ = _qkv_views(num_heads, num_kv_heads, head_dim, dtype, device, flat=flat)
    out = {}
    for way in ("fused", "triton", "reference"):
        qkv, q, k, v = _qkv_views(num_heads, num_kv_heads, head_dim, dtype, device, flat=flat)
        cache = init.clone()
        if way == "fused":
            rq, rk = rotary_write_kv_cache(positions, q, k, v, cos_sin, head_dim, cache, slots, k_scale, v_scale)
            assert rq is q and rk is k
        elif way == "triton":
            rotary_embedding(positions, q, k, cos_sin, head_dim, inplace=True)
            write_kv_cache(k.view(len(SLOTS), num_kv_heads, head_dim), v.view(len(SLOTS), num_kv_heads, head_dim),
                           cache, slots, k_scale, v_scale)
        else:
            q, k = reference.rotary_embedding(positions, q, k, cos_sin, head_dim)
            reference.write_kv_cache(k.view(len(SLOTS), num_kv_heads, head_dim),
                                     v.view(len(SLOTS), num_kv_heads, head_dim), cache, slots, k_scale, v_scale)
        out[way] = (q.reshape(len(SLOTS), num_heads, head_dim), k.reshape(len(SLOTS), num_kv_heads, head_dim),
                    cache, qkv)
    return out, original, init


def _bytes(cache: torch.Tensor) -> torch.Tensor:
    return cache.view(torch.uint8)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (6, 1), (3, 3)])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (64, 32), (48, 48)])
@pytest.mark.parametrize("flat", [False, True])
def test_fused_equals_reference_float_cache(num_heads, num_kv_heads, head_dim, rotary_dim, flat, device) -> None:
    out, original, init = _run_three_ways(num_heads, num_kv_heads, head_dim, rotary_dim, torch.float32,
                                          torch.float32, device, flat=flat)
    fq, fk, fcache, fqkv = out["fused"]
    tq, tk, tcache, _ = out["triton"]
    rq, rk, rcache, _ = out["reference"]
    torch.testing.assert_close(fq, rq, **F32)
    torch.testing.assert_close(fk, rk, **F32)
    torch.testing.assert_close(fcache, rcache, **F32)
    # bit for bit the two kernels it replaces
    torch.testing.assert_close(fq, tq, **EXACT)
    torch.testing.assert_close(fk, tk, **EXACT)
    torch.testing.assert_close(fcache, tcache, **EXACT)
    # v is read, never written; the padding token's slot is not among the written ones (everything else is intact)
    qk_width = (num_heads + num_kv_heads) * head_dim
    torch.testing.assert_close(fqkv[:, qk_width:], original[:, qk_width:], **EXACT)
    written = torch.tensor([s for s in SLOTS if s >= 0])
    untouched = torch.ones(NUM_BLOCKS * TOKENS_PER_BLOCK, dtype=torch.bool)
    untouched[written] = False
    flat_cache = fcache.view(2, -1, num_kv_heads, head_dim)
    torch.testing.assert_close(flat_cache[:, untouched.to(device)], init.view(2, -1, num_kv_heads, head_dim)
                               [:, untouched.to(device)], **EXACT)


def test_fused_rotates_q_and_writes_rotated_k(device) -> None:
    """Guards against a kernel that skips q, writes k unrotated, or skips q / k of a padding token: the rotation
    is not the identity at these positions, and the rotated values differ from the inputs by far more than 1e-5."""
    num_heads, num_kv_heads, head_dim = 4, 2, 64
    out, original, _ = _run_three_ways(num_heads, num_kv_heads, head_dim, head_dim, torch.float32, torch.float32,
                                       device)
    fq, fk, fcache, _ = out["fused"]
    rq, rk, _, _ = out["reference"]
    q_in = original[:, : num_heads * head_dim].view(len(SLOTS), num_heads, head_dim)
    k_in = original[:, num_heads * head_dim: (num_heads + num_kv_heads) * head_dim].view(len(SLOTS), num_kv_heads,
                                                                                         head_dim)
    moved = torch.tensor(POSITIONS) > 0
    assert ((rq - q_in).abs().amax(dim=(1, 2)) > 1e-2).cpu().tolist() == moved.tolist()
    assert ((rk - k_in).abs().amax(dim=(1, 2)) > 1e-2).cpu().tolist() == moved.tolist()
    pad = SLOTS.index(-1)
    assert POSITIONS[pad] > 0  # the padding token's q and k are rotated too (callers read q; k stays consistent)
    torch.testing.assert_close(fq[pad], rq[pad], **F32)
    torch.testing.assert_close(fk[pad], rk[pad], **F32)
    for i, slot in enumerate(SLOTS):
        if slot >= 0:
            stored_k = fcache[0, slot // TOKENS_PER_BLOCK, slot % TOKENS_PER_BLOCK]
            torch.testing.assert_close(stored_k, rk[i], **F32)
            torch.testing.assert_close(fcache[1, slot // TOKENS_PER_BLOCK, slot % TOKENS_PER_BLOCK],
                                       original[i, (num_heads + num_kv_heads) * head_dim:]
                                       .view(num_kv_heads, head_dim), **EXACT)


@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("per_head", [True, False])
def test_fused_quantized_cache(cache_dtype, per_head, device) -> None:
    if cache_dtype == torch.float8_e4m3fn and device != "cuda":
        pytest.skip("Triton fp8 (e4m3) conversion needs a GPU: the interpreter does not emulate it")
    num_heads, num_kv_heads, head_dim = 6, 2, 32
    n = num_kv_heads if per_head else 1
    scales = (torch.tensor([0.02, 0.035][:n], device=device), torch.tensor([0.011, 0.007][:n], device=device))
    out, _, init = _run_three_ways(num_heads, num_kv_heads, head_dim, head_dim, torch.float32, cache_dtype, device,
                                   scales=scales)
    fq, fk, fcache, fqkv = out["fused"]
    tq, tk, tcache, _ = out["triton"]
    rq, rk, rcache, _ = out["reference"]
    torch.testing.assert_close(fq, rq, **F32)
    torch.testing.assert_close(fk, rk, **F32)
    assert torch.equal(fq, tq) and torch.equal(fk, tk)
    assert torch.equal(_bytes(fcache), _bytes(tcache))  # bit for bit the two kernels
    # the stored codes are exactly the reference quantization of the rotated k the kernel left in k
    want = init.clone()
    v = fqkv[:, (num_heads + num_kv_heads) * head_dim:].view(len(SLOTS), num_kv_heads, head_dim)
    reference.write_kv_cache(fk, v, want, torch.tensor(SLOTS, device=device), *scales)
    assert torch.equal(_bytes(fcache), _bytes(want))
    if device == "cpu":  # the interpreter rotates exactly as torch: the whole reference chain, byte for byte
        assert torch.equal(_bytes(fcache), _bytes(rcache))
    assert not torch.equal(_bytes(fcache), _bytes(init))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_half_precision(dtype, device) -> None:
    """bf16 / fp16 q, k, v and cache: identical to the two Triton kernels, close to the reference."""
    out, _, _ = _run_three_ways(4, 2, 64, 64, dtype, dtype, device)
    fq, fk, fcache, _ = out["fused"]
    tq, tk, tcache, _ = out["triton"]
    rq, rk, rcache, _ = out["reference"]
    assert torch.equal(fq, tq) and torch.equal(fk, tk) and torch.equal(fcache, tcache)
    torch.testing.assert_close(fq, rq, **BF16)
    torch.testing.assert_close(fk, rk, **BF16)
    torch.testing.assert_close(fcache, rcache, **BF16)


def test_fused_int32_positions_and_slots_and_empty(device) -> None:
    hq, hkv, d = 4, 2, 32
    cos_sin = _cos_sin(128, d, device)
    _, q, k, v = _qkv_views(hq, hkv, d, torch.float32, device)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    ours = torch.zeros(2, NUM_BLOCKS, TOKENS_PER_BLOCK, hkv, d, device=device)
    theirs = ours.clone()
    rotary_write_kv_cache(torch.tensor(POSITIONS, dtype=torch.int32, device=device), q, k, v, cos_sin, d, ours,
                          torch.tensor(SLOTS, dtype=torch.int32, device=device))
    rotary_write_kv_cache(torch.tensor(POSITIONS, device=device), q2, k2, v2, cos_sin, d, theirs,
                          torch.tensor(SLOTS, device=device))
    assert torch.equal(q, q2) and torch.equal(k, k2) and torch.equal(ours, theirs)
    empty = torch.zeros(0, hq, d, device=device)
    rotary_write_kv_cache(torch.zeros(0, dtype=torch.int64, device=device), empty, empty[:, :hkv], empty[:, :hkv],
                          cos_sin, d, ours, torch.zeros(0, dtype=torch.int64, device=device))
    assert torch.equal(ours, theirs)  # zero tokens: nothing launched, nothing written


def test_fused_rejects_bad_input(device) -> None:
    t, hq, hkv, d = 3, 4, 2, 32
    q, k = torch.zeros(t, hq, d, device=device), torch.zeros(t, hkv, d, device=device)
    pos, slots = torch.zeros(t, dtype=torch.int64, device=device), torch.arange(t, device=device)
    cache = torch.zeros(2, 2, 4, hkv, d, device=device)
    cos_sin = _cos_sin(16, d, device)
    with pytest.raises(ValueError, match="rotary_dim"):  # odd
        rotary_write_kv_cache(pos, q, k, k, cos_sin[:, :31], d, cache, slots)
    with pytest.raises(ValueError, match="rotary_dim"):  # wider than a head
        rotary_write_kv_cache(pos, q, k, k, _cos_sin(16, 64, device), d, cache, slots)
    with pytest.raises(ValueError, match="q"):  # token count differs from positions
        rotary_write_kv_cache(pos[:2], q, k, k, cos_sin, d, cache, slots)
    with pytest.raises(ValueError, match="cache"):  # head_dim differs from the cache's
        rotary_write_kv_cache(pos, q[..., :16], k[..., :16], k[..., :16], cos_sin[:, :16], 16, cache, slots)
    with pytest.raises(ValueError, match="slot_mapping"):
        rotary_write_kv_cache(pos, q, k, k, cos_sin, d, cache, slots[:2])
    with pytest.raises(ValueError, match="k_scale"):  # a quantized cache needs scales
        rotary_write_kv_cache(pos, q, k, k, cos_sin, d, cache.to(torch.int8), slots)
    with pytest.raises(ValueError, match="positions"):
        rotary_write_kv_cache(pos[:, None], q, k, k, cos_sin, d, cache, slots)


# ---- the attention backend and the model take the fused kernel ------------------------------------------------------
def test_attention_rotary_fused_and_reference_paths(device) -> None:
    """Attention(..., rotary=RotaryInputs): triton with a cache fuses RoPE into the KV write (q, k rotated in place),
    the reference backend rotates first; both equal rotating before a rotary-less call."""
    from kvflight.model.attention import Attention, AttentionMetadata, RotaryInputs, positions_for

    hq, hkv, d, tpb = 4, 2, 32, 4
    query_lens, seq_lens = [5, 1, 3], [5, 9, 7]  # a prefill, a decode, a chunk over a cached prefix
    meta = AttentionMetadata.build(query_lens, seq_lens, [[3, 0, 5], [1, 4, 6], [2, 7]], tpb, device=device)
    positions = positions_for(query_lens, seq_lens, device=device)
    rotary = RotaryInputs(positions, _cos_sin(64, d, device), d)
    g = torch.Generator().manual_seed(5)
    num_tokens = sum(query_lens)
    qkv = torch.randn(num_tokens, (hq + 2 * hkv) * d, generator=g).to(device)
    prefix = torch.randn(2, 8, tpb, hkv, d, generator=g).to(device)  # earlier tokens' (already rotated) K / V
    outs, caches = {}, {}
    for way in ("triton", "reference", "pre-rotated"):
        x = qkv.clone()
        q, k, v = (t.reshape(num_tokens, -1, d) for t in x.split([hq * d, hkv * d, hkv * d], dim=-1))
        cache = prefix.clone()
        attn = Attention(hq, d, hkv, backend="reference" if way == "reference" else "triton")
        assert attn.fuses_rotary(cache) == (way != "reference")
        if way == "pre-rotated":
            q, k = rotary.apply_reference(q, k)
            outs[way] = attn(q, k, v, cache, meta)
        else:
            outs[way] = attn(q, k, v, cache, meta, rotary=rotary)
        caches[way] = cache
    for way in ("triton", "reference"):
        torch.testing.assert_close(outs[way], outs["pre-rotated"], **F32)
        torch.testing.assert_close(caches[way], caches["pre-rotated"], **F32)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_model_triton_uses_fused_kernel_and_matches_torch(qk_norm, device, monkeypatch) -> None:
    """A tiny Llama / Qwen3 (q / k norm before RoPE): prefill then two decode steps, triton (fused RoPE + KV write,
    no separate rotary launch) vs the torch backend: same hidden states and caches."""
    from kvflight.kernels import rope_write_kv
    from kvflight.kernels import rotary as triton_rotary
    from kvflight.model.arch import ModelArch
    from kvflight.model.attention import AttentionMetadata, positions_for
    from kvflight.model.llama import LlamaForCausalLM

    arch = ModelArch(architecture="Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM", hidden_size=64,
                     num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=96, vocab_size=50,
                     rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=64,
                     qk_norm=qk_norm)
    torch.manual_seed(0)
    model = LlamaForCausalLM(arch, device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p))
    calls = {"fused": 0, "rotary": 0}
    fused_fn, rotary_fn = rope_write_kv.rotary_write_kv_cache, triton_rotary.rotary_embedding

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(rope_write_kv, "rotary_write_kv_cache", counting("fused", fused_fn))
    monkeypatch.setattr(triton_rotary, "rotary_embedding", counting("rotary", rotary_fn))
    tpb, blocks = 4, [[2, 0, 5], [1, 3]]
    steps = [([7, 3], [7, 3]), ([1, 1], [8, 4]), ([1, 1], [9, 5])]  # (query_lens, seq_lens): prefill, decodes
    results = {}
    for backend in ("torch", "triton"):
        model.set_kernel_backend(backend)
        caches = [torch.zeros(model.kv_cache_shape(6, tpb), device=device) for _ in range(arch.num_layers)]
        gen = torch.Generator().manual_seed(1)
        hidden = []
        with torch.no_grad():
            for query_lens, seq_lens in steps:
                meta = AttentionMetadata.build(query_lens, seq_lens, blocks, tpb, device=device)
                ids = torch.randint(0, arch.vocab_size, (sum(query_lens),), generator=gen).to(device)
                hidden.append(model(ids, positions_for(query_lens, seq_lens, device=device), caches, meta))
        results[backend] = (hidden, caches)
    assert calls == {"fused": arch.num_layers * len(steps), "rotary": 0}
    for got, want in zip(results["triton"][0] + results["triton"][1], results["torch"][0] + results["torch"][1]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ---- GPU, real shapes (Llama-3-8B-like heads) ---------------------------------------------------------------------
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("num_tokens", [1, 8, 2048])
def test_gpu_fused_bf16_equals_two_kernels(cache_dtype, num_tokens) -> None:
    hq, hkv, d, num_blocks, tpb = 32, 8, 128, 256, 16
    cos_sin = _cos_sin(8192, d, "cuda")
    positions = torch.randint(0, 8192, (num_tokens,), device="cuda")
    slots = torch.randperm(num_blocks * tpb, device="cuda")[:num_tokens]
    slots[::5] = -1
    qkv = torch.randn(num_tokens, (hq + 2 * hkv) * d, device="cuda", dtype=torch.bfloat16)
    scales = (None, None)
    if cache_dtype != torch.bfloat16:
        scales = (torch.rand(hkv, device="cuda") * 0.02 + 0.02, torch.rand(hkv, device="cuda") * 0.02 + 0.01)
    results = []
    for fused in (True, False):
        x = qkv.clone()
        q, k, v = (t.view(num_tokens, -1, d) for t in x.split([hq * d, hkv * d, hkv * d], dim=-1))
        cache = torch.zeros(2, num_blocks, tpb, hkv, d, device="cuda", dtype=cache_dtype)
        if fused:
            rotary_write_kv_cache(positions, q, k, v, cos_sin, d, cache, slots, *scales)
        else:
            rotary_embedding(positions, q, k, cos_sin, inplace=True)
            write_kv_cache(k, v, cache, slots, *scales)
        results.append((x, cache))
    (fx, fcache), (tx, tcache) = results
    assert torch.equal(fx, tx)  # q and k rotated in place alike, v untouched
    assert torch.equal(_bytes(fcache), _bytes(tcache))
    q0, k0 = qkv[:, : hq * d], qkv[:, hq * d: (hq + hkv) * d]
    rq, rk = reference.rotary_embedding(positions, q0, k0, cos_sin)
    torch.testing.assert_close(fx[:, : hq * d], rq, **BF16)
    torch.testing.assert_close(fx[:, hq * d: (hq + hkv) * d], rk, **BF16)
