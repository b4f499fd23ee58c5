"""Calibration data and activation capture: read the texts (the packaged default set, a user's JSONL or plain-text
file), pack them into token sequences, and run a model one decoder layer at a time while recording what each
linear layer sees (per-channel statistics and a subsample of input rows)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Sequence

import torch

from kvflight.quant.schemes import QuantizationError

if TYPE_CHECKING:
    from kvflight.model.llama import LlamaDecoderLayer, LlamaForCausalLM

DEFAULT_DATASET = "default"
JSONL_TEXT_KEYS: tuple[str, ...] = ("text", "prompt")


# ---- texts ------------------------------------------------------------------------------------------------------
def load_texts(source: str | None, what: str = "--calib-dataset") -> list[str]:
    """Texts from "default" (the calibration set shipped with kvflight), a .jsonl file (one object per line with a
    "text" or "prompt" string; "prompt" + "completion"/"response" are joined) or a plain-text file (paragraphs
    separated by blank lines)."""
    if source is None or source == DEFAULT_DATASET:
        from kvflight.quant.calib_data import CALIBRATION_TEXTS

        return list(CALIBRATION_TEXTS)
    path = os.path.expanduser(source)
    if not os.path.isfile(path):
        raise QuantizationError(f"{what} {source!r}: no such file; pass 'default' (the built-in set), a .jsonl "
                                "file of {\"text\": ...} / {\"prompt\": ...} objects, or a plain-text file")
    with open(path, encoding="utf-8") as fh:
        content = fh.read()
    if path.endswith((".jsonl", ".json")):
        texts = [_jsonl_text(line, i + 1, path) for i, line in enumerate(content.splitlines()) if line.strip()]
    else:
        blocks = [b.strip() for b in content.replace("\r\n", "\n").split("\n\n")]
        texts = [b for b in blocks if b]
    if not texts:
        raise QuantizationError(f"{what} {source!r} holds no text")
    return texts


def _jsonl_text(line: str, line_no: int, path: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise QuantizationError(f"{path} line {line_no}: not valid JSON ({exc.msg}); expected one object per line "
                                "such as {\"text\": \"...\"}") from None
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise QuantizationError(f"{path} line {line_no}: expected a JSON object with a \"text\" or \"prompt\" key")
    for key in JSONL_TEXT_KEYS:
        value = record.get(key)
        if isinstance(value, str) and value:
            answer = record.get("completion") or record.get("response") or ""
            return value + (("\n" + answer) if key == "prompt" and isinstance(answer, str) and answer else "")
    raise QuantizationError(f"{path} line {line_no}: no non-empty string under {' / '.join(JSONL_TEXT_KEYS)} "
                            f"(keys: {', '.join(record)})")


def pack_token_sequences(tokenizer: Any, texts: Sequence[str], num_sequences: int | None,
                         seq_len: int, separator_id: int | None = None) -> list[list[int]]:
    """Tokenize the texts back to back (separator token between them) and cut the stream into sequences of
    seq_len tokens; a last partial one shorter than seq_len / 4 is dropped unless it is the only one. None = all."""
    if seq_len < 2:
        raise QuantizationError(f"sequence length {seq_len}: must be >= 2")
    stream: list[int] = []
    need = None if num_sequences is None else num_sequences * seq_len
    for text in texts:
        ids = list(tokenizer.encode(text, add_special_tokens=False))
        if stream and separator_id is not None:
            stream.append(separator_id)
        stream.extend(ids)
        if need is not None and len(stream) >= need:
            break
    sequences = [stream[i:i + seq_len] for i in range(0, len(stream), seq_len)]
    if len(sequences) > 1 and len(sequences[-1]) < seq_len // 4:
        sequences.pop()  # a short tail adds little; a short text alone is still scored
    if sequences and len(sequences[-1]) < 2:
        sequences.pop()
    if num_sequences is not None:
        sequences = sequences[:num_sequences]
    if not sequences:
        raise QuantizationError("the texts give fewer than 2 tokens; give more text")
    return sequences


# ---- activation capture ---------------------------------------------------------------------------------------
@dataclass
class InputStats:
    """What one linear layer's inputs looked like over the calibration tokens."""

    abs_sum: torch.Tensor | None = None  # [K] float32: sum of |x| per input channel
    abs_max: torch.Tensor | None = None  # [K] float32: max of |x| per input channel
    num_tokens: int = 0
    samples: list[torch.Tensor] = field(default_factory=list)  # the search batch's input rows, float32

    def add(self, x: torch.Tensor, keep: bool) -> None:  # x [T, K]; keep: also store the rows
        xf = x.detach().reshape(-1, x.shape[-1]).float()
        a = xf.abs()
        if self.abs_sum is None:
            self.abs_sum, self.abs_max = a.sum(0), a.amax(0)
        else:
            self.abs_sum += a.sum(0)
            torch.maximum(self.abs_max, a.amax(0), out=self.abs_max)
        self.num_tokens += xf.shape[0]
        if keep:
            self.samples.append(xf.clone())

    @property
    def abs_mean(self) -> torch.Tensor:  # [K]
        assert self.abs_sum is not None, "no calibration tokens recorded"
        return self.abs_sum / max(1, self.num_tokens)

    def sample_rows(self) -> torch.Tensor:  # [S, K]
        return torch.cat(self.samples, dim=0)


@dataclass
class SearchBatch:
    """The calibration sequences whose rows InputStats.samples keeps, with what attention needs to rerun them."""

    positions: torch.Tensor  # [S] int64
    meta: Any  # AttentionMetadata of those sequences (fresh prefills, no KV cache)
    rotary: Any  # the model's RotaryEmbedding


LINEAR_NAMES: tuple[str, ...] = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


@torch.no_grad()
def run_layerwise(model: "LlamaForCausalLM", sequences: Sequence[Sequence[int]],
                  on_layer: Callable[[int, "LlamaDecoderLayer", dict[str, InputStats], SearchBatch | None], None],
                  max_samples: int = 512, tokens_per_forward: int = 4096,
                  quantized_view: Callable[["LlamaDecoderLayer"], ContextManager[None]] | None = None) -> None:
    """Push the calibration sequences through the model one decoder layer at a time (no KV cache).

    For each layer: record every linear's input statistics over all tokens, and the input rows of the search
    batch (the first sequences, up to max_samples tokens; at least one sequence, none if max_samples is 0);
    compute the layer's output; then call on_layer(index, layer, stats, search_batch), which may rewrite the
    layer's weights in ways that leave its float output (nearly) unchanged: folded smoothing scales, clipping.
    quantized_view: if given, the layer's output fed to the next layer is recomputed inside quantized_view(layer)
    (weights as they will be quantized), so later layers calibrate on the inputs they will really see.
    """
    from kvflight.model.attention import AttentionMetadata

    device = model.device
    num_search = 0
    if max_samples > 0:
        total = 0
        while num_search < len(sequences) and (num_search == 0 or total + len(sequences[num_search]) <= max_samples):
            total += len(sequences[num_search])
            num_search += 1
    batches = ([list(sequences[:num_search])] if num_search else []) + list(
        _batches(sequences[num_search:], tokens_per_forward))
    metas, positions, hidden, residual = [], [], [], []
    for batch in batches:
        lens = [len(seq) for seq in batch]
        metas.append(AttentionMetadata.build(lens, lens, [[0] * math.ceil(n / 16) for n in lens], 16,
                                             device=device))
        positions.append(torch.cat([torch.arange(n, device=device) for n in lens]))
        ids = torch.tensor([t for seq in batch for t in seq], dtype=torch.int64, device=device)
        hidden.append(model.model.embed_tokens(ids))  # [T, H]
        residual.append(None)
    rotary = model.model.rotary_emb
    search = SearchBatch(positions[0], metas[0], rotary) if num_search else None
    for index, layer in enumerate(model.model.layers):
        stats = {name: InputStats() for name in LINEAR_NAMES}
        current = [0]  # index of the batch being run
        hooks = [layer.get_submodule(name).register_forward_pre_hook(
            lambda _m, args, _s=stats[name]: _s.add(args[0], keep=num_search > 0 and current[0] == 0))
            for name in LINEAR_NAMES]
        inputs = list(zip(hidden, residual)) if quantized_view is not None else []
        try:
            for b in range(len(batches)):
                current[0] = b
                hidden[b], residual[b] = layer(positions[b], hidden[b], residual[b], None, metas[b], rotary)
        finally:
            for hook in hooks:
                hook.remove()
        on_layer(index, layer, stats, search)
        if quantized_view is not None:
            with quantized_view(layer):
                for b, (h, r) in enumerate(inputs):
                    hidden[b], residual[b] = layer(positions[b], h, r, None, metas[b], rotary)


def _batches(sequences: Sequence[Sequence[int]], tokens_per_forward: int) -> Iterator[list[Sequence[int]]]:
    batch: list[Sequence[int]] = []
    count = 0
    for seq in sequences:
        if batch and count + len(seq) > tokens_per_forward:
            yield batch
            batch, count = [], 0
        batch.append(seq)
        count += len(seq)
    if batch:
        yield batch
