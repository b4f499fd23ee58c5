"""What programmatic dependent launch saves inside a CUDA graph (kernels/pdl.py): a chain of 64 bf16 GEMVs [4096 x
4096] at one row, each followed by a one-program RMSNorm-like kernel (or not), launched plainly ("off"), with PDL
and the trigger after the main loop ("late"), or with the trigger first thing ("early", what kvflight does). Prints
microseconds per GEMV (+ norm) and the error against a float32 chain.

    python benchmarks/pdl_probe_gpu.py
"""
import torch, triton, triton.language as tl
from triton.language.extra.cuda import gdc_wait, gdc_launch_dependents
print("triton", triton.__version__)

@triton.jit
def gemv(w_ptr, x_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
         EARLY: tl.constexpr):
    pid = tl.program_id(0)
    if PDL and EARLY:
        gdc_launch_dependents()
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        rk = k + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :])
        if PDL:
            if k == 0:
                gdc_wait()
        x = tl.load(x_ptr + rk)
        acc += w.to(tl.float32) * x[None, :].to(tl.float32)
    if PDL and not EARLY:
        gdc_launch_dependents()
    tl.store(y_ptr + rn, tl.sum(acc, 1).to(y_ptr.dtype.element_ty))

@triton.jit
def norm(x_ptr, y_ptr, N, BLOCK: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr):
    if PDL:
        if EARLY:
            gdc_launch_dependents()
        gdc_wait()
    c = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + c, mask=c < N, other=0.0).to(tl.float32)
    v = tl.sum(x * x, 0) / N
    if PDL and not EARLY:
        gdc_launch_dependents()
    tl.store(y_ptr + c, (x * tl.rsqrt(v + 1e-5)).to(y_ptr.dtype.element_ty), mask=c < N)

def run(mode, N=4096, K=4096, layers=64, with_norm=True, block_n=16, block_k=512, warps=4):
    pdl, early = mode in ("late", "early"), mode == "early"
    torch.manual_seed(0)
    ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
    x0 = torch.randn(K, device="cuda", dtype=torch.bfloat16)
    a = [torch.empty(N, device="cuda", dtype=torch.bfloat16) for _ in range(layers + 1)]
    b = [torch.empty(N, device="cuda", dtype=torch.bfloat16) for _ in range(layers + 1)]
    kw = {"launch_pdl": True} if pdl else {}
    def fwd():
        b[0].copy_(x0)
        for i in range(layers):
            gemv[(N // block_n,)](ws[i], b[i], a[i + 1], N, K, BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl, EARLY=early,
                                  num_warps=warps, num_stages=3, **kw)
            if with_norm:
                norm[(1,)](a[i + 1], b[i + 1], N, BLOCK=triton.next_power_of_2(N), PDL=pdl, EARLY=early,
                           num_warps=8, **kw)
            else:
                b[i + 1] = a[i + 1]
    fwd(); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        fwd(); torch.cuda.synchronize()
        with torch.cuda.graph(g, stream=s):
            fwd()
    torch.cuda.synchronize()
    g.replay(); torch.cuda.synchronize()
    ref = x0.float()
    for i in range(layers):
        ref = (ws[i].float() @ ref).bfloat16().float()
        if with_norm:
            ref = (ref * torch.rsqrt((ref * ref).mean() + 1e-5)).bfloat16().float()
    err = (b[layers].float() - ref).abs().max().item() / ref.abs().max().item()
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(3): g.replay()
    st.record()
    for _ in range(20): g.replay()
    en.record(); torch.cuda.synchronize()
    us = st.elapsed_time(en) / 20 / layers * 1e3
    print(f"{mode:5s} norm={with_norm} N={N} K={K} bn={block_n}: {us:6.2f} us/layer  rel err {err:.1e}", flush=True)

for with_norm in (True, False):
    for mode in ("off", "late", "early"):
        run(mode, with_norm=with_norm)
for mode in ("off", "early"):
    run(mode, block_n=32, block_k=256)
    run(mode, N=4096, K=4096, block_n=8, block_k=512, warps=8)
