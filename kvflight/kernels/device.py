"""What the kernels' launch code asks of a CUDA device (SM count, compute capability), looked up once per device."""

from __future__ import annotations

import functools

import torch


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=16)
def _properties(index: int):
    return torch.cuda.get_device_properties(index)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of this CUDA device."""
    return _properties(_index(device)).multi_processor_count


def capability_at_least(device: torch.device, major: int, minor: int = 0) -> bool:
    """Whether this CUDA device's compute capability is major.minor or later."""
    props = _properties(_index(device))
    return (props.major, props.minor) >= (major, minor)
