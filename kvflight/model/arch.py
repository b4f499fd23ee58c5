"""ModelArch: the shape of a Llama-family model (sizes, RoPE, norms, special ids), parsed from an HF config dict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvflight.model.registry import (
    MODEL_TYPE_TO_ARCH,
    SUPPORTED_ARCHITECTURES,
    UnsupportedArchitectureError,
    supported_list,
)

# RoPE scaling types the rotary embedding implements ("default" is stored as rope_scaling=None).
# "freq_factors" is internal: llama.cpp's per-frequency divisors (GGUF tensor rope_freqs.weight).
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3", "freq_factors")


class ArchError(ValueError):
    """A config value kvflight cannot run; the message says what is supported."""


@dataclass(frozen=True)
class ModelArch:
    """Everything the model code, the memory planner and the engine need to know about a checkpoint's shape."""

    architecture: str  # HF class name, one of SUPPORTED_ARCHITECTURES
    hidden_size: int
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # == num_heads for MHA, fewer for GQA
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # None = plain RoPE; else {"rope_type": ..., params}
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedArchitectureError(
                f"unsupported model architecture '{self.architecture}'; supported: {supported_list()}")
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
                     "vocab_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ArchError(f"ModelArch.{name}={value!r}: must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ArchError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}; "
                            "grouped-query attention needs whole groups")
        if self.head_dim % 2:
            raise ArchError(f"head_dim={self.head_dim}: rotary embedding needs an even head_dim")
        if not self.rms_norm_eps > 0:
            raise ArchError(f"rms_norm_eps={self.rms_norm_eps}: must be > 0")
        if not self.rope_theta > 0:
            raise ArchError(f"rope_theta={self.rope_theta}: must be > 0")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type")
            if kind not in SUPPORTED_ROPE_TYPES or kind == "default":
                raise ArchError(f"rope_scaling type {kind!r} is not supported; supported: "
                                f"{', '.join(SUPPORTED_ROPE_TYPES)} (store 'default' as rope_scaling=None)")

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K plus V cache one token takes over all layers, at `dtype_bytes` per element."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def num_params(self) -> int:
        """Parameter count (embedding + layers + final norm + untied lm_head)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        if self.qk_norm:
            attn += 2 * d
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h  # + input / post-attention norms
        total = self.vocab_size * h + self.num_layers * per_layer + h
        if not self.tie_word_embeddings:
            total += self.vocab_size * h
        return total

    def weight_bytes(self, dtype_bytes: int) -> int:
        return self.num_params() * dtype_bytes

    # ---- parsing -------------------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> "ModelArch":
        """Parse an HF config.json dict (transformers 4.x `rope_theta`/`rope_scaling` or 5.x `rope_parameters`)."""
        if not isinstance(config, dict):
            raise ArchError(f"expected an HF config dict, got {type(config).__name__}")
        architecture = _architecture_of(config)

        def req(key: str) -> Any:
            if config.get(key) is None:
                raise ArchError(f"config.json of a {architecture} lacks required key '{key}'")
            return config[key]

        hidden_size = int(req("hidden_size"))
        num_heads = int(req("num_attention_heads"))
        num_kv_heads = int(config.get("num_key_value_heads") or num_heads)
        head_dim = int(config.get("head_dim") or hidden_size // num_heads)
        act = config.get("hidden_act", config.get("hidden_activation", "silu"))
        if act != "silu":
            raise ArchError(f"hidden_act={act!r} is not supported; supported: silu")
        if config.get("mlp_bias"):
            raise ArchError("mlp_bias=true is not supported; supported: MLP projections without bias")
        max_pos = int(req("max_position_embeddings"))
        _check_sliding_window(architecture, config, max_pos)
        rope_theta, rope_scaling = _parse_rope(config)
        if architecture == "Qwen2ForCausalLM":
            attention_bias = True  # Qwen2 always has q/k/v biases; its config has no key for it
        else:
            attention_bias = bool(config.get("attention_bias", False))
        qk_norm = architecture == "Qwen3ForCausalLM"
        eos = config.get("eos_token_id")
        eos_list = [] if eos is None else eos if isinstance(eos, list) else [eos]
        eos_ids = tuple(int(e) for e in eos_list)
        bos = config.get("bos_token_id")
        return cls(
            architecture=architecture,
            hidden_size=hidden_size,
            num_layers=int(req("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            intermediate_size=int(req("intermediate_size")),
            vocab_size=int(req("vocab_size")),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            qk_norm=qk_norm,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=eos_ids,
        )


def _architecture_of(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    for name in archs:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    if archs:
        raise UnsupportedArchitectureError(
            f"unsupported model architecture {archs}; supported: {supported_list()}")
    model_type = config.get("model_type")
    if model_type in MODEL_TYPE_TO_ARCH:
        return MODEL_TYPE_TO_ARCH[model_type]
    raise UnsupportedArchitectureError(
        f"cannot tell the architecture: config has no 'architectures' list and model_type={model_type!r}; "
        f"supported: {supported_list()} (model_type {', '.join(MODEL_TYPE_TO_ARCH)})")


def _check_sliding_window(architecture: str, config: dict[str, Any], max_pos: int) -> None:
    window = config.get("sliding_window")
    if architecture == "MistralForCausalLM":
        if window is not None and int(window) < max_pos:
            raise ArchError(f"Mistral sliding_window={window} is smaller than the context ({max_pos} tokens): "
                            "sliding-window attention is not supported yet; supported: sliding_window null (or >= "
                            "max_position_embeddings)")
    elif architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        layer_types = config.get("layer_types") or []
        if config.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
            raise ArchError(f"{architecture} with use_sliding_window=true is not supported yet; "
                            "supported: full attention in every layer")


def _parse_rope(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, normalized rope_scaling or None) from either transformers 4.x or 5.x spelling."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]  # per-layer-type spelling; every supported layer is full attention
    if isinstance(params, dict) and params:
        scaling: dict[str, Any] | None = dict(params)
        theta = scaling.pop("rope_theta", config.get("rope_theta", 10000.0))
    else:
        scaling = dict(config["rope_scaling"]) if config.get("rope_scaling") else None
        theta = config.get("rope_theta", 10000.0)
    if scaling is None:
        return float(theta), None
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if kind == "default":
        return float(theta), None
    if kind == "linear":
        return float(theta), {"rope_type": "linear", "factor": float(scaling["factor"])}
    if kind == "llama3":
        try:
            return float(theta), {
                "rope_type": "llama3",
                "factor": float(scaling["factor"]),
                "low_freq_factor": float(scaling["low_freq_factor"]),
                "high_freq_factor": float(scaling["high_freq_factor"]),
                "original_max_position_embeddings": int(scaling["original_max_position_embeddings"]),
            }
        except KeyError as exc:
            raise ArchError(f"llama3 rope_scaling lacks '{exc.args[0]}'; it needs factor, low_freq_factor, "
                            "high_freq_factor, original_max_position_embeddings") from None
    raise ArchError(f"rope_scaling type {kind!r} is not supported; supported: default, linear, llama3")

