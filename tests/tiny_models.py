"""Tiny random-weight HF checkpoints (2 layers, hidden 64) written by transformers itself, for fast tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB = 160

_COMMON: dict[str, Any] = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=96, vocab_size=VOCAB,
                               max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

# name -> (transformers config class, extra config kwargs)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama_mha": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama_gqa": ("LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=2)),
    "llama31_rope": ("LlamaConfig", dict(
        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})),
    "mistral_mqa": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=None)),
    "qwen2_bias": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen3_qknorm": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32)),
    "llama_tied": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
}


def write_hf_checkpoint(name: str, directory: Path) -> None:
    """A tiny random model written by transformers itself; every parameter (norms, biases too) randomized."""
    import transformers

    config_cls_name, extra = CASES[name]
    config = getattr(transformers, config_cls_name)(**_COMMON, **extra)
    torch.manual_seed(1234)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if pname.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.copy_(0.15 * torch.randn_like(param))
    model.save_pretrained(directory)
