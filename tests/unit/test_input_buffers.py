"""InputBuffers: one step's flat inputs (ids, positions, KV slots, offsets, block tables) and CUDA-graph padding."""

from __future__ import annotations

import pytest
import torch

from kvflight.config import ConfigError
from kvflight.model.attention import AttentionMetadata, positions_for
from kvflight.runner.cuda_graphs import capture_sizes, mixed_token_buckets
from kvflight.runner.input_buffers import InputBuffers
from kvflight.runner.model_runner import resolve_kernel_backend

TPB = 4


def _buffers() -> InputBuffers:
    return InputBuffers(max_num_tokens=32, max_num_seqs=8, max_blocks_per_seq=6, tokens_per_block=TPB,
                        device=torch.device("cpu"))


def test_mixed_step_matches_attention_metadata_build() -> None:
    buf = _buffers()
    starts, num_new = [5, 0, 9], [1, 7, 3]  # a decode token, a fresh prefill, a chunk after a cached prefix
    tables = [[3, 1], [0, 5], [2, 4, 7]]
    ids = [[11], [1, 2, 3, 4, 5, 6, 7], [21, 22, 23]]
    inputs = buf.prepare(starts, num_new, tables, [True, False, True], ids)
    seq_lens = [s + n for s, n in zip(starts, num_new)]
    ref = AttentionMetadata.build(num_new, seq_lens, tables, TPB)
    assert inputs.slot_mapping.tolist() == ref.slot_mapping.tolist()
    assert inputs.query_start_loc.tolist() == [0, 1, 8, 11]
    assert inputs.seq_lens.tolist() == seq_lens
    assert inputs.positions.tolist() == positions_for(num_new, seq_lens).tolist()
    assert inputs.input_ids.tolist() == [t for x in ids for t in x]
    assert inputs.logits_indices.tolist() == [0, 10]  # last token of the sampling sequences
    for i, t in enumerate(tables):
        assert inputs.block_tables[i, :len(t)].tolist() == t


def test_decode_only_fast_path_and_graph_padding() -> None:
    buf = _buffers()
    inputs = buf.prepare([4, 7], [1, 1], [[2, 3], [0, 6]], [True, True], [[9], [8]], pad_num_seqs=4)
    # positions 4 and 7: block 3 offset 0 -> slot 12, block 6 offset 3 -> slot 27; padding tokens write nowhere
    assert inputs.slot_mapping.tolist() == [12, 27, -1, -1]
    assert inputs.positions.tolist() == [4, 7, 0, 0]
    assert inputs.input_ids.tolist() == [9, 8, 0, 0]
    # padding sequences: no new tokens, no context
    assert inputs.query_start_loc.tolist() == [0, 1, 2, 2, 2]
    assert inputs.seq_lens.tolist() == [5, 8, 0, 0]
    assert inputs.block_tables.shape == (4, 6)


def test_mixed_graph_padding() -> None:
    """A mixed-step graph pads tokens and sequences apart: padding tokens belong to no sequence (slot -1, not
    written), padding sequences have no tokens (query_len 0), and the real rows equal the unpadded step's."""
    buf = _buffers()
    args = ([5, 0], [1, 6], [[3, 1], [0, 5]], [True, True], [[11], [1, 2, 3, 4, 5, 6]])
    plain = buf.prepare(*args)
    want = [t.tolist() for t in (plain.input_ids, plain.positions, plain.slot_mapping, plain.query_start_loc,
                                 plain.seq_lens, plain.logits_indices)]
    got = buf.prepare(*args, pad_num_seqs=5, pad_num_tokens=16)
    assert got.input_ids.shape == (16,) and got.query_start_loc.shape == (6,) and got.seq_lens.shape == (5,)
    assert got.input_ids[:7].tolist() == want[0] and got.positions[:7].tolist() == want[1]
    assert got.slot_mapping.tolist() == want[2] + [-1] * 9
    assert got.query_start_loc.tolist() == want[3] + [7] * 3
    assert got.seq_lens.tolist() == want[4] + [0] * 3
    assert got.logits_indices.tolist() == want[5] == [0, 6]
    empty = buf.prepare([], [], [], [], [], pad_num_seqs=8, pad_num_tokens=32)  # a graph's capture inputs
    assert set(empty.slot_mapping.tolist()) == {-1} and set(empty.query_start_loc.tolist()) == {0}
    with pytest.raises(ValueError, match="padding to 4 tokens"):
        buf.prepare(*args, pad_num_seqs=5, pad_num_tokens=4)


def test_mixed_token_buckets() -> None:
    assert mixed_token_buckets(300) == [16, 32, 64, 128, 192, 256, 300]
    assert mixed_token_buckets(48) == [16, 32, 48]
    full = mixed_token_buckets(8192)
    assert full[:4] == [16, 32, 64, 128] and full[-1] == 8192
    assert all(b - a == 64 for a, b in zip(full[2:], full[3:]) if b <= 2048)
    assert all(b - a == 256 for a, b in zip(full, full[1:]) if a >= 2048)
    assert len(full) == 2 + 32 + 24


def test_stale_rows_from_a_longer_step_do_not_leak_into_slots() -> None:
    buf = _buffers()
    buf.prepare([0], [9], [[1, 2, 3]], [True], [list(range(9))])
    inputs = buf.prepare([2], [1], [[5]], [True], [[4]])
    assert inputs.slot_mapping.tolist() == [22]
    assert inputs.input_ids.tolist() == [4]


def test_limits_are_named() -> None:
    buf = _buffers()
    with pytest.raises(ValueError, match="max_num_tokens=32"):
        buf.prepare([0], [33], [[0] * 6], [True], [[0] * 33])
    with pytest.raises(ValueError, match="max_blocks_per_seq=6"):
        buf.prepare([0], [1], [[0] * 7], [True], [[0]])


def test_capture_sizes_and_kernel_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(256)[-3:] == [240, 248, 256]
    assert resolve_kernel_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_kernel_backend("auto", torch.device("cuda", 0)) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="kernel_backend=triton needs a CUDA device"):
        resolve_kernel_backend("triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_kernel_backend("triton", torch.device("cpu")) == "triton"
