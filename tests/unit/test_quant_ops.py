"""Quantize -> dequantize round trips (error bounds per scheme), int4 packing, the QuantConfig JSON, load-time
planning, and the calibration data readers."""

from __future__ import annotations

import json

import pytest
import torch

from kvflight.kernels import reference
from kvflight.quant import ops
from kvflight.quant.calibrate import load_texts, pack_token_sequences
from kvflight.quant.loading import plan_quantization
from kvflight.quant.schemes import QuantConfig, QuantizationError


def _weight(n: int = 96, k: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[3, 7] = 0.9  # an outlier: per-channel / per-group scales must contain it
    w[5] = 0.0  # a dead row must not divide by zero
    return w


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---- round trips ------------------------------------------------------------------------------------------------
def test_int8_per_channel_round_trip() -> None:
    w = _weight()
    q, scale = ops.quantize_int8_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (96,) and scale.dtype == torch.float32
    deq = ops.dequantize_int8(q, scale)
    # every element within half a step of its row; rows without outliers lose < 1 % overall
    assert bool(((deq - w).abs() <= scale[:, None] / 2 + 1e-7).all())
    assert _rel_err(deq, w) < 0.01
    assert int(q.abs().max()) == 127 and bool((deq[5] == 0).all())


@pytest.mark.parametrize("zero_point", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_groupwise_round_trip(zero_point: bool, group_size: int) -> None:
    w = _weight()
    q, scales, zeros = ops.quantize_int4_groupwise(w, group_size, zero_point)
    assert q.shape == (96, 128) and q.dtype == torch.uint8
    assert scales.shape == (96, 256 // group_size) and scales.dtype == torch.float16
    assert (zeros is not None) == zero_point
    deq = ops.dequantize_int4(q, scales, zeros, group_size)
    step = scales.float().repeat_interleave(group_size, dim=1)
    # half a step of rounding; with zero points the integer zero shifts the grid by up to another half step
    assert bool(((deq - w).abs() <= step * (1.0 if zero_point else 0.5) + 1e-6).all())
    assert _rel_err(deq, w) < (0.12 if zero_point else 0.14)  # 4 bits: ~ 9-11 % on gaussian weights
    # the kernels' reference reads exactly what ops wrote
    x = torch.randn(3, 256)
    torch.testing.assert_close(reference.w4a16_matmul(x, q, scales, zeros, group_size), x @ deq.t(),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.fake_quantize_int4(w, group_size, zero_point), deq, atol=0, rtol=0)


def test_int4_clip_ratio_shrinks_the_range() -> None:
    w = _weight()
    _, full, _ = ops.quantize_int4_groupwise(w, 64, True)
    _, clipped, _ = ops.quantize_int4_groupwise(w, 64, True, clip_ratio=0.5)
    assert bool((clipped.float() <= full.float() * 0.5 + 1e-4).all())


@pytest.mark.parametrize("per_channel", [True, False])
def test_fp8_round_trip(per_channel: bool) -> None:
    w = _weight()
    q, scale = ops.quantize_fp8(w, per_channel)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (96,)
    if not per_channel:
        assert bool((scale == scale[0]).all())
    deq = ops.dequantize_fp8(q, scale)
    assert _rel_err(deq, w) < 0.04  # 3 mantissa bits: ~ 2.6 % relative
    assert float(q.float().abs().max()) == ops.FP8_MAX


def test_pack_unpack_int4() -> None:
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = ops.pack_int4(codes)
    assert packed.shape == (5, 32)
    assert torch.equal(reference.unpack_int4(packed), codes)
    # checkpoints keep the plain order (column 2j in the low nibble of byte j), converted at the file boundary
    plain = ops.int4_to_file_layout(packed)
    assert torch.equal(torch.stack([plain & 0x0F, plain >> 4], dim=-1).reshape(5, 64), codes)
    assert torch.equal(ops.int4_from_file_layout(plain), packed)


def test_effective_group_size() -> None:
    assert ops.effective_group_size(4096, 128) == 128
    assert ops.effective_group_size(576, 128) == 64  # SmolLM2's hidden size: 4.5 x 128
    assert ops.effective_group_size(1536, 128) == 128
    assert ops.effective_group_size(96, 128) == 32
    with pytest.raises(ValueError, match="in_features=100 is not a multiple of 32"):
        ops.effective_group_size(100, 128)
    with pytest.raises(ValueError, match="group_size=48"):
        ops.effective_group_size(96, 48)


def test_per_token_quant_reference() -> None:
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    q, scale = reference.per_token_quant(x, torch.int8)
    assert q.tolist() == [[64, -127, 32], [0, 0, 0]]  # 63.5 rounds away from zero
    assert float(scale[0, 0]) == pytest.approx(2.0 / 127)
    q8, scale8 = reference.per_token_quant(x, torch.float8_e4m3fn)
    torch.testing.assert_close(q8.float() * scale8, x, atol=0.02, rtol=0.07)


# ---- config -----------------------------------------------------------------------------------------------------
def test_quant_config_json_round_trip() -> None:
    cfg = QuantConfig("int4_awq", group_size=64, zero_point=False, kv_cache_dtype="fp8",
                      calibration={"dataset": "default", "num_sequences": 4})
    data = json.loads(json.dumps(cfg.to_hf_dict()))
    assert data["quant_method"] == "kvflight" and data["weight_bits"] == 4 and data["group_size"] == 64
    assert QuantConfig.from_hf_dict(data) == cfg
    sq = QuantConfig("int8_sq", smoothquant_alpha=0.7).to_hf_dict()
    assert sq["smoothquant_alpha"] == 0.7 and sq["activation_scheme"] == "dynamic_per_token"
    auto = QuantConfig("int8_sq").to_hf_dict()  # alpha searched per layer by default
    assert auto["smoothquant_alpha"] == "auto" and QuantConfig.from_hf_dict(auto).smoothquant_alpha is None


def test_quant_config_errors_name_the_field() -> None:
    with pytest.raises(QuantizationError, match="scheme 'int3'.*supported: fp8"):
        QuantConfig("int3")
    with pytest.raises(QuantizationError, match="group_size=100"):
        QuantConfig("int4_wo", group_size=100)
    with pytest.raises(QuantizationError, match="smoothquant_alpha=1.5"):
        QuantConfig("int8_sq", smoothquant_alpha=1.5)
    with pytest.raises(QuantizationError, match="quant_method='awq' is not supported.*kvflight quantize"):
        QuantConfig.from_hf_dict({"quant_method": "awq", "bits": 4})


def test_plan_quantization() -> None:
    ckpt = QuantConfig("int4_awq")
    assert plan_quantization("auto", ckpt, "hf") == (ckpt, None)  # load the quantized tensors
    assert plan_quantization("int4_awq", ckpt, "hf") == (ckpt, None)
    assert plan_quantization("auto", None, "gguf") == (None, None)
    assert plan_quantization("none", None, "hf") == (None, None)
    assert plan_quantization("fp8", None, "gguf") == (None, QuantConfig("fp8"))  # online
    assert plan_quantization("auto", ckpt, "dummy") == (None, ckpt)  # random weights in the checkpoint's scheme
    with pytest.raises(QuantizationError, match="already quantized as int4_awq.*quantization=auto"):
        plan_quantization("fp8", ckpt, "hf")
    with pytest.raises(QuantizationError, match="int4_awq' needs calibration data.*kvflight quantize"):
        plan_quantization("int4_awq", None, "gguf")
    assert plan_quantization("int4_awq", None, "dummy")[1] == QuantConfig("int4_awq")


# ---- calibration data -------------------------------------------------------------------------------------------
class _CharTokenizer:
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) % 1000 for c in text]


def test_default_calibration_set_is_varied() -> None:
    from kvflight.quant.calib_data import CALIBRATION_TEXTS, EVAL_TEXTS

    texts = load_texts("default")
    assert len(texts) >= 100 and sum(len(t) for t in texts) > 30_000
    assert any("def " in t for t in texts) and any("的" in t for t in texts) and any("SELECT" in t for t in texts)
    assert not set(EVAL_TEXTS) & set(CALIBRATION_TEXTS)  # the eval text is held out
    first_ten = "".join(texts[:10])
    assert "的" in first_ten and "def " in first_ten  # interleaved: early sequences already mix languages


def test_user_jsonl_and_text_files(tmp_path) -> None:
    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text('{"text": "first sample"}\n\n{"prompt": "Q?", "completion": "A."}\n"a bare string"\n',
                     encoding="utf-8")
    assert load_texts(str(jsonl)) == ["first sample", "Q?\nA.", "a bare string"]
    txt = tmp_path / "calib.txt"
    txt.write_text("para one\nline two\n\n\npara two\n", encoding="utf-8")
    assert load_texts(str(txt)) == ["para one\nline two", "para two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text key"}\n', encoding="utf-8")
    with pytest.raises(QuantizationError, match="bad.jsonl line 2: no non-empty string under text / prompt"):
        load_texts(str(bad))
    bad.write_text('{"text": "ok"\n', encoding="utf-8")
    with pytest.raises(QuantizationError, match="line 1: not valid JSON"):
        load_texts(str(bad))
    with pytest.raises(QuantizationError, match="no such file.*'default'"):
        load_texts(str(tmp_path / "missing.jsonl"))


def test_pack_token_sequences() -> None:
    tok = _CharTokenizer()
    seqs = pack_token_sequences(tok, ["abcdef", "ghij"], None, 4, separator_id=0)
    assert seqs == [[97, 98, 99, 100], [101, 102, 0, 103], [104, 105, 106]]
    assert pack_token_sequences(tok, ["abcdef", "ghij"], 2, 4, separator_id=0) == seqs[:2]
    assert pack_token_sequences(tok, ["abc"], 4, 64) == [[97, 98, 99]]  # a short text alone is kept
    with pytest.raises(QuantizationError, match="fewer than 2 tokens"):
        pack_token_sequences(tok, ["a"], 4, 64)
