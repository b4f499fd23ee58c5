"""kvflight: an LLM inference engine and server with in-flight batching, paged KV cache and an autotuner."""

from kvflight.types import CompletionOutput, FinishReason, RequestOutput, SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "FinishReason", "__version__"]


def __getattr__(name: str):
    if name == "LLM":  # lazy: importing kvflight must not import torch
        from kvflight.engine.llm import LLM

        return LLM
    raise AttributeError(name)
