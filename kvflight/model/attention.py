"""Paged attention: AttentionMetadata (what a step's flat batch looks like), the Attention module, its backends."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn

from kvflight.kernels import reference


@dataclass
class AttentionMetadata:
    """Where one step's tokens come from and where their K/V go. All sequences' new tokens are flattened
    back to back (no padding), in the order of query_start_loc.

    slot_mapping     [num_tokens] int64: block_id * tokens_per_block + offset, where each new token's K/V is
                     written (negative = padding token, not written)
    query_start_loc  [num_seqs + 1] int32: prefix sums of the new-token counts
    seq_lens         [num_seqs] int32: context length after this step (cached + new)
    block_tables     [num_seqs, max_blocks_per_seq] int32: each sequence's blocks in position order (pad: 0)
    """

    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    max_query_len: int
    max_seq_len: int
    query_lens_cpu: list[int]  # host copy: new tokens per sequence
    seq_lens_cpu: list[int]  # host copy of seq_lens
    num_splits: int = 1  # split-K segments per sequence in the Triton kernel (multi_block_mode); 1 = off

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    @property
    def is_prefill_only(self) -> bool:
        """Every sequence starts from an empty cache (no earlier context to read)."""
        return all(q == s for q, s in zip(self.query_lens_cpu, self.seq_lens_cpu))

    @classmethod
    def build(
        cls,
        query_lens: Sequence[int],
        seq_lens: Sequence[int],
        block_ids: Sequence[Sequence[int]],
        tokens_per_block: int,
        device: torch.device | str = "cpu",
        max_blocks_per_seq: int | None = None,
    ) -> "AttentionMetadata":
        """Metadata for sequences whose new tokens are positions seq_len - query_len .. seq_len - 1.

        block_ids[i] is sequence i's whole block table (it must cover seq_lens[i] tokens).
        """
        if not len(query_lens) == len(seq_lens) == len(block_ids):
            raise ValueError(f"query_lens ({len(query_lens)}), seq_lens ({len(seq_lens)}) and block_ids "
                             f"({len(block_ids)}) must have one entry per sequence")
        width = max([len(b) for b in block_ids] + [max_blocks_per_seq or 1])
        slots: list[int] = []
        for query_len, seq_len, blocks in zip(query_lens, seq_lens, block_ids):
            if not 0 <= query_len <= seq_len:
                raise ValueError(f"query_len={query_len} must be in [0, seq_len={seq_len}]")
            if len(blocks) * tokens_per_block < seq_len:
                raise ValueError(f"{len(blocks)} blocks of {tokens_per_block} tokens cannot hold {seq_len} tokens")
            for pos in range(seq_len - query_len, seq_len):
                slots.append(blocks[pos // tokens_per_block] * tokens_per_block + pos % tokens_per_block)
        table = torch.zeros((len(block_ids), width), dtype=torch.int32)  # [num_seqs, max_blocks_per_seq]
        for i, blocks in enumerate(block_ids):
            table[i, :len(blocks)] = torch.tensor(list(blocks), dtype=torch.int32)
        starts = [0]
        for query_len in query_lens:
            starts.append(starts[-1] + query_len)
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(list(seq_lens), dtype=torch.int32, device=device),
            block_tables=table.to(device),
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=list(seq_lens),
        )


def positions_for(query_lens: Sequence[int], seq_lens: Sequence[int],
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Absolute positions of the new tokens of a flat batch -> [num_tokens] int64."""
    pos: list[int] = []
    for query_len, seq_len in zip(query_lens, seq_lens):
        pos.extend(range(seq_len - query_len, seq_len))
    return torch.tensor(pos, dtype=torch.int64, device=device)


@dataclass(frozen=True, slots=True)
class RotaryInputs:
    """Neox RoPE that Attention applies to q and k before the K/V write; a backend that fuses it (triton, with a
    cache) rotates inside its KV-write kernel, the others get q and k rotated by reference.rotary_embedding."""

    positions: torch.Tensor  # [num_tokens] int64 (or int32)
    cos_sin_cache: torch.Tensor  # [max_position, rotary_dim] float32: cos | sin
    head_dim: int  # rotary_dim <= head_dim: dims past rotary_dim pass through

    @property
    def rotary_dim(self) -> int:
        return int(self.cos_sin_cache.shape[-1])

    def apply_reference(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k [T, Hkv, D] -> rotated copies (the slow path beside the fused kernel)."""
        return reference.rotary_embedding(self.positions, q, k, self.cos_sin_cache, self.head_dim)


# A backend: (q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], kv_cache | None, meta, scale) -> out [T, Hq, D];
# with a quantized cache (kv_cache_dtype int8 / fp8) it is also called with kv_scales=[2, Hkv] float32 (K row, V row);
# one registered with fuses_rotary=True is called with rotary=RotaryInputs (q and k not yet rotated) when it has a cache
AttentionBackendFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", AttentionMetadata, float], torch.Tensor]


def _reference_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor | None,
                       meta: AttentionMetadata, scale: float, kv_scales: torch.Tensor | None = None) -> torch.Tensor:
    if kv_cache is None or kv_cache.numel() == 0:
        # no cache (e.g. a memory-profiling forward): only valid when no sequence has earlier context
        if not meta.is_prefill_only:
            raise ValueError("attention without a KV cache only works when every sequence is a fresh prefill "
                             "(query_lens == seq_lens)")
        return reference.prefill_attention(q, k, v, meta.query_lens_cpu, scale)
    if kv_scales is not None:
        reference.write_kv_cache(k, v, kv_cache, meta.slot_mapping, kv_scales[0], kv_scales[1])
        return reference.paged_attention(q, kv_cache, meta.block_tables, meta.query_lens_cpu, meta.seq_lens_cpu,
                                         scale, kv_scales[0], kv_scales[1])
    reference.write_kv_cache(k, v, kv_cache, meta.slot_mapping)
    return reference.paged_attention(q, kv_cache, meta.block_tables, meta.query_lens_cpu, meta.seq_lens_cpu, scale)


def _triton_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor | None,
                    meta: AttentionMetadata, scale: float, kv_scales: torch.Tensor | None = None,
                    rotary: RotaryInputs | None = None) -> torch.Tensor:
    """Triton KV write (with RoPE fused into it when rotary is given: q and k rotated in place) + one paged-attention
    launch for the whole mixed batch (CUDA-graph capturable)."""
    from kvflight.kernels import paged_attention, rope_write_kv, write_kv

    if kv_cache is None or kv_cache.numel() == 0:
        raise ValueError("the triton attention backend needs a KV cache tensor (prefills write into it)")
    k_scale, v_scale = (None, None) if kv_scales is None else (kv_scales[0], kv_scales[1])  # [Hkv] float32 each
    if rotary is not None:
        rope_write_kv.rotary_write_kv_cache(rotary.positions, q, k, v, rotary.cos_sin_cache, rotary.head_dim,
                                            kv_cache, meta.slot_mapping, k_scale, v_scale)
    else:
        write_kv.write_kv_cache(k, v, kv_cache, meta.slot_mapping, k_scale, v_scale)
    return paged_attention.paged_attention(q, kv_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens,
                                           scale, max_query_len=meta.max_query_len, num_splits=meta.num_splits,
                                           k_scale=k_scale, v_scale=v_scale)


_BACKENDS: dict[str, AttentionBackendFn] = {"reference": _reference_backend, "triton": _triton_backend}
_FUSES_ROTARY: set[str] = {"triton"}  # backends that take rotary=RotaryInputs when they have a cache


def register_attention_backend(name: str, fn: AttentionBackendFn, *, fuses_rotary: bool = False) -> None:
    """Make `name` selectable as Attention(backend=name) (Triton backends register themselves here).
    fuses_rotary: fn takes rotary=RotaryInputs (q, k unrotated) whenever it is given a non-empty KV cache."""
    _BACKENDS[name] = fn
    if fuses_rotary:
        _FUSES_ROTARY.add(name)
    else:
        _FUSES_ROTARY.discard(name)


def attention_backends() -> tuple[str, ...]:
    return tuple(_BACKENDS)


class Attention(nn.Module):
    """Writes the step's K/V into this layer's paged cache, then causal attention over each sequence's context.

    GQA / MQA / MHA: query head h reads KV head h // (num_heads // num_kv_heads). Softmax scale 1/sqrt(head_dim).
    """

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float | None = None,
                 backend: str = "reference") -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
        self.backend = backend
        # quantized KV cache (kv_cache_dtype int8 / fp8): [2, num_kv_heads] float32 K / V scales on the cache's
        # device, set by the runner (kvflight.quant.kv_cache.set_kv_scales); None = a float cache
        self.kv_scales: torch.Tensor | None = None
        if backend not in _BACKENDS:
            raise ValueError(f"unknown attention backend '{backend}'; available: {', '.join(_BACKENDS)}")

    def fuses_rotary(self, kv_cache: torch.Tensor | None) -> bool:
        """Whether forward(..., rotary=...) rotates inside the backend's KV write (triton with a cache: one launch
        less per layer) rather than through reference.rotary_embedding first."""
        return self.backend in _FUSES_ROTARY and kv_cache is not None and kv_cache.numel() > 0

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor | None,
                meta: AttentionMetadata, rotary: RotaryInputs | None = None) -> torch.Tensor:
        """q [T, Hq, D], k / v [T, Hkv, D], kv_cache [2, num_blocks, tokens_per_block, Hkv, D] -> [T, Hq, D].

        rotary: RoPE still to apply to q and k (None: already rotated). A fusing backend rotates q and k in place;
        otherwise they are rotated out of place by the reference first."""
        kwargs: dict = {}
        if self.kv_scales is not None and kv_cache is not None and kv_cache.numel() > 0:
            kwargs["kv_scales"] = self.kv_scales
        if rotary is not None:
            if self.fuses_rotary(kv_cache):
                kwargs["rotary"] = rotary
            else:
                q, k = rotary.apply_reference(q, k)
        return _BACKENDS[self.backend](q, k, v, kv_cache, meta, self.scale, **kwargs)
