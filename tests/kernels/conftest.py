"""Kernel tests run under the Triton interpreter on CPU-only machines (set before any kernel module imports triton)."""

from __future__ import annotations

import os

import pytest
import torch

# Triton picks the interpreter when @triton.jit runs (module import), so this must precede the kernel imports.
# On a CUDA machine the kernels are compiled for real instead, and the small float32 tests run on the GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def device() -> str:
    """Where the small-shape float32 tests put their tensors: CPU under the interpreter, else the GPU."""
    return "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
