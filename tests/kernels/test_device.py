"""kernels/device.py: the SM count and compute-capability checks the kernels' launch code uses, against a faked
CUDA device table (no GPU needed): an index-less device means the current one, and minor versions count."""

from types import SimpleNamespace

import pytest
import torch

from kvflight.kernels import device


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    table = {0: SimpleNamespace(major=8, minor=9, multi_processor_count=142),
             1: SimpleNamespace(major=9, minor=0, multi_processor_count=132)}
    asked: list[int] = []

    def props(index: int) -> SimpleNamespace:
        asked.append(index)
        return table[index]

    device._properties.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    yield asked
    device._properties.cache_clear()


def test_num_sms_and_capability(fake_gpus: list[int]) -> None:
    assert device.num_sms(torch.device("cuda", 0)) == 142
    assert device.num_sms(torch.device("cuda")) == 132  # no index: the current device (1)
    assert device.capability_at_least(torch.device("cuda", 0), 8, 9)
    assert not device.capability_at_least(torch.device("cuda", 0), 9)
    assert device.capability_at_least(torch.device("cuda", 0), 8)
    assert device.capability_at_least(torch.device("cuda"), 9)
    assert not device.capability_at_least(torch.device("cuda", 1), 9, 1)
    assert sorted(set(fake_gpus)) == [0, 1] and len(fake_gpus) == 2  # looked up once per device
