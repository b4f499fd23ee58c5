"""The Triton row argmax equals torch.argmax(dim=-1): ties to the lowest index, ragged widths, -inf rows."""

from __future__ import annotations

import pytest
import torch

from kvflight.kernels import argmax as argmax_module
from kvflight.kernels.argmax import argmax_rows


@pytest.mark.parametrize("vocab", [1, 7, 300, 1024, 1500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_equals_torch(vocab: int, dtype: torch.dtype, device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(argmax_module, "CHUNK", 256)  # several pieces per row at small widths
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(6, vocab, generator=g)
    x[1] = float("-inf")  # nothing visible: index 0
    if vocab > 1:
        x[2, vocab // 3] = x[2, vocab - 1] = 50.0  # a tie across pieces: the first wins
        x[3, :] = 1.0  # all equal
        x[4, vocab - 1] = 60.0  # the last column, in the ragged last piece
    x = x.to(dtype).to(device)
    for _ in range(2):  # the arrival counters are re-armed: a second call is the same
        got = argmax_rows(x)
        assert got.dtype == torch.int64
        assert torch.equal(got.cpu(), x.cpu().argmax(dim=-1))
    assert int(argmax_module._COUNTERS[str(x.device)].abs().sum()) == 0


def test_argmax_strided_and_bad_input(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2000, generator=g).to(device)[:, ::2]  # stride 2 in the vocab dim
    assert torch.equal(argmax_rows(x).cpu(), x.cpu().argmax(dim=-1))
    assert argmax_rows(torch.zeros(0, 5, device=device)).shape == (0,)
    with pytest.raises(ValueError, match="expected \\[rows, V\\]"):
        argmax_rows(torch.zeros(5))
    with pytest.raises(ValueError, match="float dtype"):
        argmax_rows(torch.zeros(2, 5, dtype=torch.int32))
