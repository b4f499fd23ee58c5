"""KVCacheManager owns every request's block table: prefix matching, slot allocation, block registration, freeing."""

from __future__ import annotations

from kvflight.cache import block_pool as _block_pool_module
from kvflight.cache.block_pool import BlockPool
from kvflight.types import Request


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

    def __init__(self, num_blocks: int, tokens_per_block: int, enable_caching: bool = True) -> None:
        if not isinstance(tokens_per_block, int) or isinstance(tokens_per_block, bool) or tokens_per_block < 1:
            raise ValueError(f"KVCacheManager tokens_per_block={tokens_per_block!r}: must be an integer >= 1 "
                             "(e.g. 32)")
        self.pool = BlockPool(num_blocks)
        self.num_blocks: int = num_blocks
        self.tokens_per_block: int = tokens_per_block
        self.enable_caching: bool = bool(enable_caching)
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

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest cached prefix of full blocks of request.all_token_ids, leaving at least one token to compute.

        Returns (block_ids, num_computed_tokens); takes no references (allocate_slots does). ([], 0) when caching
        is off.
        """
        if not self.enable_caching:
            return [], 0
        tpb = self.tokens_per_block
        max_blocks = (request.num_tokens - 1) // tpb  # a fully cached prompt drops its last block
        if max_blocks <= 0:
            return [], 0
        keys = self._block_keys(request, max_blocks)
        pool = self.pool
        tokens = request.all_token_ids
        hits: list[int] = []
        parent_uid: int | None = None
        for k in range(max_blocks):
            block_id = pool.lookup(keys[k], tuple(tokens[k * tpb:(k + 1) * tpb]), parent_uid)
            if block_id is None:
                break
            hits.append(block_id)
            parent_uid = pool.block_uid(block_id)
        return hits, len(hits) * tpb

    # ------------------------------------------------------------------ allocation
    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[int] | None = None) -> list[int] | None:
        """Grow the request's table to cover its computed tokens plus num_new_tokens; return the new block ids.

        The covered length is max(request.num_computed_tokens, len(new_computed_blocks) * tokens_per_block)
        + num_new_tokens, so a new request's prefix hits count whether or not the caller has already set
        num_computed_tokens. new_computed_blocks (from get_computed_blocks) is only for a request without blocks;
        they get a reference each. Returns None, changing nothing, if the free blocks do not suffice.
        """
        if num_new_tokens < 0:
            raise ValueError(f"allocate_slots: num_new_tokens={num_new_tokens} must be >= 0")
        blocks = self._requests.get(request.request_id)
        num_table_blocks = len(blocks.block_ids) if blocks is not None else 0
        if not new_computed_blocks:
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
                             "blocks; new_computed_blocks is only for a request being admitted without blocks")
        num_prefix_blocks = len(new_computed_blocks)
        num_covered_tokens = max(request.num_computed_tokens, num_prefix_blocks * self.tokens_per_block) \
            + num_new_tokens
        num_needed = max(0, self.num_blocks_needed(num_covered_tokens) - num_prefix_blocks)
        pool = self.pool
        if num_needed + pool.num_free_among(new_computed_blocks) > pool.num_free_blocks:
            return None
        pool.touch(new_computed_blocks)  # before allocate(): touched blocks must not be evicted by it
        blocks = self._new_request_blocks(request, new_computed_blocks)
        new_blocks = pool.allocate(num_needed)
        blocks.block_ids.extend(new_blocks)
        return new_blocks

    def _new_request_blocks(self, request: Request, computed_blocks: list[int]) -> _RequestBlocks:
        blocks = _RequestBlocks()
        blocks.block_ids.extend(computed_blocks)
        pool = self.pool
        for block_id in computed_blocks:
            uid = pool.block_uid(block_id)
            if uid is None:
                raise ValueError(f"allocate_slots: computed block {block_id} is not in the prefix index; pass the "
                                 "block ids get_computed_blocks returned in this same step")
            blocks.block_uids.append(uid)
        self._requests[request.request_id] = blocks
        num_missed = max(0, self.num_blocks_needed(request.num_tokens) - len(computed_blocks))
        pool.record_lookup(len(computed_blocks), num_missed)
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

    def reset_prefix_cache(self) -> None:
        """Drop every prefix-index entry (e.g. after weights change). Running requests keep their blocks."""
        self.pool.reset_prefix_cache()
        for blocks in self._requests.values():
            blocks.chain_broken = True  # their uids are gone; never register under them again

    # ------------------------------------------------------------------ stats / checks
    def stats(self) -> dict[str, int | float]:
        pool = self.pool
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
