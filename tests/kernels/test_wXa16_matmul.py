"""Triton weight-only matmuls (W8A16, W4A16) and the per-token activation quantizer equal their references."""

from __future__ import annotations

import pytest
import torch

from kvflight.kernels import reference
from kvflight.kernels.per_token_quant import per_token_quant
from kvflight.kernels.w4a16_matmul import w4a16_matmul
from kvflight.kernels.w8a16_matmul import w8a16_matmul

F32 = dict(atol=1e-4, rtol=1e-4)
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _w8(n: int, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    qweight = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) * 0.02 + 1e-3
    return qweight, scale


def _w4(n: int, k: int, group: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    qweight = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, k // group, generator=g) * 0.02 + 1e-3).half()
    zeros = torch.randint(0, 16, (n, k // group), generator=g, dtype=torch.uint8)
    return qweight, scales, zeros


@pytest.mark.parametrize("num_tokens", [1, 5, 33])  # decode, ragged, more than one row block
@pytest.mark.parametrize("n,k", [(48, 64), (96, 192)])
@pytest.mark.parametrize("split_k", [None, 1, 2])
def test_w8a16_matches_reference(num_tokens: int, n: int, k: int, split_k: int | None, device: str) -> None:
    g = torch.Generator().manual_seed(num_tokens * 100 + n)
    x = torch.randn(num_tokens, k, generator=g)
    qweight, scale = _w8(n, k, g)
    bias = torch.randn(n, generator=g)
    out = w8a16_matmul(x.to(device), qweight.to(device), scale.to(device), bias.to(device), split_k=split_k)
    ref = reference.w8a16_matmul(x, qweight, scale, bias)
    assert out.shape == (num_tokens, n) and out.dtype == x.dtype
    torch.testing.assert_close(out.cpu(), ref, **F32)


@pytest.mark.parametrize("num_tokens", [1, 7, 20])
@pytest.mark.parametrize("group_size,k", [(32, 96), (64, 192), (128, 256)])
@pytest.mark.parametrize("with_zeros", [True, False])
def test_w4a16_matches_reference(num_tokens: int, group_size: int, k: int, with_zeros: bool, device: str) -> None:
    g = torch.Generator().manual_seed(num_tokens * 1000 + k + with_zeros)
    n = 40  # not a multiple of the column block: masked edges
    x = torch.randn(num_tokens, k, generator=g)
    qweight, scales, zeros = _w4(n, k, group_size, g)
    zeros_or_none = zeros if with_zeros else None
    out = w4a16_matmul(x.to(device), qweight.to(device), scales.to(device),
                       None if zeros_or_none is None else zeros_or_none.to(device), group_size)
    ref = reference.w4a16_matmul(x, qweight, scales, zeros_or_none, group_size)
    torch.testing.assert_close(out.cpu(), ref, **F32)


@pytest.mark.parametrize("split_k", [1, 3])
def test_w4a16_bias_split_k_and_leading_dims(split_k: int, device: str) -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 128, generator=g)  # [..., K]
    qweight, scales, zeros = _w4(32, 128, 64, g)
    bias = torch.randn(32, generator=g)
    out = w4a16_matmul(x.to(device), qweight.to(device), scales.to(device), zeros.to(device), 64, bias.to(device),
                       split_k=split_k)
    ref = reference.w4a16_matmul(x.reshape(-1, 128), qweight, scales, zeros, 64, bias).view(2, 3, 32)
    assert out.shape == (2, 3, 32)
    torch.testing.assert_close(out.cpu(), ref, **F32)


def test_w4a16_float16_activations(device: str) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 128, generator=g).half()
    qweight, scales, zeros = _w4(64, 128, 64, g)
    out = w4a16_matmul(x.to(device), qweight.to(device), scales.to(device), zeros.to(device), 64)
    ref = reference.w4a16_matmul(x, qweight, scales, zeros, 64)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.cpu().float(), ref.float(), atol=2e-3, rtol=2e-3)


def test_reference_unpack_layout() -> None:
    """Nibble p of each little-endian 32-bit word holds column 8w + (0, 2, 4, 6, 1, 3, 5, 7)[p]: (word >> 4j) &
    0x000F000F is the column pair (2j, 2j + 1) of an activation register."""
    word = 0x76543210  # nibble p = p
    packed = torch.tensor([[word >> (8 * b) & 0xFF for b in range(4)]], dtype=torch.uint8)
    assert reference.unpack_int4(packed).tolist() == [[0, 4, 1, 5, 2, 6, 3, 7]]


def _bf16_bits(values: list[float]) -> list[int]:
    return torch.tensor(values, dtype=torch.float64).to(torch.bfloat16).view(torch.int16).to(torch.int32).bitwise_and(
        0xFFFF).tolist()


def _bf16x2(reg: int) -> list[float]:
    halves = torch.tensor([reg & 0xFFFF, reg >> 16], dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return halves.double().tolist()


def _run_word_chain(ptx: str, word: int, xbits: list[int], negoff: int) -> float:
    """Execute the 4-bit GEMV's PTX word chain (one row) instruction by instruction: each packed bf16x2 fma is exact
    then rounded once to bf16, as the hardware does."""
    regs = {"$1": word, "$3": negoff}

    def val(op: str) -> int:
        return regs[op] if op in regs else int(op, 0)

    for line in ptx.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, _, rest = line.partition(" ")
        if op == "ld.global.v4.b32":
            for m in range(4):
                regs[f"x{m}"] = xbits[2 * m] | (xbits[2 * m + 1] << 16)
            continue
        args = [a.strip() for a in rest.split(",")]
        dst = args[0]
        if op == "mov.b32":
            regs[dst] = val(args[1])
        elif op == "shr.u32":
            regs[dst] = val(args[1]) >> val(args[2])
        elif op == "shl.b32":
            regs[dst] = (val(args[1]) << val(args[2])) & 0xFFFFFFFF
        elif op == "and.b32":
            regs[dst] = val(args[1]) & val(args[2])
        elif op == "prmt.b32":  # default mode: byte i of the result = byte sel_i & 7 of {b, a}
            src = [(val(args[1]) >> (8 * i)) & 0xFF for i in range(4)] + [(val(args[2]) >> (8 * i)) & 0xFF
                                                                         for i in range(4)]
            sel = val(args[3])
            regs[dst] = sum(src[(sel >> (4 * i)) & 7] << (8 * i) for i in range(4))
        elif op == "lop3.b32":
            assert val(args[4]) == 0xEA  # (a & b) | c
            regs[dst] = (val(args[1]) & val(args[2])) | val(args[3])
        elif op == "fma.rn.bf16x2":
            a, b, c = (_bf16x2(val(r)) for r in args[1:])
            out = _bf16_bits([a[h] * b[h] + c[h] for h in range(2)])
            regs[dst] = out[0] | (out[1] << 16)
        elif op == "add.f32":
            f = torch.tensor([val(args[1]), val(args[2])], dtype=torch.int64).to(torch.int32).view(torch.float32)
            regs[dst] = int(torch.tensor([float(f[0]) + float(f[1])], dtype=torch.float32).view(torch.int32)[0]) \
                & 0xFFFFFFFF
        else:
            raise AssertionError(f"unhandled PTX in the word chain: {line}")
    return float(torch.tensor([regs["$0"]], dtype=torch.int64).to(torch.int32).view(torch.float32)[0])


def test_gemv_word_chain_pairs_columns_as_the_layout_packs_them() -> None:
    """The GPU GEMV's PTX word chain, executed on the CPU: for words packed by ops.pack_int4 it returns
    sum_c (code_c - zero) * x_c over the word's 8 columns (bf16 rounding of its packed sums aside); any other pairing
    of codes with activations lands far from it."""
    from kvflight.kernels.wo_gemv import _ASM_BF16
    from kvflight.quant.ops import pack_int4

    gen = torch.Generator().manual_seed(5)
    for _ in range(20):
        codes = torch.randint(0, 16, (1, 8), generator=gen)
        zero = int(torch.randint(0, 16, (1,), generator=gen))
        x = (torch.randn(8, generator=gen) * 2).to(torch.bfloat16)
        word = int(pack_int4(codes).view(torch.int32)[0, 0]) & 0xFFFFFFFF
        negoff = ((zero | 0xC300) * 65537) & 0xFFFFFFFF  # -(128 + zero) in both bf16 halves
        got = _run_word_chain(_ASM_BF16.value, word, x.view(torch.int16).to(torch.int32).bitwise_and(0xFFFF).tolist(),
                              negoff)
        terms = (codes[0].double() - zero) * x.double()
        want = float(terms.sum())
        scale = float(terms.abs().sum()) + 1e-6
        assert abs(got - want) <= 0.02 * scale, (got, want)
        # a pairing off by one column pair (the old layout's order, or a swapped pair) is caught
        wrong = float(((codes[0, [0, 4, 1, 5, 2, 6, 3, 7]].double() - zero) * x.double()).sum())
        if abs(wrong - want) > 0.2 * scale:
            assert abs(got - wrong) > 0.1 * scale


def test_bad_shapes_are_clear_errors() -> None:
    x = torch.randn(2, 96)
    with pytest.raises(ValueError, match="group_size=64 must be a power of two >= 32 dividing K=96"):
        w4a16_matmul(x, torch.zeros(8, 48, dtype=torch.uint8), torch.ones(8, 1), None, 64)
    with pytest.raises(ValueError, match="qweight .* expected \\[N, 96\\] int8"):
        w8a16_matmul(x, torch.zeros(8, 64, dtype=torch.int8), torch.ones(8))


@pytest.mark.parametrize("num_tokens,k", [(1, 64), (6, 300), (3, 3000)])  # K > one block: two passes per row
def test_per_token_quant_int8_equals_reference(num_tokens: int, k: int, device: str) -> None:
    g = torch.Generator().manual_seed(k)
    x = torch.randn(num_tokens, k, generator=g) * 3
    x[0, :5] = torch.tensor([0.5, -0.5, 1.5, -2.5, 0.0])  # ties round away from zero in both
    if num_tokens > 2:
        x[2] = 0.0  # an all-zero row gets a tiny scale, codes 0
    q, scale = per_token_quant(x.to(device), torch.int8)
    ref_q, ref_scale = reference.per_token_quant(x, torch.int8)
    torch.testing.assert_close(scale.cpu(), ref_scale, atol=0, rtol=1e-6)
    assert torch.equal(q.cpu(), ref_q)


# ---- real shapes on a GPU ---------------------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("num_tokens", [1, 16, 300])
def test_bf16_llama_shapes_on_gpu(num_tokens: int) -> None:
    g = torch.Generator().manual_seed(num_tokens)
    n, k = 1024, 4096
    x = torch.randn(num_tokens, k, generator=g).bfloat16().cuda()
    qweight, scale = _w8(n, k, g)
    out = w8a16_matmul(x, qweight.cuda(), scale.cuda())
    ref = reference.w8a16_matmul(x.float(), qweight.cuda(), scale.cuda())
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=2e-2)
    q4, scales, zeros = _w4(n, k, 128, g)
    out = w4a16_matmul(x, q4.cuda(), scales.cuda(), zeros.cuda(), 128)
    ref = reference.w4a16_matmul(x.float(), q4.cuda(), scales.cuda(), zeros.cuda(), 128)
    torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=2e-2)


@gpu
def test_per_token_quant_fp8_on_gpu() -> None:
    x = torch.randn(9, 4096, device="cuda", dtype=torch.bfloat16) * 5
    q, scale = per_token_quant(x, torch.float8_e4m3fn)
    ref_q, ref_scale = reference.per_token_quant(x, torch.float8_e4m3fn)
    torch.testing.assert_close(scale, ref_scale, atol=0, rtol=1e-6)
    assert (q.float() - ref_q.float()).abs().max() == 0


# ---- one-pass weight dequantization (the large-batch path: dequantize, then cuBLAS) -----------------------------
@pytest.mark.parametrize("n,k", [(48, 64), (40, 200)])  # ragged tiles in both directions
def test_dequantize_8bit_equals_reference(n: int, k: int, device: str) -> None:
    from kvflight.kernels.dequant_weight import dequantize_8bit
    from kvflight.quant import ops

    g = torch.Generator().manual_seed(n + k)
    qweight, scale = _w8(n, k, g)
    # bf16 exactly on the GPU only: the interpreter's float32 -> bf16 cast does not round to nearest
    for dtype in (torch.float32, torch.bfloat16) if device == "cuda" else (torch.float32,):
        out = dequantize_8bit(qweight.to(device), scale.to(device), dtype)
        assert out.dtype == dtype and out.shape == (n, k)
        assert torch.equal(out.cpu(), ops.dequantize_int8(qweight, scale).to(dtype))


@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("n,k,group", [(48, 256, 128), (33, 192, 32)])
def test_dequantize_int4_equals_reference(n: int, k: int, group: int, zero_point: bool, device: str) -> None:
    from kvflight.kernels.dequant_weight import dequantize_int4
    from kvflight.quant import ops

    g = torch.Generator().manual_seed(n * k)
    qweight, scales, zeros = _w4(n, k, group, g)
    zeros = zeros if zero_point else None
    out = dequantize_int4(qweight.to(device), scales.to(device), None if zeros is None else zeros.to(device), group,
                          torch.float32)
    assert torch.equal(out.cpu(), ops.dequantize_int4(qweight, scales, zeros, group))


@gpu
def test_fp8_weights_in_w8a16_and_dequant_on_gpu() -> None:
    from kvflight.kernels.dequant_weight import dequantize_8bit
    from kvflight.quant import ops

    g = torch.Generator().manual_seed(8)
    w = torch.randn(1024, 4096, generator=g) * 0.02
    q, scale = ops.quantize_fp8(w.cuda(), per_channel=True)
    wd = q.float() * scale[:, None]  # [N, K] float32
    assert torch.equal(dequantize_8bit(q, scale, torch.float32), wd)
    for num_tokens in (1, 16):
        x = torch.randn(num_tokens, 4096, generator=g).bfloat16().cuda()
        out = w8a16_matmul(x, q, scale)
        torch.testing.assert_close(out.float(), x.float() @ wd.t(), atol=5e-2, rtol=2e-2)


# ---- the decode GEMV (a few rows, CUDA cores, weights streamed once) ---------------------------------------------
@pytest.mark.parametrize("num_tokens", [1])
@pytest.mark.parametrize("group_size,k", [(32, 96), (128, 512)])
@pytest.mark.parametrize("with_zeros", [True, False])
@pytest.mark.parametrize("split_k", [1, 3])
def test_gemv_4bit_matches_reference(num_tokens: int, group_size: int, k: int, with_zeros: bool, split_k: int,
                                     device: str) -> None:
    from kvflight.kernels.wo_gemv import GemvConfig, wo_gemv

    g = torch.Generator().manual_seed(num_tokens * 1000 + k + with_zeros + split_k)
    n = 40  # not a multiple of the column block: masked edges
    x = torch.randn(num_tokens, k, generator=g)
    qweight, scales, zeros = _w4(n, k, group_size, g)
    zeros = zeros if with_zeros else None
    bias = torch.randn(n, generator=g)
    cfg = GemvConfig(16, 32, split_k)
    out = wo_gemv(x.to(device), qweight.to(device), scales.to(device), None if zeros is None else zeros.to(device),
                  group_size, bias.to(device), config=cfg)
    ref = reference.w4a16_matmul(x, qweight, scales, zeros, group_size, bias)
    assert out.shape == (num_tokens, n) and out.dtype == x.dtype
    torch.testing.assert_close(out.cpu(), ref, **F32)
    if split_k > 1:  # the last split of each column block re-armed its arrival counter: the next call is the same
        from kvflight.kernels.w8a16_matmul import _COUNTERS

        assert int(_COUNTERS[(str(out.device), 3)].abs().sum()) == 0
        again = wo_gemv(x.to(device), qweight.to(device), scales.to(device),
                        None if zeros is None else zeros.to(device), group_size, bias.to(device), config=cfg)
        assert torch.equal(again, out)


@pytest.mark.parametrize("num_tokens", [1])
@pytest.mark.parametrize("n,k", [(40, 64), (24, 200)])  # ragged K tail
@pytest.mark.parametrize("split_k", [1, 2])
def test_gemv_8bit_matches_reference(num_tokens: int, n: int, k: int, split_k: int, device: str) -> None:
    from kvflight.kernels.wo_gemv import GemvConfig, wo_gemv

    g = torch.Generator().manual_seed(num_tokens * 100 + n + split_k)
    x = torch.randn(num_tokens, k, generator=g)
    qweight, scale = _w8(n, k, g)
    out = wo_gemv(x.to(device), qweight.to(device), scale.to(device), config=GemvConfig(16, 64, split_k))
    torch.testing.assert_close(out.cpu(), reference.w8a16_matmul(x, qweight, scale), **F32)


def test_gemv_refuses_bad_input() -> None:
    from kvflight.kernels.wo_gemv import wo_gemv

    with pytest.raises(ValueError, match="GEMV_MAX_ROWS"):
        wo_gemv(torch.zeros(2, 64), torch.zeros(8, 64, dtype=torch.int8), torch.ones(8))
    with pytest.raises(ValueError, match="group_size=48"):
        wo_gemv(torch.zeros(1, 96), torch.zeros(8, 48, dtype=torch.uint8), torch.ones(8, 2), group_size=48)
    with pytest.raises(ValueError, match="qweight dtype torch.float16"):
        wo_gemv(torch.zeros(1, 64), torch.zeros(8, 64, dtype=torch.float16), torch.ones(8))


@gpu
@pytest.mark.parametrize("num_tokens", [1])
def test_gemv_llama_shapes_on_gpu(num_tokens: int) -> None:
    from kvflight.kernels.wo_gemv import wo_gemv
    from kvflight.quant import ops

    g = torch.Generator().manual_seed(num_tokens)
    for n, k in ((6144, 4096), (4096, 14336)):
        x = torch.randn(num_tokens, k, generator=g).bfloat16().cuda()
        q4, scales, zeros = _w4(n, k, 128, g)
        out = wo_gemv(x, q4.cuda(), scales.cuda(), zeros.cuda(), 128)
        ref = reference.w4a16_matmul(x.float(), q4.cuda(), scales.cuda(), zeros.cuda(), 128)
        # bf16 activations: each word's 8 products are summed in bf16 (packed arithmetic), so the error is a few
        # bf16 roundings of the partial sums: about 0.4% of the output's norm, against 0.2% for rounding the output
        rel = ((out.float() - ref).norm() / ref.norm()).item()
        assert rel < 1e-2, f"[{n}, {k}] int4: relative error {rel:.4f}"
        q8, scale = _w8(n, k, g)
        out = wo_gemv(x, q8.cuda(), scale.cuda())
        torch.testing.assert_close(out.float(), reference.w8a16_matmul(x.float(), q8.cuda(), scale.cuda()),
                                   atol=5e-2, rtol=2e-2)
        qf, scale_f = ops.quantize_fp8((torch.randn(n, k, generator=g) * 0.02).cuda(), per_channel=True)
        out = wo_gemv(x, qf, scale_f)
        torch.testing.assert_close(out.float(), x.float() @ (qf.float() * scale_f[:, None]).t(), atol=5e-2,
                                   rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_4bit_16bit_activations(dtype: torch.dtype, device: str) -> None:
    """16-bit activations sum each word's 8 products in their own dtype (packed x2 arithmetic on a GPU): within a
    16-bit rounding of the float32 reference."""
    from kvflight.kernels.wo_gemv import GemvConfig, wo_gemv

    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("the interpreter keeps bf16 in float32 storage: an int16 -> bf16 bitcast is not emulated")
    g = torch.Generator().manual_seed(16)
    n, k, group = 40, 256, 64
    x = torch.randn(1, k, generator=g)
    qweight, scales, zeros = _w4(n, k, group, g)
    out = wo_gemv(x.to(dtype).to(device), qweight.to(device), scales.to(device), zeros.to(device), group,
                  config=GemvConfig(16, 64, 2))
    ref = reference.w4a16_matmul(x.to(dtype).float(), qweight, scales, zeros, group)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float().cpu(), ref, atol=2e-2 * ref.abs().max().item(), rtol=2e-2)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_zeros", [True, False])
def test_gemv_4bit_ptx_chain_tiles_across_groups_on_gpu(dtype: torch.dtype, with_zeros: bool,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The PTX word chain (16-bit activations on a GPU), one or two rows per chain: tiles of 1, 2, 4 and 16 groups
    over 11 groups (a last tile partly past K; with 16, a split with no K at all), split K, x starting at an odd element (its pairs are re-aligned), bias,
    row blocks past N; against the float32 reference and against the Triton unpack path (KVFLIGHT_GEMV_ASM=0)."""
    from kvflight.kernels.wo_gemv import GemvConfig, wo_gemv

    g = torch.Generator().manual_seed(11)
    n, group = 40, 64
    k = 11 * group
    x_storage = torch.randn(1, k + 1, generator=g).to(dtype).cuda()
    x = x_storage[:, 1:]  # data_ptr % 4 == 2
    qweight, scales, zeros = (t.cuda() for t in _w4(n, k, group, g))
    zeros = zeros if with_zeros else None
    bias = torch.randn(n, generator=g).to(dtype).cuda()
    ref = reference.w4a16_matmul(x.float(), qweight, scales, zeros, group, bias.float())
    for cfg in (GemvConfig(16, 64, 1), GemvConfig(16, 128, 3), GemvConfig(32, 256, 2, 4, 3),
                GemvConfig(16, 64, 2, rows2=True), GemvConfig(32, 128, 3, 4, 3, rows2=True),
                GemvConfig(64, 256, 1, 8, 3, rows2=True), GemvConfig(16, 1024, 2, 8, 3)):
        out = wo_gemv(x, qweight, scales, zeros, group, bias, config=cfg)
        assert out.dtype == dtype and out.shape == (1, n)
        rel = ((out.float() - ref).norm() / ref.norm()).item()
        assert rel < 1e-2, f"{cfg}: relative error {rel:.4f}"
        if cfg.block_k <= group:
            monkeypatch.setenv("KVFLIGHT_GEMV_ASM", "0")
            plain = wo_gemv(x, qweight, scales, zeros, group, bias, config=cfg)
            monkeypatch.delenv("KVFLIGHT_GEMV_ASM")
            rel_plain = ((out.float() - plain.float()).norm() / ref.norm()).item()
            assert rel_plain < 1e-2, f"{cfg}: PTX chain vs Triton unpack {rel_plain:.4f}"


def test_gemv_config_override_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """KVFLIGHT_GEMV_CONFIG names launches per (kind, N, K) for tuning inside the decode graph; other shapes keep the
    chooser's, and a malformed item or a wrong number of values is refused with the item named."""
    from kvflight.kernels.wo_gemv import GemvConfig, config_override, launch_override

    monkeypatch.setenv("KVFLIGHT_GEMV_CONFIG",
                       "4:4096:14336=16,1024,2,8,3; 8:6144:4096=16,512,1,4,3,0;mma:4096:4096=1,4,8")
    assert config_override(4, 4096, 14336) == GemvConfig(16, 1024, 2, 8, 3, False)
    assert config_override(8, 6144, 4096) == GemvConfig(16, 512, 1, 4, 3, False)
    assert config_override(4, 6144, 4096) is None
    assert launch_override("mma", 4096, 4096, 3, 5) == (1, 4, 8)
    monkeypatch.setenv("KVFLIGHT_GEMV_CONFIG", "4:4096:4096=32,512,4,4,3,1")
    assert config_override(4, 4096, 4096).rows2 is True
    monkeypatch.setenv("KVFLIGHT_GEMV_CONFIG", "4:4096:4096=32,512")
    with pytest.raises(ValueError, match="4:4096:4096: 2 values"):
        config_override(4, 4096, 4096)
    for bad in ("4:4096=16,1024", "4:4096:4096=16,x", "4:4096:4096="):
        monkeypatch.setenv("KVFLIGHT_GEMV_CONFIG", bad)
        with pytest.raises(ValueError, match=bad):
            config_override(4, 4096, 4096)
    monkeypatch.delenv("KVFLIGHT_GEMV_CONFIG")
    assert config_override(4, 4096, 14336) is None
