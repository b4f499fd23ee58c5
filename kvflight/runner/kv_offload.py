"""KVOffloader owns the host tier's KV tensor and runs a step's block copies between it and the device KV cache.

The scheduler decides the copies (SchedulerOutput.kv_offloads [(gpu_block, host_block)] and kv_loads
[(host_block, gpu_block)]); apply() runs them before the step's forward: every offload first, then every load.
That order is what makes a GPU block that is evicted and reused as a load destination in the same step safe (its
old content is read before the load overwrites it), and a load whose host source was written by an offload of the
same step reads the new content.

Shapes: device cache per layer [2, num_blocks + 1, tokens_per_block, num_kv_heads, head_dim] (block dim 1; the last
block is the runner's scratch block and never copied). Host cache, one tensor block-major so that a host block is one
contiguous run of bytes (one DMA per block, no CPU copy): [num_host_blocks, num_layers, 2, tokens_per_block,
num_kv_heads, head_dim], pinned when the device cache is on CUDA; host_caches[layer] views it as
[2, num_host_blocks, tokens_per_block, num_kv_heads, head_dim], shaped like the device cache.

Every copy is enqueued on the current stream, without a host sync: offloads gather the blocks on the device into a
block-major staging tensor and copy it to the host blocks (one copy per run of consecutive host blocks); loads copy
host blocks into a device staging tensor and scatter it into each layer. The forward that follows on the same stream
sees the loads; later steps' copies are ordered after this one's.
"""

from __future__ import annotations

import torch


class KVOffloader:
    """Pinned host copies of KV blocks (the host tier) and the batched copies between them and the device cache."""

    def __init__(self, kv_caches: list[torch.Tensor], num_host_blocks: int) -> None:
        if not isinstance(num_host_blocks, int) or isinstance(num_host_blocks, bool) or num_host_blocks < 0:
            raise ValueError(f"KVOffloader num_host_blocks={num_host_blocks!r}: must be an integer >= 0 "
                             "(kv_host_cache_bytes // KV bytes per block)")
        if num_host_blocks and not kv_caches:
            raise ValueError("KVOffloader: num_host_blocks > 0 but kv_caches is empty; allocate the KV cache first")
        for i, kv in enumerate(kv_caches):
            if kv.dim() != 5 or kv.shape[0] != 2 or kv.shape != kv_caches[0].shape or kv.dtype != kv_caches[0].dtype:
                raise ValueError(f"KVOffloader: kv_caches[{i}] is {tuple(kv.shape)} {kv.dtype}; expected every layer "
                                 "[2, num_blocks + 1, tokens_per_block, num_kv_heads, head_dim] of one shape and dtype")
        self.kv_caches = kv_caches
        self.num_host_blocks = num_host_blocks
        self.num_device_blocks = kv_caches[0].shape[1] - 1 if kv_caches else 0  # without the scratch block
        self.device = kv_caches[0].device if kv_caches else torch.device("cpu")
        # [num_host_blocks, num_layers, 2, tokens_per_block, num_kv_heads, head_dim]
        self.host_cache: torch.Tensor | None = None
        self.host_caches: list[torch.Tensor] = []  # per layer: [2, num_host_blocks, tokens_per_block, heads, dim]
        if num_host_blocks:
            kv0 = kv_caches[0]
            self.host_cache = torch.empty((num_host_blocks, len(kv_caches), 2, *kv0.shape[2:]), dtype=kv0.dtype,
                                          device="cpu", pin_memory=self.device.type == "cuda")
            self.host_caches = [self.host_cache[:, layer].transpose(0, 1) for layer in range(len(kv_caches))]
        # counters (blocks copied, all layers together count once)
        self.num_offloaded_blocks = 0
        self.num_loaded_blocks = 0

    @property
    def host_bytes(self) -> int:
        t = self.host_cache
        return t.numel() * t.element_size() if t is not None else 0

    def _check(self, name: str, pairs: list[tuple[int, int]], src_limit: int, dst_limit: int,
               src_what: str, dst_what: str) -> None:
        srcs = [p[0] for p in pairs]
        dsts = [p[1] for p in pairs]
        if min(srcs) < 0 or max(srcs) >= src_limit or min(dsts) < 0 or max(dsts) >= dst_limit:
            raise ValueError(f"KVOffloader.apply: {name}={pairs} has an id outside {src_what} [0, {src_limit}) or "
                             f"{dst_what} [0, {dst_limit}); pass the scheduler's SchedulerOutput.{name} unchanged")
        if len(set(dsts)) != len(dsts):
            raise ValueError(f"KVOffloader.apply: {name}={pairs} writes one {dst_what} twice; destinations of one "
                             "step must be distinct (the scheduler guarantees it)")

    @torch.no_grad()
    def apply(self, offloads: list[tuple[int, int]], loads: list[tuple[int, int]]) -> None:
        """Copy offloads [(gpu_block, host_block)], then loads [(host_block, gpu_block)]; call before the forward."""
        if not offloads and not loads:
            return
        if not self.num_host_blocks:
            raise ValueError("KVOffloader.apply: got host-tier copies but num_host_blocks=0; size the host tier "
                             "with the engine's num_host_blocks (kv_host_cache_bytes // KV bytes per block)")
        if offloads:
            self._check("kv_offloads", offloads, self.num_device_blocks, self.num_host_blocks, "device blocks",
                        "host blocks")
            self._offload(offloads)
        if loads:
            self._check("kv_loads", loads, self.num_host_blocks, self.num_device_blocks, "host blocks",
                        "device blocks")
            self._load(loads)

    def _device_ids(self, block_ids: list[int]) -> torch.Tensor:
        """Block ids as an int64 device tensor, copied without a host sync (from pinned memory on CUDA)."""
        pinned = self.device.type == "cuda"
        return torch.tensor(block_ids, dtype=torch.int64, pin_memory=pinned).to(self.device, non_blocking=pinned)

    def _staging(self, num_blocks: int) -> torch.Tensor:
        """[num_blocks, num_layers, 2, tokens_per_block, num_kv_heads, head_dim] on the device."""
        host = self.host_cache
        assert host is not None
        return torch.empty((num_blocks, *host.shape[1:]), dtype=host.dtype, device=self.device)

    def _offload(self, offloads: list[tuple[int, int]]) -> None:
        host = self.host_cache
        assert host is not None
        src = self._device_ids([g for g, _ in offloads])
        staging = self._staging(len(offloads))
        for layer, kv in enumerate(self.kv_caches):
            staging[:, layer].copy_(kv.index_select(1, src).transpose(0, 1))  # [n, 2, tpb, heads, dim]
        for i, h, n in _runs([h for _, h in offloads]):
            host[h:h + n].copy_(staging[i:i + n], non_blocking=True)
        self.num_offloaded_blocks += len(offloads)

    def _load(self, loads: list[tuple[int, int]]) -> None:
        host = self.host_cache
        assert host is not None
        staging = self._staging(len(loads))
        for i, h, n in _runs([h for h, _ in loads]):
            staging[i:i + n].copy_(host[h:h + n], non_blocking=True)
        dst = self._device_ids([g for _, g in loads])
        for layer, kv in enumerate(self.kv_caches):
            kv.index_copy_(1, dst, staging[:, layer].transpose(0, 1))
        self.num_loaded_blocks += len(loads)


def _runs(host_blocks: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive host blocks: (index in the list, first host block, length)."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(host_blocks) + 1):
        if i == len(host_blocks) or host_blocks[i] != host_blocks[i - 1] + 1:
            runs.append((start, host_blocks[start], i - start))
            start = i
    return runs


__all__ = ["KVOffloader"]
