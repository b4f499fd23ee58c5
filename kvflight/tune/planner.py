"""Deployment memory planner: where one GPU's memory goes (weights, activations, CUDA graphs, KV cache) for a model
config and engine settings, computed from the config alone (no GPU), with a verdict and the fixes when it cannot run.

The arithmetic (every figure is per GPU; T = tokens, B = rows, H = hidden, I = intermediate, V = vocab,
D = head_dim, L = layers, tp = tensor_parallel_size, ``act`` = bytes per element of the compute dtype):

* weights: ``ModelArch.num_params`` split the way the tensor-parallel layers split them: column-parallel q/k/v and
  gate/up (output dim / tp), row-parallel o_proj and down_proj (input dim / tp), vocab-parallel embedding and LM
  head (ceil(V / tp) rows), norms replicated. K/V heads: num_kv_heads / tp per GPU, or 1 (replicated) when
  num_kv_heads < tp. Weights are stored in the compute dtype (GGUF files are dequantized at load), except the
  linear layers under a weight scheme (``quantization``): 1 byte per weight for fp8 / int8_wo / int8_sq, about
  0.53 for int4_wo / int4_awq (two codes a byte + 16-bit scale and zero per group of 128); with
  ``quantize_lm_head=on`` (or auto with an int4 scheme) the LM head's rows in int8 + a float32 scale. Plus the
  rotary cos/sin cache, float32 [max_position_embeddings, head_dim].
* activation workspace: what the runner measures on the GPU with one profiling forward of
  ``T = min(max_num_tokens, max_seq_len * max_batch_size)`` tokens split over ``B = min(max_batch_size, T)``
  sequences, then the logits of B rows and a softmax + sort. Intermediates die layer by layer, so the peak is the
  larger of
    - forward: ``T * act * max(attention, mlp)`` with ``attention = 4H + (q + 2kv) + (q + kv) + q`` and
      ``mlp = 4H + 2I + I``: the layer's input hidden and residual (the model's loop holds them), the new
      residual and normed input (4H), then qkv, rotated q/k and the attention output, or the [T, 2I] gate_up
      output and the SiLU-and-mul output (Triton: no temporary); q / kv / I are this GPU's shares;
    - logits: ``T * H * act`` (final hidden) ``+ B * V * 42``: float32 logits, softmax, sorted values and int64
      indices (4 + 4 + 4 + 8) plus the GPU sort's double buffers and index input (~22 more; 42 measured).
  Attention scores are never materialized (the kernels are flash-style), so there is no T^2 term. Measured on
  an H100 (Llama-3.1-8B shape, bf16): 4096 and 16384 tokens match the forward term exactly; batch 256's logits
  peak is 1.32 GiB.
* CUDA graphs (on GPU with the Triton kernels, unless enforce_eager): decode batches of 1, 2, 4, 8, 16, ... up
  to ``G = min(max_batch_size, cuda_graph_max_batch_size or 512)`` are captured into one shared pool, largest
  first, so the pool holds the largest graph's intermediates (its forward and its logits in the compute dtype),
  the one float32 logits buffer all graphs write into, and ~16 MiB of workspaces:
  ``forward(T = G) + G * V * (act + 4) + 16 MiB`` (H100, Llama-3.1-8B shape: 0.22 GiB measured for G = 256,
  0.11 GiB for 128, 0.03 GiB for 16). Steps carrying prompt tokens replay graphs of up to
  ``M = min(max_num_tokens, cuda_graph_max_num_tokens or 2048)`` padded tokens, captured after the decode graphs
  into the same pool; they reuse few of its freed blocks (other sizes), so they add ``1.25 * forward(M)`` (the
  allocator's rounding of the larger intermediates, measured) and their one hidden-states buffer ``M * H * act``
  (H100, Llama-3.1-8B shape, M = 2048: 0.30 GiB measured, 0.30 estimated; the decode graphs of G = 256 0.21).
  Unless cuda_graph_max_num_tokens is set, M shrinks in steps of 64 tokens, down to none, until the pool fits in
  what the KV cache leaves.
  The runner captures them after the KV cache, in what ``kv_cache_free_gpu_memory_fraction`` leaves over.
* KV cache: ``kv_bytes_per_token = 2 * L * kv_heads_per_gpu * D * kv_bytes`` (kv_bytes: the compute dtype's for
  ``auto``, 1 for fp8 / int8); a block holds ``tokens_per_block`` tokens. The runner's budget:
  ``fraction * (gpu_memory - non_torch - weights - activations)`` (non_torch: the driver's reserve, the CUDA
  context and other processes: 1 GiB by default, as on an H100 80GB whose nvidia-smi total is 81559 MiB and
  free memory before loading 80552 MiB; the runner measures it), or with ``gpu_memory_utilization`` u:
  ``u * gpu_memory - non_torch - weights - activations``; capped by kv_cache_bytes and
  max_tokens_in_paged_kv_cache; ``num_blocks = budget // kv_bytes_per_block``. On CPU (no GPU memory given) the
  budget is kv_cache_bytes, else max_tokens_in_paged_kv_cache, else 1 GiB, as the runner does.

The verdict: one request of max_seq_len needs ``ceil(max_seq_len / tokens_per_block)`` blocks. When they do not fit
(or the weights and activations alone exceed the GPU, or the CUDA graphs do not fit in the rest), the report says
by how much and which single change fixes it; each fix is checked by planning again with that change.
`MemoryPlanReport.refusal_message()` is the text the engine prints when it refuses to start.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

from kvflight.config import (ConfigError, EngineConfig, add_cli_args, flat_from_args, load_yaml,
                             mixed_graph_max_tokens, parse_size)
from kvflight.model.arch import ModelArch
from kvflight.quant.schemes import QUANT_SCHEMES, QuantConfig, lm_head_int8

GIB = 1 << 30
MIB = 1 << 20
CPU_DEFAULT_KV_CACHE_BYTES = 1 << 30  # the KV budget on CPU when none is given
DEFAULT_NON_TORCH_BYTES = 1 << 30  # driver reserve (~0.5 GiB) + CUDA context (~0.5 GiB), measured on an H100
DEFAULT_CUDA_GRAPH_MAX_BATCH_SIZE = 512  # the runner captures decode graphs up to min(max_batch_size, 512)
DEFAULT_ALPHA = 0.1  # the guide: context share of a step's tokens, 0.05 .. 0.20
SAMPLER_BYTES_PER_LOGIT = 42  # float32 logits, softmax, sorted values, int64 indices + the sort's buffers (H100)
GRAPH_WORKSPACE_BYTES = 16 * MIB  # fixed part of the CUDA graph pool (workspaces, rounding), measured (H100)
MIXED_GRAPH_ROUNDING_NUM, MIXED_GRAPH_ROUNDING_DEN = 5, 4  # mixed-step graphs' pool: 1.25 x their forward (H100)
DTYPE_BYTES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}
KV_CACHE_DTYPES: tuple[str, ...] = ("auto", "fp8", "int8")  # auto = the compute dtype
KV_QUANT_BYTES: dict[str, int] = {"fp8": 1, "int8": 1}
TP_CANDIDATES: tuple[int, ...] = (2, 4, 8)

# Total memory as `nvidia-smi --query-gpu=memory.total` reports it (MiB). Not listed? pass --gpu-memory.
KNOWN_GPUS_MIB: dict[str, int] = {
    "H100-80GB": 81559,  # H100 SXM5 80GB HBM3
    "H100-PCIe": 81559,
    "H100-NVL": 95830,
    "H200": 143771,
    "H20": 97871,
    "A100-80GB": 81920,
    "A100-40GB": 40960,
    "L40S": 46068,
    "L4": 23034,
    "A10G": 23028,
    "RTX4090": 24564,
}
_GPU_ALIASES: dict[str, str] = {"h100": "H100-80GB", "h100sxm": "H100-80GB", "h100sxm5": "H100-80GB",
                                "h10080gbhbm3": "H100-80GB", "h100pcie80gb": "H100-PCIe", "h200sxm": "H200",
                                "h200141gb": "H200", "a100": "A100-80GB", "a100sxm480gb": "A100-80GB",
                                "a100sxm440gb": "A100-40GB", "4090": "RTX4090", "geforcertx4090": "RTX4090"}


class PlanError(ValueError):
    """A planner input is wrong; the message names the field and the fix."""


# ---- inputs ---------------------------------------------------------------------------------------------------------
def _squash(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def gpu_memory_bytes_of(name: str) -> int:
    """Total memory of a known GPU by name (case, dashes and spaces ignored: 'h100-80gb', 'H100 SXM')."""
    key = _squash(name)
    for known in KNOWN_GPUS_MIB:
        if _squash(known) == key:
            return KNOWN_GPUS_MIB[known] * MIB
    if key in _GPU_ALIASES:
        return KNOWN_GPUS_MIB[_GPU_ALIASES[key]] * MIB
    raise PlanError(f"--gpu {name!r} is not a known GPU; known: {', '.join(KNOWN_GPUS_MIB)}; or pass its memory "
                    "with --gpu-memory (e.g. --gpu-memory 80GiB)")


def canonical_gpu_name(name: str) -> str:
    key = _squash(name)
    for known in KNOWN_GPUS_MIB:
        if _squash(known) == key:
            return known
    return _GPU_ALIASES.get(key, name)


@dataclass(frozen=True)
class PlanInputs:
    """The engine settings the memory plan depends on (the names of kvflight/config.py)."""

    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    tensor_parallel_size: int = 1
    max_seq_len: int | None = None  # None: the model's context length
    max_input_len: int | None = None
    max_batch_size: int = 256
    max_num_tokens: int = 8192
    tokens_per_block: int = 32
    kv_cache_free_gpu_memory_fraction: float = 0.9
    gpu_memory_utilization: float | None = None
    kv_cache_bytes: int | None = None
    max_tokens_in_paged_kv_cache: int | None = None
    enable_chunked_context: bool = True
    batch_scheduler_policy: str = "max_utilization"
    enforce_eager: bool = False
    cuda_graph_max_batch_size: int | None = None
    cuda_graph_max_num_tokens: int | None = None  # mixed-step graphs (None: the runner's default, 0: none)
    kernel_backend: str = "auto"  # CUDA graphs are captured with the triton kernels only (auto on a GPU)
    quantization: str = "auto"  # weight scheme of the linear layers (auto / none: the compute dtype)
    # on, or auto with 4-bit weights named by `quantization`: an int8 LM head (auto with quantization "auto" counts
    # it float: the checkpoint is not read here)
    quantize_lm_head: str = "auto"

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise PlanError(f"kv_cache_dtype={self.kv_cache_dtype!r}: the planner knows {', '.join(KV_CACHE_DTYPES)}")
        if self.dtype != "auto" and self.dtype not in DTYPE_BYTES:
            raise PlanError(f"dtype={self.dtype!r}: use auto, {', '.join(DTYPE_BYTES)}")
        if not isinstance(self.tensor_parallel_size, int) or self.tensor_parallel_size < 1:
            raise PlanError(f"tensor_parallel_size={self.tensor_parallel_size!r}: must be an integer >= 1")

    @classmethod
    def from_config(cls, config: EngineConfig | Mapping[str, Any]) -> "PlanInputs":
        """From an EngineConfig, or from flat keys (YAML / CLI names and vLLM aliases; validated by EngineConfig,
        except kv_cache_dtype and tensor_parallel_size, whose planner values the engine does not take yet)."""
        if isinstance(config, EngineConfig):
            return cls._from_engine_config(config, config.cache.kv_cache_dtype,
                                           config.parallel.tensor_parallel_size)
        flat = {k.replace("-", "_"): v for k, v in dict(config).items()}
        kv_dtype = str(flat.pop("kv_cache_dtype", "auto"))
        tp = flat.pop("tensor_parallel_size", flat.pop("tp", 1))
        try:
            tp = int(tp)
        except (TypeError, ValueError):
            raise PlanError(f"tensor_parallel_size={tp!r}: must be an integer >= 1") from None
        return cls._from_engine_config(EngineConfig.from_flat(flat), kv_dtype, tp)

    @classmethod
    def _from_engine_config(cls, cfg: EngineConfig, kv_cache_dtype: str, tp: int) -> "PlanInputs":
        s, c, r = cfg.scheduler, cfg.cache, cfg.runtime
        return cls(dtype=cfg.model.dtype, kv_cache_dtype=kv_cache_dtype, tensor_parallel_size=tp,
                   max_seq_len=s.max_seq_len, max_input_len=s.max_input_len, max_batch_size=s.max_batch_size,
                   max_num_tokens=s.max_num_tokens, tokens_per_block=c.tokens_per_block,
                   kv_cache_free_gpu_memory_fraction=c.kv_cache_free_gpu_memory_fraction,
                   gpu_memory_utilization=c.gpu_memory_utilization, kv_cache_bytes=c.kv_cache_bytes,
                   max_tokens_in_paged_kv_cache=c.max_tokens_in_paged_kv_cache,
                   enable_chunked_context=s.enable_chunked_context, batch_scheduler_policy=s.batch_scheduler_policy,
                   enforce_eager=r.enforce_eager,
                   cuda_graph_max_batch_size=getattr(r, "cuda_graph_max_batch_size", None),
                   cuda_graph_max_num_tokens=getattr(r, "cuda_graph_max_num_tokens", None),
                   kernel_backend=getattr(r, "kernel_backend", "auto"),
                   quantization=getattr(cfg.model, "quantization", "auto"),
                   quantize_lm_head=getattr(cfg.model, "quantize_lm_head", "auto"))

    def replace(self, **changes: Any) -> "PlanInputs":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class MeasuredMemory:
    """Figures the runner measured on the GPU; each given one replaces the planner's estimate (bytes)."""

    weights_bytes: int | None = None
    activation_bytes: int | None = None
    cuda_graph_bytes: int | None = None
    non_torch_bytes: int | None = None


# ---- per-GPU shapes -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardShape:
    """One GPU's share of the model under tensor parallelism (element counts)."""

    tp: int
    num_heads: int  # query heads on this GPU
    num_kv_heads: int  # KV heads on this GPU (replicated when the model has fewer than tp)
    head_dim: int
    hidden_size: int
    intermediate_size: int  # this GPU's share
    vocab_rows: int  # embedding / LM head rows on this GPU

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def valid_tp_sizes(arch: ModelArch, limit: int = 64) -> list[int]:
    """Tensor-parallel sizes this model splits evenly into (heads, KV heads or their replicas, intermediate)."""
    return [tp for tp in range(1, limit + 1) if _tp_problem(arch, tp) is None]


def _tp_problem(arch: ModelArch, tp: int) -> str | None:
    if arch.num_heads % tp:
        return f"num_heads={arch.num_heads} is not divisible by {tp}"
    if arch.num_kv_heads >= tp and arch.num_kv_heads % tp:
        return f"num_kv_heads={arch.num_kv_heads} is not divisible by {tp}"
    if arch.num_kv_heads < tp and tp % arch.num_kv_heads:
        return f"{tp} is not a multiple of num_kv_heads={arch.num_kv_heads} (KV heads are replicated)"
    if arch.intermediate_size % tp:
        return f"intermediate_size={arch.intermediate_size} is not divisible by {tp}"
    return None


def shard_shape(arch: ModelArch, tp: int) -> ShardShape:
    problem = _tp_problem(arch, tp)
    if problem is not None:
        choices = ", ".join(str(t) for t in valid_tp_sizes(arch, 16))
        raise PlanError(f"tensor_parallel_size={tp}: {problem}; use one of {choices}")
    return ShardShape(tp=tp, num_heads=arch.num_heads // tp, num_kv_heads=max(1, arch.num_kv_heads // tp),
                      head_dim=arch.head_dim, hidden_size=arch.hidden_size,
                      intermediate_size=arch.intermediate_size // tp, vocab_rows=math.ceil(arch.vocab_size / tp))


def params_per_gpu(arch: ModelArch, shard: ShardShape) -> int:
    """Parameters one GPU holds (equals arch.num_params() at tp 1)."""
    h, s = arch.hidden_size, shard
    attn = h * s.q_size + 2 * h * s.kv_size + s.q_size * h  # q, k, v (column) + o_proj (row)
    if arch.attention_bias:
        attn += s.q_size + 2 * s.kv_size
    if arch.qk_norm:
        attn += 2 * arch.head_dim
    mlp = 3 * h * s.intermediate_size  # gate + up (column) + down (row)
    per_layer = attn + mlp + 2 * h  # + the two norms (replicated)
    total = s.vocab_rows * h + arch.num_layers * per_layer + h  # embedding + layers + final norm
    if not arch.tie_word_embeddings:
        total += s.vocab_rows * h  # LM head
    return total


# bytes per linear-layer weight under each weight scheme (codes + their scales; int4 packs two codes in a byte and
# keeps a 16-bit scale and zero point per group of 128)
LINEAR_BYTES_PER_PARAM: dict[str, float] = {"fp8": 1.0, "int8_wo": 1.0, "int8_sq": 1.0,
                                            "int4_wo": 0.5 + 4 / 128, "int4_awq": 0.5 + 4 / 128}


def linear_params_per_gpu(arch: ModelArch, shard: ShardShape) -> int:
    """Weights of the quantizable linear layers (q/k/v/o, gate/up/down) one GPU holds."""
    h, s = arch.hidden_size, shard
    return arch.num_layers * (h * s.q_size + 2 * h * s.kv_size + s.q_size * h + 3 * h * s.intermediate_size)


def weights_bytes_per_gpu(arch: ModelArch, shard: ShardShape, act_bytes: int, quantization: str,
                          lm_head_int8: bool = False) -> int:
    """Parameter bytes on one GPU: the linear layers in their weight scheme's bytes, the rest in the compute dtype.
    lm_head_int8: the head's rows as int8 + a float32 scale each; an untied head's float copy is freed, a tied one's
    is the embedding and stays."""
    total = params_per_gpu(arch, shard) * act_bytes
    per_param = LINEAR_BYTES_PER_PARAM.get(quantization)
    if per_param is not None:
        linear = linear_params_per_gpu(arch, shard)
        total -= linear * act_bytes - int(linear * per_param)
    if lm_head_int8:
        total += shard.vocab_rows * (arch.hidden_size + 4)
        if not arch.tie_word_embeddings:
            total -= shard.vocab_rows * arch.hidden_size * act_bytes
    return total


def kv_bytes_per_token(arch: ModelArch, shard: ShardShape, kv_dtype_bytes: int) -> int:
    """K and V of one token over all layers, on one GPU."""
    return 2 * arch.num_layers * shard.num_kv_heads * shard.head_dim * kv_dtype_bytes


def forward_peak_bytes(shard: ShardShape, num_tokens: int, act_bytes: int) -> int:
    """Peak live activations of a forward of num_tokens tokens (see the module docstring)."""
    h, q, kv, i = shard.hidden_size, shard.q_size, shard.kv_size, shard.intermediate_size
    attention = 4 * h + (q + 2 * kv) + (q + kv) + q
    mlp = 4 * h + 2 * i + i
    return num_tokens * act_bytes * max(attention, mlp)


def rotary_cache_bytes(arch: ModelArch) -> int:
    """The rotary embedding's cos/sin cache: float32 [max_position_embeddings, head_dim], on every GPU."""
    return arch.max_position_embeddings * arch.head_dim * 4


def logits_peak_bytes(arch: ModelArch, num_tokens: int, num_rows: int, act_bytes: int) -> int:
    """Final hidden states + float32 logits of num_rows rows + the sampler's softmax and sort copies."""
    return num_tokens * arch.hidden_size * act_bytes + num_rows * arch.vocab_size * SAMPLER_BYTES_PER_LOGIT


# ---- the core arithmetic ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Budget:
    """The figures of one planned configuration (bytes unless named otherwise)."""

    weights_bytes: int
    activation_bytes: int
    forward_peak_bytes: int
    logits_peak_bytes: int
    profile_num_tokens: int
    profile_num_rows: int
    cuda_graph_bytes: int
    cuda_graph_max_batch_size: int
    cuda_graph_max_num_tokens: int  # the largest mixed-step graph (0: none)
    non_torch_bytes: int
    usable_bytes: int  # memory - non_torch - weights - activations (GPU); the budget itself on CPU
    kv_budget_bytes: int
    kv_cap_reason: str | None  # which cap bound the budget (kv_cache_bytes / max_tokens_in_paged_kv_cache)
    kv_bytes_per_token: int
    kv_bytes_per_block: int
    num_blocks: int
    leftover_bytes: int  # what the KV cache leaves for CUDA graphs (GPU)


def _act_bytes(inputs: PlanInputs, on_gpu: bool) -> int:
    if inputs.dtype == "auto":
        return 2 if on_gpu else 4  # bfloat16 on a GPU, float32 on CPU (the loader's choice)
    return DTYPE_BYTES[inputs.dtype]


def _dtype_name(inputs: PlanInputs, on_gpu: bool) -> str:
    if inputs.dtype != "auto":
        return inputs.dtype
    return "bfloat16" if on_gpu else "float32"


def _kv_dtype_bytes(inputs: PlanInputs, act_bytes: int) -> int:
    return KV_QUANT_BYTES.get(inputs.kv_cache_dtype, act_bytes)


def _scaled(measured: int | None, estimate: int, base_estimate: int) -> int:
    """A measured figure carried over to a changed config in proportion to the estimates (the estimate if none)."""
    if measured is None:
        return estimate
    return measured if base_estimate == 0 else int(round(measured * estimate / base_estimate))


def _budget(arch: ModelArch, inputs: PlanInputs, max_seq_len: int, gpu_memory_bytes: int | None,
            measured: MeasuredMemory, base: PlanInputs) -> _Budget:
    on_gpu = gpu_memory_bytes is not None
    act = _act_bytes(inputs, on_gpu)
    shard = shard_shape(arch, inputs.tensor_parallel_size)
    # the loader's rule, on the scheme `quantization` names (a checkpoint's own is not read here)
    int8_head = lm_head_int8(inputs.quantize_lm_head,
                             QuantConfig(inputs.quantization) if inputs.quantization in QUANT_SCHEMES else None)
    weights = (weights_bytes_per_gpu(arch, shard, act, inputs.quantization, int8_head)
               + rotary_cache_bytes(arch))
    t = min(inputs.max_num_tokens, max_seq_len * inputs.max_batch_size)
    rows = max(1, min(inputs.max_batch_size, t))
    fwd = forward_peak_bytes(shard, t, act)
    logits = logits_peak_bytes(arch, t, rows, act)
    graph_max = 0
    if on_gpu and not inputs.enforce_eager and inputs.kernel_backend != "torch":
        graph_max = min(inputs.max_batch_size, inputs.cuda_graph_max_batch_size or DEFAULT_CUDA_GRAPH_MAX_BATCH_SIZE)
    mixed_max = mixed_graph_max_tokens(inputs.cuda_graph_max_num_tokens, inputs.max_num_tokens) if graph_max else 0
    graphs = _graph_pool_bytes(arch, shard, graph_max, mixed_max, act)
    base_graphs = graphs
    if measured != MeasuredMemory():
        base_b = _budget(arch, base, max_seq_len, gpu_memory_bytes, MeasuredMemory(), base)
        weights = _scaled(measured.weights_bytes, weights, base_b.weights_bytes)
        scaled_act = _scaled(measured.activation_bytes, max(fwd, logits), base_b.activation_bytes)
        graphs = _scaled(measured.cuda_graph_bytes, graphs, base_b.cuda_graph_bytes)
    else:
        scaled_act = max(fwd, logits)
    scale_graphs = graphs / base_graphs if base_graphs else 1.0
    per_token = kv_bytes_per_token(arch, shard, _kv_dtype_bytes(inputs, act))
    per_block = per_token * inputs.tokens_per_block
    non_torch = 0
    if on_gpu:
        non_torch = DEFAULT_NON_TORCH_BYTES if measured.non_torch_bytes is None else measured.non_torch_bytes
        assert gpu_memory_bytes is not None
        usable = gpu_memory_bytes - non_torch - weights - scaled_act
        if inputs.gpu_memory_utilization is not None:
            budget = int(inputs.gpu_memory_utilization * gpu_memory_bytes) - non_torch - weights - scaled_act
        else:
            budget = int(inputs.kv_cache_free_gpu_memory_fraction * usable)
        budget, cap_reason = _apply_caps(inputs, budget, per_block)
    else:
        budget, cap_reason = _cpu_budget(inputs, per_block)
        usable = budget
    num_blocks = max(0, budget // per_block)
    if inputs.max_tokens_in_paged_kv_cache is not None:
        num_blocks = min(num_blocks, inputs.max_tokens_in_paged_kv_cache // inputs.tokens_per_block)
    leftover = usable - num_blocks * per_block if on_gpu else 0  # what CUDA graphs are captured in
    if inputs.cuda_graph_max_num_tokens is None and graphs > leftover:
        # the default mixed-step size shrinks (in steps of 64 tokens, to none) to what the KV cache leaves
        while mixed_max > 0 and graphs > leftover:
            mixed_max = max(0, (mixed_max - 1) // 64 * 64)
            graphs = int(_graph_pool_bytes(arch, shard, graph_max, mixed_max, act) * scale_graphs)
    return _Budget(weights, scaled_act, fwd, logits, t, rows, graphs, graph_max, mixed_max, non_torch, usable, budget,
                   cap_reason, per_token, per_block, num_blocks, leftover)


def _graph_pool_bytes(arch: ModelArch, shard: ShardShape, graph_max: int, mixed_max: int, act_bytes: int) -> int:
    """Decode graphs up to graph_max rows, then mixed-step graphs up to mixed_max tokens (module docstring)."""
    if graph_max <= 0:
        return 0
    logits = graph_max * arch.vocab_size * (act_bytes + 4)  # in the graph + the shared float32 output buffer
    decode = forward_peak_bytes(shard, graph_max, act_bytes) + logits + GRAPH_WORKSPACE_BYTES
    if mixed_max <= 0:
        return decode
    mixed = forward_peak_bytes(shard, mixed_max, act_bytes) * MIXED_GRAPH_ROUNDING_NUM // MIXED_GRAPH_ROUNDING_DEN
    return decode + mixed + mixed_max * shard.hidden_size * act_bytes


def _cpu_budget(inputs: PlanInputs, per_block: int) -> tuple[int, str]:
    """(budget, the setting that set it): the runner's CPU rule."""
    if inputs.kv_cache_bytes is not None:
        return inputs.kv_cache_bytes, "kv_cache_bytes"
    if inputs.max_tokens_in_paged_kv_cache is not None:
        tokens = inputs.max_tokens_in_paged_kv_cache
        return math.ceil(tokens / inputs.tokens_per_block) * per_block, "max_tokens_in_paged_kv_cache"
    return CPU_DEFAULT_KV_CACHE_BYTES, "kv_cache_bytes (CPU default 1 GiB)"


def _apply_caps(inputs: PlanInputs, budget: int, per_block: int) -> tuple[int, str | None]:
    reason = None
    if inputs.kv_cache_bytes is not None and inputs.kv_cache_bytes < budget:
        budget, reason = inputs.kv_cache_bytes, "kv_cache_bytes"
    if inputs.max_tokens_in_paged_kv_cache is not None:
        cap = inputs.max_tokens_in_paged_kv_cache // inputs.tokens_per_block * per_block
        if cap < budget:
            budget, reason = cap, "max_tokens_in_paged_kv_cache"
    return budget, reason


# ---- the report ------------------------------------------------------------------------------------------------------
FITS = "fits"
KV_TOO_SMALL = "kv_too_small"  # one request of max_seq_len does not fit in the KV cache
NO_MEMORY_LEFT = "no_memory_left"  # weights + activations (+ context) alone exceed the GPU
GRAPHS_DO_NOT_FIT = "graphs_do_not_fit"  # the KV cache fits, but the CUDA graph pool does not fit in the rest


@dataclass(frozen=True)
class PlanFix:
    """One change that makes the plan fit (checked by planning again)."""

    field: str  # the config field to change ("gpu" for another GPU)
    value: Any
    text: str  # how the message says it


@dataclass
class MemoryPlanReport:
    """Where the memory goes for one model + settings on one GPU (bytes; per GPU under tensor parallelism)."""

    model_name: str
    gpu_name: str | None  # None: CPU or an anonymous --gpu-memory
    gpu_memory_bytes: int | None  # None: a CPU run with an explicit KV budget
    inputs: PlanInputs
    max_seq_len: int
    max_input_len: int
    context_length: int  # the model's max_position_embeddings
    dtype: str  # resolved compute dtype name
    kv_cache_dtype: str  # resolved KV dtype name
    num_params_per_gpu: int
    num_heads_per_gpu: int
    num_kv_heads_per_gpu: int
    kv_heads_replicated: bool
    rotary_cache_bytes: int
    weights_bytes: int  # parameters + the rotary cache
    activation_bytes: int
    forward_peak_bytes: int
    logits_peak_bytes: int
    profile_num_tokens: int
    profile_num_rows: int
    cuda_graph_bytes: int
    cuda_graph_max_batch_size: int
    cuda_graph_max_num_tokens: int  # the largest mixed-step graph (0: none)
    non_torch_bytes: int
    usable_bytes: int
    kv_budget_bytes: int
    kv_cap_reason: str | None
    kv_bytes_per_token: int
    kv_bytes_per_block: int
    num_blocks: int
    blocks_per_max_seq_len: int
    leftover_bytes: int
    largest_max_batch_size: int
    alpha: float
    max_num_tokens_guide: int  # the guide's formula at max_batch_size, max_input_len
    max_num_tokens_capacity: int  # the formula at the batch the KV cache holds, the workload's input length
    max_num_tokens_limit: int  # the largest whose activations leave room for one request of max_seq_len
    max_num_tokens_suggested: int
    workload_input_len: int | None = None
    workload_seq_len: int | None = None
    verdict: str = FITS
    shortfall_blocks: int = 0
    shortfall_bytes: int = 0
    fixes: list[PlanFix] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    # ---- derived ----
    @property
    def fits(self) -> bool:
        return self.verdict == FITS

    @property
    def kv_cache_bytes(self) -> int:
        return self.num_blocks * self.kv_bytes_per_block

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_blocks * self.inputs.tokens_per_block

    @property
    def requests_at_max_seq_len(self) -> int:
        return self.num_blocks // self.blocks_per_max_seq_len

    @property
    def requests_at_workload_len(self) -> int | None:
        if self.workload_seq_len is None:
            return None
        return self.num_blocks // math.ceil(self.workload_seq_len / self.inputs.tokens_per_block)

    @property
    def batch_held(self) -> int:
        """The batch the KV cache really holds: min(max_batch_size, requests at the workload length, else at
        max_seq_len), at least 1."""
        held = self.requests_at_workload_len if self.requests_at_workload_len is not None \
            else self.requests_at_max_seq_len
        return max(1, min(self.inputs.max_batch_size, held))

    # ---- the verdict as text ----
    def _memory_line(self) -> str:
        if self.gpu_memory_bytes is None:
            return "on CPU: the KV budget is kv_cache_bytes, else max_tokens_in_paged_kv_cache, else 1 GiB"
        gpu = f"{self.gpu_name} " if self.gpu_name else ""
        tp = f", per GPU at tensor_parallel_size={self.inputs.tensor_parallel_size}" \
            if self.inputs.tensor_parallel_size > 1 else ""
        share = (f"gpu_memory_utilization={self.inputs.gpu_memory_utilization:g} of the total"
                 if self.inputs.gpu_memory_utilization is not None else
                 f"{self.inputs.kv_cache_free_gpu_memory_fraction:g} x the {fmt_bytes(max(self.usable_bytes, 0))} "
                 "left")
        return (f"of the {gpu}GPU ({fmt_bytes(self.gpu_memory_bytes)}{tp}): weights {fmt_bytes(self.weights_bytes)}, "
                f"activations {fmt_bytes(self.activation_bytes)} (max_num_tokens={self.inputs.max_num_tokens}, "
                f"max_batch_size={self.inputs.max_batch_size}), driver + CUDA context "
                f"{fmt_bytes(self.non_torch_bytes)}, KV cache {share}")

    def refusal_message(self) -> str:
        """The reason the engine refuses to start, with the figures and the fixes ('' when the plan fits)."""
        if self.fits:
            return ""
        per_seq = self.blocks_per_max_seq_len * self.kv_bytes_per_block
        if self.verdict == NO_MEMORY_LEFT:
            head = (f"{self.model_name} does not fit: weights + activations + CUDA context exceed the GPU's memory "
                    f"by {fmt_bytes(self.shortfall_bytes)}, leaving nothing for the KV cache; one request of "
                    f"max_seq_len={self.max_seq_len} needs {self.blocks_per_max_seq_len} blocks "
                    f"({fmt_bytes(per_seq)})")
        elif self.verdict == GRAPHS_DO_NOT_FIT:
            mixed = f" and steps up to {self.cuda_graph_max_num_tokens} tokens" if self.cuda_graph_max_num_tokens else ""
            head = (f"the CUDA graphs of decode batches up to {self.cuda_graph_max_batch_size}{mixed} need "
                    f"{fmt_bytes(self.cuda_graph_bytes)} but the KV cache leaves {fmt_bytes(self.leftover_bytes)}: "
                    f"short by {fmt_bytes(self.shortfall_bytes)}")
        else:
            cap = f" (capped by {self.kv_cap_reason})" if self.kv_cap_reason else ""
            head = (f"one request of max_seq_len={self.max_seq_len} needs {self.blocks_per_max_seq_len} KV blocks "
                    f"of {self.inputs.tokens_per_block} tokens ({fmt_bytes(per_seq)} at "
                    f"{fmt_bytes(self.kv_bytes_per_token)}/token) but the KV cache holds {self.num_blocks} blocks "
                    f"({fmt_bytes(self.kv_cache_bytes)}){cap}: short by {self.shortfall_blocks} blocks "
                    f"({fmt_bytes(self.shortfall_bytes)})")
        fixes = "; or ".join(f.text for f in self.fixes) if self.fixes else "no single setting fixes it"
        return f"{head}. Memory {self._memory_line()}. Fix: {fixes}."

    def raise_if_not_fits(self) -> None:
        """Raise ConfigError(refusal_message()) when the plan does not fit (what the engine does at start)."""
        if not self.fits:
            raise ConfigError(self.refusal_message())

    def verdict_text(self) -> str:
        if not self.fits:
            return "DOES NOT FIT: " + self.refusal_message()
        n = self.requests_at_max_seq_len
        text = (f"fits: {self.num_blocks} KV blocks hold {n} request{'s' if n != 1 else ''} of max_seq_len="
                f"{self.max_seq_len} at once")
        if n < self.inputs.max_batch_size:
            text += (f" (< max_batch_size={self.inputs.max_batch_size}: guaranteed_no_evict admits at most {n} "
                     f"such requests; max_utilization runs more shorter ones and preempts when blocks run out)")
        return text

    # ---- outputs ----
    def table(self) -> str:
        """A readable table of every figure and how it was computed."""
        return format_table(self)

    def to_config(self) -> dict[str, Any]:
        """Flat settings (valid kvflight config keys) that `kvflight serve --config` reads, for this plan."""
        i = self.inputs
        out: dict[str, Any] = {"dtype": i.dtype, "kv_cache_dtype": i.kv_cache_dtype,
                               "tensor_parallel_size": i.tensor_parallel_size, "max_seq_len": self.max_seq_len,
                               "max_batch_size": i.max_batch_size, "max_num_tokens": i.max_num_tokens,
                               "tokens_per_block": i.tokens_per_block,
                               "kv_cache_free_gpu_memory_fraction": i.kv_cache_free_gpu_memory_fraction,
                               "batch_scheduler_policy": i.batch_scheduler_policy,
                               "enable_chunked_context": i.enable_chunked_context}
        for key in ("max_input_len", "gpu_memory_utilization", "kv_cache_bytes", "max_tokens_in_paged_kv_cache",
                    "cuda_graph_max_batch_size", "cuda_graph_max_num_tokens"):  # only when set: None would override nothing
            if getattr(i, key) is not None:
                out[key] = getattr(i, key)
        if i.enforce_eager:
            out["enforce_eager"] = True
        return out


def fmt_bytes(num_bytes: float) -> str:
    sign = "-" if num_bytes < 0 else ""
    n = abs(num_bytes)
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{int(n)} B"


# ---- plan_memory -----------------------------------------------------------------------------------------------------
def plan_memory(arch: ModelArch, config: EngineConfig | PlanInputs | Mapping[str, Any], gpu_memory_bytes: int | None,
                *, max_seq_len: int | None = None, measured: MeasuredMemory | None = None,
                model_name: str = "the model", gpu_name: str | None = None, alpha: float = DEFAULT_ALPHA,
                workload_seq_len: int | None = None, workload_input_len: int | None = None,
                with_fixes: bool = True) -> MemoryPlanReport:
    """Plan one GPU's memory for `arch` under `config` (EngineConfig, PlanInputs or flat keys).

    gpu_memory_bytes: the GPU's total memory; None plans a CPU run (explicit KV budget, no activations counted).
    max_seq_len: the engine's resolved value (default: config's, else the model's context length).
    measured: figures the runner measured on the GPU, used instead of the estimates.
    workload_seq_len: a typical request's prompt + output tokens, for "requests at the workload length";
    workload_input_len: its prompt tokens, for the capacity-based max_num_tokens (default: max_input_len).
    """
    inputs = config if isinstance(config, PlanInputs) else PlanInputs.from_config(config)
    measured = measured or MeasuredMemory()
    if not 0.0 < alpha <= 1.0:
        raise PlanError(f"alpha={alpha}: must be in (0, 1] (the guide suggests 0.05 .. 0.20)")
    seq_len = max_seq_len or inputs.max_seq_len or arch.max_position_embeddings
    if seq_len > arch.max_position_embeddings:
        raise PlanError(f"max_seq_len={seq_len} exceeds the model's context length ({arch.max_position_embeddings}); "
                        "lower max_seq_len")
    input_len = inputs.max_input_len or seq_len - 1
    b = _budget(arch, inputs, seq_len, gpu_memory_bytes, measured, inputs)
    shard = shard_shape(arch, inputs.tensor_parallel_size)
    blocks_per_seq = math.ceil(seq_len / inputs.tokens_per_block)
    report = MemoryPlanReport(
        model_name=model_name, gpu_name=gpu_name, gpu_memory_bytes=gpu_memory_bytes, inputs=inputs,
        max_seq_len=seq_len, max_input_len=input_len, context_length=arch.max_position_embeddings,
        dtype=_dtype_name(inputs, gpu_memory_bytes is not None),
        kv_cache_dtype=inputs.kv_cache_dtype if inputs.kv_cache_dtype != "auto" else "auto (= dtype)",
        num_params_per_gpu=params_per_gpu(arch, shard), num_heads_per_gpu=shard.num_heads,
        num_kv_heads_per_gpu=shard.num_kv_heads, kv_heads_replicated=arch.num_kv_heads < inputs.tensor_parallel_size,
        rotary_cache_bytes=rotary_cache_bytes(arch),
        **{f.name: getattr(b, f.name) for f in fields(_Budget)},  # every figure of the budget, under its name
        blocks_per_max_seq_len=blocks_per_seq,
        largest_max_batch_size=_largest_batch(arch, inputs, seq_len, gpu_memory_bytes, measured),
        alpha=alpha, max_num_tokens_guide=guide_max_num_tokens(inputs.max_batch_size, input_len, alpha),
        max_num_tokens_capacity=0,
        max_num_tokens_limit=_max_num_tokens_limit(arch, inputs, seq_len, gpu_memory_bytes, measured),
        max_num_tokens_suggested=0, workload_input_len=workload_input_len, workload_seq_len=workload_seq_len)
    report.max_num_tokens_capacity = _capacity_max_num_tokens(report)
    report.max_num_tokens_suggested = _suggest_max_num_tokens(report)
    _set_verdict(report, b)
    if with_fixes and not report.fits:
        report.fixes = find_fixes(arch, report, measured)
    report.notes = _notes(report)
    return report


def guide_max_num_tokens(max_batch_size: int, max_input_len: int, alpha: float = DEFAULT_ALPHA,
                         max_beam_width: int = 1) -> int:
    """The guide's estimate: max_batch_size * max_input_len * alpha + max_batch_size * max_beam_width * (1 - alpha)."""
    return int(round(max_batch_size * max_input_len * alpha + max_batch_size * max_beam_width * (1 - alpha)))


def _fits_blocks(b: _Budget, blocks_needed: int) -> bool:
    return b.usable_bytes > 0 and b.num_blocks >= blocks_needed


def _largest_batch(arch: ModelArch, inputs: PlanInputs, seq_len: int, gpu_memory_bytes: int | None,
                   measured: MeasuredMemory) -> int:
    """The largest max_batch_size whose requests of max_seq_len all fit at once (0: not even one)."""
    blocks_per_seq = math.ceil(seq_len / inputs.tokens_per_block)

    def fits(batch: int) -> bool:
        b = _budget(arch, inputs.replace(max_batch_size=batch), seq_len, gpu_memory_bytes, measured, inputs)
        return _fits_blocks(b, batch * blocks_per_seq)

    return _largest_true(fits, 1, 1 << 20)


def _max_num_tokens_limit(arch: ModelArch, inputs: PlanInputs, seq_len: int, gpu_memory_bytes: int | None,
                          measured: MeasuredMemory) -> int:
    """The largest max_num_tokens (up to max_batch_size * max_seq_len, where the profile stops growing) whose
    activations still leave room for one request of max_seq_len; 0 if none."""
    blocks_per_seq = math.ceil(seq_len / inputs.tokens_per_block)

    def fits(tokens: int) -> bool:
        b = _budget(arch, inputs.replace(max_num_tokens=tokens), seq_len, gpu_memory_bytes, measured, inputs)
        return _fits_blocks(b, blocks_per_seq)

    return _largest_true(fits, 1, inputs.max_batch_size * seq_len)


def _capacity_max_num_tokens(r: MemoryPlanReport) -> int:
    """The guide's formula for the batch the KV cache really holds: min(max_batch_size, requests that fit at the
    workload length, else at max_seq_len), with the workload's prompt length when given."""
    return guide_max_num_tokens(r.batch_held, r.workload_input_len or r.max_input_len, r.alpha)


def _largest_true(pred: Any, lo: int, hi: int) -> int:
    """The largest x in [lo, hi] with pred(x), pred being monotone (true then false); 0 when pred(lo) is false."""
    if not pred(lo):
        return 0
    if pred(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if pred(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _suggest_max_num_tokens(r: MemoryPlanReport) -> int:
    """The capacity-based value rounded to 256, at least one full decode batch (max_batch_size) and, without
    chunked context, one whole prompt (max_input_len); at most the memory limit."""
    i = r.inputs
    value = max(256, int(round(r.max_num_tokens_capacity / 256)) * 256)
    floor = max(i.max_batch_size, 0 if i.enable_chunked_context else r.max_input_len)
    value = max(value, floor)
    if r.max_num_tokens_limit:
        value = min(value, max(r.max_num_tokens_limit, floor))
    return value


def _set_verdict(r: MemoryPlanReport, b: _Budget) -> None:
    if r.gpu_memory_bytes is not None and b.usable_bytes <= 0:
        r.verdict, r.shortfall_bytes = NO_MEMORY_LEFT, -b.usable_bytes
        r.shortfall_blocks = r.blocks_per_max_seq_len
    elif r.num_blocks < r.blocks_per_max_seq_len:
        r.verdict = KV_TOO_SMALL
        r.shortfall_blocks = r.blocks_per_max_seq_len - r.num_blocks
        r.shortfall_bytes = r.shortfall_blocks * r.kv_bytes_per_block
    elif r.gpu_memory_bytes is not None and r.cuda_graph_bytes > r.leftover_bytes:
        r.verdict, r.shortfall_bytes = GRAPHS_DO_NOT_FIT, r.cuda_graph_bytes - r.leftover_bytes


# ---- fixes -----------------------------------------------------------------------------------------------------------
class _Replanner:
    """Plans changed copies of a report's inputs. `ok(changed)`: the change solves the report's problem (for a KV
    problem, CUDA graphs that then do not fit are left to a second change, which `fix` names)."""

    def __init__(self, arch: ModelArch, report: MemoryPlanReport, measured: MeasuredMemory, graphs_only: bool):
        self.arch, self.report, self.measured, self.graphs_only = arch, report, measured, graphs_only
        self._cache: dict[tuple[PlanInputs, int, int | None], MemoryPlanReport | None] = {}

    def plan(self, changed: PlanInputs, seq_len: int | None = None, memory: int | None = None
             ) -> MemoryPlanReport | None:
        key = (changed, seq_len or self.report.max_seq_len, memory or self.report.gpu_memory_bytes)
        if key not in self._cache:
            try:
                self._cache[key] = plan_memory(self.arch, changed, key[2], max_seq_len=key[1], with_fixes=False,
                                               measured=_carry(self.measured, changed, self.report.inputs))
            except PlanError:
                self._cache[key] = None
        return self._cache[key]

    def ok(self, changed: PlanInputs, seq_len: int | None = None, memory: int | None = None) -> bool:
        r = self.plan(changed, seq_len, memory)
        if r is None:
            return False
        return r.fits if self.graphs_only else r.verdict in (FITS, GRAPHS_DO_NOT_FIT)

    def fix(self, field_name: str, value: Any, text: str, changed: PlanInputs, seq_len: int | None = None,
            memory: int | None = None) -> PlanFix:
        r = self.plan(changed, seq_len, memory)
        if r is not None and r.verdict == GRAPHS_DO_NOT_FIT:
            then = _graph_fixes(_Replanner(self.arch, r, self.measured, graphs_only=True))
            text += f" (then also {then[0].text}: the CUDA graphs need {fmt_bytes(r.cuda_graph_bytes)})"
        return PlanFix(field_name, value, text)


def find_fixes(arch: ModelArch, report: MemoryPlanReport, measured: MeasuredMemory | None = None) -> list[PlanFix]:
    """Single changes that make the plan fit, each checked by planning again, most direct first."""
    rp = _Replanner(arch, report, measured or MeasuredMemory(), graphs_only=report.verdict == GRAPHS_DO_NOT_FIT)
    if report.verdict == GRAPHS_DO_NOT_FIT:
        return _graph_fixes(rp)
    i = report.inputs
    fixes = _seq_len_fix(rp)
    fp8 = i.replace(kv_cache_dtype="fp8")
    if i.kv_cache_dtype == "auto" and _act_bytes(i, report.gpu_memory_bytes is not None) > 1 and rp.ok(fp8):
        fixes.append(rp.fix("kv_cache_dtype", "fp8", "set kv_cache_dtype fp8 (1 byte per element)", fp8))
    for tp in TP_CANDIDATES:
        wider = i.replace(tensor_parallel_size=tp)
        if tp > i.tensor_parallel_size and _tp_problem(arch, tp) is None and rp.ok(wider):
            fixes.append(rp.fix("tensor_parallel_size", tp, f"use tensor_parallel_size {tp} ({tp} GPUs)", wider))
            break
    return fixes + _cap_fixes(rp) + _budget_fixes(rp) + _gpu_fix(rp)


def _carry(measured: MeasuredMemory, changed: PlanInputs, base: PlanInputs) -> MeasuredMemory:
    """Measured figures stay valid only for the same tensor-parallel split and dtype; else estimate afresh."""
    if changed.tensor_parallel_size != base.tensor_parallel_size or changed.dtype != base.dtype:
        return MeasuredMemory(non_torch_bytes=measured.non_torch_bytes)
    return measured


def _seq_len_fix(rp: _Replanner) -> list[PlanFix]:
    """The longest max_seq_len that fits (checked, since it also shrinks the profiling forward)."""
    r, i = rp.report, rp.report.inputs

    def shorter(n: int) -> PlanInputs:
        keep_input_len = i.max_input_len is not None and i.max_input_len < n
        return i.replace(max_seq_len=n, max_input_len=i.max_input_len if keep_input_len else None)

    best = _largest_true(lambda n: rp.ok(shorter(n), n), 2, r.max_seq_len - 1)
    if not best:
        return []
    extra = " (and max_input_len below it)" if i.max_input_len is not None and i.max_input_len >= best else ""
    return [rp.fix("max_seq_len", best, f"lower max_seq_len to {best}{extra}", shorter(best), best)]


def _cap_fixes(rp: _Replanner) -> list[PlanFix]:
    r, i = rp.report, rp.report.inputs
    need_tokens = r.blocks_per_max_seq_len * i.tokens_per_block
    need_bytes = r.blocks_per_max_seq_len * r.kv_bytes_per_block
    fixes: list[PlanFix] = []
    more_tokens = i.replace(max_tokens_in_paged_kv_cache=need_tokens)
    if r.kv_cap_reason == "max_tokens_in_paged_kv_cache" and rp.ok(more_tokens):
        fixes.append(rp.fix("max_tokens_in_paged_kv_cache", need_tokens,
                            f"raise max_tokens_in_paged_kv_cache to {need_tokens}", more_tokens))
    more_bytes = i.replace(kv_cache_bytes=need_bytes)
    if (r.kv_cap_reason or "").startswith("kv_cache_bytes") and rp.ok(more_bytes):
        fixes.append(rp.fix("kv_cache_bytes", need_bytes,
                            f"raise kv_cache_bytes to {need_bytes} ({fmt_bytes(need_bytes)})", more_bytes))
    return fixes


def _budget_fixes(rp: _Replanner) -> list[PlanFix]:
    """Smaller activations (max_num_tokens, max_batch_size) or a larger share for the KV cache."""
    r, i = rp.report, rp.report.inputs
    fixes: list[PlanFix] = []
    if r.gpu_memory_bytes is None:
        return fixes
    floor = 1 if i.enable_chunked_context else r.max_input_len
    if i.max_num_tokens > floor:
        tokens = _largest_true(lambda t: rp.ok(i.replace(max_num_tokens=t)), floor, i.max_num_tokens - 1)
        if tokens:
            fixes.append(rp.fix("max_num_tokens", tokens, f"lower max_num_tokens to {tokens}",
                                i.replace(max_num_tokens=tokens)))
    if i.max_batch_size > 1:
        batch = _largest_true(lambda n: rp.ok(i.replace(max_batch_size=n)), 1, i.max_batch_size - 1)
        if batch:
            fixes.append(rp.fix("max_batch_size", batch, f"lower max_batch_size to {batch}",
                                i.replace(max_batch_size=batch)))
    if i.gpu_memory_utilization is None and i.kv_cache_free_gpu_memory_fraction < 1.0:
        for hundredths in range(int(i.kv_cache_free_gpu_memory_fraction * 100) + 1, 101):
            more = i.replace(kv_cache_free_gpu_memory_fraction=hundredths / 100)
            if rp.ok(more):
                fixes.append(rp.fix("kv_cache_free_gpu_memory_fraction", hundredths / 100,
                                    f"raise kv_cache_free_gpu_memory_fraction to {hundredths / 100:.2f}", more))
                break
    return fixes


def _gpu_fix(rp: _Replanner) -> list[PlanFix]:
    r = rp.report
    if r.gpu_memory_bytes is None:
        return []
    for name, mib in sorted(KNOWN_GPUS_MIB.items(), key=lambda kv: kv[1]):
        if mib * MIB > r.gpu_memory_bytes and rp.ok(r.inputs, memory=mib * MIB):
            return [rp.fix("gpu", name, f"use a GPU with more memory (e.g. {name}, {fmt_bytes(mib * MIB)})",
                           r.inputs, memory=mib * MIB)]
    return []


def _graph_fixes(rp: _Replanner) -> list[PlanFix]:
    """Fixes for CUDA graphs that do not fit in what the KV cache leaves (rp.graphs_only is True)."""
    r, i = rp.report, rp.report.inputs
    fixes: list[PlanFix] = []
    size = _largest_true(lambda n: rp.ok(i.replace(cuda_graph_max_batch_size=n)), 1,
                         max(1, r.cuda_graph_max_batch_size - 1))  # (the default mixed-step size shrinks)
    if size:
        fixes.append(PlanFix("cuda_graph_max_batch_size", size, f"lower cuda_graph_max_batch_size to {size}"))
    if r.cuda_graph_max_num_tokens > 1:
        tokens = _largest_true(lambda n: rp.ok(i.replace(cuda_graph_max_num_tokens=n)), 1,
                               r.cuda_graph_max_num_tokens - 1)
        if tokens:
            fixes.append(PlanFix("cuda_graph_max_num_tokens", tokens, f"lower cuda_graph_max_num_tokens to {tokens}"))
    if r.cuda_graph_max_num_tokens and rp.ok(i.replace(cuda_graph_max_num_tokens=0)) and \
            not any(f.field == "cuda_graph_max_num_tokens" for f in fixes):
        fixes.append(PlanFix("cuda_graph_max_num_tokens", 0, "set cuda_graph_max_num_tokens 0 (steps carrying "
                             "prompt tokens launch kernel by kernel)"))
    if i.gpu_memory_utilization is None:
        for hundredths in range(int(round(i.kv_cache_free_gpu_memory_fraction * 100)) - 1, 0, -1):
            if rp.ok(i.replace(kv_cache_free_gpu_memory_fraction=hundredths / 100)):
                fixes.append(PlanFix("kv_cache_free_gpu_memory_fraction", hundredths / 100,
                                     f"lower kv_cache_free_gpu_memory_fraction to {hundredths / 100:.2f}"))
                break
    fixes.append(PlanFix("enforce_eager", True, "set enforce_eager (no CUDA graphs; slower decode)"))
    return fixes


def _notes(r: MemoryPlanReport) -> list[str]:
    i, notes = r.inputs, []
    if r.max_num_tokens_limit and i.max_num_tokens > r.max_num_tokens_limit:
        notes.append(f"max_num_tokens={i.max_num_tokens} is above the memory limit {r.max_num_tokens_limit}: its "
                     "activation workspace leaves no room for one request of max_seq_len")
    if not i.enable_chunked_context and i.max_num_tokens < r.max_input_len:
        notes.append(f"enable_chunked_context is off and max_num_tokens={i.max_num_tokens} < max_input_len="
                     f"{r.max_input_len}: the engine refuses; raise max_num_tokens or enable chunked context")
    if i.kv_cache_dtype != "auto":
        notes.append(f"kv_cache_dtype={i.kv_cache_dtype}: planned at 1 byte per element (codes with per-layer, "
                     "per-KV-head K / V scales)")
    if i.tensor_parallel_size > 1:
        notes.append(f"tensor_parallel_size={i.tensor_parallel_size}: figures are per GPU; the engine accepts only 1 "
                     "so far; see `kvflight topo` for whether a custom all-reduce pays on your GPUs")
    return notes


# ---- the table -------------------------------------------------------------------------------------------------------
def format_table(r: MemoryPlanReport) -> str:
    i = r.inputs
    gpu = "CPU (explicit KV budget)" if r.gpu_memory_bytes is None else \
        f"{r.gpu_name or 'GPU'} ({fmt_bytes(r.gpu_memory_bytes)})"
    title = (f"kvflight plan: {r.model_name} on {gpu}, tensor_parallel_size {i.tensor_parallel_size}, {r.dtype}, "
             f"KV {r.kv_cache_dtype}")
    rows: list[tuple[str, str, str]] = [
        ("weights per GPU", fmt_bytes(r.weights_bytes),
         f"{r.num_params_per_gpu / 1e9:.3f} B params x {_act_name_bytes(r)} B + rotary cache "
         f"{fmt_bytes(r.rotary_cache_bytes)}"),
        ("heads per GPU (q / kv)", f"{r.num_heads_per_gpu} / {r.num_kv_heads_per_gpu}",
         "KV heads replicated (fewer than tensor_parallel_size)" if r.kv_heads_replicated else ""),
        ("activation workspace", fmt_bytes(r.activation_bytes),
         f"max(forward {fmt_bytes(r.forward_peak_bytes)}, logits+sampler {fmt_bytes(r.logits_peak_bytes)}) for "
         f"{r.profile_num_tokens} tokens, {r.profile_num_rows} rows"),
        ("CUDA graph pool", fmt_bytes(r.cuda_graph_bytes),
         (f"decode batches <= {r.cuda_graph_max_batch_size}" + (f", steps with prompt tokens <= "
          f"{r.cuda_graph_max_num_tokens} tokens" if r.cuda_graph_max_num_tokens else ""))
         if r.cuda_graph_max_batch_size else "none"),
    ]
    if r.gpu_memory_bytes is not None:
        rows.append(("driver + CUDA context", fmt_bytes(r.non_torch_bytes),
                     "outside torch; the engine measures it (--non-torch-memory)"))
        share = (f"{i.gpu_memory_utilization:g} x total - the above" if i.gpu_memory_utilization is not None
                 else f"{i.kv_cache_free_gpu_memory_fraction:g} x {fmt_bytes(r.usable_bytes)} free")
        rows.append(("KV cache budget", fmt_bytes(max(r.kv_budget_bytes, 0)),
                     share + (f", capped by {r.kv_cap_reason}" if r.kv_cap_reason else "")))
    else:
        rows.append(("KV cache budget", fmt_bytes(r.kv_budget_bytes), r.kv_cap_reason or "kv_cache_bytes / default"))
    rows += [
        ("KV bytes per token", fmt_bytes(r.kv_bytes_per_token), "2 x layers x kv heads x head_dim x dtype bytes"),
        ("KV bytes per block", fmt_bytes(r.kv_bytes_per_block), f"{i.tokens_per_block} tokens per block"),
        ("KV capacity", f"{r.num_blocks} blocks", f"{r.kv_capacity_tokens} tokens, {fmt_bytes(r.kv_cache_bytes)}"),
        (f"requests of max_seq_len={r.max_seq_len}", str(r.requests_at_max_seq_len),
         f"{r.blocks_per_max_seq_len} blocks each"),
    ]
    if r.workload_seq_len is not None:
        rows.append((f"requests of {r.workload_seq_len} tokens", str(r.requests_at_workload_len), "workload length"))
    if r.gpu_memory_bytes is not None:
        rows.append(("left for CUDA graphs", fmt_bytes(r.leftover_bytes), "after the KV cache"))
    rows += [
        ("largest max_batch_size", str(r.largest_max_batch_size),
         f"all at max_seq_len at once (given: {i.max_batch_size})"),
        ("max_num_tokens (guide)", str(r.max_num_tokens_guide),
         f"B x max_input_len x {r.alpha:g} + B x 1 x {1 - r.alpha:g}, B={i.max_batch_size}, "
         f"max_input_len={r.max_input_len}"),
        ("max_num_tokens (capacity)", str(r.max_num_tokens_capacity),
         f"the formula at B={r.batch_held} (what the KV cache holds), input {r.workload_input_len or r.max_input_len}"),
        ("max_num_tokens (memory limit)", str(r.max_num_tokens_limit),
         "largest that leaves room for one request of max_seq_len"),
        ("max_num_tokens suggested", str(r.max_num_tokens_suggested), f"given: {i.max_num_tokens}"),
    ]
    widths = [max(len(row[k]) for row in rows) for k in range(2)]
    lines = [title, "-" * len(title)]
    lines += [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c}".rstrip() for a, b, c in rows]
    lines.append("")
    lines.append("verdict: " + r.verdict_text())
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def _act_name_bytes(r: MemoryPlanReport) -> int:
    return DTYPE_BYTES[r.dtype]


# ---- YAML ------------------------------------------------------------------------------------------------------------
def config_yaml(flat: Mapping[str, Any], header_lines: Sequence[str] = ()) -> str:
    """A flat config as YAML text (what `kvflight serve --config` reads), with '#' header lines."""
    import yaml

    head = "".join(f"# {line}\n" for line in header_lines)
    return head + yaml.safe_dump(dict(flat), sort_keys=False, default_flow_style=False)


def typed_settings(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The same settings with values converted to their field types ('2048' -> 2048, 'off' -> False), for YAML.
    Keys EngineConfig does not take as they are (kv_cache_dtype fp8, tensor_parallel_size > 1) keep their values."""
    plain = {k: v for k, v in flat.items() if k not in ("kv_cache_dtype", "tensor_parallel_size", "tp")}
    try:
        typed = EngineConfig.from_flat(plain).to_flat()
    except ConfigError:
        return dict(flat)
    return {k: typed.get(k.replace("-", "_"), v) if k in plain else v for k, v in flat.items()}


def engine_accepts(flat: Mapping[str, Any]) -> str | None:
    """None when EngineConfig takes these settings, else the reason it refuses."""
    try:
        EngineConfig.from_flat(dict(flat))
    except ConfigError as exc:
        return str(exc)
    return None


# ---- CLI -------------------------------------------------------------------------------------------------------------
def add_plan_args(parser: argparse.ArgumentParser) -> None:
    """`kvflight plan [MODEL] --gpu H100-80GB | --gpu-memory 80GiB [engine flags]`."""
    parser.add_argument("model", nargs="?", default=None,
                        help="HF model directory (config.json is enough), .gguf file, or preset name "
                             "(llama-3.1-8b, llama-3.1-70b, qwen2.5-7b, smollm2-135m); default: SmolLM2-135M")
    parser.add_argument("--config", default=None, metavar="FILE.yaml", help="YAML settings; flags override them")
    gpu = parser.add_argument_group("GPU")
    gpu.add_argument("--gpu", default=None, metavar="NAME", help=f"a known GPU: {', '.join(KNOWN_GPUS_MIB)}")
    gpu.add_argument("--gpu-memory", default=None, metavar="SIZE",
                     help="the GPU's total memory, e.g. 80GiB or 81559MiB (overrides --gpu)")
    gpu.add_argument("--non-torch-memory", default=None, metavar="SIZE",
                     help=f"CUDA context and other processes' memory (default {fmt_bytes(DEFAULT_NON_TORCH_BYTES)})")
    work = parser.add_argument_group("workload")
    work.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                      help="the guide's context share of a step's tokens for max_num_tokens (0.05 .. 0.20)")
    work.add_argument("--input-len", type=int, default=None, help="a typical prompt length (tokens)")
    work.add_argument("--output-len", type=int, default=None, help="a typical output length (tokens)")
    out = parser.add_argument_group("output")
    out.add_argument("--output-config", default=None, metavar="FILE.yaml",
                     help="write the planned settings as a YAML config for `kvflight serve --config`")
    out.add_argument("--apply-suggestions", action="store_true",
                     help="plan (and write) max_batch_size = min(given, largest that fits) and the suggested "
                          "max_num_tokens instead of the given ones")
    out.add_argument("--json", action="store_true", help="print the figures as JSON instead of the table")
    add_cli_args(parser, sections=("model", "cache", "scheduler", "parallel", "runtime"),
                 skip=("model", "tokenizer", "device", "seed", "served_model_name", "load_format"))
    for action in parser._actions:  # the planner plans quantized KV caches the engine does not take yet
        if action.dest == "kv_cache_dtype":
            action.choices = KV_CACHE_DTYPES
            action.help = "KV cache dtype: auto (= dtype), fp8, int8 (1 byte per element)"


def _plan_flat(args: argparse.Namespace) -> tuple[str | None, dict[str, Any]]:
    """(the model argument, the given settings: YAML overridden by flags; the model comes from either)."""
    flat = load_yaml(args.config) if args.config else {}
    flat.update(flat_from_args(args))
    model = args.model if args.model is not None else flat.get("model")
    for key in ("model", "load_format"):
        flat.pop(key, None)
    return model, flat


def _gpu_from_args(args: argparse.Namespace) -> tuple[int | None, str | None]:
    if args.gpu_memory is not None:
        try:
            return parse_size(str(args.gpu_memory)), canonical_gpu_name(args.gpu) if args.gpu else None
        except ValueError:
            raise PlanError(f"--gpu-memory {args.gpu_memory!r}: give a size like 80GiB or 81559MiB") from None
    if args.gpu is not None:
        return gpu_memory_bytes_of(args.gpu), canonical_gpu_name(args.gpu)
    raise PlanError("say which GPU: --gpu NAME (" + ", ".join(KNOWN_GPUS_MIB) + ") or --gpu-memory SIZE (e.g. 80GiB)")


def load_model_arch(model: str | None) -> tuple[ModelArch, str, dict[str, Any]]:
    """(arch, display name, config keys that select it) for an HF dir / .gguf / preset, reading no weights."""
    from kvflight.model.loader import load_arch, resolve_model

    resolved = resolve_model(model, "dummy")  # the config alone: no weights needed
    keys: dict[str, Any] = {}
    if model is not None:
        keys["model"] = model
        if resolved.preset is not None:
            keys["load_format"] = "dummy"
    return load_arch(resolved), resolved.name, keys


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan; write --output-config when it fits. Exit 0 = fits, 1 = does not fit, 2 = bad input."""
    try:
        model, flat = _plan_flat(args)
        arch, name, model_keys = load_model_arch(model)
        gpu_bytes, gpu_name = _gpu_from_args(args)
        measured = MeasuredMemory(non_torch_bytes=parse_size(str(args.non_torch_memory))
                                  if args.non_torch_memory else None)
        workload = (args.input_len or 0) + (args.output_len or 0) or None
        report = plan_memory(arch, flat, gpu_bytes, measured=measured, model_name=name, gpu_name=gpu_name,
                             alpha=args.alpha, workload_seq_len=workload, workload_input_len=args.input_len)
        if args.apply_suggestions and report.fits:
            report = _apply_suggestions(arch, report, flat, measured, name, gpu_name, args.alpha, workload,
                                        args.input_len)
    except (PlanError, ConfigError, ValueError, OSError) as exc:
        print(f"kvflight plan: error: {exc}", file=sys.stderr)
        return 2
    print(_report_json(report) if args.json else report.table())
    if args.output_config:
        if not report.fits:
            print(f"kvflight plan: not writing {args.output_config}: the plan does not fit (see the fixes above)",
                  file=sys.stderr)
        else:
            _write_config(args.output_config, report, {**model_keys, **flat})
    return 0 if report.fits else 1


def _apply_suggestions(arch: ModelArch, report: MemoryPlanReport, flat: dict[str, Any], measured: MeasuredMemory,
                       name: str, gpu_name: str | None, alpha: float, workload: int | None,
                       input_len: int | None) -> MemoryPlanReport:
    """Plan again with max_batch_size = min(given, largest that fits) and the suggested max_num_tokens."""
    changed = dict(flat)
    kw = dict(measured=measured, model_name=name, gpu_name=gpu_name, alpha=alpha, workload_seq_len=workload,
              workload_input_len=input_len)
    if report.largest_max_batch_size:
        changed["max_batch_size"] = min(report.inputs.max_batch_size, report.largest_max_batch_size)
    first = plan_memory(arch, changed, report.gpu_memory_bytes, **kw)  # type: ignore[arg-type]
    changed["max_num_tokens"] = first.max_num_tokens_suggested
    second = plan_memory(arch, changed, report.gpu_memory_bytes, **kw)  # type: ignore[arg-type]
    return second if second.fits else report


def _write_config(path: str, report: MemoryPlanReport, given: dict[str, Any]) -> None:
    """The given settings (model, YAML, flags) overlaid with the planned ones, with the plan as comments."""
    flat = typed_settings({**given, **report.to_config()})
    header = [f"kvflight plan: {report.model_name} on {report.gpu_name or fmt_bytes(report.gpu_memory_bytes or 0)}",
              f"KV cache {report.num_blocks} blocks = {report.kv_capacity_tokens} tokens; "
              f"{report.requests_at_max_seq_len} requests of max_seq_len={report.max_seq_len}",
              f"suggested max_num_tokens {report.max_num_tokens_suggested}; largest max_batch_size "
              f"{report.largest_max_batch_size}"]
    refusal = engine_accepts(flat)
    if refusal is not None:
        header.append(f"NOTE: this engine version does not accept it yet: {refusal}")
        print(f"kvflight plan: warning: {path}: the engine does not accept it yet ({refusal})", file=sys.stderr)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(config_yaml(flat, header))
    print(f"config written to {path}", file=sys.stderr)


def _report_json(r: MemoryPlanReport) -> str:
    import json

    out = {k: v for k, v in dataclasses.asdict(r).items() if k not in ("inputs", "fixes")}
    out["inputs"] = dataclasses.asdict(r.inputs)
    out["fixes"] = [dataclasses.asdict(f) for f in r.fixes]
    out.update(kv_cache_bytes=r.kv_cache_bytes, kv_capacity_tokens=r.kv_capacity_tokens,
               requests_at_max_seq_len=r.requests_at_max_seq_len, refusal_message=r.refusal_message())
    return json.dumps(out, indent=2)
