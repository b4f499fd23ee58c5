"""GGUF loading: the embedded SmolLM2-135M-Instruct (Q4_1) equals transformers on the same file; synthetic GGUFs
check dequantization, llama's Q/K un-permutation, qwen2 biases, rope_freqs and unsupported-type errors."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from kvflight.model.arch import ModelArch
from kvflight.model.attention import AttentionMetadata, positions_for
from kvflight.model.layers import RotaryEmbedding, rope_inv_freq
from kvflight.model.loader import (
    ModelLoadError,
    gguf_field,
    load_arch,
    load_model,
    load_tokenizer,
    permute_for_gguf_qk,
    resolve_model,
    unpermute_gguf_qk,
)
from kvflight.model.presets import get_preset

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village, there lived"]


@pytest.fixture(scope="module")
def resolved():
    res = resolve_model(None, "auto")
    assert res.format == "gguf" and res.path is not None and res.path.endswith(".gguf")
    return res


@pytest.fixture(scope="module")
def ours(resolved):
    arch = load_arch(resolved)
    return load_model(resolved, arch, "float32", "cpu")


@pytest.fixture(scope="module")
def tokenizer(resolved):
    return load_tokenizer(resolved)


def test_default_model_arch_matches_preset(resolved, smollm2_path: str) -> None:
    assert os.path.samefile(resolved.path, smollm2_path)
    assert load_arch(resolved) == ModelArch.from_hf_config(get_preset("smollm2-135m"))


def test_smollm2_logits_equal_transformers(ours, tokenizer, smollm2_hf_model) -> None:
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    lens = [len(p) for p in prompts]
    tpb = 4
    tables, next_block = [], 0
    for n in lens:  # blocks handed out back to front
        need = (n + 1 + tpb - 1) // tpb
        tables.append([40 - next_block - i for i in range(need)])
        next_block += need
    kv = [torch.zeros(ours.kv_cache_shape(41, tpb)) for _ in range(ours.arch.num_layers)]
    meta = AttentionMetadata.build(lens, lens, tables, tpb)
    with torch.no_grad():
        hidden = ours(torch.tensor(sum(prompts, [])), positions_for(lens, lens), kv, meta)
        logits = ours.compute_logits(hidden)  # [sum(lens), vocab]
    # one decode step per prompt reading the cache: feed transformers' greedy token
    next_ids = []
    start = 0
    for ids, n in zip(prompts, lens):
        with torch.no_grad():
            ref = smollm2_hf_model(torch.tensor([ids])).logits[0].float()
        torch.testing.assert_close(logits[start:start + n], ref, atol=2e-3, rtol=1e-4)
        assert logits[start + n - 1].argmax().item() == ref[-1].argmax().item()
        next_ids.append(int(ref[-1].argmax()))
        start += n
    decode = AttentionMetadata.build([1] * len(lens), [n + 1 for n in lens], tables, tpb)
    with torch.no_grad():
        step = ours.compute_logits(ours(torch.tensor(next_ids), torch.tensor(lens), kv, decode))  # [3, vocab]
    for i, ids in enumerate(prompts):
        with torch.no_grad():
            ref = smollm2_hf_model(torch.tensor([ids + [next_ids[i]]])).logits[0, -1].float()
        torch.testing.assert_close(step[i], ref, atol=2e-3, rtol=1e-4)
        assert step[i].argmax() == ref.argmax()


def test_tokenizer_and_chat_template_from_gguf(resolved, tokenizer, smollm2_tokenizer) -> None:
    template = gguf_field(gguf.GGUFReader(resolved.path), "tokenizer.chat_template")
    assert template and tokenizer.chat_template == template
    assert tokenizer.eos_token_id == 2 and tokenizer.bos_token_id == 1
    assert tokenizer("Hello world").input_ids == smollm2_tokenizer("Hello world").input_ids
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


# ---- synthetic GGUF files -----------------------------------------------------------------------------------------
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB, LAYERS = 64, 4, 2, 16, 96, 128, 2


def _hf_weights(seed: int, bias: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return 0.1 * torch.randn(*shape, generator=gen)

    w = {"model.embed_tokens.weight": rnd(VOCAB, HIDDEN), "model.norm.weight": 1 + rnd(HIDDEN),
         "lm_head.weight": rnd(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = rnd(HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.k_proj.weight"] = rnd(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.v_proj.weight"] = rnd(KV_HEADS * HEAD_DIM, HIDDEN)
        w[p + "self_attn.o_proj.weight"] = rnd(HIDDEN, HEADS * HEAD_DIM)
        if bias:
            for proj, rows in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
                w[p + f"self_attn.{proj}_proj.bias"] = rnd(rows * HEAD_DIM)
        w[p + "mlp.gate_proj.weight"] = rnd(INTER, HIDDEN)
        w[p + "mlp.up_proj.weight"] = rnd(INTER, HIDDEN)
        w[p + "mlp.down_proj.weight"] = rnd(HIDDEN, INTER)
        w[p + "input_layernorm.weight"] = 1 + rnd(HIDDEN)
        w[p + "post_attention_layernorm.weight"] = 1 + rnd(HIDDEN)
    return w


_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, idx, rest = hf.split(".", 3)
        module, _, suffix = rest.rpartition(".")
        return f"blk.{idx}.{_TO_GGUF[module]}.{suffix}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf]


def _write_gguf(path: Path, arch_name: str, weights: dict[str, torch.Tensor], types: dict[str, str],
                extra: dict[str, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """Write a tiny model; returns what the loader must produce for each HF name (quantization round trip)."""
    writer = gguf.GGUFWriter(str(path), arch_name)
    writer.add_block_count(LAYERS)
    writer.add_context_length(512)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    expected: dict[str, torch.Tensor] = {}
    for hf_name, tensor in weights.items():
        data = tensor.numpy()
        is_qk = ".q_proj." in hf_name or ".k_proj." in hf_name
        if arch_name == "llama" and is_qk:  # what llama.cpp's converter does
            data = permute_for_gguf_qk(tensor, HEADS if ".q_proj." in hf_name else KV_HEADS).numpy()
        qtype = gguf.GGMLQuantizationType[types.get(hf_name, "F32")]
        if qtype == gguf.GGMLQuantizationType.F32:
            stored = data.astype(np.float32)
            writer.add_tensor(_gguf_name(hf_name), stored)
        elif qtype == gguf.GGMLQuantizationType.F16:
            stored = data.astype(np.float16)
            writer.add_tensor(_gguf_name(hf_name), stored)
        else:
            stored = gguf.quants.quantize(data.astype(np.float32), qtype)
            writer.add_tensor(_gguf_name(hf_name), stored, raw_dtype=qtype)
        roundtrip = torch.from_numpy(np.array(gguf.quants.dequantize(stored, qtype), dtype=np.float32))
        roundtrip = roundtrip.reshape(tensor.shape)
        if arch_name == "llama" and is_qk:
            roundtrip = unpermute_gguf_qk(roundtrip, HEADS if ".q_proj." in hf_name else KV_HEADS)
        expected[hf_name] = roundtrip
    for name, array in (extra or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def _types() -> dict[str, str]:
    types = {}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        types.update({p + "self_attn.q_proj.weight": "Q8_0", p + "self_attn.k_proj.weight": "Q8_0",
                      p + "self_attn.v_proj.weight": "F16", p + "self_attn.o_proj.weight": "Q8_0",
                      p + "mlp.gate_proj.weight": "Q8_0", p + "mlp.up_proj.weight": "F16",
                      p + "mlp.down_proj.weight": "Q8_0"})
    types["lm_head.weight"] = "F16"
    return types


def test_permutation_round_trip() -> None:
    w = torch.randn(KV_HEADS * HEAD_DIM, HIDDEN)
    assert torch.equal(unpermute_gguf_qk(permute_for_gguf_qk(w, KV_HEADS), KV_HEADS), w)
    assert not torch.equal(permute_for_gguf_qk(w, KV_HEADS), w)


@pytest.mark.parametrize("arch_name", ["llama", "qwen2"])
def test_synthetic_gguf_loads(tmp_path: Path, arch_name: str) -> None:
    weights = _hf_weights(0, bias=arch_name == "qwen2")
    path = tmp_path / f"tiny-{arch_name}.gguf"
    expected = _write_gguf(path, arch_name, weights, _types())
    resolved = resolve_model(str(path))
    assert resolved.format == "gguf"
    arch = load_arch(resolved)
    assert (arch.architecture, arch.hidden_size, arch.num_layers, arch.num_heads, arch.num_kv_heads,
            arch.head_dim, arch.intermediate_size, arch.vocab_size, arch.max_position_embeddings) == (
        "LlamaForCausalLM" if arch_name == "llama" else "Qwen2ForCausalLM", HIDDEN, LAYERS, HEADS, KV_HEADS,
        HEAD_DIM, INTER, VOCAB, 512)
    assert arch.rms_norm_eps == 1e-5 and arch.eos_token_ids == (2,) and not arch.tie_word_embeddings
    assert arch.attention_bias == (arch_name == "qwen2")
    model = load_model(resolved, arch, "float32", "cpu")
    # what came out equals the quantization round trip of the HF-layout weights (permutation undone for llama)
    reference = type(model)(arch, torch.float32)
    reference.load_weights(expected.items())
    for (name, got), want in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(got, want), name
    # and a quantization-free load of the original weights is close (Q8_0 / F16 error only)
    exact = type(model)(arch, torch.float32)
    exact.load_weights(weights.items())
    q_got = model.model.layers[0].self_attn.qkv_proj.weight
    q_exact = exact.model.layers[0].self_attn.qkv_proj.weight
    assert (q_got - q_exact).abs().max() < 2e-3
    meta = AttentionMetadata.build([6], [6], [[1, 0]], 4)
    with torch.no_grad():
        kv = [torch.zeros(model.kv_cache_shape(2, 4)) for _ in range(LAYERS)]
        got = model.compute_logits(model(torch.arange(6), torch.arange(6), kv, meta))
        kv = [torch.zeros(model.kv_cache_shape(2, 4)) for _ in range(LAYERS)]
        want = exact.compute_logits(exact(torch.arange(6), torch.arange(6), kv, meta))
    torch.testing.assert_close(got, want, atol=0.1, rtol=0)  # Q8_0 / F16 rounding noise only


def test_gguf_unsupported_tensor_type(tmp_path: Path) -> None:
    weights = _hf_weights(1, bias=False)
    types = _types()
    types["model.layers.1.mlp.gate_proj.weight"] = "Q5_0"
    path = tmp_path / "bad.gguf"
    _write_gguf(path, "llama", weights, types)
    resolved = resolve_model(str(path))
    with pytest.raises(ModelLoadError, match=r"blk\.1\.ffn_gate\.weight \(Q5_0\).*supported: F32, F16, BF16, Q8_0"):
        load_model(resolved, load_arch(resolved), "float32", "cpu")


def test_gguf_rope_freqs_equal_llama3_scaling(tmp_path: Path) -> None:
    """llama.cpp stores Llama 3.1's rope scaling as per-frequency divisors (rope_freqs.weight)."""
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    factors = (rope_inv_freq(HEAD_DIM, 10000.0, None) / rope_inv_freq(HEAD_DIM, 10000.0, llama3)).numpy()
    path = tmp_path / "rope.gguf"
    _write_gguf(path, "llama", _hf_weights(2, bias=False), {}, extra={"rope_freqs.weight": factors})
    arch = load_arch(resolve_model(str(path)))
    assert arch.rope_scaling is not None and arch.rope_scaling["rope_type"] == "freq_factors"
    ours = RotaryEmbedding(HEAD_DIM, 512, 10000.0, arch.rope_scaling).cos_sin_cache
    want = RotaryEmbedding(HEAD_DIM, 512, 10000.0, llama3).cos_sin_cache
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)
    load_model(resolve_model(str(path)), arch, "float32", "cpu")  # the rope_freqs tensor is not a weight


def test_gguf_resolution_errors(tmp_path: Path) -> None:
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"NOPE" + bytes(16))
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        resolve_model(str(not_gguf))
    with pytest.raises(ModelLoadError, match="GGUF file"):
        resolve_model(resolve_model(None).path, "hf")
    assert resolve_model(None, "dummy").preset == "smollm2-135m"
