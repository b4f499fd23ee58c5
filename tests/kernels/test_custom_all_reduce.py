"""The custom all-reduce kernel (one-shot, two-shot) between two real processes sharing memory: every rank's output
equals the ranks' inputs summed in rank order and the backend's all-reduce; a rank that never comes is reported.

On CPU the two ranks are gloo processes whose regions are shared memory files and the kernel runs under the Triton
interpreter; on a machine with two P2P-capable GPUs the same test runs over CUDA IPC with NCCL.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback

import pytest
import torch

from kvflight.kernels.all_reduce import BLOCK, NUM_PROGRAMS

# (numel, dtype, strategy): below one loop step, several loop steps, odd sizes, the NCCL / gloo fallback
CASES = [
    (1, torch.float32, "one_shot"),
    (4096, torch.bfloat16, "one_shot"),
    (NUM_PROGRAMS * BLOCK + 77, torch.float32, "one_shot"),
    (3000, torch.bfloat16, "two_shot"),
    (2 * NUM_PROGRAMS * BLOCK + 5, torch.float16, "two_shot"),
    (4096, torch.bfloat16, "two_shot"),
    (4096, torch.bfloat16, "one_shot"),  # same half as two calls ago: the halves alternate correctly
    (5, torch.float32, None),  # strategy chosen by the object: one-shot at 2 ranks
    (1 << 17, torch.float32, None),  # 512 KiB > capacity: the backend's all-reduce
]
CAPACITY_BYTES = 384 << 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, mode: str, queue) -> None:
    """mode: 'cpu' (gloo, shared memory files), 'cuda' (NCCL, rank r on cuda:r), 'one_gpu' (gloo, both ranks on
    cuda:0: checks the kernel compiled for a GPU and the IPC mapping where only one GPU is lent)."""
    import torch.distributed as dist

    from kvflight.kernels.all_reduce import reference_all_reduce
    from kvflight.runner.custom_all_reduce import CustomAllReduceError, create_custom_all_reduce

    try:
        use_cuda = mode != "cpu"
        gpu = rank if mode == "cuda" else 0
        if use_cuda:
            torch.cuda.set_device(gpu)
        device = torch.device("cuda", gpu) if use_cuda else torch.device("cpu")
        dist.init_process_group("nccl" if mode == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world)
        car, why = create_custom_all_reduce(rank, world, device, capacity_bytes=CAPACITY_BYTES,
                                            max_spins=50_000_000 if use_cuda else 200_000)
        assert car is not None, why
        results = []
        for i, (n, dtype, strategy) in enumerate(CASES):
            gen = torch.Generator().manual_seed(1000 * i + rank)
            x = torch.randn(n, generator=gen).to(dtype).to(device)
            parts = [torch.empty_like(x.cpu()) for _ in range(world)]
            dist.all_gather(parts, x.cpu())  # gathered on the host: gloo has no CUDA all_gather
            expected = reference_all_reduce([p.to(device) for p in parts]).cpu()
            chosen = car.strategy(x) if strategy is None else strategy
            got = car.all_reduce(x.clone(), strategy)
            got = got.cpu()
            gathered = [torch.empty_like(got) for _ in range(world)]
            dist.all_gather(gathered, got)
            same_on_ranks = all(torch.equal(g, gathered[0]) for g in gathered)
            err = (got.float() - expected.float()).abs().max().item()
            tol = 0.0 if chosen != "nccl" else 1e-5
            if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
                tol = 2 ** -7 * expected.float().abs().max().item()  # the interpreter rounds bf16 its own way
            results.append((n, str(dtype), chosen, err, tol, same_on_ranks))
        car.check()
        timeout_msg = ""
        if rank == 0:  # rank 1 never makes this call: rank 0's barrier gives up and says which rank it waited for
            car.max_spins = 2000
            car.all_reduce(torch.ones(64, device=device), "one_shot")
            if use_cuda:
                torch.cuda.synchronize()
            try:
                car.check()
            except CustomAllReduceError as exc:
                timeout_msg = str(exc)
        queue.put((rank, results, timeout_msg, ""))
    except BaseException:  # noqa: BLE001
        queue.put((rank, [], "", traceback.format_exc()))


def _run(world: int, mode: str) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, mode, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    out = {}
    try:
        for _ in range(world):
            rank, results, timeout_msg, error = queue.get(timeout=600)
            assert not error, f"rank {rank} failed:\n{error}"
            out[rank] = (results, timeout_msg)
    finally:
        for p in procs:
            p.join(20)
            if p.is_alive():
                p.kill()
    return out


def _check(out: dict) -> None:
    for rank, (results, _) in out.items():
        assert len(results) == len(CASES)
        for (n, dtype, chosen, err, tol, same), (_, _, strategy) in zip(results, CASES):
            assert same, f"n={n} {dtype} {chosen}: the ranks' outputs differ"
            assert err <= tol, f"rank {rank} n={n} {dtype} {chosen}: max error {err} > {tol}"
        assert [r[2] for r in results][-2:] == ["one_shot", "nccl"]
    assert "rank 1 never reached" in out[0][1], out[0][1]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU variant below runs instead")
def test_custom_all_reduce_two_cpu_processes():
    _check(_run(2, "cpu"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_custom_all_reduce_two_gpus():
    if not torch.cuda.can_device_access_peer(0, 1):
        pytest.skip("GPU0 and GPU1 cannot reach each other over P2P")
    _check(_run(2, "cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_custom_all_reduce_two_processes_on_one_gpu():
    """Two ranks on cuda:0 (time-sliced, so every barrier waits for the other process's turn): the kernel compiled
    for the GPU, the CUDA IPC mapping within one device, the pinned error word."""
    _check(_run(2, "one_gpu"))
