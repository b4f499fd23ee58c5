"""Quantization at load time: read a checkpoint's quantization_config, decide between loading a quantized checkpoint
and quantizing float weights online, convert a model's linears, and check a quantized checkpoint filled them all."""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Iterable

import torch.nn as nn

from kvflight.quant.linear import make_linear_method, quantize_linear_
from kvflight.quant.schemes import (
    ONLINE_SCHEMES,
    QUANT_SCHEMES,
    QUANTIZATION_CHOICES,
    QuantConfig,
    QuantizationError,
    lm_head_int8,
)

if TYPE_CHECKING:
    from kvflight.model.layers import _ParallelLinear

logger = logging.getLogger("kvflight.quant")


def checkpoint_quant_config(path: str | None) -> QuantConfig | None:
    """The QuantConfig recorded in an HF directory's config.json, or None (not a directory / not quantized)."""
    if path is None or not os.path.isdir(path):
        return None
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        return None
    with open(config_path, encoding="utf-8") as fh:
        data = json.load(fh)
    quant = data.get("quantization_config")
    if not quant:
        return None
    if not isinstance(quant, dict):
        raise QuantizationError(f"{config_path}: quantization_config must be an object")
    return QuantConfig.from_hf_dict(quant, where=config_path)


def plan_quantization(requested: str, checkpoint: QuantConfig | None,
                      load_format: str) -> tuple[QuantConfig | None, QuantConfig | None]:
    """(config the model is BUILT with to load quantized tensors, config to quantize float weights ONLINE with).

    requested: the `quantization` setting (auto / none / a scheme); checkpoint: what config.json records;
    load_format: the resolved format (hf / gguf / dummy).
    """
    if requested not in QUANTIZATION_CHOICES:
        raise QuantizationError(f"quantization={requested!r}: supported: {', '.join(QUANTIZATION_CHOICES)}")
    if checkpoint is not None and load_format == "hf":
        if requested in ("auto", checkpoint.scheme):
            return checkpoint, None
        raise QuantizationError(
            f"quantization={requested!r}, but the checkpoint is already quantized as {checkpoint.scheme} "
            "(config.json quantization_config): pass quantization=auto, or quantize the original float model "
            f"with another --qformat")
    if requested == "auto":
        if checkpoint is not None and load_format == "dummy":
            return None, checkpoint  # random weights in the checkpoint's scheme (benchmarks)
        return None, None
    if requested == "none":
        return None, None
    if requested not in ONLINE_SCHEMES and load_format != "dummy":
        raise QuantizationError(
            f"quantization={requested!r} needs calibration data: run `kvflight quantize MODEL --qformat {requested} "
            "--output DIR` and load DIR; at load time use one of " + ", ".join(ONLINE_SCHEMES))
    online = checkpoint.replace(scheme=requested) if checkpoint is not None else QuantConfig(scheme=requested)
    if requested == "int8_sq" and load_format != "dummy":
        logger.warning("quantization=int8_sq at load time has no SmoothQuant smoothing (that needs calibration "
                       "data); for its accuracy run `kvflight quantize MODEL --qformat int8_sq --output DIR`")
    return None, online


def linear_layers(model: nn.Module) -> Iterable[tuple[str, "_ParallelLinear"]]:
    """(module name, layer) of every quantizable linear (the modules with a quant method)."""
    for name, module in model.named_modules():
        if hasattr(module, "quant_method") and hasattr(module, "output_partition_sizes"):
            yield name, module  # type: ignore[misc]


def quantize_model_(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Quantize every linear layer's float weight in place with `config`'s scheme (no calibration)."""
    for _, layer in linear_layers(model):
        in_features = layer.weight.shape[1]
        quantize_linear_(layer, make_linear_method(config, in_features))
    return model


def check_quantized_load(model: nn.Module, filled: set[str], tied_lm_head: bool) -> None:
    """Raise if a quantized checkpoint left parameters unfilled (`filled`: names from model.load_weights)."""
    from kvflight.model.layers import MergedColumnParallelLinear, QKVParallelLinear

    shards: dict[str, tuple[str | int, ...]] = {}
    for name, layer in linear_layers(model):
        if isinstance(layer, QKVParallelLinear):
            shards[name] = ("q", "k", "v")
        elif isinstance(layer, MergedColumnParallelLinear):
            shards[name] = tuple(range(len(layer.output_sizes)))
    missing: list[str] = []
    for pname, _ in model.named_parameters(remove_duplicate=False):
        if pname == "lm_head.weight" and tied_lm_head:
            continue
        owner = pname.rpartition(".")[0]
        if owner in shards:
            missing += [f"{pname}:{s}" for s in shards[owner] if f"{pname}:{s}" not in filled]
        elif pname not in filled:
            missing.append(pname)
    if missing:
        raise QuantizationError(f"quantized checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}; was it "
                                "written by `kvflight quantize` for this model?")


def describe_quantization(model: nn.Module) -> str:
    """'int4_awq(g64) x 120, int4_awq(g128) x 30' style summary of the linears' methods (for logs and checks)."""
    counts: dict[str, int] = {}
    for _, layer in linear_layers(model):
        key = layer.quant_method.describe()
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} x {v}" for k, v in counts.items()) or "no linear layers"


__all__ = ["QUANT_SCHEMES", "checkpoint_quant_config", "plan_quantization", "quantize_model_", "lm_head_int8",
           "check_quantized_load", "describe_quantization", "linear_layers"]
