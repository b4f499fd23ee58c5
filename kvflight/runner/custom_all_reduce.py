"""The custom all-reduce's shared buffers and its per-call choice: one-shot, two-shot or NCCL (the kernel:
kvflight/kernels/all_reduce.py).

Every rank allocates one region (two data halves of `capacity_bytes` + the barrier flags) and every other rank maps
it: on GPUs through CUDA IPC (cudaIpcGetMemHandle / cudaIpcOpenMemHandle with lazy peer access; the GPUs must reach
each other over P2P, which `kvflight topo` checks), on CPU through a shared memory file (tests, under the Triton
interpreter). The addresses go into one device table the kernel reads, so the kernel is captured in CUDA graphs as is.
No NVLink multicast object is ever created: plain P2P loads and stores only.

The choice per message (the same on every rank, since it depends only on the message): NCCL when the tensor is not
contiguous, has another dtype than bf16/fp16/fp32 or is larger than `capacity_bytes`; one-shot when the world is 2
ranks or the message is at most `one_shot_max_bytes`; two-shot otherwise. `create_custom_all_reduce` sets it up
collectively and answers None (NCCL for everything) unless every rank succeeded.

A barrier that waits longer than `max_spins` polls (about KVFLIGHT_TP_TIMEOUT_S on a GPU) sets an error word in
host-visible memory and lets the kernel end; `check()` turns it into an error naming the rank that never came.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import tempfile
import uuid
from typing import Any

import torch

logger = logging.getLogger("kvflight.tp")

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DEFAULT_CAPACITY_BYTES = 8 << 20  # the largest message sent through the custom kernel (decode steps up to 1024 rows
#                                   of a 4096-wide bf16 hidden state); larger ones go to NCCL
DEFAULT_ONE_SHOT_MAX_BYTES = 256 << 10  # above this, at more than 2 ranks, two-shot moves less data per rank
_FLAG_ALIGN = 128


class CustomAllReduceError(RuntimeError):
    """A custom all-reduce barrier timed out: a peer rank never reached the same call."""


def spins_for_timeout(timeout_s: float) -> int:
    """Barrier polls allowed for a timeout (a poll of a system-scope flag takes about a microsecond on a GPU)."""
    return max(1, min(2**31 - 1, int(timeout_s * 1e6)))


# ---- CUDA runtime calls torch does not expose (IPC handles) ------------------------------------------------------
class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * 64)]  # not c_char: its value stops at the first zero byte


class _CudaRuntime:
    """The few libcudart calls needed, on the copy torch already loaded (same device state)."""

    def __init__(self) -> None:
        torch.cuda.init()
        path = _loaded_library("libcudart") or ctypes.util.find_library("cudart")
        if path is None:
            candidates = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "*", "lib",
                                                       "libcudart.so*")))
            path = candidates[-1] if candidates else None
        if path is None:
            raise OSError("libcudart not found (looked in this process's libraries, the loader path and the nvidia "
                          "wheels next to torch)")
        self.lib = ctypes.CDLL(path)
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p
        self.lib.cudaIpcOpenMemHandle.argtypes = [ctypes.POINTER(ctypes.c_void_p), _IpcHandle, ctypes.c_uint]

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise RuntimeError(f"{what}: CUDA error {code} ({self.lib.cudaGetErrorString(code).decode()})")

    def set_device(self, device: int) -> None:
        self._check(self.lib.cudaSetDevice(ctypes.c_int(device)), f"cudaSetDevice({device})")

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self._check(self.lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(nbytes)), f"cudaMalloc({nbytes})")
        self._check(self.lib.cudaMemset(ptr, 0, ctypes.c_size_t(nbytes)), "cudaMemset")
        self._check(self.lib.cudaDeviceSynchronize(), "cudaDeviceSynchronize")
        return int(ptr.value)

    def free(self, ptr: int) -> None:
        self.lib.cudaFree(ctypes.c_void_p(ptr))

    def ipc_handle(self, ptr: int) -> bytes:
        handle = _IpcHandle()
        self._check(self.lib.cudaIpcGetMemHandle(ctypes.byref(handle), ctypes.c_void_p(ptr)), "cudaIpcGetMemHandle")
        return bytes(handle.reserved)

    def ipc_open(self, handle: bytes) -> int:
        ptr = ctypes.c_void_p()
        h = _IpcHandle()
        ctypes.memmove(ctypes.byref(h), handle, 64)
        self._check(self.lib.cudaIpcOpenMemHandle(ctypes.byref(ptr), h, ctypes.c_uint(1)),  # lazy peer access
                    "cudaIpcOpenMemHandle")
        return int(ptr.value)

    def ipc_close(self, ptr: int) -> None:
        self.lib.cudaIpcCloseMemHandle(ctypes.c_void_p(ptr))


def _loaded_library(name: str) -> str | None:
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(" ", 1)[-1].strip()
                if os.path.basename(path).startswith(name + ".so"):
                    return path
    except OSError:
        pass
    return None


# ---- the shared regions ------------------------------------------------------------------------------------------
class CustomAllReduce:
    """One rank's side of the custom all-reduce. Construct on every rank of the default torch.distributed group at
    once (the constructor exchanges the regions' handles through it); `all_reduce(x)` then sums x in place."""

    def __init__(self, rank: int, world_size: int, device: torch.device, capacity_bytes: int = DEFAULT_CAPACITY_BYTES,
                 one_shot_max_bytes: int = DEFAULT_ONE_SHOT_MAX_BYTES, max_spins: int | None = None) -> None:
        import torch.distributed as dist

        from kvflight.kernels.all_reduce import NUM_PROGRAMS

        if world_size < 2:
            raise ValueError("a custom all-reduce needs at least 2 ranks")
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.capacity_bytes = capacity_bytes
        self.one_shot_max_bytes = one_shot_max_bytes
        if max_spins is None:
            from kvflight.runner.tp_workers import tp_timeout_s

            max_spins = spins_for_timeout(tp_timeout_s())
        self.max_spins = max_spins
        flags_offset = -(-2 * capacity_bytes // _FLAG_ALIGN) * _FLAG_ALIGN
        region_bytes = flags_offset + NUM_PROGRAMS * world_size * 4
        self._cuda = self.device.type == "cuda"
        self._own_ptr = 0
        self._opened: list[int] = []
        self._maps: list[torch.Tensor] = []
        self._path: str | None = None
        self.setup_error = ""  # set instead of raising past a collective: create_custom_all_reduce agrees on it
        mine: Any = None
        try:
            if self._cuda:
                self._rt = _CudaRuntime()
                self._rt.set_device(self.device.index if self.device.index is not None else torch.cuda.current_device())
                self._own_ptr = self._rt.malloc(region_bytes)
                mine = self._rt.ipc_handle(self._own_ptr)
            else:
                self._path = os.path.join(_shm_dir(), f"kvflight-allreduce-{uuid.uuid4().hex}-{rank}")
                own = torch.from_file(self._path, shared=True, size=region_bytes, dtype=torch.uint8)
                own.zero_()
                self._maps.append(own)
                mine = self._path
        except Exception as exc:  # noqa: BLE001 - every rank must still reach the exchange below
            self.setup_error = f"rank {rank}: {type(exc).__name__}: {exc}"
        handles: list[Any] = [None] * world_size
        dist.all_gather_object(handles, (mine, self.setup_error))
        failed = [err for _, err in handles if err]
        if failed:
            self.setup_error = failed[0]
            return
        bases = []
        try:
            for p, (handle, _) in enumerate(handles):
                if p == rank:
                    bases.append(self._own_ptr if self._cuda else self._maps[0].data_ptr())
                elif self._cuda:
                    ptr = self._rt.ipc_open(handle)
                    self._opened.append(ptr)
                    bases.append(ptr)
                else:
                    peer = torch.from_file(handle, shared=True, size=region_bytes, dtype=torch.uint8)
                    self._maps.append(peer)
                    bases.append(peer.data_ptr())
        except Exception as exc:  # noqa: BLE001
            self.setup_error = f"rank {rank}: mapping a peer's buffer: {type(exc).__name__}: {exc}"
            return
        if self._cuda:  # host memory the GPU writes when a barrier times out (UVA: the same address on both sides)
            self._error = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        else:
            self._error = torch.zeros(1, dtype=torch.int32)
        table = bases + [b + flags_offset for b in bases] + [self._error.data_ptr()]
        self.ptr_table = torch.tensor(table, dtype=torch.int64, device=self.device)  # [2W + 1]
        self.counters = torch.zeros(2, NUM_PROGRAMS, dtype=torch.int32, device=self.device)  # calls, barriers

    def forget_names(self) -> None:
        """Remove this rank's shared memory file name (CPU) once every rank mapped it."""
        if self._path is not None:
            try:
                os.unlink(self._path)
            except OSError:
                pass
            self._path = None

    def supports(self, x: torch.Tensor) -> bool:
        return (x.dtype in SUPPORTED_DTYPES and x.device == self.device and x.is_contiguous()
                and x.numel() * x.element_size() <= self.capacity_bytes)

    def strategy(self, x: torch.Tensor) -> str:
        """'one_shot', 'two_shot' or 'nccl' (the backend's all-reduce) for this message."""
        if not self.supports(x):
            return "nccl"
        nbytes = x.numel() * x.element_size()
        return "one_shot" if self.world_size == 2 or nbytes <= self.one_shot_max_bytes else "two_shot"

    def all_reduce(self, x: torch.Tensor, strategy: str | None = None) -> torch.Tensor:
        """Sum x over the ranks in place (x returned); a message the kernel does not take goes to NCCL / gloo."""
        from kvflight.kernels.all_reduce import launch_all_reduce

        strategy = strategy or self.strategy(x)
        if strategy == "nccl":
            import torch.distributed as dist

            dist.all_reduce(x)
            return x
        if x.numel() == 0:
            return x
        launch_all_reduce(x, x, self.ptr_table, self.counters, self.capacity_bytes // x.element_size(), self.rank,
                          self.world_size, strategy == "two_shot", self.max_spins)
        return x

    def check(self) -> None:
        """Raise CustomAllReduceError when a barrier timed out (read after the step's results were waited for)."""
        code = int(self._error[0])
        if code:
            raise CustomAllReduceError(
                f"custom all-reduce on rank {self.rank}: rank {code - 1} never reached the same all-reduce (waited "
                f"{self.max_spins} polls); that rank died or the ranks ran different steps")

    def close(self) -> None:
        if self._cuda:
            for ptr in self._opened:
                self._rt.ipc_close(ptr)
            if self._own_ptr:
                self._rt.free(self._own_ptr)
        self._opened, self._own_ptr, self._maps = [], 0, []
        self.forget_names()


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def create_custom_all_reduce(rank: int, world_size: int, device: torch.device, **kwargs: Any
                             ) -> tuple[CustomAllReduce | None, str]:
    """Set up the custom all-reduce on every rank at once; (None, why) unless every rank succeeded (then NCCL does
    every all-reduce). Call on all ranks of the default group, in the same order relative to other collectives."""
    import torch.distributed as dist

    error = ""
    car: CustomAllReduce | None = None
    device = torch.device(device)
    index = -1
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
    indices: list[Any] = [None] * world_size
    dist.all_gather_object(indices, index)
    if device.type == "cuda":
        no_peer = [d for d in indices if d != index and not torch.cuda.can_device_access_peer(index, d)]
        if no_peer:
            error = f"cuda:{index} cannot access cuda:{no_peer[0]} directly (no P2P)"
    oks: list[Any] = [None] * world_size
    dist.all_gather_object(oks, error)
    error = next((f"rank {r}: {e}" for r, e in enumerate(oks) if e), "")
    if not error:
        car = CustomAllReduce(rank, world_size, device, **kwargs)
        dist.all_gather_object(oks, car.setup_error)  # also the point after which every rank mapped every region
        error = next((e for e in oks if e), "")
        car.forget_names()
    if error:
        logger.warning("custom all-reduce set-up failed, NCCL all-reduce used: %s", error)
        if car is not None:
            car.close()
        return None, error
    return car, "ok"
