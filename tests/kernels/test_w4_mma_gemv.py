"""Tensor-core 4-bit GEMV (kernels/w4_mma_gemv.py) against reference.w4a16_matmul.

On CPU: the kernel's lane / fragment mapping replayed in torch (which words and activations each lane loads, the
byte permutes and lop3 into MAGIC, mma.m16n8k16's A / B / D fragment layouts from the PTX ISA, the zero-point and
scale epilogue), and its PTX assembled for sm_90 by Triton's ptxas. On a GPU: the kernel itself.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import torch

from kvflight.kernels import reference
from kvflight.kernels import w4_mma_gemv as mg

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _quantized(n: int, k: int, group: int, zeros: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(n, k // group, generator=gen) * 0.02 + 0.005).to(torch.float16)
    zp = torch.randint(0, 16, (n, k // group), dtype=torch.uint8, generator=gen) if zeros else None
    return qweight, scales, zp


def _halves(reg: int, act: str) -> tuple[float, float]:
    """The two 16-bit floats of a 32-bit register (low half first)."""
    lo, hi = reg & 0xFFFF, (reg >> 16) & 0xFFFF
    if act == "bf16":
        return tuple(struct.unpack("<f", struct.pack("<I", v << 16))[0] for v in (lo, hi))
    return tuple(struct.unpack("<e", struct.pack("<H", v))[0] for v in (lo, hi))


def _prmt(a: int, b: int, sel: int) -> int:
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    return sum(src[(sel >> (4 * i)) & 0x7] << (8 * i) for i in range(4))


def replay(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group: int,
           cfg: mg.MmaGemvConfig) -> torch.Tensor:
    """What the PTX block computes, lane by lane, in float64: [M, N]."""
    M, K = x.shape
    N = qweight.shape[0]
    act = "bf16" if x.dtype == torch.bfloat16 else "f16"
    magic_bits, magic_value = mg._MAGIC[act]
    R, wpl, warps = cfg.m_tiles, cfg.words_per_lane, cfg.num_warps
    span = 32 * wpl
    spans = K // span // cfg.split_k
    words = qweight.contiguous().view(torch.int32).view(N, K // 8).tolist()  # [N, K / 8]
    xbits = x.contiguous().view(torch.int16).to(torch.int32).bitwise_and(0xFFFF).tolist()  # [M, K]
    out = torch.zeros(M, N, dtype=torch.float64)
    block_n = 16 * R * warps
    for row0 in range(0, N, block_n):
        for pid_k in range(cfg.split_k):
            k0 = pid_k * spans * span
            for wp in range(warps):
                for r in range(R):
                    acc = torch.zeros(16, 8, dtype=torch.float64)  # [row in m-tile, column] as the lanes hold it
                    d = torch.zeros(16, 8, dtype=torch.float64)
                    sx = torch.zeros(16, 8, dtype=torch.float64)
                    for t in range(spans):
                        col0 = k0 + t * span
                        for i in range(wpl):
                            for e in range(2):
                                a = torch.zeros(16, 16, dtype=torch.float64)
                                b = torch.zeros(16, 8, dtype=torch.float64)
                                for lane in range(32):
                                    g, q = lane // 4, lane % 4
                                    row_g = min(row0 + (wp * R + r) * 16 + g, N - 1)
                                    row_h = min(row0 + (wp * R + r) * 16 + g + 8, N - 1)
                                    w_index = col0 // 8 + q * wpl + i  # word of the row
                                    xrow = 0 if M == 1 else min(g, M - 1)
                                    xw = xbits[xrow][8 * w_index:8 * w_index + 8]
                                    xr = [xw[2 * m] | (xw[2 * m + 1] << 16) for m in range(4)]
                                    bp = [_prmt(xr[ia], xr[ib], sel) for ia, ib, sel in mg._B_PAIRS]
                                    pg = [((words[row_g][w_index] & 0xFFFFFFFF) >> (4 * j) & 0x000F000F) | magic_bits
                                          for j in range(4)]
                                    ph = [((words[row_h][w_index] & 0xFFFFFFFF) >> (4 * j) & 0x000F000F) | magic_bits
                                          for j in range(4)]
                                    # A fragment: {a0a1} row g, k 2q..; {a2a3} row g + 8; {a4a5} row g, k 2q + 8..
                                    for reg, (rr, kk) in zip((pg[2 * e], ph[2 * e], pg[2 * e + 1], ph[2 * e + 1]),
                                                             ((g, 2 * q), (g + 8, 2 * q), (g, 2 * q + 8),
                                                              (g + 8, 2 * q + 8))):
                                        a[rr, kk], a[rr, kk + 1] = _halves(reg, act)
                                    # B fragment: {b0b1} k 2q, 2q + 1 of column g; {b2b3} k 2q + 8, 2q + 9
                                    b[2 * q, g], b[2 * q + 1, g] = _halves(bp[2 * e], act)
                                    b[2 * q + 8, g], b[2 * q + 9, g] = _halves(bp[2 * e + 1], act)
                                d += a @ b
                                sx += torch.ones(16, 16, dtype=torch.float64) @ b
                        if (t + 1) * span % group == 0 or span > group:  # group done: the epilogue
                            gi = (col0 + span - 1) // group
                            for rr in range(16):
                                row = min(row0 + (wp * R + r) * 16 + rr, N - 1)
                                z = float(zeros[row, gi]) if zeros is not None else 8.0
                                acc[rr] += (d[rr] - (magic_value + z) * sx[rr]) * float(scales[row, gi])
                            d.zero_()
                            sx.zero_()
                    for rr in range(16):
                        row = row0 + (wp * R + r) * 16 + rr
                        if row < N:
                            out[:, row] += acc[rr, :M]
    return out


@pytest.mark.parametrize("act", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,group,zeros,wpl,split", [(1, 128, True, 4, 2), (3, 128, False, 4, 1), (2, 64, True, 2, 2),
                                                     (8, 32, True, 1, 1)])
def test_fragment_mapping_replay_matches_reference(act, M, group, zeros, wpl, split) -> None:
    N, K = 40, 256  # N not a multiple of the 32-row block: clamped rows, masked outputs
    qweight, scales, zp = _quantized(N, K, group, zeros)
    x = (torch.randn(M, K, generator=torch.Generator().manual_seed(1))).to(act)
    cfg = mg.MmaGemvConfig(m_tiles=1, num_warps=2, split_k=split, words_per_lane=wpl)
    got = replay(x, qweight, scales, zp, group, cfg)
    want = reference.w4a16_matmul(x.double(), qweight, scales, zp, group)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # the reference sums in float32


def test_replay_catches_a_wrong_pairing() -> None:
    """The replay is sensitive to the B pairing: swapping two B pairs breaks it."""
    N, K, group = 32, 128, 128
    qweight, scales, zp = _quantized(N, K, group, True)
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    cfg = mg.MmaGemvConfig(m_tiles=1, num_warps=2, split_k=1)
    saved = mg._B_PAIRS
    try:
        mg._B_PAIRS = (saved[1], saved[0], saved[2], saved[3])
        bad = replay(x, qweight, scales, zp, group, cfg)
    finally:
        mg._B_PAIRS = saved
    want = reference.w4a16_matmul(x.double(), qweight, scales, zp, group)
    assert (bad - want).abs().max() > 1e-3


_ASSEMBLE = """
import inspect, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvflight.kernels import w4_mma_gemv as mg

kw = json.loads(sys.argv[1])
asm, cons, nout = mg._ptx(**kw)
types = {"x_ptr": "*bf16", "w_ptr": "*u8", "scales_ptr": "*fp16", "zeros_ptr": "*u8", "bias_ptr": "*bf16",
         "out_ptr": "*bf16", "partial_ptr": "*fp32", "counter_ptr": "*i32", "M": "i32", "N": "i32",
         "stride_xm": "i32", "stride_wn": "i32", "stride_sn": "i32", "stride_zn": "i32"}
names = list(inspect.signature(mg._w4_mma_gemv_kernel.fn).parameters)
sig = {n: types.get(n, "constexpr") for n in names}
consts = dict(ASM=asm, CONSTRAINTS=cons, NOUT=nout, R=kw["m_tiles"], WARPS=4,
              K_PER_PROGRAM=kw["spans"] * 32 * kw["wpl"], GROUP_SIZE=kw["group_size"], HAS_ZEROS=kw["has_zeros"],
              HAS_BIAS=True, M1=kw["m1"], SPLIT_K=2, PDL=kw["pdl_wait_inside"])
src = ASTSource(fn=mg._w4_mma_gemv_kernel, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=1))
print("mma", kernel.asm["ptx"].count("mma.sync"))
"""


@pytest.mark.parametrize("kwargs", [
    dict(m_tiles=2, spans=4, wpl=4, group_size=128, m1=True, has_zeros=True, act="bf16", scale="f16", prefetch=2,
         pdl_wait_inside=True),
    dict(m_tiles=1, spans=3, wpl=2, group_size=64, m1=False, has_zeros=False, act="f16", scale="f32", prefetch=1,
         pdl_wait_inside=False),
])
def test_ptx_assembles_for_sm90(kwargs) -> None:
    """The generated PTX goes through Triton's ptxas for sm_90 (in a fresh process: this one may interpret)."""
    if not hasattr(pytest.importorskip("triton.compiler"), "ASTSource"):
        pytest.skip("this Triton cannot compile for a named target")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run([sys.executable, "-c", _ASSEMBLE, json.dumps(kwargs)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    # one mma per word and m-tile plus one per word for the activation sums, per span
    mmas = kwargs["spans"] * kwargs["wpl"] * 2 * (kwargs["m_tiles"] + 1)
    assert f"mma {mmas}" in run.stdout


def test_bad_input_is_a_clear_error() -> None:
    x = torch.zeros(1, 256, dtype=torch.bfloat16)
    q, s, z = _quantized(32, 256, 128, True)
    with pytest.raises(ValueError, match="CUDA"):
        mg.w4_mma_gemv(x, q, s, z, 128)
    with pytest.raises(ValueError, match="rows"):
        mg.w4_mma_gemv(torch.zeros(9, 256, dtype=torch.bfloat16), q, s, z, 128)
    with pytest.raises(ValueError, match="group_size"):
        mg.w4_mma_gemv(x, q, s, z, 96)
    assert not mg.supported(x, 128)  # CPU tensors go elsewhere


@gpu
@pytest.mark.parametrize("act", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 2, 5, 8])
@pytest.mark.parametrize("group,zeros", [(128, True), (128, False), (64, True), (32, True)])
def test_w4_mma_gemv_matches_reference_on_gpu(act, M, group, zeros) -> None:
    N, K = 1000, 1024
    qweight, scales, zp = _quantized(N, K, group, zeros)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(3)).to(act)
    bias = torch.randn(N).to(act)
    want = reference.w4a16_matmul(x.float(), qweight, scales, zp, group, bias.float())
    args = (qweight.cuda(), scales.cuda(), None if zp is None else zp.cuda(), group, bias.cuda())
    wpl = min(4, group // 32)
    for cfg in (None, mg.MmaGemvConfig(1, 2, 1, wpl, prefetch=1), mg.MmaGemvConfig(2, 4, 4, wpl)):
        got = mg.w4_mma_gemv(x.cuda(), *args, config=cfg)
        err = (got.float().cpu() - want).norm() / want.norm()
        assert err < 4e-3, (cfg, err.item())  # bf16 output rounding is ~2e-3 of the norm
    first = mg.w4_mma_gemv(x.cuda(), *args)
    assert torch.equal(first, mg.w4_mma_gemv(x.cuda(), *args))  # split-K sums in split order: deterministic


@gpu
def test_w4_mma_gemv_llama_shapes_on_gpu() -> None:
    for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)):
        qweight, scales, zp = _quantized(n, k, 128, True, seed=n + k)
        x = torch.randn(1, k, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
        want = reference.w4a16_matmul(x.cuda().float(), qweight.cuda(), scales.cuda(), zp.cuda(), 128)
        got = mg.w4_mma_gemv(x.cuda(), qweight.cuda(), scales.cuda(), zp.cuda(), 128)
        assert ((got.float() - want).norm() / want.norm()).item() < 4e-3
