"""LlamaForCausalLM: one model for Llama 2/3/3.1, Mistral, Qwen2/2.5 (qkv bias), Qwen3 (q/k norm), SmolLM2 (tied)."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from kvflight.model.arch import ModelArch
from kvflight.model.attention import Attention, AttentionMetadata, RotaryInputs
from kvflight.model.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    SiluAndMul,
    VocabParallelEmbedding,
    default_weight_loader,
)

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)

# HF checkpoint projection name -> (our fused parameter's module name, shard id)
_STACKED: tuple[tuple[str, str, str | int], ...] = (
    (".q_proj.", ".qkv_proj.", "q"),
    (".k_proj.", ".qkv_proj.", "k"),
    (".v_proj.", ".qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
)
_IGNORED_SUFFIXES: tuple[str, ...] = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def hf_tensor_shapes(arch: ModelArch) -> list[tuple[str, tuple[int, ...]]]:
    """The unsharded HF checkpoint tensors of this family for `arch`: (name, shape) in checkpoint order."""
    h, hd, inter = arch.hidden_size, arch.head_dim, arch.intermediate_size
    q, kv = arch.num_heads * hd, arch.num_kv_heads * hd
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (arch.vocab_size, h))]
    for i in range(arch.num_layers):
        pre = f"model.layers.{i}."
        out += [(pre + "self_attn.q_proj.weight", (q, h)), (pre + "self_attn.k_proj.weight", (kv, h)),
                (pre + "self_attn.v_proj.weight", (kv, h))]
        if arch.attention_bias:
            out += [(pre + "self_attn.q_proj.bias", (q,)), (pre + "self_attn.k_proj.bias", (kv,)),
                    (pre + "self_attn.v_proj.bias", (kv,))]
        if arch.qk_norm:
            out += [(pre + "self_attn.q_norm.weight", (hd,)), (pre + "self_attn.k_norm.weight", (hd,))]
        out += [(pre + "self_attn.o_proj.weight", (h, q)),
                (pre + "mlp.gate_proj.weight", (inter, h)), (pre + "mlp.up_proj.weight", (inter, h)),
                (pre + "mlp.down_proj.weight", (h, inter)),
                (pre + "input_layernorm.weight", (h,)), (pre + "post_attention_layernorm.weight", (h,))]
    out.append(("model.norm.weight", (h,)))
    if not arch.tie_word_embeddings:
        out.append(("lm_head.weight", (arch.vocab_size, h)))
    return out


class LlamaAttention(nn.Module):
    def __init__(self, arch: ModelArch, dtype: torch.dtype, device: torch.device | str | None, backend: str) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(arch.hidden_size, arch.head_dim, arch.num_heads, arch.num_kv_heads,
                                          bias=arch.attention_bias, dtype=dtype, device=device)
        self.o_proj = RowParallelLinear(arch.num_heads * arch.head_dim, arch.hidden_size, bias=False,
                                        dtype=dtype, device=device)
        self.num_heads = self.qkv_proj.num_heads  # this rank's
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = arch.head_dim
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if arch.qk_norm:
            self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype=dtype, device=device)
            self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps, dtype=dtype, device=device)
        self.attn = Attention(self.num_heads, arch.head_dim, self.num_kv_heads, backend=backend)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor | None,
                meta: AttentionMetadata, rotary: RotaryEmbedding) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)  # [T, (Hq + 2 * Hkv) * D]
        q, k, v = qkv.split([self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q)[0]
            k = self.k_norm(k)[0]
        if self.attn.fuses_rotary(kv_cache):  # triton with a cache: RoPE inside the K/V write kernel
            fused = RotaryInputs(positions, rotary.cos_sin_cache, rotary.head_dim)
            out = self.attn(q, k, v, kv_cache, meta, rotary=fused)  # [T, Hq, D]
        else:  # reference backend, or no cache (profiling, calibration): q, k rotated first, as the hooks expect
            q, k = rotary(positions, q, k)
            out = self.attn(q, k, v, kv_cache, meta)  # [T, Hq, D]
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))  # [T, hidden]


class LlamaMLP(nn.Module):
    def __init__(self, arch: ModelArch, dtype: torch.dtype, device: torch.device | str | None) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(arch.hidden_size, [arch.intermediate_size] * 2, bias=False,
                                                       dtype=dtype, device=device)
        self.down_proj = RowParallelLinear(arch.intermediate_size, arch.hidden_size, bias=False,
                                           dtype=dtype, device=device)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))  # via [T, 2 * I_local] and [T, I_local]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, dtype: torch.dtype, device: torch.device | str | None, backend: str) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(arch, dtype, device, backend)
        self.mlp = LlamaMLP(arch, dtype, device)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype=dtype, device=device)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype=dtype, device=device)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                kv_cache: torch.Tensor | None, meta: AttentionMetadata,
                rotary: RotaryEmbedding) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [T, hidden] (this layer's input, not yet added to residual) -> (mlp out, residual)."""
        hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta, rotary)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArch, dtype: torch.dtype, device: torch.device | str | None, backend: str) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList([LlamaDecoderLayer(arch, dtype, device, backend) for _ in range(arch.num_layers)])
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype=dtype, device=device)
        self.rotary_emb = RotaryEmbedding(arch.head_dim, arch.max_position_embeddings, arch.rope_theta,
                                          arch.rope_scaling, device=device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor] | None,
                meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [T, hidden]
        residual: torch.Tensor | None = None
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(positions, hidden, residual, None if kv_caches is None else kv_caches[i],
                                     meta, self.rotary_emb)
        return self.norm(hidden, residual)[0]  # [T, hidden]


class LlamaForCausalLM(nn.Module):
    """Decoder-only Llama-family model over a paged KV cache; inputs are one flat batch of all sequences' tokens."""

    def __init__(self, arch: ModelArch, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 attn_backend: str = "reference") -> None:
        super().__init__()
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"model dtype {dtype}: supported: {', '.join(str(d) for d in SUPPORTED_DTYPES)}")
        self.arch = arch
        self.dtype = dtype
        self.model = LlamaModel(arch, dtype, device, attn_backend)
        self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, dtype=dtype, device=device)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def set_kernel_backend(self, backend: str) -> None:
        """'triton': Triton attention / RMSNorm / rotary / SiLU-and-mul kernels; 'torch': the plain-torch references."""
        if backend not in ("triton", "torch"):
            raise ValueError(f"kernel backend {backend!r}: expected 'triton' or 'torch'")
        use_triton = backend == "triton"
        for module in self.modules():
            if isinstance(module, (RMSNorm, SiluAndMul, RotaryEmbedding)):
                module.use_triton = use_triton
            elif isinstance(module, Attention):
                module.backend = "triton" if use_triton else "reference"

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def kv_cache_shape(self, num_blocks: int, tokens_per_block: int) -> tuple[int, int, int, int, int]:
        """Shape of ONE layer's cache tensor (this rank's KV heads)."""
        attn = self.model.layers[0].self_attn
        return (2, num_blocks, tokens_per_block, attn.num_kv_heads, attn.head_dim)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor] | None,
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids [T] int64, positions [T] int64, kv_caches: num_layers x [2, blocks, tokens_per_block, Hkv, D]
        (None: no cache, fresh prefills only, e.g. memory profiling) -> final-normed hidden states [T, hidden]."""
        if input_ids.dim() != 1 or positions.shape != input_ids.shape:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and positions {tuple(positions.shape)} must both "
                             "be flat [num_tokens] (all sequences back to back, no padding)")
        if kv_caches is not None and len(kv_caches) != len(self.model.layers):
            raise ValueError(f"got {len(kv_caches)} KV cache tensors for {len(self.model.layers)} layers")
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, hidden] (the rows to sample from) -> logits [B, vocab] float32."""
        return self.lm_head.compute_logits(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], strict: bool = True) -> set[str]:
        """Copy HF-named checkpoint tensors into the (fused, per-rank) parameters; returns the names filled.

        strict: raise on an unknown checkpoint name, and on parameters the checkpoint never filled.
        """
        params = dict(self.named_parameters(remove_duplicate=False))
        filled: set[str] = set()
        for hf_name, tensor in weights:
            if hf_name.endswith(_IGNORED_SUFFIXES):
                continue
            if hf_name == "lm_head.weight" and self.arch.tie_word_embeddings:
                continue  # tied: the embedding is the head (some checkpoints still store a copy)
            name, shard_id = hf_name, None
            for hf_part, our_part, sid in _STACKED:
                if hf_part in hf_name:
                    name, shard_id = hf_name.replace(hf_part, our_part), sid
                    break
            param = params.get(name)
            if param is None:
                if strict:
                    raise KeyError(f"checkpoint tensor '{hf_name}' has no place in {self.arch.architecture} "
                                   f"(mapped to '{name}'); is the config right for these weights?")
                continue
            loader = getattr(param, "weight_loader", default_weight_loader)
            with torch.no_grad():
                loader(param, tensor, shard_id) if shard_id is not None else loader(param, tensor)
            filled.add(name if shard_id is None else f"{name}:{shard_id}")
        if strict:
            missing = self._missing(params, filled)
            if missing:
                raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:5]}")
        return filled

    def _missing(self, params: dict[str, nn.Parameter], filled: set[str]) -> list[str]:
        missing: list[str] = []
        for name in params:
            if name == "lm_head.weight" and self.arch.tie_word_embeddings:
                continue
            if name.endswith("qkv_proj.weight") or name.endswith("qkv_proj.bias"):
                missing += [f"{name}:{s}" for s in ("q", "k", "v") if f"{name}:{s}" not in filled]
            elif name.endswith("gate_up_proj.weight"):
                missing += [f"{name}:{s}" for s in (0, 1) if f"{name}:{s}" not in filled]
            elif name not in filled:
                missing.append(name)
        return missing
