"""Quantized linears inside the model (tiny random checkpoints, float32, CPU): smoothing folds keep the float
function, online quantization stays close to float, and a written checkpoint loads back to the same model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvflight.kernels import reference
from kvflight.model.attention import AttentionMetadata
from kvflight.model.layers import QKVParallelLinear, RowParallelLinear
from kvflight.model.loader import load_arch, load_model, resolve_model
from kvflight.quant.calibrate import run_layerwise
from kvflight.quant.checkpoint import source_hf_config, write_checkpoint
from kvflight.quant.linear import quantized_linears
from kvflight.quant.loading import describe_quantization, linear_layers
from kvflight.quant.quantize import quantize_in_memory
from kvflight.quant.schemes import QuantConfig, QuantizationError
from kvflight.quant.smoothing import AwqOptions, awq_layer_, smoothquant_layer_

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, LAYERS, VOCAB = 64, 128, 4, 2, 16, 2, 160


def _write_tiny(directory: Path, architecture: str = "LlamaForCausalLM", seed: int = 0, vocab: int = VOCAB) -> Path:
    """A random Llama / Qwen2 (q/k/v biases) HF directory written directly (no transformers needed)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    tensors = {"model.embed_tokens.weight": rnd(vocab, HIDDEN, std=1.0), "model.norm.weight": 1 + rnd(HIDDEN),
               "lm_head.weight": rnd(vocab, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        norm = 1 + rnd(HIDDEN, std=0.2)
        norm[:3] *= 8.0  # a few outlier channels: what smoothing is for
        tensors.update({
            p + "input_layernorm.weight": norm, p + "post_attention_layernorm.weight": 1 + rnd(HIDDEN, std=0.2),
            p + "self_attn.q_proj.weight": rnd(HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": rnd(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": rnd(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": rnd(HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": rnd(INTER, HIDDEN), p + "mlp.up_proj.weight": rnd(INTER, HIDDEN),
            p + "mlp.down_proj.weight": rnd(HIDDEN, INTER)})
        if architecture == "Qwen2ForCausalLM":
            for name, rows in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
                tensors[p + f"self_attn.{name}_proj.bias"] = rnd(rows * HEAD_DIM)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"))
    config = {"architectures": [architecture], "hidden_size": HIDDEN, "intermediate_size": INTER,
              "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
              "head_dim": HEAD_DIM, "vocab_size": vocab, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "float32"}
    (directory / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_quant")
    return {"llama": _write_tiny(root / "llama"), "qwen2": _write_tiny(root / "qwen2", "Qwen2ForCausalLM", 1)}


def _sequences(n: int = 3, length: int = 24, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, length), generator=g).tolist()


@torch.inference_mode()
def _logits(model, sequences: list[list[int]]) -> torch.Tensor:
    lens = [len(s) for s in sequences]
    ids = torch.tensor([t for s in sequences for t in s])
    positions = torch.cat([torch.arange(n) for n in lens])
    meta = AttentionMetadata.build(lens, lens, [[0] * math.ceil(n / 16) for n in lens], 16)
    return model.compute_logits(model(ids, positions, None, meta))  # [T, vocab]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _load(path: Path, quantization: str = "auto", quantize_lm_head: str = "auto"):
    resolved = resolve_model(str(path))
    arch = load_arch(resolved)
    model = load_model(resolved, arch, "float32", "cpu", quantization=quantization, quantize_lm_head=quantize_lm_head)
    return model, resolved, arch


# ---- smoothing keeps the float function -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["smoothquant", "awq_scales"])
def test_smoothing_folds_preserve_the_float_model(tiny, name: str, method: str) -> None:
    model, _, _ = _load(tiny[name])
    eval_seqs = _sequences(seed=1)
    before = _logits(model, eval_seqs)
    options = AwqOptions(group_size=64, clip=False, scale_grid=5)

    def on_layer(index, layer, stats, search):
        if method == "smoothquant":
            smoothquant_layer_(layer, stats, alpha=0.5)
        else:
            awq_layer_(layer, stats, search, options)

    norm_before = model.model.layers[0].input_layernorm.weight.clone()
    run_layerwise(model, _sequences(), on_layer, max_samples=0 if method == "smoothquant" else 48)
    assert not torch.allclose(model.model.layers[0].input_layernorm.weight, norm_before)  # scales were folded
    torch.testing.assert_close(_logits(model, eval_seqs), before, atol=1e-4, rtol=1e-4)


def test_smoothquant_flattens_activation_outliers(tiny) -> None:
    model, _, _ = _load(tiny["llama"])
    reports = []
    run_layerwise(model, _sequences(), lambda i, layer, stats, search: reports.append(
        smoothquant_layer_(layer, stats, alpha=0.5)), max_samples=0)
    assert reports[0]["qkv.alpha"] == 0.5
    assert reports[0]["qkv.flatter"] > 1.5  # the outlier channels of input_layernorm got much closer to the rest


def test_smoothquant_alpha_search_keeps_the_float_model(tiny) -> None:
    from kvflight.quant.smoothing import SMOOTHQUANT_ALPHAS

    model, _, _ = _load(tiny["qwen2"])
    eval_seqs = _sequences(seed=4)
    before = _logits(model, eval_seqs)
    reports = []
    run_layerwise(model, _sequences(), lambda i, layer, stats, search: reports.append(
        smoothquant_layer_(layer, stats, alpha=None)), max_samples=48)
    assert all(r[f"{g}.alpha"] in SMOOTHQUANT_ALPHAS for r in reports for g in ("qkv", "o", "gate_up", "down"))
    torch.testing.assert_close(_logits(model, eval_seqs), before, atol=1e-4, rtol=1e-4)


# ---- online quantization ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme,bound", [("int8_wo", 0.02), ("fp8", 0.08), ("int8_sq", 0.04), ("int4_wo", 0.25)])
def test_online_quantization_is_close_to_float(tiny, scheme: str, bound: float) -> None:
    float_model, _, _ = _load(tiny["llama"])
    model, _, _ = _load(tiny["llama"], scheme)
    seqs = _sequences(seed=2)
    err = _rel(_logits(model, seqs), _logits(float_model, seqs))
    assert 0 < err < bound, err
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.quant_method.scheme == scheme
    assert not hasattr(qkv, "weight") or qkv.weight.dtype in (torch.int8, torch.float8_e4m3fn)
    if scheme == "int4_wo":  # hidden 64 -> groups of 64; intermediate 128 -> groups of 128
        assert describe_quantization(model) == "int4_wo(g64) x 6, int4_wo(g128) x 2"


def test_quantized_layer_equals_kernel_reference() -> None:
    """A layer built inside quantized_linears dispatches to the scheme's math (the kernels' references)."""
    torch.manual_seed(0)
    with quantized_linears(QuantConfig("int4_wo", group_size=32)):
        layer = QKVParallelLinear(96, 16, 4, 2, bias=True)
    with quantized_linears(QuantConfig("int8_wo")):
        row = RowParallelLinear(64, 32)
    assert {n for n, _ in layer.named_parameters()} == {"qweight", "scales", "qzeros", "bias"}
    for p in (layer.qweight, row.weight):
        p.data.copy_(torch.randint(0, 127, p.shape, dtype=p.dtype))
    layer.scales.data.copy_(torch.rand(layer.scales.shape) * 0.01)
    layer.qzeros.data.copy_(torch.randint(0, 16, layer.qzeros.shape, dtype=torch.uint8))
    layer.bias.data.copy_(torch.randn(layer.bias.shape))
    row.weight_scale.data.copy_(torch.rand(32) * 0.01)
    x = torch.randn(5, 96)
    ref = reference.w4a16_matmul(x, layer.qweight, layer.scales, layer.qzeros, 32, layer.bias)
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)
    x = torch.randn(3, 64)
    torch.testing.assert_close(row(x), reference.w8a16_matmul(x, row.weight, row.weight_scale),
                               atol=1e-5, rtol=1e-5)


# ---- checkpoints ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme,options", [
    ("int4_awq", {"group_size": 64}), ("int8_sq", {"smoothquant_alpha": 0.6}),
    ("fp8", {"weight_granularity": "channel"}), ("int4_wo", {"zero_point": False})])
def test_checkpoint_round_trip(tiny, tmp_path, scheme: str, options: dict) -> None:
    model, resolved, arch = _load(tiny["qwen2"])
    config = QuantConfig(scheme, **options)
    awq = AwqOptions(group_size=64, scale_grid=4, clip_grid=4) if scheme == "int4_awq" else None
    quantize_in_memory(model, config, _sequences(), awq, search_tokens=48)
    out = tmp_path / scheme
    write_checkpoint(model, source_hf_config(resolved, arch), config, str(out), float_dtype=torch.float32)
    saved = json.loads((out / "config.json").read_text())
    assert QuantConfig.from_hf_dict(saved["quantization_config"]) == config
    names = set(load_file(str(out / "model.safetensors")))
    stem = "model.layers.0.self_attn."
    if scheme.startswith("int4"):
        assert {stem + "q_proj.qweight", stem + "v_proj.scales", stem + "k_proj.bias"} <= names
        assert (stem + "q_proj.qzeros" in names) == config.zero_point
    else:
        assert {stem + "q_proj.weight", stem + "q_proj.weight_scale", "model.layers.1.mlp.up_proj.weight"} <= names
    assert _load(out)[0].lm_head.is_int8 == scheme.startswith("int4")  # quantize_lm_head auto
    loaded, _, _ = _load(out, quantize_lm_head="off")  # the float head, as the in-memory model has
    assert describe_quantization(loaded) == describe_quantization(model)
    seqs = _sequences(seed=3)
    torch.testing.assert_close(_logits(loaded, seqs), _logits(model, seqs), atol=1e-6, rtol=1e-6)
    with pytest.raises(QuantizationError, match=f"already quantized as {scheme}"):
        _load(out, "int8_wo")


def test_fp8_per_tensor_scales_are_per_projection(tiny) -> None:
    from kvflight.quant.loading import quantize_model_

    model, _, _ = _load(tiny["llama"])
    quantize_model_(model, QuantConfig("fp8", weight_granularity="channel"))
    assert model.model.layers[0].self_attn.qkv_proj.weight_scale.unique().numel() > 3
    model, _, _ = _load(tiny["llama"], "fp8")  # default: per tensor
    scale = model.model.layers[0].self_attn.qkv_proj.weight_scale  # q, k, v: one scale each
    assert scale.unique().numel() == 3
    assert scale[:HEADS * HEAD_DIM].unique().numel() == 1


def test_broken_quantized_checkpoints_are_clear_errors(tiny, tmp_path) -> None:
    model, resolved, arch = _load(tiny["llama"], "int8_wo")
    out = tmp_path / "int8"
    write_checkpoint(model, source_hf_config(resolved, arch), QuantConfig("int8_wo"), str(out),
                     float_dtype=torch.float32)
    tensors = load_file(str(out / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight_scale"]
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(QuantizationError, match="lacks 1 tensors.*down_proj.weight_scale"):
        _load(out)
    # a float checkpoint whose config claims int8 weights: refused, never silently cast
    fake = _write_tiny(tmp_path / "fake")
    config = json.loads((fake / "config.json").read_text())
    config["quantization_config"] = QuantConfig("int8_wo").to_hf_dict()
    (fake / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="checkpoint tensor is torch.float32, the quantized model expects torch.int8"):
        _load(fake)


def test_linear_layers_found(tiny) -> None:
    model, _, _ = _load(tiny["llama"])
    names = [n for n, _ in linear_layers(model)]
    assert names[:4] == ["model.layers.0.self_attn.qkv_proj", "model.layers.0.self_attn.o_proj",
                         "model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.down_proj"]
    assert len(names) == 4 * LAYERS  # the LM head and embeddings stay unquantized


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scheme", ["fp8", "int8_sq", "int8_wo", "int4_wo"])
def test_gpu_paths_equal_the_cpu_math(scheme: str) -> None:
    """Triton / _scaled_mm / _int_mm on the GPU compute what the CPU fallback computes (bf16, Llama-like K)."""
    import copy

    from kvflight.model.layers import ColumnParallelLinear
    from kvflight.quant.linear import make_linear_method, quantize_linear_

    torch.manual_seed(0)
    layer = ColumnParallelLinear(4096, 1024, bias=True, dtype=torch.bfloat16, device="cuda")
    layer.weight.data.normal_(0, 0.02)
    layer.bias.data.normal_(0, 0.1)
    quantize_linear_(layer, make_linear_method(QuantConfig(scheme), 4096))
    cpu_layer = copy.deepcopy(layer).to("cpu")
    from kvflight.quant.linear import W8A8_WEIGHT_ONLY_MAX_ROWS

    # 1, 5: decode kernels; 40: the fused kernels' large tiles (int4: dequantize + cuBLAS); 1100: dequantize +
    # cuBLAS for int8_wo too
    for num_tokens in (1, 5, 40, 1100):
        x = torch.randn(num_tokens, 4096, device="cuda", dtype=torch.bfloat16)
        out = layer(x).float().cpu()
        if scheme in ("fp8", "int8_sq") and num_tokens <= W8A8_WEIGHT_ONLY_MAX_ROWS:  # weight-only math
            ref = torch.nn.functional.linear(x.float().cpu(), cpu_layer.quant_method.dequantized_weight(cpu_layer)
                                             .float(), cpu_layer.bias.float())
        else:
            ref = cpu_layer(x.cpu()).float()
        assert float((out - ref).norm() / ref.norm()) < 0.02, (scheme, num_tokens)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scheme", ["none", "fp8", "int4_wo"])
def test_pdl_launches_change_nothing_on_gpu(scheme: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode (CUDA graphs; one request: the one-row GEMV; three: the batched kernels) gives the same tokens and
    log-probabilities with programmatic dependent launch as without (KVFLIGHT_PDL=0)."""
    from kvflight import LLM, SamplingParams
    from kvflight.kernels import pdl

    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("KVFLIGHT_PDL", flag)
        probe = torch.zeros(1, device="cuda")
        assert pdl.enabled(probe) == (flag == "1" and pdl.HAVE_GDC and torch.cuda.get_device_capability() >= (9, 0))
        llm = LLM("smollm2-135m", load_format="dummy", quantization=scheme, dtype="bfloat16", max_seq_len=256,
                  kv_cache_bytes=64 << 20)
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
        outs = llm.generate([[3, 17, 42, 99, 5, 61]], params) + llm.generate([[3, 17], [8] * 30, [5, 9, 1]], params)
        results.append([(o.outputs[0].token_ids, [(lp.sampled, lp.top) for lp in o.outputs[0].logprobs or []])
                        for o in outs])
        del llm
    assert results[0] == results[1]


# ---- int8 LM head (quantize_lm_head) ----------------------------------------------------------------------------
def test_lm_head_int8_untied_frees_the_float_head_and_stays_close(tiny) -> None:
    float_model, _, _ = _load(tiny["llama"])
    resolved = resolve_model(str(tiny["llama"]))
    model = load_model(resolved, load_arch(resolved), "float32", "cpu", quantize_lm_head="on")
    head = model.lm_head
    assert head.is_int8 and head.weight is None and head.int8_weight.dtype == torch.int8
    # the head computes exactly with its dequantized rows (codes x per-row scale, scale = max |w_row| / 127)
    w = float_model.lm_head.weight.detach()
    scale = w.abs().amax(dim=1) / 127
    torch.testing.assert_close(head.int8_scale, scale)
    assert int((head.int8_weight.float() * scale[:, None] - w).abs().max() / scale.max() * 2) <= 1  # half a step
    hidden = torch.randn(5, HIDDEN)
    want = hidden @ (head.int8_weight.float() * head.int8_scale[:, None]).t()
    torch.testing.assert_close(head.compute_logits(hidden), want, atol=1e-5, rtol=1e-5)
    seqs = _sequences(seed=4)
    assert _rel(_logits(model, seqs), _logits(float_model, seqs)) < 0.01
    assert "lm_head.weight" not in dict(model.named_parameters())
    with pytest.raises(ValueError, match="already int8"):
        head.quantize_int8_(keep_float_weight=False)


def test_lm_head_int8_tied_keeps_the_embedding() -> None:
    from kvflight.model.arch import ModelArch
    from kvflight.model.llama import LlamaForCausalLM

    arch = ModelArch(architecture="LlamaForCausalLM", hidden_size=HIDDEN, num_layers=1, num_heads=HEADS,
                     num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, intermediate_size=INTER, vocab_size=VOCAB,
                     rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=64,
                     tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(arch)
    model.model.embed_tokens.weight.data.normal_()
    embedding = model.model.embed_tokens.weight.detach().clone()
    model.lm_head.quantize_int8_(keep_float_weight=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied: the embedding is untouched
    torch.testing.assert_close(model.model.embed_tokens.weight, embedding, atol=0, rtol=0)
    hidden = torch.randn(3, HIDDEN)
    assert _rel(model.lm_head.compute_logits(hidden), hidden @ embedding.t()) < 0.01


def test_lm_head_setting_and_checkpoint_record(tiny, tmp_path) -> None:
    from kvflight.quant.loading import lm_head_int8
    from kvflight.tune.planner import shard_shape, weights_bytes_per_gpu

    recorded = QuantConfig("int8_wo", lm_head="int8_wo")
    assert lm_head_int8("auto", recorded) and not lm_head_int8("auto", QuantConfig("int8_wo"))
    # auto: int8 under 4-bit weights (the head would be the step's largest read), float under 8-bit ones
    assert lm_head_int8("auto", QuantConfig("int4_awq")) and lm_head_int8("auto", QuantConfig("int4_wo"))
    assert not lm_head_int8("auto", QuantConfig("fp8")) and not lm_head_int8("off", QuantConfig("int4_awq"))
    assert not lm_head_int8("auto", None) and lm_head_int8("on", None) and not lm_head_int8("off", recorded)
    with pytest.raises(QuantizationError, match="quantize_lm_head='yes'"):
        lm_head_int8("yes", None)
    with pytest.raises(QuantizationError, match="lm_head='int4'"):
        QuantConfig("int8_wo", lm_head="int4")
    hf = recorded.to_hf_dict()
    assert hf["lm_head"] == "int8_wo" and "lm_head" not in hf["modules_not_quantized"]
    assert QuantConfig.from_hf_dict(hf) == recorded
    assert "lm_head" not in QuantConfig("int8_wo").to_hf_dict()
    # a checkpoint that records it: auto makes the head int8, off keeps it float
    model, resolved, arch = _load(tiny["llama"])
    quantize_in_memory(model, recorded, _sequences(), None)
    out = tmp_path / "int8_head"
    write_checkpoint(model, source_hf_config(resolved, arch), recorded, str(out), float_dtype=torch.float32)
    assert "lm_head.weight" in load_file(str(out / "model.safetensors"))  # the float head is kept
    loaded, _, _ = _load(out)
    assert loaded.lm_head.is_int8
    resolved_out = resolve_model(str(out))
    assert not load_model(resolved_out, arch, "float32", "cpu", quantize_lm_head="off").lm_head.is_int8
    # the planner counts the head's int8 bytes (untied: the float copy is gone)
    shard = shard_shape(arch, 1)
    saved = weights_bytes_per_gpu(arch, shard, 2, "int8_wo") - weights_bytes_per_gpu(arch, shard, 2, "int8_wo", True)
    assert saved == VOCAB * HIDDEN * 2 - VOCAB * (HIDDEN + 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lm_head_int8_gpu_kernels_equal_the_dequantized_head() -> None:
    """bf16 on the GPU: one row through wo_gemv, 2..300 rows through w8a16_matmul (Llama-3.1-8B head width, a
    vocabulary slice), against the dequantized head in float32."""
    from kvflight.model.layers import ParallelLMHead

    torch.manual_seed(0)
    head = ParallelLMHead(32000, 4096, dtype=torch.bfloat16, device="cuda")
    head.weight.data.normal_(0, 0.02)
    head.quantize_int8_(keep_float_weight=False)
    w = head.int8_weight.float() * head.int8_scale[:, None]
    for rows in (1, 4, 300):
        hidden = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
        got = head.compute_logits(hidden).float()
        assert got.shape == (rows, 32000)
        assert _rel(got, hidden.float() @ w.t()) < 0.01, rows
