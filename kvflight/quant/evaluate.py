"""Perplexity check: the model's next-token loss over a text file, with the engine's own model forward (no KV
cache, fresh prefills), and `kvflight eval ppl` which compares quantization schemes side by side."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from kvflight.model.llama import LlamaForCausalLM

logger = logging.getLogger("kvflight.quant")


@dataclass
class PerplexityResult:
    nll_sum: float  # natural-log loss summed over the predicted tokens
    num_predicted_tokens: int
    predictions: torch.Tensor  # [num_predicted_tokens] int64 (CPU): the argmax next token at each position

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / max(1, self.num_predicted_tokens))

    def top1_agreement(self, other: "PerplexityResult") -> float:
        """Fraction of positions where both models' argmax next token is the same (teacher-forced greedy)."""
        if other.predictions.shape != self.predictions.shape:
            raise ValueError("top1_agreement: the two results cover different tokens")
        return float((self.predictions == other.predictions).float().mean())


@torch.inference_mode()
def perplexity(model: "LlamaForCausalLM", sequences: Sequence[Sequence[int]],
               tokens_per_forward: int = 2048) -> PerplexityResult:
    """Mean next-token loss of every sequence (each scored on its own, from position 0, no cache)."""
    from kvflight.model.attention import AttentionMetadata

    device = model.device
    nll_sum, count = 0.0, 0
    predictions: list[torch.Tensor] = []
    start = 0
    while start < len(sequences):
        batch = [sequences[start]]
        total = len(batch[0])
        while start + len(batch) < len(sequences) and total + len(sequences[start + len(batch)]) <= tokens_per_forward:
            batch.append(sequences[start + len(batch)])
            total += len(batch[-1])
        start += len(batch)
        lens = [len(s) for s in batch]
        ids = torch.tensor([t for s in batch for t in s], dtype=torch.int64, device=device)  # [T]
        positions = torch.cat([torch.arange(n, device=device) for n in lens])  # [T]
        meta = AttentionMetadata.build(lens, lens, [[0] * math.ceil(n / 16) for n in lens], 16, device=device)
        hidden = model(ids, positions, None, meta)  # [T, hidden]
        offset = 0
        for n in lens:
            logits = model.compute_logits(hidden[offset:offset + n - 1])  # [n - 1, vocab] float32
            targets = ids[offset + 1:offset + n]
            nll_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
            predictions.append(logits.argmax(dim=-1).cpu())
            count += n - 1
            offset += n
    return PerplexityResult(nll_sum, count, torch.cat(predictions) if predictions else torch.zeros(0))


def eval_sequences(tokenizer, dataset: str, max_seq_len: int, max_tokens: int | None) -> list[list[int]]:
    """The dataset (default = the built-in held-out text) tokenized into windows of max_seq_len tokens."""
    from kvflight.quant.calib_data import EVAL_TEXTS
    from kvflight.quant.calibrate import load_texts, pack_token_sequences

    texts = list(EVAL_TEXTS) if dataset == "default" else load_texts(dataset, "--dataset")
    separator = getattr(tokenizer, "eos_token_id", None)
    num = None if max_tokens is None else max(1, max_tokens // max_seq_len)
    return pack_token_sequences(tokenizer, texts, num, max_seq_len, separator)


# ---- `kvflight eval ppl` ----------------------------------------------------------------------------------------
def add_eval_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", required=True)
    ppl = sub.add_parser("ppl", help="perplexity of a model (and its quantized variants) over a text file")
    ppl.add_argument("model", nargs="?", default=None,
                     help="HF directory (a `kvflight quantize` output too), .gguf file, or omitted for SmolLM2")
    ppl.add_argument("--dataset", default="default",
                     help="text to score: 'default' (built-in held-out text), a .jsonl of {\"text\"|\"prompt\"} "
                          "objects, or a plain-text file")
    ppl.add_argument("--quantization", default="auto",
                     help="comma-separated schemes compared on the same tokens, the first is the baseline: e.g. "
                          "none,fp8,int8_wo,int4_wo (auto: as the checkpoint is)")
    ppl.add_argument("--kv-cache-dtype", default="auto",
                     help="comma-separated KV cache dtypes scored with every scheme: auto (no quantized cache), "
                          "int8, fp8 (K/V written to a paged cache of that dtype and read back through it; scales "
                          "from the checkpoint, else online calibration), e.g. auto,int8,fp8")
    ppl.add_argument("--quantize-lm-head", default="auto",
                     help="comma-separated LM head settings scored with every scheme: auto (int8 under int4 "
                          "weights, else as the checkpoint records), off (float head), on (int8 per output row), "
                          "e.g. off,on")
    ppl.add_argument("--max-seq-len", type=int, default=512, help="tokens per scored window")
    ppl.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    ppl.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float32, ...")
    ppl.add_argument("--device", default="auto")
    ppl.add_argument("--load-format", default="auto", choices=("auto", "hf", "gguf", "dummy"))
    ppl.add_argument("--tokenizer", default=None)
    ppl.add_argument("--json", action="store_true", help="one JSON object per scheme instead of the table")
    ppl.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from kvflight.model.loader import load_arch, load_model, load_tokenizer, resolve_model
    from kvflight.quant.loading import describe_quantization
    from kvflight.quant.schemes import QUANTIZATION_CHOICES, QuantizationError

    schemes = [s.strip() for s in args.quantization.split(",") if s.strip()]
    bad = [s for s in schemes if s not in QUANTIZATION_CHOICES]
    if bad or not schemes:
        raise QuantizationError(f"--quantization {args.quantization!r}: each entry must be one of "
                                f"{', '.join(QUANTIZATION_CHOICES)}")
    kv_dtypes = [s.strip() for s in args.kv_cache_dtype.split(",") if s.strip()]
    if not kv_dtypes or any(k not in ("auto", "int8", "fp8") for k in kv_dtypes):
        raise QuantizationError(f"--kv-cache-dtype {args.kv_cache_dtype!r}: each entry must be auto, int8 or fp8")
    heads = [s.strip() for s in args.quantize_lm_head.split(",") if s.strip()]
    if not heads or any(h not in ("auto", "on", "off") for h in heads):
        raise QuantizationError(f"--quantize-lm-head {args.quantize_lm_head!r}: each entry must be auto, on or off")
    resolved = resolve_model(args.model, args.load_format)
    arch = load_arch(resolved)
    tokenizer = load_tokenizer(resolved, args.tokenizer)
    if tokenizer is None:
        raise QuantizationError("this model has no tokenizer: pass --tokenizer DIR")
    sequences = eval_sequences(tokenizer, args.dataset, args.max_seq_len, args.max_tokens)
    num_tokens = sum(len(s) for s in sequences)
    logger.info("scoring %d tokens in %d windows of <= %d", num_tokens, len(sequences), args.max_seq_len)
    rows = []
    baseline: PerplexityResult | None = None
    for scheme, head in [(scheme, head) for scheme in schemes for head in heads]:
        t0 = time.perf_counter()
        model = load_model(resolved, arch, args.dtype, args.device, quantization=scheme, quantize_lm_head=head)
        name = scheme + ("+lm_head:int8" if model.lm_head.is_int8 else "")
        for kv in kv_dtypes:
            result = perplexity(model, sequences) if kv == "auto" else _kv_perplexity(
                model, sequences, kv, resolved.path, tokenizer, arch.vocab_size)
            row = {"quantization": name if kv == "auto" else f"{name}+kv:{kv}",
                   "linears": describe_quantization(model), "kv_cache_dtype": kv,
                   "perplexity": result.perplexity, "tokens": result.num_predicted_tokens,
                   "seconds": time.perf_counter() - t0}
            if baseline is None:
                baseline = result
            else:
                row["delta_vs_first"] = result.perplexity / baseline.perplexity - 1.0
                row["top1_agreement_vs_first"] = result.top1_agreement(baseline)
            rows.append(row)
            t0 = time.perf_counter()
            if args.json:
                print(json.dumps(row), flush=True)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if not args.json:
        print(format_ppl_table(rows, rows[0]["quantization"]))
    return 0


def _kv_perplexity(model: "LlamaForCausalLM", sequences: Sequence[Sequence[int]], kv_cache_dtype: str,
                   model_path: str | None, tokenizer, vocab_size: int) -> PerplexityResult:
    """Perplexity through a paged KV cache of kv_cache_dtype, with the scales the engine would use."""
    from kvflight.quant.kv_cache import perplexity_with_kv_cache, resolve_kv_scales

    scales, source = resolve_kv_scales(model, kv_cache_dtype, model_path, lambda: tokenizer, vocab_size)
    logger.info("kv_cache_dtype %s: scales from %s", kv_cache_dtype, source)
    predictions: list[torch.Tensor] = []
    ppl = perplexity_with_kv_cache(model, sequences, kv_cache_dtype, scales, predictions=predictions)
    count = sum(len(s) - 1 for s in sequences)
    return PerplexityResult(math.log(ppl) * count, count, torch.cat(predictions) if predictions else torch.zeros(0))


def format_ppl_table(rows: list[dict], first: str) -> str:
    width = max([13] + [len(r["quantization"]) for r in rows])
    lines = [f"{'quantization':<{width}} {'perplexity':>10} {'vs ' + first:>12} {'top-1 agree':>12}  linears",
             "-" * 80]
    for row in rows:
        delta = f"{row['delta_vs_first']:+.2%}" if "delta_vs_first" in row else "-"
        agree = f"{row['top1_agreement_vs_first']:.1%}" if "top1_agreement_vs_first" in row else "-"
        lines.append(f"{row['quantization']:<{width}} {row['perplexity']:>10.3f} {delta:>12} {agree:>12}  {row['linears']}")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m kvflight.quant.evaluate ppl MODEL ...
    _parser = argparse.ArgumentParser(prog="kvflight eval")
    add_eval_args(_parser)
    _args = _parser.parse_args()
    sys.exit(_args.func(_args))
