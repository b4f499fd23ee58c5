"""QuantConfig: which weight quantization scheme a model uses, with its knobs, and its `quantization_config` JSON.

Schemes (the names of TensorRT-LLM's `--qformat`):
    fp8       W8A8 float8 e4m3: weights per tensor (one scale per q / k / v / gate / up / o / down projection,
              as TensorRT-LLM) or per output channel, activations dynamic per token
    int8_sq   W8A8 int8 SmoothQuant: smoothing scales (alpha) folded into the preceding norms / projections,
              weights per output channel, activations dynamic per token
    int8_wo   W8A16: int8 weights per output channel, 16-bit activations
    int4_wo   W4A16: int4 weights per group of input columns (default 128), scales and zero points
    int4_awq  W4A16 as int4_wo, after AWQ: activation-aware per-input-channel scales (and range clipping) searched
              on calibration data and folded into the preceding ops
Embeddings and norms stay in the model dtype; the LM head too, unless lm_head="int8_wo" (int8 per output row,
quantized at load time from the float head the checkpoint keeps: `kvflight quantize --quantize-lm-head`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

QUANT_SCHEMES: tuple[str, ...] = ("fp8", "int8_sq", "int8_wo", "int4_wo", "int4_awq")
QUANTIZATION_CHOICES: tuple[str, ...] = ("auto", "none", *QUANT_SCHEMES)  # the `quantization` config field
ONLINE_SCHEMES: tuple[str, ...] = ("fp8", "int8_wo", "int4_wo", "int8_sq")  # need no calibration data
CALIBRATED_SCHEMES: tuple[str, ...] = ("int8_sq", "int4_awq")
KV_CACHE_DTYPES: tuple[str, ...] = ("int8", "fp8")
LM_HEAD_SCHEMES: tuple[str, ...] = ("none", "int8_wo")
# quantize_lm_head "auto" makes the LM head int8 under these weight schemes (lm_head_int8)
AUTO_INT8_HEAD_SCHEMES: tuple[str, ...] = ("int4_wo", "int4_awq")
QUANT_METHOD_NAME = "kvflight"  # quantization_config.quant_method of checkpoints we write
FORMAT_VERSION = 1


class QuantizationError(ValueError):
    """A quantization setting or checkpoint is wrong; the message names the field and the fix."""


@dataclass(frozen=True)
class QuantConfig:
    scheme: str  # one of QUANT_SCHEMES
    group_size: int = 128  # int4: requested columns per group; per layer the largest of 128/64/32 dividing K
    zero_point: bool = True  # int4: asymmetric groups with zero points (False: symmetric, zero point 8)
    weight_granularity: str = "tensor"  # fp8: "tensor" (one scale per projection) or "channel" (per output row)
    smoothquant_alpha: float | None = None  # int8_sq: migration strength; 0 = no smoothing; None = searched
    kv_cache_dtype: str | None = None  # recorded for the KV-cache quantization (implemented elsewhere)
    lm_head: str = "none"  # "int8_wo": the loader makes the LM head int8 (ParallelLMHead.quantize_int8_)
    calibration: dict[str, Any] = field(default_factory=dict)  # what calibrated it (dataset, sizes, options)

    def __post_init__(self) -> None:
        if self.scheme not in QUANT_SCHEMES:
            raise QuantizationError(f"quantization scheme {self.scheme!r}: supported: {', '.join(QUANT_SCHEMES)}")
        if self.group_size < 32 or self.group_size & (self.group_size - 1):
            raise QuantizationError(f"group_size={self.group_size}: must be a power of two >= 32 (e.g. 128)")
        if self.weight_granularity not in ("channel", "tensor"):
            raise QuantizationError(f"weight_granularity={self.weight_granularity!r}: supported: channel, tensor")
        if self.smoothquant_alpha is not None and not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise QuantizationError(f"smoothquant_alpha={self.smoothquant_alpha}: must be in [0, 1] (e.g. 0.5), "
                                    "or None / 'auto' (searched per layer)")
        if self.lm_head not in LM_HEAD_SCHEMES:
            raise QuantizationError(f"lm_head={self.lm_head!r}: supported: {', '.join(LM_HEAD_SCHEMES)}")
        if self.kv_cache_dtype is not None and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise QuantizationError(f"kv_cache_dtype={self.kv_cache_dtype!r}: supported: "
                                    f"{', '.join(KV_CACHE_DTYPES)}")

    @property
    def weight_bits(self) -> int:
        return 4 if self.scheme.startswith("int4") else 8

    @property
    def activation_scheme(self) -> str:
        return "dynamic_per_token" if self.scheme in ("fp8", "int8_sq") else "none"

    def replace(self, **changes: Any) -> "QuantConfig":
        return dataclasses.replace(self, **changes)

    # ---- config.json -----------------------------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """The `quantization_config` entry of a checkpoint's config.json."""
        out: dict[str, Any] = {
            "quant_method": QUANT_METHOD_NAME,
            "format_version": FORMAT_VERSION,
            "scheme": self.scheme,
            "weight_bits": self.weight_bits,
            "activation_scheme": self.activation_scheme,
            "modules_not_quantized": ["embed_tokens", "norms"] + (["lm_head"] if self.lm_head == "none" else []),
        }
        if self.lm_head != "none":
            out["lm_head"] = self.lm_head
        if self.weight_bits == 4:
            out.update(group_size=self.group_size, zero_point=self.zero_point,
                       group_size_rule="per layer: the largest of group_size, group_size/2, ... (>= 32) that "
                                       "divides the layer's input features",
                       packing="uint8, two codes per byte, low nibble = even input column")
        if self.scheme == "fp8":
            out["weight_granularity"] = self.weight_granularity
        if self.scheme == "int8_sq":
            out["smoothquant_alpha"] = "auto" if self.smoothquant_alpha is None else self.smoothquant_alpha
        if self.kv_cache_dtype is not None:
            out["kv_cache_dtype"] = self.kv_cache_dtype
        if self.calibration:
            out["calibration"] = dict(self.calibration)
        return out

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], where: str = "config.json") -> "QuantConfig":
        """Parse a `quantization_config` written by `kvflight quantize`; other tools' formats are refused."""
        method = data.get("quant_method")
        if method != QUANT_METHOD_NAME:
            raise QuantizationError(
                f"{where}: quantization_config.quant_method={method!r} is not supported; kvflight loads "
                f"checkpoints written by `kvflight quantize` (quant_method '{QUANT_METHOD_NAME}'). Quantize the "
                "original model with `kvflight quantize MODEL --qformat ... --output DIR`")
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise QuantizationError(f"{where}: quantization_config.format_version={version}: this kvflight reads "
                                    f"version {FORMAT_VERSION}; re-run `kvflight quantize`")
        try:
            return cls(scheme=data["scheme"], group_size=int(data.get("group_size", 128)),
                       zero_point=bool(data.get("zero_point", True)),
                       weight_granularity=data.get("weight_granularity", "tensor"),
                       smoothquant_alpha=_alpha(data.get("smoothquant_alpha", "auto"), where),
                       kv_cache_dtype=data.get("kv_cache_dtype"), lm_head=data.get("lm_head", "none"),
                       calibration=dict(data.get("calibration") or {}))
        except KeyError:
            raise QuantizationError(f"{where}: quantization_config lacks 'scheme'") from None


def _alpha(value: object, where: str) -> float | None:
    if value == "auto":
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise QuantizationError(f"{where}: quantization_config.smoothquant_alpha={value!r}: expected a number in "
                                "[0, 1] or 'auto'") from None


def parse_alpha(text: str) -> float | None:
    """--smoothquant-alpha: a number in [0, 1], or 'auto' (None: searched per layer)."""
    return _alpha(text, "--smoothquant-alpha")


def lm_head_int8(setting: str, config: QuantConfig | None) -> bool:
    """Whether the LM head becomes int8: the quantize_lm_head setting (on / off), or with "auto" when the linears'
    weights are 4-bit (int4_wo / int4_awq: the float head would be a fifth of a Llama-8B decode step's bytes, and
    int8 costs ~0.2% perplexity against int4's few percent) or the model's quantization config records it (a
    `kvflight quantize --quantize-lm-head` checkpoint)."""
    if setting not in ("auto", "on", "off"):
        raise QuantizationError(f"quantize_lm_head={setting!r}: expected auto, on or off")
    if setting == "auto":
        return config is not None and (config.lm_head == "int8_wo" or config.scheme in AUTO_INT8_HEAD_SCHEMES)
    return setting == "on"
