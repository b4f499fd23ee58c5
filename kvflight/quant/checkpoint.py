"""The quantized checkpoint: an HF-style directory that `kvflight serve DIR` / `LLM(model=DIR)` load as it is.

    DIR/config.json                       the source model's HF config + "quantization_config" (schemes.py)
    DIR/model.safetensors                 (or model-0000k-of-0000n.safetensors + model.safetensors.index.json)
    DIR/tokenizer.json, tokenizer_config.json, ...   the source tokenizer (chat template included)
    DIR/kvflight_quantize.json            how it was made: command options, calibration, per-layer group sizes

Tensor names are the HF checkpoint names: the fused q/k/v and gate/up projections are split back into q_proj /
k_proj / v_proj and gate_proj / up_proj, each holding its own quantized tensors (linear.py lists them), so the
model's ordinary weight loaders fuse them again.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import torch

from kvflight.quant.loading import linear_layers
from kvflight.quant.schemes import QuantConfig, QuantizationError

if TYPE_CHECKING:
    from kvflight.model.arch import ModelArch
    from kvflight.model.llama import LlamaForCausalLM
    from kvflight.model.loader import ResolvedModel

SHARD_BYTES = 4 << 30  # largest safetensors file written
MODEL_TYPES: dict[str, str] = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                               "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
_DTYPE_NAMES: dict[torch.dtype, str] = {torch.float32: "float32", torch.float16: "float16",
                                        torch.bfloat16: "bfloat16"}


def source_hf_config(resolved: "ResolvedModel", arch: "ModelArch") -> dict[str, Any]:
    """The HF config dict of the model being quantized (its config.json, GGUF metadata, or a preset)."""
    from kvflight.model.loader import _gguf_reader, gguf_hf_config
    from kvflight.model.presets import get_preset

    if resolved.preset is not None:
        config = get_preset(resolved.preset)
    elif resolved.path is not None and os.path.isdir(resolved.path):
        with open(os.path.join(resolved.path, "config.json"), encoding="utf-8") as fh:
            config = json.load(fh)
    elif resolved.path is not None:
        if arch.rope_scaling is not None and arch.rope_scaling.get("rope_type") == "freq_factors":
            raise QuantizationError(f"{resolved.path}: this GGUF stores its RoPE scaling as a rope_freqs tensor, "
                                    "which an HF config.json cannot express; quantize the HF model directory instead")
        config = gguf_hf_config(_gguf_reader(resolved.path))
    else:
        raise QuantizationError("the model to quantize has neither files nor a preset")
    config = dict(config)
    config.setdefault("model_type", MODEL_TYPES.get(arch.architecture, "llama"))
    config.pop("quantization_config", None)
    return config


def _hf_tensors(model: "LlamaForCausalLM", float_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """name -> CPU tensor in HF naming. Quantized tensors keep their dtypes; other float tensors -> float_dtype."""
    from kvflight.model.llama import _STACKED

    fused: dict[str, list[str]] = {}
    for hf_part, our_part, _ in _STACKED:
        fused.setdefault(our_part.strip("."), []).append(hf_part.strip("."))
    linears = dict(linear_layers(model))
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():  # tied lm_head appears once, as the embedding
        owner, _, leaf = name.rpartition(".")
        tensor = param.detach().to("cpu")
        layer = linears.get(owner)
        if layer is not None:
            tensor = layer.quant_method.checkpoint_tensor(leaf, tensor)  # as a checkpoint stores it
        is_quantized = tensor.dtype not in _DTYPE_NAMES or leaf in ("weight_scale", "scales")
        if not is_quantized:
            tensor = tensor.to(float_dtype)
        parent, _, module = owner.rpartition(".")
        if layer is not None and module in fused:
            parts = tensor.split(layer.output_partition_sizes, dim=0)
            for hf_module, part in zip(fused[module], parts):
                out[f"{parent}.{hf_module}.{leaf}"] = part.contiguous()
        else:
            out[name] = tensor.contiguous()
    return out


def write_checkpoint(model: "LlamaForCausalLM", hf_config: dict[str, Any], config: QuantConfig, output_dir: str,
                     tokenizer: Any = None, float_dtype: torch.dtype = torch.bfloat16,
                     extra_info: dict[str, Any] | None = None) -> list[str]:
    """Write the (already quantized) model to output_dir; returns the files written."""
    from safetensors.torch import save_file

    if float_dtype not in _DTYPE_NAMES:
        raise QuantizationError(f"checkpoint dtype {float_dtype}: supported: {', '.join(_DTYPE_NAMES.values())}")
    os.makedirs(output_dir, exist_ok=True)
    tensors = _hf_tensors(model, float_dtype)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    written: list[str] = []
    if len(shards) == 1:
        path = os.path.join(output_dir, "model.safetensors")
        save_file(shards[0], path, metadata={"format": "pt"})
        written.append(path)
    else:
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(output_dir, file), metadata={"format": "pt"})
            weight_map.update({name: file for name in shard})
            written.append(os.path.join(output_dir, file))
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": weight_map}
        path = os.path.join(output_dir, "model.safetensors.index.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(index, fh, indent=2)
        written.append(path)
    config_out = dict(hf_config)
    config_out["torch_dtype"] = _DTYPE_NAMES[float_dtype]
    config_out["quantization_config"] = config.to_hf_dict()
    path = os.path.join(output_dir, "config.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(config_out, fh, indent=2, ensure_ascii=False)
    written.append(path)
    if tokenizer is not None:  # tokenizer.json, tokenizer_config.json, chat template ...
        written += [str(f) for f in tokenizer.save_pretrained(output_dir)]
    info = {"quantization_config": config.to_hf_dict(),
            "linear_layers": {name: layer.quant_method.describe() for name, layer in linear_layers(model)},
            **(extra_info or {})}
    path = os.path.join(output_dir, "kvflight_quantize.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(info, fh, indent=2, ensure_ascii=False)
    written.append(path)
    return written
