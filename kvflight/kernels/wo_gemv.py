"""Triton weight-only GEMV for one activation row (batch-1 decode): y = x W^T, W in 4-bit groups or 8-bit channels.

The tensor-core kernels (w4a16_matmul / w8a16_matmul) pad a 1-row call to 16 rows and unpack every code into a dot
operand; at batch 1 that leaves the 4-bit kernel at a third of the copy bandwidth. Here a program owns BLOCK_N output
channels and a stretch of K, streams its [BLOCK_N, BLOCK_K] weight tiles once and multiplies them with the (tiny,
cached) activation row on the CUDA cores into a float32 accumulator per lane that is summed over K once, after the
loop: per weight an unpack, a convert and a few multiply-adds, no reduction inside the loop.

4-bit (reference.INT4_NIBBLE_COLUMNS layout): the rows are read as little-endian 32-bit words, nibble i of word w
being column 8w + (0, 2, 4, 6, 1, 3, 5, 7)[i], so (word >> 4j) & 0x000F000F holds columns 8w + 2j, 8w + 2j + 1 as
x's 32-bit register j holds their activations.
- On a GPU with bf16 / fp16 activations (the decode path): each word (of one row, or of two rows sharing the
  activations: GemvConfig.rows2) goes through one PTX chain (_asm_word_chain) that
  loads the word's 8 activations (16 bytes), builds two codes per register with a shift and a
  lop3 into the mantissa of a 16-bit MAGIC (128.0 / 1024.0: MAGIC + code exactly), subtracts MAGIC + zero (exact)
  and multiply-adds with packed x2 arithmetic; the word's sum (two halves of 4 products each) joins a float32
  accumulator with the group's scale. A tile spans whole groups ([BLOCK_N, GT, WPG] words, one scale / zero per row
  and group) or lies inside one. Weight loads are marked evict-first (streamed once per step). H100 sweep, % of copy
  bandwidth at one row (benchmarks/wo_gemv_sweep_gpu.py), Triton unpack -> this chain's best config: qkv 41 -> 57,
  o 34 -> 49, gate_up 58 -> 77, down 47 -> 71 (two rows per chain on qkv, o and down; the defaults keep one row,
  which won in the decode graph: choose_gemv_config); with the same loads and no arithmetic gate_up streams at
  91%, with the arithmetic but a constant x at 82%: the chain's instructions and the x loads are what is left.
  Error: about 0.4% of the output's norm against 0.2% for rounding the output to bf16 (GPU test).
- Elsewhere (the interpreter, float32 activations): a code becomes a float by or-ing it into the mantissa of 2^23
  (int-to-float converts run at a quarter of the FMA rate); 16-bit activations use the 16-bit MAGIC the same way and
  sum each word's 8 products in that dtype. Tiles lie inside one group.

8-bit (int8, or float8 e4m3 bytes): int8 codes become floats through the 2^23 mantissa as well (an int-to-float
convert runs at an eighth of the FMA rate on sm_90); the per-channel scale multiplies the final sum.

With SPLIT_K > 1 each K stretch stores its partial sums and the last one to finish a column block adds them and
writes the output (w8a16_matmul.split_k_store): one launch per call.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kvflight.kernels import pdl
from kvflight.kernels.pdl import pdl_trigger, pdl_wait
from kvflight.kernels.w8a16_matmul import split_k_buffers, split_k_store

GEMV_MAX_ROWS = 1  # batch-1 decode; more rows go to the tensor-core kernels (or dequantize + cuBLAS)


def _asm_word_chain(fma: str, magic: str, one: str, to_f32: list[str], regs: str = "", rows: int = 1) -> str:
    """PTX for one 32-bit word of 8 codes in each of `rows` rows (reference.INT4_NIBBLE_COLUMNS layout), the rows
    sharing the word's activations. Operands: outputs $0 .. $(rows - 1), the float32 bits of
    sum_i (code_i - zero) * x_i per row; then the rows' words, the address of x's 16 bytes for the word (columns
    8w .. 8w + 7: pair m = columns 8w + 2m, 8w + 2m + 1 in one register; a coherent load, not .nc: under PDL x is
    written by the kernel ahead while this one runs, and ptxas may hoist a non-coherent load above the wait), and
    the rows' -(MAGIC + zero) in both halves. Pair m: nibbles m and m + 4 of the word (columns 8w + 2m and
    8w + 2m + 1) move into the two halves by one shift (none for m = 0), are or-ed into the mantissa of MAGIC by one
    lop3, shifted by -(MAGIC + zero) (exact) and multiplied into a packed accumulator: at most 4 instructions per
    2 weights. The accumulator's two halves (4 products each) are added in float32 (to_f32: a -> $out)."""
    word = [f"${rows + r}" for r in range(rows)]
    addr = f"${2 * rows}"
    negoff = [f"${2 * rows + 1 + r}" for r in range(rows)]
    outs = ", ".join(f"o{r}" for r in range(rows))  # results stay in scratch registers until every input is read
    lines = ["{", f".reg .b32 s, t, p, a, one, zero, x0, x1, x2, x3, {outs};", *([regs] if regs else []),
             f"ld.global.v4.b32 {{x0, x1, x2, x3}}, [{addr}];", f"mov.b32 one, {one};", "mov.b32 zero, 0;"]
    for r in range(rows):
        for m in range(4):
            # pair m: nibbles m and m + 4 = columns 8w + 2m, 8w + 2m + 1 (reference.INT4_NIBBLE_COLUMNS), the halves
            # of x register m
            lines += [f"shr.u32 t, {word[r]}, {4 * m};" if m else f"mov.b32 t, {word[r]};",
                      f"lop3.b32 p, t, 0x000F000F, {magic}, 0xEA;",
                      f"fma.rn.{fma} p, p, one, {negoff[r]};",
                      f"fma.rn.{fma} a, p, x{m}, {'zero' if m == 0 else 'a'};"]
        lines += [line.replace("$out", f"o{r}") for line in to_f32]
    return "\n".join(lines + [f"mov.b32 ${r}, o{r};" for r in range(rows)] + ["}"])


_TO_F32_BF16 = ["shl.b32 t, a, 16;", "and.b32 s, a, 0xFFFF0000;", "add.f32 $out, t, s;"]
_TO_F32_FP16 = ["mov.b32 {h0, h1}, a;", "cvt.f32.f16 f0, h0;", "cvt.f32.f16 f1, h1;", "add.f32 f0, f0, f1;",
                "mov.b32 $out, f0;"]
_REGS_FP16 = ".reg .b16 h0, h1;\n.reg .f32 f0, f1;"
_ASM_BF16 = tl.constexpr(_asm_word_chain("bf16x2", "0x43004300", "0x3F803F80", _TO_F32_BF16))
_ASM_FP16 = tl.constexpr(_asm_word_chain("f16x2", "0x64006400", "0x3C003C00", _TO_F32_FP16, _REGS_FP16))
_ASM2_BF16 = tl.constexpr(_asm_word_chain("bf16x2", "0x43004300", "0x3F803F80", _TO_F32_BF16, rows=2))
_ASM2_FP16 = tl.constexpr(_asm_word_chain("f16x2", "0x64006400", "0x3C003C00", _TO_F32_FP16, _REGS_FP16, rows=2))


@triton.jit
def _w4_tile(w_ptr, scales_ptr, zeros_ptr, rows, row_mask, ww, group, g_mask, stride_wn, stride_sn, stride_zn,
             HAS_ZEROS: tl.constexpr, NEG_MAGIC_BITS: tl.constexpr):
    """One tile of 4-bit rows for the PTX chain: words [R, GT, WPG] int32, scales [R, GT] float32 and
    -(MAGIC + zero) in both halves [R, GT, WPG] int32 (rows [R], word columns ww [GT, WPG], groups [GT])."""
    R: tl.constexpr = rows.shape[0]
    words = tl.load(w_ptr + rows[:, None, None] * stride_wn + ww[None, :, :],
                    mask=row_mask[:, None, None] & g_mask[None, :, None], other=0, eviction_policy="evict_first")
    sz_mask = row_mask[:, None] & g_mask[None, :]
    scale = tl.load(scales_ptr + rows[:, None] * stride_sn + group[None, :], mask=sz_mask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        zero = tl.load(zeros_ptr + rows[:, None] * stride_zn + group[None, :], mask=sz_mask, other=0).to(tl.int32)
    else:
        zero = tl.full((R, group.shape[0]), 8, dtype=tl.int32)
    # the 16-bit float of MAGIC + z has z in its mantissa: its negation, twice in one register
    negoff = tl.broadcast_to(((zero | NEG_MAGIC_BITS) * 65537)[:, :, None], words.shape)
    return words, scale, negoff


@triton.jit
def _wo_gemv_kernel(
    x_ptr,  # [K] activations (one row)
    w_ptr,  # 4-bit: [N, K / 8] int32 words of 8 codes (the uint8 [N, K / 2] rows read 4 bytes at a time);
    #         8-bit: [N, K] int8 (or float8 e4m3 bytes)
    scales_ptr,  # 4-bit: [N, K / GROUP_SIZE]; 8-bit: [N] float32
    zeros_ptr,  # 4-bit with HAS_ZEROS: [N, K / GROUP_SIZE] uint8 codes (else zero point 8); unused for 8-bit
    bias_ptr,  # [N] (unused unless HAS_BIAS)
    out_ptr,  # [N] x dtype
    partial_ptr,  # [SPLIT_K, N] float32 scratch (SPLIT_K > 1)
    counter_ptr,  # [cdiv(N, BLOCK_N)] int32, zero between calls (SPLIT_K > 1): splits arrived per column block
    N,
    K,
    stride_wn,  # in elements of w_ptr (words for 4-bit)
    stride_sn,
    stride_zn,
    BITS: tl.constexpr,  # 4 or 8
    W_FP8: tl.constexpr,  # 8-bit codes are float8 e4m3
    GROUP_SIZE: tl.constexpr,  # 4-bit group (BLOCK_K divides it or, with ASM, is a multiple of it); unused for 8-bit
    HAS_ZEROS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HALF: tl.constexpr = False,  # 4-bit with 16-bit activations: sum each word's 8 products in the activation dtype
    PAIRS: tl.constexpr = False,  # HALF on a GPU: unpack two codes per 32-bit operation (PTX; not interpretable)
    PDL: tl.constexpr = False,  # programmatic dependent launch: the first weight tile loads before the wait
    ASM: tl.constexpr = False,  # 4-bit, 16-bit activations on a GPU: the PTX word chain (_ASM_BF16 / _ASM_FP16)
    xw_ptr=None,  # ASM: x's storage as [K / 2] int32, two activations per word (columns 2m, 2m + 1)
    ROWS2: tl.constexpr = False,  # ASM: one chain per word of two rows (shares the activation load)
):
    pdl_trigger(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    HALF_MATH: tl.constexpr = HALF and (x_ptr.dtype.element_ty == tl.bfloat16 or x_ptr.dtype.element_ty == tl.float16)
    MAGIC_BITS: tl.constexpr = 0x4300 if x_ptr.dtype.element_ty == tl.bfloat16 else 0x6400
    MAGIC_VALUE: tl.constexpr = 128.0 if x_ptr.dtype.element_ty == tl.bfloat16 else 1024.0
    NEG_MAGIC_BITS: tl.constexpr = 0xC300 if x_ptr.dtype.element_ty == tl.bfloat16 else 0xE400
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # [BN] output channels
    n_mask = rn < N
    k_per_split = tl.cdiv(K, BLOCK_K * SPLIT_K) * BLOCK_K
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if BITS == 4 and ASM:  # a GPU with 16-bit activations: one PTX chain per word, packed x2 math end to end
        # a tile spans GT whole groups (or lies inside one): [BN, GT, WPG] words, one scale / zero per (row, group).
        # ROWS2: each chain takes the same word of an even and an odd row (rows a = 2i, b = 2i + 1 of the block),
        # sharing one load of the word's activations
        GT: tl.constexpr = BLOCK_K // GROUP_SIZE if BLOCK_K >= GROUP_SIZE else 1
        WPG: tl.constexpr = (GROUP_SIZE if BLOCK_K >= GROUP_SIZE else BLOCK_K) // 8
        RN: tl.constexpr = BLOCK_N // 2 if ROWS2 else BLOCK_N  # rows per row set
        rg = tl.arange(0, GT)  # [GT] groups inside the tile
        rw = tl.arange(0, WPG)  # [WPG] words inside a group's stretch of the tile
        ra = (pid_n * BLOCK_N + (2 if ROWS2 else 1) * tl.arange(0, RN)).to(tl.int64)  # [RN] rows of set a
        rb = ra + 1  # [RN] rows of set b (ROWS2)
        a_mask = ra < N
        b_mask = rb < N
        acc_a = tl.zeros((RN, GT, WPG), dtype=tl.float32)  # per-lane partial sums, reduced once at the end
        acc_b = tl.zeros((RN, GT, WPG), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            ww = k0 // 8 + rg[:, None] * WPG + rw[None, :]  # [GT, WPG] word columns: word w = columns 8w .. 8w + 7
            group = k0 // GROUP_SIZE + rg  # [GT]
            g_mask = group < K // GROUP_SIZE  # a last tile may reach past K: its missing groups read as zeros
            words_a, scale_a, negoff_a = _w4_tile(w_ptr, scales_ptr, zeros_ptr, ra, a_mask, ww, group, g_mask,
                                                  stride_wn, stride_sn, stride_zn, HAS_ZEROS, NEG_MAGIC_BITS)
            if ROWS2:
                words_b, scale_b, negoff_b = _w4_tile(w_ptr, scales_ptr, zeros_ptr, rb, b_mask, ww, group, g_mask,
                                                      stride_wn, stride_sn, stride_zn, HAS_ZEROS, NEG_MAGIC_BITS)
            if k0 == k_start:  # weights only so far: wait for the kernel that wrote x before the chain reads it
                pdl_wait(PDL)
            # x's 16 bytes for each word are loaded inside the chain (a missing group's word reads word 0 of x:
            # finite, times a zero scale)
            x_addr = tl.broadcast_to((xw_ptr + 4 * tl.where(g_mask[:, None], ww, 0)).to(tl.int64)[None, :, :],
                                     (RN, GT, WPG))  # [RN, GT, WPG] int64 addresses
            # not pure: the chain loads x, so it must stay after the PDL wait above
            if ROWS2:
                part_a, part_b = tl.inline_asm_elementwise(
                    _ASM2_BF16 if x_ptr.dtype.element_ty == tl.bfloat16 else _ASM2_FP16, "=r,=r,r,r,l,r,r",
                    [words_a, words_b, x_addr, negoff_a, negoff_b], dtype=(tl.int32, tl.int32), is_pure=False,
                    pack=1)  # [RN, GT, WPG] float32 bits each: sum_i (code_i - zero) x_i
                acc_b += part_b.to(tl.float32, bitcast=True) * scale_b[:, :, None]
            else:
                part_a = tl.inline_asm_elementwise(
                    _ASM_BF16 if x_ptr.dtype.element_ty == tl.bfloat16 else _ASM_FP16, "=r,r,l,r",
                    [words_a, x_addr, negoff_a], dtype=tl.int32, is_pure=False, pack=1)
            acc_a += part_a.to(tl.float32, bitcast=True) * scale_a[:, :, None]
        total_a = tl.sum(tl.sum(acc_a, axis=2), axis=1)  # [RN]
        if ROWS2:
            total = tl.reshape(tl.join(total_a, tl.sum(tl.sum(acc_b, axis=2), axis=1)), (BLOCK_N,))  # rows in order
        else:
            total = total_a
    elif BITS == 4:
        pdl_wait(PDL)  # (4-bit calls launch without PDL: see wo_gemv)
        WORDS: tl.constexpr = BLOCK_K // 8
        rw = tl.arange(0, WORDS)  # [BK / 8] 32-bit words inside the tile: word w holds columns 8w .. 8w + 7
        acc = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)  # per-lane partial sums, reduced once at the end
        for k0 in range(k_start, k_end, BLOCK_K):
            ww = k0 // 8 + rw  # [BK / 8] word columns (K is a multiple of the group, so a tile is whole)
            words = tl.load(w_ptr + rn[:, None] * stride_wn + ww[None, :], mask=n_mask[:, None], other=0)
            group = k0 // GROUP_SIZE
            scale = tl.load(scales_ptr + rn * stride_sn + group, mask=n_mask, other=0.0).to(tl.float32)  # [BN]
            if HAS_ZEROS:
                zero = tl.load(zeros_ptr + rn * stride_zn + group, mask=n_mask, other=0).to(tl.float32)
            else:
                zero = tl.full((BLOCK_N,), 8.0, dtype=tl.float32)
            if HALF_MATH:  # 16-bit activations: codes -> 16-bit floats (exact), packed x2 arithmetic
                # the code in the low mantissa bits of MAGIC (bf16 128.0 / fp16 1024.0, unit last place) is exactly
                # MAGIC + code; subtracting MAGIC + zero leaves code - zero exactly
                offset_h = (zero + MAGIC_VALUE).to(x_ptr.dtype.element_ty)  # [BN]
                part_h = tl.zeros((BLOCK_N, WORDS), dtype=x_ptr.dtype.element_ty)
                if PAIRS:  # two codes per 32-bit operation: nibbles j and j + 4 land in the two 16-bit halves
                    for j in tl.static_range(4):
                        pair = ((words >> (4 * j)) & 0x000F000F) | (MAGIC_BITS * 65537)
                        lo, hi = tl.inline_asm_elementwise("mov.b32 {$0, $1}, $2;", "=h,=h,r", [pair],
                                                           dtype=(x_ptr.dtype.element_ty, x_ptr.dtype.element_ty),
                                                           is_pure=True, pack=1)
                        x_lo = tl.load(x_ptr + 8 * ww + 2 * j)  # [BK / 8] nibble j: columns 8w + 2j
                        x_hi = tl.load(x_ptr + 8 * ww + 2 * j + 1)  # nibble j + 4: columns 8w + 2j + 1
                        part_h += (lo - offset_h[:, None]) * x_lo[None, :]
                        part_h += (hi - offset_h[:, None]) * x_hi[None, :]
                else:
                    for i in tl.static_range(8):
                        x_i = tl.load(x_ptr + 8 * ww + (i % 4) * 2 + i // 4)  # [BK / 8] nibble i's columns
                        bits = (((words >> (4 * i)) & 0x0F) | MAGIC_BITS).to(tl.int16)
                        part_h += (bits.to(x_ptr.dtype.element_ty, bitcast=True) - offset_h[:, None]) * x_i[None, :]
                part = part_h.to(tl.float32)
            else:
                offset = zero + 8388608.0  # [BN] 2^23 + zero point
                part = tl.zeros((BLOCK_N, WORDS), dtype=tl.float32)
                for i in tl.static_range(8):
                    x_i = tl.load(x_ptr + 8 * ww + (i % 4) * 2 + i // 4).to(tl.float32)  # [BK / 8] nibble i
                    # code -> float without an int-to-float convert (quarter rate): the code in the low mantissa
                    # bits of 2^23 is exactly 2^23 + code; subtracting 2^23 + zero leaves code - zero exactly
                    bits = ((words >> (4 * i)) & 0x0F) | 0x4B000000
                    part += (bits.to(tl.float32, bitcast=True) - offset[:, None]) * x_i[None, :]
            acc += part * scale[:, None]
        total = tl.sum(acc, axis=1)  # [BN]
    else:
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            kk = k0 + rk  # [BK]
            k_mask = kk < K
            w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :], mask=n_mask[:, None] & k_mask[None, :],
                        other=0, eviction_policy="evict_first")
            # [BN, BK] int8 (fp8 codes travel as their bytes: a masked 0 byte is +0.0)
            if W_FP8:
                wf = w.to(tl.float8e4nv, bitcast=True).to(tl.float32)
            else:  # int8 -> float without an int-to-float convert (an eighth of the FMA rate on sm_90): the byte
                # + 128 in the low mantissa bits of 2^23 is exactly 2^23 + 128 + w (one lop3), less 2^23 + 128
                wf = ((w.to(tl.uint8, bitcast=True).to(tl.int32) ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True)
                wf = wf - 8388736.0
            if k0 == k_start:  # weights only so far: wait for the kernel that wrote x before the first x load
                pdl_wait(PDL)
            x = tl.load(x_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)  # [BK]
            acc += wf * x[None, :]
        scale = tl.load(scales_ptr + rn, mask=n_mask, other=0.0)  # [BN] float32
        total = tl.sum(acc, axis=1) * scale
    pdl_wait(PDL)  # (a program with no K to cover never waited in the loop) before anything is written
    if HAS_BIAS:
        if pid_k == 0:
            total += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    split_k_store(total, out_ptr, rn, n_mask, partial_ptr, rn, N, counter_ptr, pid_n, pid_k, SPLIT_K)


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 4
    rows2: bool = False  # 4-bit PTX chain: one chain per word of two rows (sharing the activation load)


def choose_gemv_config(M: int, N: int, K: int, bits: int, group_size: int = 128, asm: bool = False) -> GemvConfig:
    """The launch for one call: the best configs of an H100 sweep on the Llama-8B linears, weights rotated past L2
    (benchmarks/wo_gemv_sweep_gpu.py; % of copy bandwidth, GEMV vs the tensor-core matmul kernel at one row):
    4-bit (the PTX chain, asm=True) qkv 48 vs 25, o 40 vs 20, gate_up 71 vs 26, down 60 vs 25. Two rows per chain
    (rows2) won that sweep on three linears (qkv 57, o 49, down 71) but lost in the decode graph: the int4_awq step
    took 3.202 ms with those configs against 3.042 ms with these (decode_breakdown_gpu.py --int4-one-row, same H100
    run), so rows2 stays a sweep option, off by default. fp8 qkv 81 vs 47,
    o 71 vs 45, gate_up 96 vs 87, down 85 vs 77; int8 (codes converted through the 2^23 mantissa) qkv 80 vs 69,
    o 67 vs 49, gate_up 94 vs 91, down 84 vs 82.
    The 4-bit long-K launch (down) comes from a sweep inside the int4_awq batch-1 decode graph instead
    (benchmarks/decode_breakdown_gpu.py --gemv-sweep: each launch timed by the whole step's replay, H100): 16 rows
    per program, 1024-column tiles, two K splits took the step from 2.965 to 2.807 ms (64 rows, 256-column tiles,
    8 splits before); the same sweep kept the other three linears' launches. One chain per two words (two words
    loaded as 8 bytes, 16 products per packed sum) lost at every launch of that sweep (gate_up 32/256/2 split: step
    2.693 -> 3.512 ms, down 16/1024/8: 2.668 -> 2.895), so the chain stays one word per row."""
    if bits == 4 and asm:  # tiles of one or more whole groups, one row per chain (see below)
        wide = 2 * group_size
        if N >= 16384:
            return GemvConfig(128, wide, 4, 4, 3)
        if K >= 8192:
            return GemvConfig(16, max(1024, group_size), 2, 8, 3)
        return GemvConfig(128, group_size, 8, 8, 3) if N > K else GemvConfig(32, wide, 8, 4, 3)
    if bits == 4:
        block_k = min(group_size, 128)
        return GemvConfig(64, block_k, 8, 4, 3) if N >= 16384 else GemvConfig(128, block_k, 8, 8, 3)
    if N >= 16384:
        return GemvConfig(16, 256, 1, 4, 4)
    if K >= 8192:
        return GemvConfig(16, 512, 2, 4, 3)
    return GemvConfig(16, 512, 1, 8, 3) if N > K else GemvConfig(16, 512, 2, 4, 3)


@functools.lru_cache(maxsize=8)
def _launch_overrides(spec: str) -> dict[tuple[str, int, int], tuple[int, ...]]:
    """KVFLIGHT_GEMV_CONFIG="KIND:N:K=v,v,...;..." -> {(KIND, N, K): (v, ...)}."""
    table = {}
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        key, _, value = item.partition("=")
        parts = key.split(":")
        try:
            if len(parts) != 3 or not value:
                raise ValueError("expected KIND:N:K=values")
            table[(parts[0], int(parts[1]), int(parts[2]))] = tuple(int(v) for v in value.split(","))
        except ValueError as e:
            raise ValueError(f"KVFLIGHT_GEMV_CONFIG item {item!r}: expected KIND:N:K=v,v,... with KIND 4 or 8 "
                             f"(wo_gemv: block_n,block_k,split,warps,stages[,rows2]) or mma (w4_mma_gemv: "
                             f"m_tiles,warps,split[,words_per_lane,prefetch]) ({e})") from None
    return table


def launch_override(kind: str, N: int, K: int, min_fields: int, max_fields: int) -> tuple[int, ...] | None:
    """The launch KVFLIGHT_GEMV_CONFIG names for a GEMV kind ("4", "8" or "mma") and shape [N, K], for tuning
    inside the decode graph (benchmarks/decode_breakdown_gpu.py --gemv-sweep), else None."""
    spec = os.environ.get("KVFLIGHT_GEMV_CONFIG", "")
    fields = _launch_overrides(spec).get((kind, N, K)) if spec else None
    if fields is not None and not min_fields <= len(fields) <= max_fields:
        raise ValueError(f"KVFLIGHT_GEMV_CONFIG {kind}:{N}:{K}: {len(fields)} values, expected {min_fields} to "
                         f"{max_fields}")
    return fields


def config_override(bits: int, N: int, K: int) -> GemvConfig | None:
    """wo_gemv's launch from KVFLIGHT_GEMV_CONFIG ("4:N:K=" / "8:N:K=block_n,block_k,split,warps,stages[,rows2]")."""
    fields = launch_override(str(bits), N, K, 5, 6)
    return None if fields is None else GemvConfig(*fields[:5], len(fields) > 5 and bool(fields[5]))


def wo_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
            group_size: int = 0, bias: torch.Tensor | None = None, config: GemvConfig | None = None) -> torch.Tensor:
    """x [M, K] (or [..., K]) with M <= GEMV_MAX_ROWS rows.
    4-bit: qweight [N, K / 2] uint8, scales / zeros [N, K / group_size] (as reference.w4a16_matmul);
    8-bit: qweight [N, K] int8 or float8_e4m3fn, scales [N] float32 (as reference.w8a16_matmul).
    -> [M, N] in x's dtype."""
    K = x.shape[-1]
    N = qweight.shape[0]
    x2 = x.reshape(-1, K)  # [M, K]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M > GEMV_MAX_ROWS:
        raise ValueError(f"wo_gemv: {M} rows > GEMV_MAX_ROWS={GEMV_MAX_ROWS}; use the matmul kernels")
    if qweight.dtype == torch.uint8:
        bits = 4
        if group_size < 32 or group_size & (group_size - 1) or K % group_size:
            raise ValueError(f"wo_gemv: group_size={group_size} must be a power of two >= 32 dividing K={K}")
        if qweight.shape != (N, K // 2) or scales.shape != (N, K // group_size):
            raise ValueError(f"wo_gemv: 4-bit qweight {tuple(qweight.shape)} / scales {tuple(scales.shape)}: "
                             f"expected [N, {K // 2}] / [N, {K // group_size}]")
        if zeros is not None and (zeros.shape != scales.shape or zeros.dtype != torch.uint8):
            raise ValueError(f"wo_gemv: zeros {tuple(zeros.shape)} {zeros.dtype}: expected {tuple(scales.shape)} "
                             "uint8")
    elif qweight.dtype in (torch.int8, torch.float8_e4m3fn):
        bits = 8
        if qweight.shape != (N, K) or scales.shape != (N,) or scales.dtype != torch.float32:
            raise ValueError(f"wo_gemv: 8-bit qweight {tuple(qweight.shape)} / scales {tuple(scales.shape)} "
                             f"{scales.dtype}: expected [N, {K}] / [N] float32")
    else:
        raise ValueError(f"wo_gemv: qweight dtype {qweight.dtype}: expected uint8 (4-bit), int8 or float8_e4m3fn")
    w = qweight if qweight.stride(-1) == 1 else qweight.contiguous()
    w_fp8 = w.dtype == torch.float8_e4m3fn
    if w_fp8:
        w = w.view(torch.int8)
    if bits == 4:
        if w.stride(0) % 4 or w.data_ptr() % 4:
            w = w.contiguous()
        w = w.view(torch.int32)  # [N, K / 8]: K is a multiple of the group size (>= 32)
    sc = scales if scales.stride(-1) == 1 else scales.contiguous()
    zr = None if zeros is None else (zeros if zeros.stride(-1) == 1 else zeros.contiguous())
    # the PTX word chain: 4-bit codes, 16-bit activations, a compiled GPU kernel (KVFLIGHT_GEMV_ASM=0: the Triton
    # unpack below it, the interpreter's path)
    use_asm = (bits == 4 and x2.dtype in (torch.bfloat16, torch.float16) and x2.is_cuda
               and os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("KVFLIGHT_GEMV_ASM", "1") != "0")
    xw = None
    if use_asm:
        if x2.data_ptr() % 4:
            x2 = x2.clone()
        xw = x2.view(torch.int32)  # [M, K / 2]: K is a multiple of the group size
    cfg = config or config_override(bits, N, K) or choose_gemv_config(M, N, K, bits, group_size or 128, asm=use_asm)
    if bits == 4 and group_size % cfg.block_k and (not use_asm or cfg.block_k % group_size):
        raise ValueError(f"wo_gemv: block_k={cfg.block_k} must divide group_size={group_size}"
                         + ("" if not use_asm else " or be a multiple of it"))
    num_blocks = triton.cdiv(N, cfg.block_n)
    out, partial, counters = split_k_buffers(M, N, cfg.split_k, num_blocks, x2)
    if M > 0 and N > 0:
        grid = (num_blocks, cfg.split_k)
        _wo_gemv_kernel[grid](
            x2, w, sc, zr if zr is not None else w, bias if bias is not None else sc, out, partial, counters, N, K,
            w.stride(0), sc.stride(0), zr.stride(0) if zr is not None else 0,
            BITS=bits, W_FP8=w_fp8, GROUP_SIZE=group_size if bits == 4 else 1, HAS_ZEROS=zr is not None,
            HAS_BIAS=bias is not None, SPLIT_K=cfg.split_k, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            HALF=bits == 4 and x2.dtype in (torch.bfloat16, torch.float16),
            PAIRS=x2.is_cuda and os.environ.get("TRITON_INTERPRET") != "1", ASM=use_asm, xw_ptr=xw,
            ROWS2=use_asm and cfg.rows2 and cfg.block_n >= 2,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            # PDL: the first weight tile (and its scales) loads while the kernel ahead ends (8B batch-1 decode graph
            # on an H100 with the other decode kernels' PDL: fp8 3.73 -> 3.47 ms; int4 with the PTX chain 2.99 ->
            # 2.96 ms); the 4-bit Triton unpack launches plainly (with PDL its graph went 3.43 -> 3.92 ms)
            **(pdl.launch_kwargs(x2, "wo_gemv") if bits == 8 else
               pdl.launch_kwargs(x2, "wo_gemv4") if use_asm else {"PDL": False}))
    return out.view(*x.shape[:-1], N)
