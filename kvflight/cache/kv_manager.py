"""KVCacheManager owns every request's block table: prefix matching, slot allocation, block registration, freeing.

With a host tier, a prefix lookup continues on the host after the GPU prefix index misses; allocate_slots copies those
host blocks back into fresh GPU blocks (loads) and take_transfers() hands the iteration's offloads and loads to the
scheduler for its SchedulerOutput.
"""

from __future__ import annotations

from typing import NamedTuple

from kvflight.cache import block_pool as _block_pool_module
from kvflight.cache.block_pool import BlockPool
from kvflight.types import Request


class PrefixMatch(NamedTuple):
    """A new request's cached prefix: GPU blocks for its first blocks, then host blocks for the next ones."""

    block_ids: list[int]  # GPU hits, blocks 0..len-1 of the prompt
    num_computed_tokens: int  # (len(block_ids) + len(host_block_ids)) * tokens_per_block
    host_block_ids: list[int] = []  # host-tier hits for the blocks that follow; loaded by allocate_slots


class _RequestBlocks:
    """One request's block table and how far its chain of full blocks is registered in the prefix index."""

    __slots__ = ("block_ids", "block_uids", "chain_broken")

    def __init__(self) -> None:
        self.block_ids: list[int] = []
        # uid of the index entry that holds the content of block k, for k < len(block_uids) (registered prefix)
        self.block_uids: list[int] = []
        self.chain_broken: bool = False  # a hash collision stopped registration; later blocks stay private


class KVCacheManager:
    """Maps requests to blocks of a BlockPool; with enable_caching, full blocks are shared by common prefixes."""

    def __init__(self, num_blocks: int, tokens_per_block: int, enable_caching: bool = True,
                 num_host_blocks: int = 0) -> None:
        """num_host_blocks > 0 adds a host tier (only with enable_caching: without reuse nothing is worth keeping)."""
        if not isinstance(tokens_per_block, int) or isinstance(tokens_per_block, bool) or tokens_per_block < 1:
            raise ValueError(f"KVCacheManager tokens_per_block={tokens_per_block!r}: must be an integer >= 1 "
                             "(e.g. 32)")
        self.enable_caching: bool = bool(enable_caching)
        self.pool = BlockPool(num_blocks, num_host_blocks if self.enable_caching else 0)
        self.num_blocks: int = num_blocks
        self.num_host_blocks: int = self.pool.host.num_blocks if self.pool.host is not None else 0
        self.tokens_per_block: int = tokens_per_block
        self._requests: dict[str, _RequestBlocks] = {}
        # per-request chained keys of full blocks: a pure function of the tokens, so kept until free()
        self._keys: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ sizes
    def num_blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold num_tokens tokens."""
        return -(-num_tokens // self.tokens_per_block)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return self.pool.num_used_blocks / self.num_blocks

    def get_block_ids(self, request_id: str) -> list[int]:
        """A copy of the request's block table ([] if it holds no blocks)."""
        blocks = self._requests.get(request_id)
        return list(blocks.block_ids) if blocks is not None else []

    def get_num_blocks(self, request_id: str) -> int:
        """Length of the request's block table (0 if it holds no blocks)."""
        blocks = self._requests.get(request_id)
        return len(blocks.block_ids) if blocks is not None else 0

    def num_free_among(self, block_ids: list[int]) -> int:
        """How many of block_ids are free: taking them (as prefix hits) costs that many free blocks."""
        return self.pool.num_free_among(block_ids)

    # ------------------------------------------------------------------ prefix cache
    def _block_keys(self, request: Request, num_full_blocks: int) -> list[int]:
        """Chained index keys of the request's first num_full_blocks full blocks (extended incrementally)."""
        keys = self._keys.get(request.request_id)
        if keys is None:
            keys = self._keys[request.request_id] = []
        if len(keys) < num_full_blocks:
            hash_fn = _block_pool_module.hash_block_tokens  # looked up per call: tests monkeypatch it
            tpb = self.tokens_per_block
            tokens = request.all_token_ids
            parent = keys[-1] if keys else None
            for k in range(len(keys), num_full_blocks):
                parent = hash_fn(parent, tuple(tokens[k * tpb:(k + 1) * tpb]))
                keys.append(parent)
        return keys

    def get_computed_blocks(self, request: Request) -> PrefixMatch:
        """Longest cached prefix of full blocks of request.all_token_ids, leaving at least one token to compute.

        Returns PrefixMatch(block_ids, num_computed_tokens, host_block_ids): GPU hits first; where the GPU index
        misses, the walk goes on in the host tier (host hits only from there on). Takes no references and changes
        no LRU order (allocate_slots does). ([], 0, []) when caching is off.
        """
        if not self.enable_caching:
            return PrefixMatch([], 0, [])
        tpb = self.tokens_per_block
        max_blocks = (request.num_tokens - 1) // tpb  # a fully cached prompt drops its last block
        if max_blocks <= 0:
            return PrefixMatch([], 0, [])
        keys = self._block_keys(request, max_blocks)
        pool = self.pool
        tokens = request.all_token_ids
        hits: list[int] = []
        parent_uid: int | None = None
        k = 0
        while k < max_blocks:
            block_id = pool.lookup(keys[k], tuple(tokens[k * tpb:(k + 1) * tpb]), parent_uid)
            if block_id is None:
                break
            hits.append(block_id)
            parent_uid = pool.block_uid(block_id)
            k += 1
        host_hits: list[int] = []
        host = pool.host
        if host is not None:
            while k < max_blocks:
                host_block = host.lookup(keys[k], tuple(tokens[k * tpb:(k + 1) * tpb]), parent_uid)
                if host_block is None:
                    break
                host_hits.append(host_block)
                parent_uid = host.uid(host_block)
                k += 1
        return PrefixMatch(hits, k * tpb, host_hits)

    # ------------------------------------------------------------------ allocation
    def allocate_slots(self, request: Request, num_new_tokens: int, new_computed_blocks: list[int] | None = None,
                       new_host_blocks: list[int] | None = None) -> list[int] | None:
        """Grow the request's table to cover its computed tokens plus num_new_tokens; return the new block ids.

        The covered length is max(request.num_computed_tokens, (len(new_computed_blocks) + len(new_host_blocks))
        * tokens_per_block) + num_new_tokens, so a new request's prefix hits count whether or not the caller has
        already set num_computed_tokens. new_computed_blocks and new_host_blocks (a PrefixMatch's block_ids and
        host_block_ids, from get_computed_blocks in this same iteration) are only for a request without blocks:
        the GPU hits get a reference each, the host hits get the first new blocks and a load each (the returned
        list starts with those load destinations). Returns None, changing nothing, if the free blocks do not
        suffice.
        """
        if num_new_tokens < 0:
            raise ValueError(f"allocate_slots: num_new_tokens={num_new_tokens} must be >= 0")
        blocks = self._requests.get(request.request_id)
        num_table_blocks = len(blocks.block_ids) if blocks is not None else 0
        if not new_computed_blocks and not new_host_blocks:
            # fast path (every decode step): usually nothing to allocate
            num_needed = -(-(request.num_computed_tokens + num_new_tokens) // self.tokens_per_block) \
                - num_table_blocks
            if num_needed <= 0:
                if blocks is None:
                    self._new_request_blocks(request, [])
                return []
            if num_needed > self.pool.num_free_blocks:
                return None
            if blocks is None:
                blocks = self._new_request_blocks(request, [])
            new_blocks = self.pool.allocate(num_needed)
            blocks.block_ids.extend(new_blocks)
            return new_blocks

        if num_table_blocks:
            raise ValueError(f"allocate_slots: request {request.request_id!r} already holds {num_table_blocks} "
                             "blocks; new_computed_blocks / new_host_blocks are only for a request being admitted "
                             "without blocks")
        new_computed_blocks = new_computed_blocks or []
        new_host_blocks = new_host_blocks or []
        pool = self.pool
        host = pool.host
        if new_host_blocks and host is None:
            raise ValueError("allocate_slots: new_host_blocks given but this KVCacheManager has no host tier "
                             "(num_host_blocks=0); pass the host_block_ids get_computed_blocks returned")
        num_prefix_blocks = len(new_computed_blocks) + len(new_host_blocks)
        num_covered_tokens = max(request.num_computed_tokens, num_prefix_blocks * self.tokens_per_block) \
            + num_new_tokens
        num_needed = max(len(new_host_blocks),
                         self.num_blocks_needed(num_covered_tokens) - len(new_computed_blocks))
        if num_needed + pool.num_free_among(new_computed_blocks) > pool.num_free_blocks:
            return None
        blocks = self._new_request_blocks(request, new_computed_blocks, len(new_host_blocks))
        pool.touch(new_computed_blocks)  # before allocate(): touched blocks must not be evicted by it
        for host_block in new_host_blocks:  # before allocate(): its offloads must not overwrite a load's source
            host.lock(host_block)  # type: ignore[union-attr]
        new_blocks = pool.allocate(num_needed)
        for host_block, block_id in zip(new_host_blocks, new_blocks):
            blocks.block_uids.append(pool.register_loaded(block_id, host_block))
        blocks.block_ids.extend(new_blocks)
        return new_blocks

    def _new_request_blocks(self, request: Request, computed_blocks: list[int],
                            num_host_hit_blocks: int = 0) -> _RequestBlocks:
        """Start the request's table with its GPU prefix hits and count its lookup outcome."""
        blocks = _RequestBlocks()
        pool = self.pool
        for block_id in computed_blocks:
            uid = pool.block_uid(block_id)
            if uid is None:
                raise ValueError(f"allocate_slots: computed block {block_id} is not in the prefix index; pass the "
                                 "block ids get_computed_blocks returned in this same step")
            blocks.block_uids.append(uid)
        blocks.block_ids.extend(computed_blocks)
        self._requests[request.request_id] = blocks
        num_reused = len(computed_blocks) + num_host_hit_blocks
        num_missed = max(0, self.num_blocks_needed(request.num_tokens) - num_reused)
        pool.record_lookup(num_reused, num_missed, num_host_hit_blocks)
        return blocks

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the request's blocks fully covered by num_computed_tokens in the prefix index (incremental)."""
        if not self.enable_caching:
            return
        blocks = self._requests.get(request.request_id)
        if blocks is None or blocks.chain_broken:
            return
        tpb = self.tokens_per_block
        num_full = min(num_computed_tokens, request.num_tokens, len(blocks.block_ids) * tpb) // tpb
        uids = blocks.block_uids
        if num_full <= len(uids):
            return
        keys = self._block_keys(request, num_full)
        tokens = request.all_token_ids
        pool = self.pool
        block_ids = blocks.block_ids
        for k in range(len(uids), num_full):
            uid = pool.register(block_ids[k], keys[k], tuple(tokens[k * tpb:(k + 1) * tpb]),
                                uids[k - 1] if k else None)
            if uid is None:  # hash collision with other content: this chain is not shareable from here on
                blocks.chain_broken = True
                return
            uids.append(uid)

    def free(self, request: Request) -> None:
        """Release the request's blocks (tail first, so its last blocks are evicted first) and forget it."""
        self._keys.pop(request.request_id, None)
        blocks = self._requests.pop(request.request_id, None)
        if blocks is not None:
            self.pool.free(reversed(blocks.block_ids))

    def take_transfers(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The iteration's host-tier copies: (offloads [(gpu_block, host_block)], loads [(host_block, gpu_block)]).

        Call once per iteration after the last allocation (the scheduler does, at the end of schedule()); the runner
        must execute every offload, then every load, before the forward.
        """
        return self.pool.take_transfers()

    def reset_prefix_cache(self) -> None:
        """Drop every prefix-index entry (e.g. after weights change). Running requests keep their blocks."""
        self.pool.reset_prefix_cache()
        for blocks in self._requests.values():
            blocks.chain_broken = True  # their uids are gone; never register under them again

    # ------------------------------------------------------------------ stats / checks
    def stats(self) -> dict[str, int | float]:
        """Sizes and monotonic counters. reused_blocks counts GPU and host-tier hits; host_hit_blocks the latter."""
        pool = self.pool
        host = pool.host
        looked_up = pool.num_reused_blocks + pool.num_missed_blocks
        return {
            "max_num_blocks": self.num_blocks,
            "free_num_blocks": pool.num_free_blocks,
            "used_num_blocks": pool.num_used_blocks,
            "tokens_per_block": self.tokens_per_block,
            "cached_blocks": pool.num_cached_blocks,
            "alloc_total_blocks": pool.num_allocated_blocks,
            "reused_blocks": pool.num_reused_blocks,
            "missed_blocks": pool.num_missed_blocks,
            "evicted_blocks": pool.num_evicted_blocks,
            "cache_hit_rate": pool.num_reused_blocks / looked_up if looked_up else 0.0,
            "host_hit_blocks": pool.num_host_hit_blocks,
            "host_max_num_blocks": self.num_host_blocks,
            "host_cached_blocks": host.num_cached_blocks if host is not None else 0,
            "offloaded_blocks": host.num_stored_blocks if host is not None else 0,
            "host_evicted_blocks": host.num_evicted_blocks if host is not None else 0,
            "host_dropped_blocks": host.num_dropped_blocks if host is not None else 0,
        }

    def check_integrity(self) -> None:
        """Raise AssertionError if the pool or a block table is inconsistent. O(num_blocks + table sizes)."""
        self.pool.check_integrity()
        refs: dict[int, int] = {}
        for request_id, blocks in self._requests.items():
            if len(set(blocks.block_ids)) != len(blocks.block_ids):
                raise AssertionError(f"KVCacheManager integrity: request {request_id!r} has a repeated block id")
            if len(blocks.block_uids) > len(blocks.block_ids):
                raise AssertionError(f"KVCacheManager integrity: request {request_id!r} registered more blocks "
                                     "than it holds")
            for block_id in blocks.block_ids:
                refs[block_id] = refs.get(block_id, 0) + 1
        for block_id in range(self.num_blocks):
            if self.pool.ref_count(block_id) != refs.get(block_id, 0):
                raise AssertionError(f"KVCacheManager integrity: block {block_id} has ref count "
                                     f"{self.pool.ref_count(block_id)} but {refs.get(block_id, 0)} tables hold it")
