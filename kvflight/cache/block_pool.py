"""BlockPool owns the KV cache's block ids: ref counts, the LRU free list and the prefix index of full blocks.

Blocks are ids 0..num_blocks-1; the pool never sees tensors. A block is either in use (ref count > 0) or free
(ref count 0, in the free list exactly once). The free list is kept in LRU order: freed blocks go to the tail,
allocation takes from the head. A free block that is still registered in the prefix index can be reused (touched)
until it reaches the head and is handed out for a new allocation; only then is it evicted from the index.

Prefix index. A full block is registered under a chained key `hash_block_tokens(parent_key, token_ids)`. The key is
only a hint: every entry also stores its token ids and the unique registration id (uid) of its parent entry, and a
lookup must match both. So a hash collision (two contents under one key) never gives a false hit, even across
evictions: children registered under an evicted parent keep the dead parent's uid, which no live entry ever has again.

Host tier (num_host_blocks > 0). A registered block evicted by allocate() first moves its entry, uid included, to the
HostTier and records an offload (gpu_block, host_block); load() puts a host entry back into a freshly allocated GPU
block under the same uid and records a load (host_block, gpu_block). take_transfers() hands the iteration's copies to
the scheduler (which puts them in the SchedulerOutput); the runner runs every offload before any load, before the
forward. That order makes a GPU block evicted and reused as a load destination in one iteration safe, and the host
tier's locks keep a host block from being both a load source and an offload destination in one iteration.
A content registered on the GPU that the host already holds takes the host entry's uid, so one content has one uid.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from kvflight.cache.host_tier import HostTier


def hash_block_tokens(parent_key: int | None, token_ids: tuple[int, ...]) -> int:
    """Chained prefix-index key of one full block: depends on the whole prefix through parent_key.

    Module-level so that tests can monkeypatch it to force collisions; KVCacheManager looks it up at call time.
    """
    return hash((parent_key, token_ids))


class BlockPool:
    """Ref-counted block ids with an LRU free list and a collision-safe prefix index."""

    def __init__(self, num_blocks: int, num_host_blocks: int = 0) -> None:
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 1:
            raise ValueError(f"BlockPool num_blocks={num_blocks!r}: must be an integer >= 1; give the KV cache "
                             "more memory (kv_cache_bytes / kv_cache_free_gpu_memory_fraction) or smaller blocks")
        if not isinstance(num_host_blocks, int) or isinstance(num_host_blocks, bool) or num_host_blocks < 0:
            raise ValueError(f"BlockPool num_host_blocks={num_host_blocks!r}: must be an integer >= 0 "
                             "(kv_host_cache_bytes // KV bytes per block; 0: no host tier)")
        self.num_blocks: int = num_blocks
        self.host: HostTier | None = HostTier(num_host_blocks) if num_host_blocks else None
        # copies of the iteration being scheduled, in the order they were decided
        self._offloads: list[tuple[int, int]] = []  # (gpu_block, host_block)
        self._loads: list[tuple[int, int]] = []  # (host_block, gpu_block)
        self._ref_counts: list[int] = [0] * num_blocks
        # OrderedDict as an O(1) doubly linked list: head = next to allocate (least recently freed).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        # prefix index: key -> block id, plus per-block registration data (None: not registered)
        self._index: dict[int, int] = {}
        self._block_key: list[int | None] = [None] * num_blocks
        self._block_token_ids: list[tuple[int, ...] | None] = [None] * num_blocks
        self._block_parent_uid: list[int | None] = [None] * num_blocks
        self._block_uid: list[int | None] = [None] * num_blocks
        self._next_uid: int = 0
        # counters (monotonic, for iteration stats)
        self.num_reused_blocks: int = 0  # blocks found in the prefix index by admitted requests
        self.num_missed_blocks: int = 0  # blocks admitted requests had to compute
        self.num_host_hit_blocks: int = 0  # of num_reused_blocks, those loaded from the host tier
        self.num_evicted_blocks: int = 0  # registered blocks dropped from the index to be reallocated
        self.num_allocated_blocks: int = 0  # blocks handed out by allocate()

    # ------------------------------------------------------------------ sizes
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix index (in use or free)."""
        return len(self._index)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def num_free_among(self, block_ids: Iterable[int]) -> int:
        """How many of block_ids are free (touching them would take them out of the free list)."""
        refs = self._ref_counts
        return sum(1 for b in block_ids if refs[b] == 0)

    def free_block_ids(self) -> list[int]:
        """The free list, head (next to allocate) first. O(num_free_blocks): for tests and debugging."""
        return list(self._free)

    # ------------------------------------------------------------------ ref counting
    def allocate(self, num_blocks: int) -> list[int]:
        """Take num_blocks blocks from the head of the free list (ref count 1), evicting them from the index."""
        free = self._free
        if num_blocks > len(free):
            raise ValueError(f"BlockPool.allocate: num_blocks={num_blocks} but only {len(free)} blocks are free; "
                             "check num_free_blocks first (or preempt / wait for requests to finish)")
        refs = self._ref_counts
        block_uid = self._block_uid
        out: list[int] = []
        for _ in range(num_blocks):
            block_id, _unused = free.popitem(last=False)
            if block_uid[block_id] is not None:
                self._evict(block_id)
            refs[block_id] = 1
            out.append(block_id)
        self.num_allocated_blocks += num_blocks
        return out

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take one more reference on each block; a free block leaves the free list (its cached K/V is kept)."""
        refs = self._ref_counts
        free = self._free
        for block_id in block_ids:
            if refs[block_id] == 0:
                del free[block_id]
            refs[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference on each block, in the given order; blocks reaching 0 go to the free list's tail.

        Pass a request's table in reverse so that its tail blocks (least likely to be shared) are evicted first.
        """
        refs = self._ref_counts
        free = self._free
        for block_id in block_ids:
            ref = refs[block_id]
            if ref <= 0:
                raise ValueError(f"BlockPool.free: block {block_id} has ref count {ref}; it is freed twice "
                                 "(a request's blocks must be freed exactly once)")
            ref -= 1
            refs[block_id] = ref
            if ref == 0:
                free[block_id] = None

    # ------------------------------------------------------------------ prefix index
    def block_uid(self, block_id: int) -> int | None:
        """Registration id of the block's index entry, or None if it is not registered."""
        return self._block_uid[block_id]

    def lookup(self, key: int, token_ids: tuple[int, ...], parent_uid: int | None) -> int | None:
        """The registered block holding token_ids after the prefix whose entry has parent_uid, or None.

        parent_uid is None for the first block of a sequence. A key hit whose token ids or parent differ is a
        hash collision and counts as a miss.
        """
        block_id = self._index.get(key)
        if block_id is None:
            return None
        if self._block_parent_uid[block_id] != parent_uid or self._block_token_ids[block_id] != token_ids:
            return None
        return block_id

    def register(self, block_id: int, key: int, token_ids: tuple[int, ...], parent_uid: int | None) -> int | None:
        """Register a full, in-use block under key; returns the uid its content is now known by.

        If the same content (token ids and parent) is already registered under key, block_id stays unregistered
        and the existing entry's uid is returned (a duplicate computation). If key holds different content
        (a hash collision), nothing is registered and None is returned: the caller must stop its chain there.
        """
        if self._ref_counts[block_id] <= 0:
            raise ValueError(f"BlockPool.register: block {block_id} is free; only blocks a request holds "
                             "(ref count > 0) can be registered")
        existing = self._index.get(key)
        if existing is not None:
            if self._block_parent_uid[existing] == parent_uid and self._block_token_ids[existing] == token_ids:
                return self._block_uid[existing]
            return None
        if self._block_uid[block_id] is not None:
            raise ValueError(f"BlockPool.register: block {block_id} is already registered under another key; "
                             "a block's content is registered once")
        host_block = self.host.lookup(key, token_ids, parent_uid) if self.host is not None else None
        if host_block is not None:  # the host tier knows this content: one content, one uid
            uid = self.host.uid(host_block)  # type: ignore[union-attr]
        else:
            uid = self._next_uid
            self._next_uid += 1
        self._index[key] = block_id
        self._block_key[block_id] = key
        self._block_token_ids[block_id] = token_ids
        self._block_parent_uid[block_id] = parent_uid
        self._block_uid[block_id] = uid
        return uid

    def register_loaded(self, block_id: int, host_block: int) -> int:
        """Give a freshly allocated block the content of a locked host block; return that content's uid.

        Records the load (host_block, block_id) for take_transfers(). The block is registered in the prefix index
        under the host entry's key and uid, unless the key already holds other content on the GPU (a collision),
        in which case it stays private; either way the returned uid names its content for the block's children.
        """
        host = self.host
        if host is None:
            raise ValueError("BlockPool.register_loaded: this pool has no host tier (num_host_blocks=0)")
        if self._ref_counts[block_id] != 1 or self._block_uid[block_id] is not None:
            raise ValueError(f"BlockPool.register_loaded: block {block_id} has ref count "
                             f"{self._ref_counts[block_id]} and uid {self._block_uid[block_id]}; a load's destination "
                             "must be a block just allocated (ref count 1, unregistered)")
        key, token_ids, parent_uid, uid = host.entry(host_block)
        host.hit(host_block)
        if key not in self._index:
            self._index[key] = block_id
            self._block_key[block_id] = key
            self._block_token_ids[block_id] = token_ids
            self._block_parent_uid[block_id] = parent_uid
            self._block_uid[block_id] = uid
        self._loads.append((host_block, block_id))
        return uid

    def take_transfers(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The iteration's copies, (offloads [(gpu_block, host_block)], loads [(host_block, gpu_block)]); clears them
        and unlocks the host tier. The runner must run all offloads, then all loads, before the forward."""
        offloads, loads = self._offloads, self._loads
        self._offloads, self._loads = [], []
        if self.host is not None:
            self.host.unlock_all()
        return offloads, loads

    def record_lookup(self, num_reused_blocks: int, num_missed_blocks: int, num_host_hit_blocks: int = 0) -> None:
        """Count an admitted request's prefix-index outcome (called once per admission, not per lookup).

        num_reused_blocks includes the num_host_hit_blocks loaded from the host tier.
        """
        self.num_reused_blocks += num_reused_blocks
        self.num_missed_blocks += num_missed_blocks
        self.num_host_hit_blocks += num_host_hit_blocks

    def reset_prefix_cache(self) -> None:
        """Forget every index entry, the host tier's too (blocks keep their ref counts; in-use blocks are simply no
        longer shared)."""
        for block_id in self._index.values():
            self._clear_registration(block_id)
        self._index.clear()
        if self.host is not None:
            self.host.reset()

    def _evict(self, block_id: int) -> None:
        key = self._block_key[block_id]
        if self._index.get(key) == block_id:  # type: ignore[arg-type]
            del self._index[key]  # type: ignore[arg-type]
        if self.host is not None:
            # the content keeps its uid on the host; the runner copies the block before anything overwrites it
            token_ids, parent_uid, uid = (self._block_token_ids[block_id], self._block_parent_uid[block_id],
                                          self._block_uid[block_id])
            host_block = self.host.store(key, token_ids, parent_uid, uid)  # type: ignore[arg-type]
            if host_block is not None:
                self._offloads.append((block_id, host_block))
        self._clear_registration(block_id)
        self.num_evicted_blocks += 1

    def _clear_registration(self, block_id: int) -> None:
        self._block_key[block_id] = None
        self._block_token_ids[block_id] = None
        self._block_parent_uid[block_id] = None
        self._block_uid[block_id] = None

    # ------------------------------------------------------------------ checks
    def check_integrity(self) -> None:
        """Raise AssertionError if any invariant is broken. O(num_blocks): for tests and debug runs."""
        def fail(msg: str) -> None:
            raise AssertionError(f"BlockPool integrity: {msg}")

        if len(self._free) > self.num_blocks:
            fail(f"free list has {len(self._free)} entries for {self.num_blocks} blocks")
        for block_id in self._free:
            if not 0 <= block_id < self.num_blocks:
                fail(f"free list holds unknown block id {block_id}")
        for block_id, ref in enumerate(self._ref_counts):
            if ref < 0:
                fail(f"block {block_id} has negative ref count {ref}")
            in_free = block_id in self._free
            if ref == 0 and not in_free:
                fail(f"block {block_id} has ref count 0 but is not in the free list (leaked)")
            if ref > 0 and in_free:
                fail(f"block {block_id} has ref count {ref} but is in the free list")
            uid = self._block_uid[block_id]
            if uid is not None:
                key = self._block_key[block_id]
                if key is None or self._index.get(key) != block_id:
                    fail(f"block {block_id} is marked registered (uid {uid}) but the index does not point to it")
                if self._block_token_ids[block_id] is None:
                    fail(f"registered block {block_id} has no stored token ids")
        for key, block_id in self._index.items():
            if self._block_key[block_id] != key or self._block_uid[block_id] is None:
                fail(f"index key {key} points to block {block_id} whose stored key is {self._block_key[block_id]}")
        if self._next_uid < len(self._index):
            fail("fewer uids issued than index entries")
        for host_block, block_id in self._loads:
            if self._ref_counts[block_id] <= 0:
                fail(f"block {block_id} is free but is the destination of a pending load from host block "
                     f"{host_block}")
        if self.host is not None:
            self.host.check_integrity()


__all__ = ["BlockPool", "hash_block_tokens"]
