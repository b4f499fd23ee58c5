"""Architecture registry: HF architecture names (and model_type / GGUF spellings) -> the model class."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch.nn as nn

# One implementation (kvflight.model.llama.LlamaForCausalLM) covers the whole Llama family.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",  # Llama 2 / 3 / 3.1 / 3.2, SmolLM2 (tied embeddings)
    "MistralForCausalLM",  # without sliding window
    "Qwen2ForCausalLM",  # Qwen2 / Qwen2.5 (qkv bias)
    "Qwen3ForCausalLM",  # Qwen3 dense (per-head q/k RMSNorm)
)

# config.json "model_type" -> architecture (configs saved without an "architectures" list)
MODEL_TYPE_TO_ARCH: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# GGUF "general.architecture" -> architecture
GGUF_ARCH_TO_ARCH: dict[str, str] = {
    "llama": "LlamaForCausalLM",  # llama.cpp also writes Mistral 7B checkpoints as "llama"
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's architecture is not one kvflight implements."""


def supported_list() -> str:
    return ", ".join(SUPPORTED_ARCHITECTURES)


def get_model_class(architecture: str) -> "type[nn.Module]":
    """Return the nn.Module class implementing `architecture` (an HF architecture name)."""
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"unsupported model architecture '{architecture}'; supported: {supported_list()}")
    from kvflight.model.llama import LlamaForCausalLM  # lazy: keeps `import kvflight.model.arch` torch-free

    return LlamaForCausalLM
