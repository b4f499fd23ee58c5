"""Tensor-parallel ranks 1..N-1: their processes, the process group, the per-step diff sent to them, their liveness.

Rank 0 is the Engine's own process (scheduler, sampler, its ModelRunner as rank 0). `TPWorkerGroup` spawns one
process per other rank (multiprocessing "spawn"); each sets its rank (`set_tensor_parallel`) before building its
ModelRunner, joins the torch.distributed group (gloo on CPU, NCCL on GPUs, rank r on cuda:r) and then runs every
step's forward from a compact diff that rank 0 sends down a pipe:

    (num_scheduled_tokens, [(start_pos, num_new_tokens, block_ids, do_sample, token_ids, is_context) ...],
     kv_offloads, kv_loads)

No Request object crosses (they hold generators); workers never sample: rank 0 samples from the logits that the
vocab-parallel LM head all-gathers on every rank. The pipes carry the control messages (hello, loaded, planned KV
blocks, allocate, ready, step, stop, error); the process group carries only the model's collectives, with a timeout
(KVFLIGHT_TP_TIMEOUT_S, default 600 s), so a worker that dies or stops answering makes the engine raise
TensorParallelError instead of hanging. A worker exits when rank 0 says stop, when its pipe closes (rank 0 gone)
or when a collective fails.

KV sizing: every rank plans its own KV pool (per-rank KV heads); rank 0 takes the minimum number of blocks over the
ranks so that a block id means the same slot on every rank.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import os
import socket
import time
import traceback
from datetime import timedelta
from typing import Any

from kvflight.config import ConfigError, EngineConfig
from kvflight.model.arch import ModelArch
from kvflight.model.loader import ResolvedModel
from kvflight.types import SchedulerOutput

logger = logging.getLogger("kvflight.tp")

StepDiff = tuple[int, list[tuple[int, int, list[int], bool, list[int], bool]], list[tuple[int, int]],
                 list[tuple[int, int]]]


def tp_timeout_s() -> float:
    """Seconds a collective (or a worker's start-up step) may take before the engine gives up on the group."""
    return float(os.environ.get("KVFLIGHT_TP_TIMEOUT_S", "600"))


class TensorParallelError(RuntimeError):
    """A tensor-parallel rank died, failed or stopped answering; the engine cannot go on."""


def check_tp_shape(arch: ModelArch, tp: int) -> None:
    """ConfigError when the model cannot be split over `tp` ranks (heads, KV heads, intermediate size)."""
    from kvflight.tune.planner import PlanError, shard_shape

    try:
        shard_shape(arch, tp)
    except PlanError as exc:
        raise ConfigError(str(exc)) from None


# ---- the per-step diff ---------------------------------------------------------------------------------------------
def encode_step(out: SchedulerOutput) -> StepDiff:
    """The plain data of a SchedulerOutput that a worker's forward needs (no Request objects)."""
    rows = [(s.start_pos, s.num_new_tokens, list(s.block_ids), s.do_sample, list(s.token_ids), s.is_context)
            for s in out.scheduled]
    return out.num_scheduled_tokens, rows, list(out.kv_offloads), list(out.kv_loads)


@dataclasses.dataclass
class _WorkerScheduled:
    """A ScheduledRequest look-alike without its Request (the worker's runner never samples)."""

    start_pos: int
    num_new_tokens: int
    block_ids: list[int]
    do_sample: bool
    token_ids: list[int]
    is_context: bool
    request: Any = None


def decode_step(diff: StepDiff) -> SchedulerOutput:
    num_tokens, rows, offloads, loads = diff
    return SchedulerOutput(scheduled=[_WorkerScheduled(*row) for row in rows],  # type: ignore[misc]
                           num_scheduled_tokens=num_tokens, kv_offloads=offloads, kv_loads=loads)


# ---- a worker process ----------------------------------------------------------------------------------------------
def _backend(config: EngineConfig) -> str:
    import torch

    from kvflight.model.loader import resolve_device

    return "nccl" if resolve_device(config.model.device).type == "cuda" and torch.cuda.is_available() else "gloo"


def setup_all_reduce(strategy: str, rank: int, world_size: int, backend: str) -> tuple[str, str]:
    """Every rank, right after joining the group: set up the custom all-reduce when `strategy` is 'custom' (all
    ranks at once). (strategy in use, why): 'custom', or the backend's ('nccl' / 'gloo') when it failed anywhere or
    was not asked."""
    if strategy != "custom":
        return strategy, ""
    import torch

    from kvflight.model.layers import set_custom_all_reduce
    from kvflight.runner.custom_all_reduce import create_custom_all_reduce

    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    car, why = create_custom_all_reduce(rank, world_size, device)
    if car is None:
        return backend, why
    set_custom_all_reduce(car)
    return "custom", why


def check_custom_all_reduce() -> None:
    """Raise when this rank's custom all-reduce timed out waiting for a peer (after the step's results landed)."""
    from kvflight.model.layers import get_custom_all_reduce

    car = get_custom_all_reduce()
    if car is not None:
        car.check()


def _worker_main(rank: int, world_size: int, init_method: str, config: EngineConfig, resolved: ResolvedModel,
                 arch: ModelArch, max_seq_len: int, conn: Any, num_threads: int, log_level: int,
                 all_reduce: str) -> None:
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s [tp{rank}] %(name)s: %(message)s")
    dist = None
    try:
        import torch
        import torch.distributed as dist

        from kvflight.model.layers import set_tensor_parallel
        from kvflight.runner.model_runner import ModelRunner

        backend = _backend(config)
        if backend == "gloo" and num_threads > 0:
            torch.set_num_threads(num_threads)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        set_tensor_parallel(rank, world_size)  # before the model is built: layers read it at construction
        conn.send(("hello", rank))
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=tp_timeout_s()))
        setup_all_reduce(all_reduce, rank, world_size, backend)
        runner = ModelRunner(config, resolved, arch, max_seq_len)
        runner.skip_sampling = True
        conn.send(("loaded", rank))
        plan = runner.plan_kv_cache()
        conn.send(("planned", plan.num_blocks))
        msg = conn.recv()
        if msg[0] != "allocate":
            return
        _, num_blocks, num_host_blocks = msg
        plan = dataclasses.replace(plan, num_blocks=num_blocks, kv_cache_bytes=num_blocks * plan.kv_bytes_per_block)
        runner.allocate_kv_cache(plan, num_host_blocks=num_host_blocks)
        conn.send(("ready", rank))
        while True:
            msg = conn.recv()
            if msg[0] == "step":
                runner.execute(decode_step(msg[1]))
                check_custom_all_reduce()
            else:  # "stop"
                break
    except (EOFError, KeyboardInterrupt):  # rank 0 is gone: nothing to report to
        pass
    except BaseException:  # noqa: BLE001 - report anything to rank 0, then exit non-zero
        try:
            conn.send(("error", rank, traceback.format_exc()))
        except (OSError, EOFError):
            pass
        os._exit(1)  # a failed collective group must not block the exit
    finally:
        try:
            if dist is not None and dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- rank 0's handle on the workers --------------------------------------------------------------------------------
class TPWorkerGroup:
    """Spawns ranks 1..N-1 and makes this process rank 0 of the group (call before building rank 0's runner)."""

    def __init__(self, config: EngineConfig, resolved: ResolvedModel, arch: ModelArch, max_seq_len: int) -> None:
        import torch
        import torch.distributed as dist

        from kvflight.model.layers import set_tensor_parallel

        self.world_size = tp = config.parallel.tensor_parallel_size
        check_tp_shape(arch, tp)
        if dist.is_initialized():
            raise ConfigError(f"tensor_parallel_size={tp}: this process already has a torch.distributed group "
                              "(another tensor-parallel engine?); shut it down first (Engine.shutdown())")
        if config.model.device.startswith("cuda:"):
            raise ConfigError(f"device={config.model.device!r} with tensor_parallel_size={tp}: rank r runs on cuda:r; "
                              "use device=cuda (or auto) and pick the GPUs with CUDA_VISIBLE_DEVICES")
        self.backend = _backend(config)
        if self.backend == "nccl" and torch.cuda.device_count() < tp:
            raise ConfigError(f"tensor_parallel_size={tp} needs {tp} GPUs, {torch.cuda.device_count()} visible; "
                              "lower tensor_parallel_size or set CUDA_VISIBLE_DEVICES")
        self.all_reduce_strategy = self._choose_all_reduce(config.parallel.use_custom_all_reduce)
        self.processes: list[Any] = []
        self.conns: list[Any] = []
        self._errors: dict[int, str] = {}
        self._closed = False
        ctx = mp.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        num_threads = max(1, (os.cpu_count() or 1) // tp)
        log_level = logging.getLogger("kvflight").getEffectiveLevel()
        # the server's engine core is a daemon process; its workers are still tied to it (their pipe closes when it
        # dies, and they are daemons themselves), so let it have children
        me = mp.current_process()
        was_daemon = me.daemon
        if was_daemon:
            me._config["daemon"] = False  # type: ignore[attr-defined]
        try:
            for rank in range(1, tp):
                parent_conn, child_conn = ctx.Pipe()
                proc = ctx.Process(target=_worker_main, name=f"kvflight-tp{rank}", daemon=True,
                                   args=(rank, tp, init_method, config, resolved, arch, max_seq_len, child_conn,
                                         num_threads, log_level, self.all_reduce_strategy))
                proc.start()
                child_conn.close()
                self.processes.append(proc)
                self.conns.append(parent_conn)
        finally:
            if was_daemon:
                me._config["daemon"] = True  # type: ignore[attr-defined]
        try:
            self._wait_all("hello")
            if self.backend == "nccl":
                torch.cuda.set_device(0)
            set_tensor_parallel(0, tp)
            dist.init_process_group(self.backend, init_method=init_method, rank=0, world_size=tp,
                                    timeout=timedelta(seconds=tp_timeout_s()))
            requested = self.all_reduce_strategy
            self.all_reduce_strategy, why = setup_all_reduce(requested, 0, tp, self.backend)
            if config.parallel.use_custom_all_reduce == "on" and requested == "custom" != self.all_reduce_strategy:
                raise ConfigError(f"use_custom_all_reduce=on, but the custom all-reduce could not be set up ({why}); "
                                  "use auto (falls back to NCCL) or off")
        except BaseException:
            self.shutdown()
            raise
        logger.info("tensor parallel: %d ranks (%s), all-reduce: %s, worker pids %s", tp, self.backend,
                    self.all_reduce_strategy, [p.pid for p in self.processes])

    def _choose_all_reduce(self, mode: str) -> str:
        if self.backend == "gloo":
            if mode == "on" and os.environ.get("TRITON_INTERPRET") == "1":
                logger.info("use_custom_all_reduce=on on CPU: the kernel runs interpreted over shared memory (tests)")
                return "custom"
            if mode == "on":
                logger.info("use_custom_all_reduce=on has no effect on CPU: gloo all-reduce")
            return "gloo"
        if mode == "off":
            return "nccl"
        from kvflight.tune.topo import custom_allreduce_pays, physical_gpu_ids

        pays, reason = custom_allreduce_pays(physical_gpu_ids(self.world_size))
        if mode == "on" or pays:
            logger.info("custom all-reduce for small messages (%s; %s): NCCL for the rest",
                        "use_custom_all_reduce=on" if mode == "on" else "auto", reason)
            return "custom"
        logger.info("custom all-reduce does not pay here (%s): NCCL all-reduce", reason)
        return "nccl"

    # ---- start-up ------------------------------------------------------------------------------------------
    def _recv(self, index: int, kind: str, deadline: float) -> Any:
        conn, proc = self.conns[index], self.processes[index]
        while True:
            if conn.poll(0.05):
                try:
                    msg = conn.recv()
                except EOFError:
                    raise TensorParallelError(self.failure_message()) from None
                if msg[0] == "error":
                    self._errors[msg[1]] = msg[2]
                    raise TensorParallelError(self.failure_message())
                if msg[0] == kind:
                    return msg
                continue
            if not proc.is_alive():
                raise TensorParallelError(self.failure_message())
            if time.monotonic() > deadline:
                raise TensorParallelError(f"tensor-parallel rank {index + 1} sent no '{kind}' in "
                                          f"{tp_timeout_s():.0f} s (KVFLIGHT_TP_TIMEOUT_S)")

    def _wait_all(self, kind: str) -> list[Any]:
        deadline = time.monotonic() + tp_timeout_s()
        return [self._recv(i, kind, deadline) for i in range(len(self.conns))]

    def wait_loaded(self) -> None:
        """Every worker built its runner (a failed load comes back here, with its traceback, before the first forward
        that would otherwise wait in a collective for the missing rank)."""
        self._wait_all("loaded")

    def agree_num_blocks(self, num_blocks: int) -> int:
        """The minimum over the ranks of the KV blocks each planned (rank 0's is `num_blocks`)."""
        planned = [num_blocks] + [msg[1] for msg in self._wait_all("planned")]
        if len(set(planned)) > 1:
            logger.info("KV blocks planned per rank %s: using %d on every rank", planned, min(planned))
        return min(planned)

    def start_allocate(self, num_blocks: int, num_host_blocks: int) -> None:
        """Workers allocate their KV pools (and warm up / capture graphs, collectives included) while rank 0 does."""
        self._send(("allocate", num_blocks, num_host_blocks))

    def wait_ready(self) -> None:
        self._wait_all("ready")

    # ---- steps ---------------------------------------------------------------------------------------------
    def _send(self, msg: Any) -> None:
        for conn in self.conns:
            try:
                conn.send(msg)
            except (OSError, EOFError):
                raise TensorParallelError(self.failure_message()) from None

    def send_step(self, out: SchedulerOutput) -> None:
        """Check that every worker lives, then send it the step's diff (before rank 0's own forward)."""
        self.check_alive()
        self._send(("step", encode_step(out)))

    def check_alive(self) -> None:
        if self._closed:
            raise TensorParallelError("the tensor-parallel workers were shut down")
        for proc in self.processes:
            if not proc.is_alive():
                raise TensorParallelError(self.failure_message())

    def failure_message(self) -> str:
        """What went wrong with the workers: dead ranks with exit codes, and any traceback they sent."""
        for i, conn in enumerate(self.conns):
            try:
                while conn.poll(0):
                    msg = conn.recv()
                    if msg[0] == "error":
                        self._errors[msg[1]] = msg[2]
            except (OSError, EOFError):
                pass
            proc = self.processes[i]
            if not proc.is_alive() and i + 1 not in self._errors:
                proc.join(0.1)
        parts = []
        for i, proc in enumerate(self.processes):
            rank = i + 1
            if rank in self._errors:
                parts.append(f"rank {rank} (pid {proc.pid}) failed:\n{self._errors[rank].rstrip()}")
            elif not proc.is_alive():
                parts.append(f"rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}")
        if not parts:
            return "a tensor-parallel collective failed or timed out; every worker process is still alive"
        return "tensor-parallel worker failure, the engine stops: " + "; ".join(parts)

    # ---- shutdown ------------------------------------------------------------------------------------------
    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the workers (stop message, then terminate / kill what is left), leave the group, reset TP state."""
        if self._closed:
            return
        self._closed = True
        for conn in self.conns:
            try:
                conn.send(("stop",))
            except (OSError, EOFError):
                pass
        deadline = time.monotonic() + timeout_s
        for proc in self.processes:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.processes:
            if proc.is_alive():
                proc.terminate()
                proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
        for conn in self.conns:
            conn.close()
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a broken group cannot be left cleanly; the process state is reset anyway
            pass
        from kvflight.model.layers import set_tensor_parallel

        set_tensor_parallel(0, 1)
