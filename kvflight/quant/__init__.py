"""Weight quantization: schemes (fp8, int8_sq, int8_wo, int4_wo, int4_awq), quantize / dequantize helpers, the
linear methods the model's layers dispatch to, AWQ and SmoothQuant calibration, the checkpoint writer, the default
calibration text and the perplexity check.

Only the leaf modules (schemes, ops, linear) are imported here: the model imports them, and the calibration /
checkpoint / eval modules import the model.
"""

from kvflight.quant.schemes import (
    CALIBRATED_SCHEMES,
    ONLINE_SCHEMES,
    QUANT_SCHEMES,
    QuantConfig,
    QuantizationError,
)

__all__ = ["CALIBRATED_SCHEMES", "ONLINE_SCHEMES", "QUANT_SCHEMES", "QuantConfig", "QuantizationError"]
