"""Tensor-core 4-bit GEMV for 1..8 activation rows (small-batch decode): y = x W^T, W in 4-bit groups, on mma.sync.

The CUDA-core GEMV (wo_gemv) spends ~24 instructions per 32-bit word of 8 codes (unpack, zero-point subtraction,
packed multiply-adds, a float32 sum per word): at one row it is instruction-bound, at 44-74% of copy bandwidth on the
Llama-8B linears. Here the multiply-adds go to the tensor cores: each warp runs mma.sync.m16n8k16 (16 weight rows x
16 columns as A, the activations as B, float32 accumulators), and a word costs 3 shifts + 4 lop3 (its 8 codes as four
16-bit pairs in the mantissa of MAGIC) + 1 mma, plus its share of per-group work.

Work split (reference.INT4_NIBBLE_COLUMNS layout: nibble i of 32-bit word w of a row = column
8w + (0, 2, 4, 6, 1, 3, 5, 7)[i]):
- A program owns BLOCK_N = 16 * R * num_warps rows and SPANS spans of SPAN = 32 * WPL columns of K (SPLIT_K programs
  per row block; the last to finish adds the partial sums: w8a16_matmul.split_k_store's scheme). Warp w owns R
  m-tiles of 16 rows. Lane (g = lane / 4, q = lane % 4) of an m-tile reads rows g and g + 8, WPL words each per span
  (words q * WPL .. q * WPL + WPL - 1 of the span: four lanes read a row's 16 * WPL contiguous bytes; WPL 4 = one
  16-byte load per row and span).
- Word i of lane q feeds two mma: pair j (j = 0..3) = (code of column 8w + 2j, code of column 8w + 2j + 1) taken
  by lop3((word >> 4j) & 0x000F000F | MAGIC) into the two 16-bit halves; mma 1 takes pairs 0 and 1 as the lane's
  k-slots (2q, 2q + 1) and (2q + 8, 2q + 9) of rows g and g + 8, mma 2 pairs 2 and 3. The B operand holds the same
  columns' activations: (x[8w + 2j], x[8w + 2j + 1]), the loaded x register j as it is (_B_PAIRS); B column n
  (lane group g) is activation row n (row 0 everywhere when M == 1). A k-slot means the same column in A and B, so
  the mma sums over 16 real columns; the column order inside the mma does not matter.
- The codes enter as MAGIC + code (16-bit float, exact): the mma sums D = sum (MAGIC + c) x in float32, and the
  zero point is applied once per group and row: sum (c - z) x = D - (MAGIC + z) * Sx, Sx = sum x over the group
  from one more mma per word with A = 1.0 (shared by the warp's m-tiles). The products are exact and the sums
  float32: more accurate than the CUDA-core GEMV's 16-bit partial sums.
- Everything a program does is one inline-PTX block per thread (a fully unrolled K range: SPANS spans, the loads of
  span t + PREFETCH issued before span t's math), run once per thread on a [32 * num_warps] tensor; the block checks
  that its element index is its %tid.x (trap otherwise), so a Triton layout that spread the elements differently
  fails loudly instead of feeding mma wrong lanes.

Not interpretable (PTX): the Triton interpreter and CPUs use wo_gemv / the matmul kernels; tests/kernels checks this
one on a GPU, and a CPU test replays its lane and fragment mapping in torch against reference.w4a16_matmul.
"""

from __future__ import annotations

import functools
import os
import struct
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kvflight.kernels import pdl
from kvflight.kernels.device import capability_at_least
from kvflight.kernels.pdl import pdl_trigger
from kvflight.kernels.w8a16_matmul import split_k_arrive, split_k_buffers, split_k_rearm, split_k_sum
from kvflight.kernels.wo_gemv import launch_override

MMA_GEMV_MAX_ROWS = 8  # B's 8 columns: one activation row each
MAX_SPANS_PER_PROGRAM = 32  # a program's unrolled K range (code size and compile time)
_MAGIC = {"bf16": (0x43004300, 128.0), "f16": (0x64006400, 1024.0)}  # MAGIC in both halves; its value (code 0)
_ONE = {"bf16": 0x3F803F80, "f16": 0x3C003C00}  # 1.0 in both halves
# x pairs (x[2m], x[2m + 1]) in registers xr[0..3] -> B pair j (the columns of A pair j: 2j, 2j + 1 in the
# reference.INT4_NIBBLE_COLUMNS layout), as (register, register, byte-permute selector); 0x3210 is the first register
# as it is (no instruction)
_B_PAIRS = ((0, 0, 0x3210), (1, 1, 0x3210), (2, 2, 0x3210), (3, 3, 0x3210))


class MmaGemvConfig(NamedTuple):
    m_tiles: int  # R: m-tiles of 16 rows per warp
    num_warps: int
    split_k: int
    words_per_lane: int = 4  # WPL: 32-bit words per lane, row and span (SPAN = 32 * WPL columns)
    prefetch: int = 2  # spans whose loads are issued ahead of the math


def _f32(value: float) -> str:
    """A float32 immediate in PTX's hex form."""
    return "0f%08X" % struct.unpack("<I", struct.pack("<f", value))[0]


@functools.lru_cache(maxsize=None)
def _ptx(m_tiles: int, spans: int, wpl: int, group_size: int, m1: bool, has_zeros: bool, act: str, scale: str,
         prefetch: int, pdl_wait_inside: bool) -> tuple[str, str, int]:
    """(PTX, constraints, number of outputs) for one thread's whole K range. Operands: outputs (float32 bits: per
    m-tile rows g, g + 8, and per row the columns 2q, 2q + 1 unless m1), then tid, w (u64 address of the block's
    row 0 at the program's first column), w row stride (bytes), last valid row offset, x (u64, row 0 at the first
    column), x row stride (bytes), M - 1, scales (u64, row 0 at the first group), scales row stride (bytes),
    zeros (u64), zeros row stride (bytes)."""
    R, SPAN = m_tiles, 32 * wpl
    spg = max(group_size // SPAN, 1)  # spans per group
    cols = 1 if m1 else 2  # output columns a lane keeps (mma columns 2q, 2q + 1)
    nout = R * 2 * cols
    magic_bits, magic_value = _MAGIC[act]
    one = _ONE[act]
    mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{act}.{act}.f32"
    o = nout  # first input operand
    TID, W, WS, NL, X, XS, ML, S, SS, Z, ZS = (f"${o + i}" for i in range(11))
    regs: dict[str, list[str]] = {"b32": [], "b64": [], "f32": [], "pred": [], "b16": []}
    body: list[str] = []

    declared: set[str] = set()

    def reg(kind: str, name: str) -> str:
        if name in declared:
            raise AssertionError(f"PTX register {name} declared twice")
        declared.add(name)
        regs[kind].append(name)
        return name

    # -- lane coordinates and addresses
    for n in ("tx", "lane", "warp", "g", "q", "t0", "t1", "xrow"):
        reg("b32", n)
    reg("pred", "pbad")
    body += ["mov.u32 tx, %tid.x;", f"setp.ne.u32 pbad, tx, {TID};", "@pbad trap;",
             f"and.b32 lane, {TID}, 31;", f"shr.u32 warp, {TID}, 5;", "shr.u32 g, lane, 2;", "and.b32 q, lane, 3;"]
    reg("f32", "fz")
    body.append("mov.f32 fz, 0f00000000;")
    reg("b32", "one")
    body.append(f"mov.b32 one, {one:#010x};")
    rows = []  # per m-tile: (row g, row g + 8) register names
    for r in range(R):
        rg, rh = reg("b32", f"rg{r}"), reg("b32", f"rh{r}")
        body += [f"mad.lo.u32 t0, warp, {16 * R}, g;", f"add.u32 t0, t0, {16 * r};", f"min.u32 {rg}, t0, {NL};",
                 "add.u32 t0, t0, 8;", f"min.u32 {rh}, t0, {NL};"]
        rows.append((rg, rh))
    addr = {}  # (kind, r, half) -> u64 register
    reg("b64", "off")
    reg("b32", "qoff")
    body.append(f"mul.lo.u32 qoff, q, {4 * wpl};")
    for r in range(R):
        for h, row in enumerate(rows[r]):
            a = reg("b64", f"wa{r}{h}")
            body += [f"mul.wide.u32 off, {row}, {WS};", f"add.u64 {a}, {W}, off;",
                     "cvt.u64.u32 off, qoff;", f"add.u64 {a}, {a}, off;"]
            sa = reg("b64", f"sa{r}{h}")
            body += [f"mul.wide.u32 off, {row}, {SS};", f"add.u64 {sa}, {S}, off;"]
            addr["w", r, h], addr["s", r, h] = a, sa
            if has_zeros:
                za = reg("b64", f"za{r}{h}")
                body += [f"mul.wide.u32 off, {row}, {ZS};", f"add.u64 {za}, {Z}, off;"]
                addr["z", r, h] = za
    reg("b64", "xa")
    if m1:
        body.append(f"mov.u64 xa, {X};")
    else:
        body += [f"min.u32 xrow, g, {ML};", f"mul.wide.u32 off, xrow, {XS};", f"add.u64 xa, {X}, off;"]
    body += [f"mul.lo.u32 t1, q, {16 * wpl};", "cvt.u64.u32 off, t1;", "add.u64 xa, xa, off;"]
    acc = {}
    for r in range(R):
        for h in range(2):
            for c in range(cols):
                acc[r, h, c] = reg("f32", f"acc{r}{h}{c}")
                body.append(f"mov.f32 {acc[r, h, c]}, 0f00000000;")

    # -- loads of one span (weights, scales / zeros at a group's first span) and of its activations
    def load_weights(t: int) -> list[str]:
        out = []
        vec = {4: ".v4", 2: ".v2", 1: ""}[wpl]
        for r in range(R):
            for h in range(2):
                names = [reg("b32", f"w{t}_{r}{h}_{i}") for i in range(wpl)]
                dst = "{" + ", ".join(names) + "}" if wpl > 1 else names[0]
                out.append(f"ld.global.L1::evict_first{vec}.u32 {dst}, [{addr['w', r, h]}+{t * SPAN // 2}];")
        if t % spg == 0:
            gi = t // spg
            sbytes = {"f16": 2, "bf16": 2, "f32": 4}[scale]
            for r in range(R):
                for h in range(2):
                    if scale == "f32":
                        out.append(f"ld.global.f32 {reg('f32', f's{t}_{r}{h}')}, [{addr['s', r, h]}+{gi * sbytes}];")
                    else:
                        out.append(f"ld.global.u16 {reg('b32', f'sr{t}_{r}{h}')}, [{addr['s', r, h]}+{gi * sbytes}];")
                    if has_zeros:
                        out.append(f"ld.global.u8 {reg('b32', f'z{t}_{r}{h}')}, [{addr['z', r, h]}+{gi}];")
        return out

    def load_x(t: int) -> list[str]:
        out = []
        for i in range(wpl):
            names = [reg("b32", f"x{t}_{i}_{m}") for m in range(4)]
            out.append(f"ld.global.v4.u32 {{{', '.join(names)}}}, [xa+{t * SPAN * 2 + 16 * i}];")
        return out

    def math(t: int) -> list[str]:
        out = []
        first, last = t % spg == 0, t % spg == spg - 1
        bp = {}
        for i in range(wpl):  # B pairs of word i
            for j, (a, b, sel) in enumerate(_B_PAIRS):
                if sel == 0x3210:
                    bp[i, j] = f"x{t}_{i}_{a}"
                    continue
                bp[i, j] = reg("b32", f"b{t}_{i}_{j}")
                out.append(f"prmt.b32 {bp[i, j]}, x{t}_{i}_{a}, x{t}_{i}_{b}, {sel:#06x};")
        # Sx: A = 1.0 (D1 columns 2q, 2q + 1 = Sx of activation rows 2q, 2q + 1)
        d1 = [reg("f32", f"sx{t}_{k}") for k in range(4)]
        prev1 = ["fz"] * 4 if first else [f"sx{t - 1}_{k}" for k in range(4)]
        for i in range(wpl):
            for e in range(2):
                b_ops = f"{bp[i, 2 * e]}, {bp[i, 2 * e + 1]}"
                out.append(f"{mma} {{{', '.join(d1)}}}, {{one, one, one, one}}, {{{b_ops}}}, {{{', '.join(prev1)}}};")
                prev1 = d1
        for r in range(R):
            d = [reg("f32", f"dd{t}_{r}_{k}") for k in range(4)]  # rows g (cols 2q, 2q+1), g + 8 (cols 2q, 2q+1)
            prev = ["fz"] * 4 if first else [f"dd{t - 1}_{r}_{k}" for k in range(4)]
            for i in range(wpl):
                p = {}
                for h in range(2):
                    word = f"w{t}_{r}{h}_{i}"
                    for j in range(4):
                        p[h, j] = reg("b32", f"p{t}_{r}{h}_{i}_{j}")
                        if j == 0:
                            out.append(f"lop3.b32 {p[h, j]}, {word}, 0x000F000F, {magic_bits:#010x}, 0xEA;")
                        else:
                            sh = reg("b32", f"sh{t}_{r}{h}_{i}_{j}")
                            out += [f"shr.u32 {sh}, {word}, {4 * j};",
                                    f"lop3.b32 {p[h, j]}, {sh}, 0x000F000F, {magic_bits:#010x}, 0xEA;"]
                for e in range(2):
                    a_ops = f"{p[0, 2 * e]}, {p[1, 2 * e]}, {p[0, 2 * e + 1]}, {p[1, 2 * e + 1]}"
                    out.append(f"{mma} {{{', '.join(d)}}}, {{{a_ops}}}, {{{bp[i, 2 * e]}, {bp[i, 2 * e + 1]}}}, "
                               f"{{{', '.join(prev)}}};")
                    prev = d
            if last:  # group done: acc += (D - (MAGIC + z) * Sx) * scale, per row and column
                t0 = t - spg + 1  # the group's first span (its scales / zeros)
                for h in range(2):
                    nmz = reg("f32", f"nmz{t}_{r}{h}")
                    if has_zeros:
                        zf = reg("f32", f"zf{t}_{r}{h}")
                        out += [f"cvt.rn.f32.u32 {zf}, z{t0}_{r}{h};", f"sub.f32 {nmz}, {_f32(-magic_value)}, {zf};"]
                    else:
                        out.append(f"mov.f32 {nmz}, {_f32(-magic_value - 8.0)};")
                    if scale == "f32":
                        sf = f"s{t0}_{r}{h}"
                    else:
                        sf = reg("f32", f"sf{t}_{r}{h}")
                        if scale == "bf16":
                            out.append(f"shl.b32 {sf}, sr{t0}_{r}{h}, 16;")
                        else:
                            hreg = reg("b16", f"hs{t}_{r}{h}")
                            out += [f"cvt.u16.u32 {hreg}, sr{t0}_{r}{h};", f"cvt.f32.f16 {sf}, {hreg};"]
                    for c in range(cols):
                        tmp = reg("f32", f"e{t}_{r}{h}{c}")
                        out += [f"fma.rn.f32 {tmp}, {nmz}, {d1[c]}, {d[2 * h + c]};",
                                f"fma.rn.f32 {acc[r, h, c]}, {tmp}, {sf}, {acc[r, h, c]};"]
        return out

    spans_list = list(range(spans))
    head = spans_list[:prefetch]
    for t in head:
        body += load_weights(t)
    if pdl_wait_inside:  # weights only so far: now wait for the kernel that wrote x
        body.append("griddepcontrol.wait;")
    for t in head:
        body += load_x(t)
    for t in spans_list:
        if t + prefetch < spans:
            body += load_weights(t + prefetch) + load_x(t + prefetch)
        body += math(t)
    outs = []
    for r in range(R):
        for h in range(2):
            for c in range(cols):
                outs.append(f"mov.b32 ${len(outs)}, {acc[r, h, c]};")
    decl = [f".reg .{kind} {', '.join(names)};" for kind, names in regs.items() if names]
    ptx = "\n".join(["{", *decl, *body, *outs, "}"])
    constraints = ",".join(["=r"] * nout + ["r", "l", "r", "r", "l", "r", "r", "l", "r", "l", "r"])
    return ptx, constraints, nout


@triton.jit
def _out_slot(i: tl.constexpr, tile_row, q, M, N, M1: tl.constexpr):
    """Where output i of the PTX block goes: (offset into [M, N], weight row, mask). Outputs run over m-tiles r,
    rows g / g + 8 (h), then columns 2q, 2q + 1 (c; one column when M1, kept by the q == 0 lanes only)."""
    COLS: tl.constexpr = 1 if M1 else 2
    row = tile_row + 16 * (i // (2 * COLS)) + 8 * ((i // COLS) % 2)
    m = 2 * q + i % COLS
    ok = (row < N) & ((q == 0) if M1 else (m < M))
    return m * N + row, row, ok


@triton.jit
def _w4_mma_gemv_kernel(
    x_ptr,  # [M, K] 16-bit activations
    w_ptr,  # [N, K / 2] uint8 (reference.w4a16_matmul layout)
    scales_ptr,  # [N, K / GROUP_SIZE]
    zeros_ptr,  # [N, K / GROUP_SIZE] uint8 (HAS_ZEROS) else unused
    bias_ptr,  # [N] (HAS_BIAS)
    out_ptr,  # [M, N] x dtype
    partial_ptr,  # [SPLIT_K, M, N] float32 scratch (SPLIT_K > 1)
    counter_ptr,  # [cdiv(N, BLOCK_N)] int32 arrival counters (SPLIT_K > 1)
    M, N,
    stride_xm, stride_wn, stride_sn, stride_zn,  # in elements
    ASM: tl.constexpr, CONSTRAINTS: tl.constexpr, NOUT: tl.constexpr,
    R: tl.constexpr, WARPS: tl.constexpr, K_PER_PROGRAM: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, M1: tl.constexpr, SPLIT_K: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_trigger(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    BLOCK_N: tl.constexpr = 16 * R * WARPS
    row0 = pid_n * BLOCK_N
    k0 = pid_k * K_PER_PROGRAM
    tid = tl.arange(0, 32 * WARPS)  # [T] one element per thread (the PTX checks it is its %tid.x)
    zero = tid * 0
    w_addr = (w_ptr + row0.to(tl.int64) * stride_wn + k0 // 2 + zero).to(tl.int64)
    x_addr = (x_ptr + k0 + zero).to(tl.int64)
    s_addr = (scales_ptr + row0.to(tl.int64) * stride_sn + k0 // GROUP_SIZE + zero).to(tl.int64)
    if HAS_ZEROS:
        z_addr = (zeros_ptr + row0.to(tl.int64) * stride_zn + k0 // GROUP_SIZE + zero).to(tl.int64)
    else:
        z_addr = s_addr
    outs = tl.inline_asm_elementwise(
        ASM, CONSTRAINTS,
        [tid, w_addr, zero + stride_wn, zero + (N - 1 - row0), x_addr, zero + stride_xm * 2, zero + (M - 1),
         s_addr, zero + stride_sn * scales_ptr.dtype.element_ty.primitive_bitwidth // 8, z_addr, zero + stride_zn],
        dtype=(tl.int32,) * NOUT, is_pure=False, pack=1)
    q = tid % 4
    tile_row = row0 + (tid // 32) * (16 * R) + (tid % 32) // 4  # [T] row g of the warp's first m-tile
    plane = M * N
    if SPLIT_K > 1:
        for i in tl.static_range(NOUT):
            offs, row, ok = _out_slot(i, tile_row, q, M, N, M1)
            tl.store(partial_ptr + pid_k * plane + offs, outs[i].to(tl.float32, bitcast=True), mask=ok)
        if split_k_arrive(counter_ptr, pid_n) == SPLIT_K - 1:  # the last split of this row block adds them up
            tl.debug_barrier()
            for i in tl.static_range(NOUT):
                offs, row, ok = _out_slot(i, tile_row, q, M, N, M1)
                total = split_k_sum(partial_ptr, offs, plane, ok, SPLIT_K)
                if HAS_BIAS:
                    total += tl.load(bias_ptr + row, mask=ok, other=0.0).to(tl.float32)
                tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=ok)
            split_k_rearm(counter_ptr, pid_n)
    else:
        for i in tl.static_range(NOUT):
            offs, row, ok = _out_slot(i, tile_row, q, M, N, M1)
            val = outs[i].to(tl.float32, bitcast=True)
            if HAS_BIAS:
                val += tl.load(bias_ptr + row, mask=ok, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=ok)


def choose_mma_gemv_config(M: int, N: int, K: int, group_size: int) -> MmaGemvConfig:
    """The launch for one call: the best configs of an H100 sweep on the Llama-8B linears at 2, 4 and 8 rows, weights
    rotated past L2 (benchmarks/w4_mma_gemv_sweep_gpu.py; us at 4 rows, this kernel vs the Triton W4A16 matmul):
    qkv 8.5 vs 18.0, o 6.8 vs 15.4, gate_up 31.0 vs 76.0, down 15.9 vs 42.2. A program's K range is unrolled, so the
    split keeps it at <= 32 spans."""
    wpl = 4 if group_size % 128 == 0 else group_size // 32
    spans = K // (32 * wpl)
    if N >= 16384:
        tiles, warps, split, prefetch = 2, 4, 8, 4
    elif K >= 8192:
        tiles, warps, split, prefetch = 1, 4, 4, 4
    elif N > K:
        tiles, warps, split, prefetch = 1, 4, 4, 2
    else:
        tiles, warps, split, prefetch = 1, 4, 8, 1
    fits = [s for s in range(1, spans + 1) if spans % s == 0 and spans // s <= MAX_SPANS_PER_PROGRAM]
    split = min(fits, key=lambda s: (abs(s - split), s))  # the nearest split that cuts K into whole spans
    return MmaGemvConfig(tiles, warps, split, wpl, prefetch)


def _group_ok(group_size: int) -> bool:
    """Groups of 32 or 64 columns (one span each) or a multiple of 128 (whole spans of 128)."""
    return group_size in (32, 64) or (group_size > 0 and group_size % 128 == 0)


def supported(x: torch.Tensor, group_size: int) -> bool:
    """Whether w4_mma_gemv can take this call: a CUDA device of sm_80 or later (mma.sync bf16), 16-bit activations,
    1..MMA_GEMV_MAX_ROWS rows, groups of 32, 64 or a multiple of 128 columns; not under the Triton interpreter nor
    with KVFLIGHT_MMA_GEMV=0."""
    if not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("KVFLIGHT_MMA_GEMV", "1") == "0":
        return False
    if not 1 <= x.numel() // max(x.shape[-1], 1) <= MMA_GEMV_MAX_ROWS:
        return False
    if not _group_ok(group_size):
        return False
    return capability_at_least(x.device, 8)


def w4_mma_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                group_size: int, bias: torch.Tensor | None = None,
                config: MmaGemvConfig | None = None) -> torch.Tensor:
    """x [M, K] (or [..., K]) bf16 / fp16 with M <= MMA_GEMV_MAX_ROWS, qweight [N, K / 2] uint8, scales / zeros
    [N, K / group_size] (as reference.w4a16_matmul) -> [M, N] in x's dtype."""
    K = x.shape[-1]
    N = qweight.shape[0]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1 or x2.data_ptr() % 16 or (x2.shape[0] > 1 and x2.stride(0) % 8):
        x2 = x2.contiguous()
    M = x2.shape[0]
    if not 1 <= M <= MMA_GEMV_MAX_ROWS:
        raise ValueError(f"w4_mma_gemv: {M} rows: expected 1..{MMA_GEMV_MAX_ROWS}")
    if not _group_ok(group_size):
        raise ValueError(f"w4_mma_gemv: group_size={group_size}: expected 32, 64 or a multiple of 128")
    if K % group_size:
        raise ValueError(f"w4_mma_gemv: K={K} is not a multiple of group_size={group_size}")
    if qweight.dtype != torch.uint8 or qweight.shape != (N, K // 2) or scales.shape != (N, K // group_size):
        raise ValueError(f"w4_mma_gemv: qweight {tuple(qweight.shape)} {qweight.dtype} / scales "
                         f"{tuple(scales.shape)}: expected [N, {K // 2}] uint8 / [N, {K // group_size}]")
    if scales.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"w4_mma_gemv: scales {scales.dtype}: expected float16, bfloat16 or float32")
    if zeros is not None and (zeros.shape != scales.shape or zeros.dtype != torch.uint8):
        raise ValueError(f"w4_mma_gemv: zeros {tuple(zeros.shape)} {zeros.dtype}: expected {tuple(scales.shape)} "
                         "uint8")
    if x2.dtype not in (torch.bfloat16, torch.float16) or not x2.is_cuda:
        raise ValueError(f"w4_mma_gemv: x {x2.dtype} on {x2.device}: expected bfloat16 / float16 on a CUDA device")
    w = qweight if qweight.stride(-1) == 1 and qweight.stride(0) % 16 == 0 and qweight.data_ptr() % 16 == 0 \
        else qweight.contiguous()
    if w.stride(0) % 16:
        raise ValueError(f"w4_mma_gemv: qweight rows of {w.stride(0)} bytes: expected a multiple of 16 (K % 32 == 0)")
    sc = scales if scales.stride(-1) == 1 else scales.contiguous()
    zr = None if zeros is None else (zeros if zeros.stride(-1) == 1 else zeros.contiguous())
    override = None if config else launch_override("mma", N, K, 3, 5)
    cfg = config or (MmaGemvConfig(*override) if override else choose_mma_gemv_config(M, N, K, group_size))
    wpl = cfg.words_per_lane
    span = 32 * wpl
    if wpl not in (1, 2, 4) or (group_size % span and span % group_size) or (span > group_size):
        raise ValueError(f"w4_mma_gemv: words_per_lane={wpl} (span {span} columns) does not fit group_size="
                         f"{group_size}")
    spans = K // span
    if K % span or spans % cfg.split_k:
        raise ValueError(f"w4_mma_gemv: K={K} ({spans} spans of {span}) is not divisible into split_k={cfg.split_k}")
    spans_per_program = spans // cfg.split_k
    if (spans_per_program * span) % group_size:
        raise ValueError(f"w4_mma_gemv: split_k={cfg.split_k} cuts a group of {group_size} columns")
    m1 = M == 1
    kind = {torch.bfloat16: "bf16", torch.float16: "f16"}[x2.dtype]
    skind = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}[sc.dtype]
    pdl_kwargs = pdl.launch_kwargs(x2, "w4_mma_gemv")
    asm, constraints, nout = _ptx(cfg.m_tiles, spans_per_program, wpl, group_size, m1, zr is not None, kind,
                                  skind, min(cfg.prefetch, spans_per_program), pdl_kwargs["PDL"])
    block_n = 16 * cfg.m_tiles * cfg.num_warps
    num_blocks = triton.cdiv(N, block_n)
    out, partial, counters = split_k_buffers(M, N, cfg.split_k, num_blocks, x2)
    _w4_mma_gemv_kernel[(num_blocks, cfg.split_k)](
        x2, w, sc, zr if zr is not None else w, bias if bias is not None else sc, out, partial, counters, M, N,
        x2.stride(0), w.stride(0), sc.stride(0), zr.stride(0) if zr is not None else 0,
        ASM=asm, CONSTRAINTS=constraints, NOUT=nout, R=cfg.m_tiles, WARPS=cfg.num_warps,
        K_PER_PROGRAM=spans_per_program * span, GROUP_SIZE=group_size, HAS_ZEROS=zr is not None,
        HAS_BIAS=bias is not None, M1=m1, SPLIT_K=cfg.split_k, num_warps=cfg.num_warps, num_stages=1,
        **pdl_kwargs)
    return out.view(*x.shape[:-1], N)

