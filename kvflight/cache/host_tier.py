"""HostTier owns the host-memory copies of KV blocks evicted from the GPU: host block ids, LRU order, prefix entries.

Pure bookkeeping like BlockPool: host blocks are ids 0..num_blocks-1 of the pinned host buffers the runner owns
(kvflight/runner/kv_offload.py); copies are instructions the scheduler hands to the runner. A host block holds at
most one block's content, registered with the same data as the GPU prefix index: chained key, token ids, parent uid
and uid. The uid travels with the content between tiers (a block offloaded and loaded back keeps its uid), so
parent-uid chains stay valid whichever tier holds each block, and a lookup matches key, tokens and parent uid, so a
hash collision never gives a false hit.

LRU: every host block sits in one ordered dict, head = least recently used (empty blocks start at the head).
Storing a block or hitting it moves it to the tail. A host block that is the destination of an offload or the
source of a load in the iteration being scheduled is locked: it is neither evicted nor overwritten until the
scheduler hands the iteration's copies to the runner (unlock_all); if every host block is locked, an offload is
dropped (the GPU content is simply lost, as without a host tier).
"""

from __future__ import annotations

from collections import OrderedDict


class HostTier:
    """LRU set of host blocks, each caching one evicted GPU block's content under its prefix-index entry."""

    def __init__(self, num_blocks: int) -> None:
        if not isinstance(num_blocks, int) or isinstance(num_blocks, bool) or num_blocks < 1:
            raise ValueError(f"HostTier num_blocks={num_blocks!r}: must be an integer >= 1; raise "
                             "kv_host_cache_bytes to at least one KV block (or set it to 0 for no host tier)")
        self.num_blocks: int = num_blocks
        self._lru: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # head = least recently used
        self._index: dict[int, int] = {}  # key -> host block
        self._uid_block: dict[int, int] = {}  # uid -> host block
        self._key: list[int | None] = [None] * num_blocks
        self._token_ids: list[tuple[int, ...] | None] = [None] * num_blocks
        self._parent_uid: list[int | None] = [None] * num_blocks
        self._uid: list[int | None] = [None] * num_blocks
        self._locked: set[int] = set()
        # counters (monotonic)
        self.num_stored_blocks: int = 0  # offloads: GPU blocks copied here
        self.num_hit_blocks: int = 0  # loads: host blocks copied back instead of recomputed
        self.num_evicted_blocks: int = 0  # host entries dropped (LRU) to make room
        self.num_dropped_blocks: int = 0  # offloads skipped because every host block was locked

    # ------------------------------------------------------------------ sizes / reads
    @property
    def num_cached_blocks(self) -> int:
        return len(self._index)

    def lru_block_ids(self) -> list[int]:
        """Host blocks, least recently used first. O(num_blocks): for tests and debugging."""
        return list(self._lru)

    def is_locked(self, host_block: int) -> bool:
        return host_block in self._locked

    def uid(self, host_block: int) -> int | None:
        """uid of the content the host block holds, or None if it is empty."""
        return self._uid[host_block]

    def entry(self, host_block: int) -> tuple[int, tuple[int, ...], int | None, int]:
        """(key, token_ids, parent_uid, uid) of a cached host block."""
        uid = self._uid[host_block]
        if uid is None:
            raise ValueError(f"HostTier.entry: host block {host_block} is empty; pass a host block a lookup "
                             "returned in this same iteration")
        key, token_ids = self._key[host_block], self._token_ids[host_block]
        return key, token_ids, self._parent_uid[host_block], uid  # type: ignore[return-value]

    def lookup(self, key: int, token_ids: tuple[int, ...], parent_uid: int | None) -> int | None:
        """The host block holding token_ids after the prefix whose entry has parent_uid, or None (no LRU change)."""
        host_block = self._index.get(key)
        if host_block is None:
            return None
        if self._parent_uid[host_block] != parent_uid or self._token_ids[host_block] != token_ids:
            return None
        return host_block

    # ------------------------------------------------------------------ writes
    def store(self, key: int, token_ids: tuple[int, ...], parent_uid: int | None, uid: int) -> int | None:
        """Take an evicted GPU block's content; return the host block to copy it into, or None for no copy.

        No copy when the content (same uid) is already here (it becomes most recently used), or when every
        candidate host block is locked this iteration (the content is dropped). Otherwise the destination is the
        entry under the same key if one holds other content (replaced), else the least recently used unlocked
        block (its content, if any, is evicted); it is locked until unlock_all().
        """
        existing = self._uid_block.get(uid)
        if existing is not None:
            self._lru.move_to_end(existing)
            return None
        host_block = self._index.get(key)
        if host_block is not None:  # other content under this key (a recompute or a collision): replace it
            if host_block in self._locked:
                self.num_dropped_blocks += 1
                return None
        else:
            host_block = next((b for b in self._lru if b not in self._locked), None)
            if host_block is None:
                self.num_dropped_blocks += 1
                return None
        if self._uid[host_block] is not None:
            self._clear(host_block)
            self.num_evicted_blocks += 1
        self._index[key] = host_block
        self._uid_block[uid] = host_block
        self._key[host_block] = key
        self._token_ids[host_block] = token_ids
        self._parent_uid[host_block] = parent_uid
        self._uid[host_block] = uid
        self._lru.move_to_end(host_block)
        self._locked.add(host_block)
        self.num_stored_blocks += 1
        return host_block

    def lock(self, host_block: int) -> None:
        """Keep a cached host block (a load's source) from being evicted or overwritten until unlock_all()."""
        if self._uid[host_block] is None:
            raise ValueError(f"HostTier.lock: host block {host_block} is empty; only cached host blocks can be "
                             "loaded (pass host blocks a lookup returned in this same iteration)")
        self._locked.add(host_block)

    def hit(self, host_block: int) -> None:
        """A load of this (locked) host block was committed: count it and make it most recently used.

        The host copy stays (inclusive tier): if the GPU evicts the block again, no copy is needed.
        """
        if host_block not in self._locked:
            raise ValueError(f"HostTier.hit: host block {host_block} is not locked; lock() it before allocating "
                             "GPU blocks so that their offloads cannot evict it")
        self._lru.move_to_end(host_block)
        self.num_hit_blocks += 1

    def unlock_all(self) -> None:
        """The iteration's copies were handed to the runner: every host block may be reused again."""
        self._locked.clear()

    def reset(self) -> None:
        """Forget every entry (e.g. after weights change); locked blocks stay locked for this iteration."""
        for host_block in list(self._index.values()):
            self._clear(host_block)
            self._lru.move_to_end(host_block, last=False)

    def _clear(self, host_block: int) -> None:
        key = self._key[host_block]
        if self._index.get(key) == host_block:  # type: ignore[arg-type]
            del self._index[key]  # type: ignore[arg-type]
        uid = self._uid[host_block]
        if self._uid_block.get(uid) == host_block:  # type: ignore[arg-type]
            del self._uid_block[uid]  # type: ignore[arg-type]
        self._key[host_block] = None
        self._token_ids[host_block] = None
        self._parent_uid[host_block] = None
        self._uid[host_block] = None

    # ------------------------------------------------------------------ checks
    def check_integrity(self) -> None:
        """Raise AssertionError if any invariant is broken. O(num_blocks): for tests and debug runs."""
        def fail(msg: str) -> None:
            raise AssertionError(f"HostTier integrity: {msg}")

        if sorted(self._lru) != list(range(self.num_blocks)):
            fail("the LRU order does not hold every host block exactly once")
        for host_block in self._locked:
            if not 0 <= host_block < self.num_blocks:
                fail(f"unknown host block {host_block} is locked")
        for host_block in range(self.num_blocks):
            uid = self._uid[host_block]
            if uid is None:
                if self._key[host_block] is not None or self._token_ids[host_block] is not None:
                    fail(f"empty host block {host_block} keeps a key or token ids")
                continue
            if self._index.get(self._key[host_block]) != host_block:  # type: ignore[arg-type]
                fail(f"host block {host_block} holds uid {uid} but the index does not point to it")
            if self._uid_block.get(uid) != host_block:
                fail(f"host block {host_block} holds uid {uid} but the uid map does not point to it")
            if self._token_ids[host_block] is None:
                fail(f"cached host block {host_block} has no stored token ids")
        for key, host_block in self._index.items():
            if self._key[host_block] != key or self._uid[host_block] is None:
                fail(f"index key {key} points to host block {host_block} whose stored key is "
                     f"{self._key[host_block]}")
        if len(self._uid_block) != len(self._index):
            fail(f"{len(self._uid_block)} uids for {len(self._index)} index entries")


__all__ = ["HostTier"]
