"""Our Llama-family model over the paged KV cache equals transformers' logits (tiny random HF checkpoints, float32)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kvflight.model.arch import ArchError, ModelArch
from kvflight.model.attention import AttentionMetadata
from kvflight.model.layers import QKVParallelLinear, RotaryEmbedding
from kvflight.model.loader import (
    ModelLoadError,
    load_arch,
    load_model,
    load_tokenizer,
    resolve_dtype,
    resolve_model,
)
from kvflight.model.presets import PRESET_NAMES, get_preset
from kvflight.model.registry import UnsupportedArchitectureError
from tiny_models import CASES, VOCAB, write_hf_checkpoint

TOKENS_PER_BLOCK = 4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf_models")
    out = {}
    for name in CASES:
        write_hf_checkpoint(name, root / name)
        out[name] = root / name
    return out


def _hf_logits(directory: Path, token_ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()  # [len, vocab]


class PagedDriver:
    """Drives our model step by step with a hand-built paged cache; blocks come from a scrambled pool."""

    def __init__(self, model: torch.nn.Module, arch: ModelArch, num_blocks: int) -> None:
        self.model = model
        self.kv_caches = [torch.full((2, num_blocks, TOKENS_PER_BLOCK, arch.num_kv_heads, arch.head_dim),
                                     float("nan")) for _ in range(arch.num_layers)]
        # interleaved, descending-then-ascending ids: no sequence gets contiguous blocks
        odd = [b for b in range(num_blocks) if b % 2][::-1]
        even = [b for b in range(num_blocks) if b % 2 == 0]
        self.free = [b for pair in zip(odd, even) for b in pair] + odd[len(even):] + even[len(odd):]
        self.tables: dict[str, list[int]] = {}
        self.cached: dict[str, int] = {}
        self.logits: dict[str, list[torch.Tensor]] = {}

    def step(self, work: list[tuple[str, list[int]]]) -> None:
        """work: (sequence id, its new token ids) in batch order -> logits of every new token recorded."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        for seq, tokens in work:
            start = self.cached.get(seq, 0)
            table = self.tables.setdefault(seq, [])
            while len(table) * TOKENS_PER_BLOCK < start + len(tokens):
                table.append(self.free.pop(0))
            for i, token in enumerate(tokens):
                pos = start + i
                input_ids.append(token)
                positions.append(pos)
                slots.append(table[pos // TOKENS_PER_BLOCK] * TOKENS_PER_BLOCK + pos % TOKENS_PER_BLOCK)
            query_start.append(query_start[-1] + len(tokens))
            seq_lens.append(start + len(tokens))
            self.cached[seq] = start + len(tokens)
        width = max(len(self.tables[seq]) for seq, _ in work) + 1  # one spare column of padding
        block_tables = torch.zeros(len(work), width, dtype=torch.int32)
        for i, (seq, _) in enumerate(work):
            block_tables[i, : len(self.tables[seq])] = torch.tensor(self.tables[seq], dtype=torch.int32)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=block_tables,
            max_query_len=max(len(t) for _, t in work),
            max_seq_len=max(seq_lens),
            query_lens_cpu=[len(t) for _, t in work],
            seq_lens_cpu=seq_lens,
        )
        with torch.no_grad():
            hidden = self.model(torch.tensor(input_ids), torch.tensor(positions), self.kv_caches, meta)
            assert hidden.shape == (len(input_ids), self.model.arch.hidden_size)
            logits = self.model.compute_logits(hidden)  # [T, vocab] float32
        assert logits.dtype == torch.float32
        for i, (seq, _) in enumerate(work):
            self.logits.setdefault(seq, []).append(logits[query_start[i]:query_start[i + 1]])


@pytest.mark.parametrize("name", list(CASES))
def test_logits_equal_transformers(name: str, checkpoints: dict[str, Path]) -> None:
    directory = checkpoints[name]
    resolved = resolve_model(str(directory), "auto")
    assert resolved.format == "hf"
    arch = load_arch(resolved)
    model = load_model(resolved, arch, "float32", "cpu", seed=0)
    gen = torch.Generator().manual_seed(7)
    lengths = {"a": 7, "b": 13, "c": 4, "d": 10, "e": 70}
    tokens = {s: torch.randint(3, VOCAB, (n + 3,), generator=gen).tolist() for s, n in lengths.items()}
    driver = PagedDriver(model, arch, num_blocks=64)
    # step 1: prefill a, b, c, e and the first chunk of d in ONE flat batch
    driver.step([("a", tokens["a"][:7]), ("b", tokens["b"][:13]), ("d", tokens["d"][:6]), ("c", tokens["c"][:4]),
                 ("e", tokens["e"][:70])])
    # step 2: decodes reading the cache, the second chunk of d, a 2-token "speculative" append on b
    driver.step([("a", tokens["a"][7:8]), ("c", tokens["c"][4:5]), ("d", tokens["d"][6:10]),
                 ("b", tokens["b"][13:15]), ("e", tokens["e"][70:71])])
    # step 3: one more decode each (several cross a block boundary)
    driver.step([("d", tokens["d"][10:11]), ("a", tokens["a"][8:9]), ("c", tokens["c"][5:6]),
                 ("b", tokens["b"][15:16]), ("e", tokens["e"][71:72])])
    for seq in lengths:
        ours = torch.cat(driver.logits[seq])  # [tokens fed, vocab]
        ref = _hf_logits(directory, tokens[seq][: ours.shape[0]])
        assert ref.abs().max() > 1.0  # the random model is not degenerate
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}/{seq}: {m}")
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("name", list(CASES))
def test_arch_from_saved_config(name: str, checkpoints: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    config = json.loads((checkpoints[name] / "config.json").read_text())
    arch = ModelArch.from_hf_config(config)
    assert arch.hidden_size == 64 and arch.num_layers == 2 and arch.vocab_size == VOCAB
    assert arch.attention_bias == (name == "qwen2_bias")
    assert arch.qk_norm == (name == "qwen3_qknorm")
    assert arch.tie_word_embeddings == (name == "llama_tied")
    assert (arch.rope_scaling or {}).get("rope_type") == ("llama3" if name == "llama31_rope" else None)
    hf = AutoModelForCausalLM.from_pretrained(checkpoints[name], dtype=torch.float32)
    assert arch.num_params() == sum(p.numel() for p in hf.parameters())  # tied weights counted once


def test_rope_cache_matches_transformers(checkpoints: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(checkpoints["llama31_rope"], dtype=torch.float32)
    arch = load_arch(resolve_model(str(checkpoints["llama31_rope"])))
    rope = RotaryEmbedding(arch.head_dim, arch.max_position_embeddings, arch.rope_theta, arch.rope_scaling)
    positions = torch.arange(200)[None]
    cos, sin = hf.model.rotary_emb(torch.zeros(1, 200, 4), positions)  # [1, 200, D]
    ours_cos, ours_sin = rope.cos_sin_cache[:200].chunk(2, dim=-1)
    torch.testing.assert_close(torch.cat([ours_cos, ours_cos], -1), cos[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.cat([ours_sin, ours_sin], -1), sin[0], atol=1e-6, rtol=0)


def test_presets_parse_and_sizes() -> None:
    archs = {name: ModelArch.from_hf_config(get_preset(name)) for name in PRESET_NAMES}
    l8 = archs["llama-3.1-8b"]
    assert (l8.hidden_size, l8.num_layers, l8.num_heads, l8.num_kv_heads, l8.head_dim) == (4096, 32, 32, 8, 128)
    assert l8.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}
    assert l8.kv_bytes_per_token(2) == 2 * 32 * 8 * 128 * 2  # 128 KiB per token in bf16
    assert l8.num_params() == 8_030_261_248
    assert l8.eos_token_ids == (128001, 128008, 128009)
    assert 70.0e9 < archs["llama-3.1-70b"].num_params() < 71.0e9
    assert 7.5e9 < archs["qwen2.5-7b"].num_params() < 7.7e9 and archs["qwen2.5-7b"].attention_bias
    smol = archs["smollm2-135m"]
    assert smol.tie_word_embeddings and smol.num_params() == 134_515_008
    assert resolve_model("smollm2-135m", "auto").format == "dummy"


def test_dummy_weights(tmp_path: Path, checkpoints: dict[str, Path]) -> None:
    (tmp_path / "config.json").write_text((checkpoints["qwen3_qknorm"] / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="load_format='dummy'"):
        resolve_model(str(tmp_path), "auto")  # config only, no weights
    resolved = resolve_model(str(tmp_path), "dummy")
    arch = load_arch(resolved)
    a = load_model(resolved, arch, "bfloat16", "cpu", seed=3)
    b = load_model(resolved, arch, "bfloat16", "cpu", seed=3)
    c = load_model(resolved, arch, "bfloat16", "cpu", seed=4)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert pa.dtype == torch.bfloat16
        assert torch.equal(pa, pb)
        if name.endswith("norm.weight"):
            assert torch.all(pa == 1.0)
        else:
            assert pa.abs().max() <= 1e-3 and not torch.equal(pa, pc)
    assert load_tokenizer(resolved) is None
    meta = AttentionMetadata.build([5], [5], [[2, 0]], TOKENS_PER_BLOCK)
    with torch.no_grad():
        hidden = a(torch.arange(5), torch.arange(5), None, meta)
    assert torch.isfinite(a.compute_logits(hidden)).all()


def test_qwen2_biases_loaded(checkpoints: dict[str, Path]) -> None:
    resolved = resolve_model(str(checkpoints["qwen2_bias"]))
    model = load_model(resolved, load_arch(resolved), torch.float32, "cpu")
    from safetensors.torch import load_file

    state = load_file(str(checkpoints["qwen2_bias"] / "model.safetensors"))
    qkv = model.model.layers[1].self_attn.qkv_proj
    assert isinstance(qkv, QKVParallelLinear) and qkv.bias is not None
    expected = torch.cat([state[f"model.layers.1.self_attn.{p}_proj.bias"] for p in "qkv"])
    assert torch.equal(qkv.bias, expected)


def test_load_weights_rejects_unknown_and_missing(checkpoints: dict[str, Path]) -> None:
    resolved = resolve_model(str(checkpoints["llama_gqa"]))
    arch = load_arch(resolved)
    model = load_model(resolved, arch, "float32", "cpu")
    with pytest.raises(KeyError, match="model.layers.0.mlp.experts"):
        model.load_weights([("model.layers.0.mlp.experts.0.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="lacks"):
        model.load_weights([("model.norm.weight", torch.ones(64))])
    with pytest.raises(ValueError, match="checkpoint tensor has"):
        model.load_weights([("model.layers.0.self_attn.k_proj.weight", torch.zeros(64, 64))], strict=False)


def test_config_errors() -> None:
    base = get_preset("smollm2-135m")
    with pytest.raises(UnsupportedArchitectureError, match="supported: LlamaForCausalLM"):
        ModelArch.from_hf_config({**base, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ArchError, match="sliding"):
        ModelArch.from_hf_config({**base, "architectures": ["MistralForCausalLM"], "sliding_window": 4096})
    mistral = ModelArch.from_hf_config({**base, "architectures": ["MistralForCausalLM"], "sliding_window": None})
    assert mistral.architecture == "MistralForCausalLM"
    with pytest.raises(ArchError, match="use_sliding_window"):
        ModelArch.from_hf_config({**get_preset("qwen2.5-7b"), "use_sliding_window": True})
    with pytest.raises(ArchError, match="yarn"):
        ModelArch.from_hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    linear = ModelArch.from_hf_config({**base, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert linear.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(ModelLoadError, match="supported: auto, float32"):
        resolve_dtype("int8")
    with pytest.raises(ModelLoadError, match="not found"):
        resolve_model("/nonexistent/model/dir", "auto")
    with pytest.raises(ModelLoadError, match="load_format"):
        resolve_model(None, "safetensors")
    assert math.isclose(ModelArch.from_hf_config(base).rms_norm_eps, 1e-5)


def test_dropped_model_is_freed_without_gc(checkpoints: dict[str, Path]) -> None:
    """No reference cycles (e.g. param.weight_loader -> layer -> param): `del model` frees GPU memory at once."""
    import gc
    import weakref

    resolved = resolve_model(str(checkpoints["llama_tied"]))
    model = load_model(resolved, load_arch(resolved), "float32", "cpu")
    ref = weakref.ref(model.model.layers[0].self_attn.qkv_proj.weight)
    gc.disable()
    try:
        del model
        assert ref() is None
    finally:
        gc.enable()
