"""`kvflight quantize`: load a float model, calibrate (SmoothQuant / AWQ), quantize its linears, write a checkpoint.

    kvflight quantize MODEL --qformat fp8|int8_sq|int4_awq|int8_wo|int4_wo --output DIR
        [--calib-dataset default|FILE] [--calib-size N] [--calib-max-seq-length L] [--kv-cache-dtype int8|fp8]

`quantize_in_memory` is the same pipeline without the files (tests, `kvflight eval`).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Sequence

import torch

from kvflight.quant.schemes import CALIBRATED_SCHEMES, QUANT_SCHEMES, QuantConfig, QuantizationError, parse_alpha
from kvflight.quant.smoothing import AwqOptions

if TYPE_CHECKING:
    from kvflight.model.llama import LlamaForCausalLM

logger = logging.getLogger("kvflight.quant")

DEFAULT_CALIB_SIZE = 32  # sequences
DEFAULT_CALIB_MAX_SEQ_LENGTH = 512  # tokens per sequence
DEFAULT_AWQ_SEARCH_TOKENS = 512  # calibration rows kept per linear layer for the AWQ searches


def calibration_sequences(tokenizer: Any, dataset: str, num_sequences: int, seq_len: int,
                          vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Calibration token sequences from a dataset; a model without a tokenizer (dummy preset) gets random ids."""
    from kvflight.quant.calibrate import load_texts, pack_token_sequences

    if tokenizer is None:
        logger.warning("no tokenizer: calibrating on random token ids (fine for dummy weights only)")
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (num_sequences, seq_len), generator=generator).tolist()
    texts = load_texts(dataset)
    sequences = pack_token_sequences(tokenizer, texts, num_sequences, seq_len,
                                     getattr(tokenizer, "eos_token_id", None))
    if len(sequences) < num_sequences:
        logger.warning("calibration data gives %d sequences of <= %d tokens (asked for %d); using them all",
                       len(sequences), seq_len, num_sequences)
    return sequences


@torch.no_grad()
def quantize_in_memory(model: "LlamaForCausalLM", config: QuantConfig,
                       sequences: Sequence[Sequence[int]] | None = None,
                       awq: AwqOptions | None = None, search_tokens: int = DEFAULT_AWQ_SEARCH_TOKENS,
                       ) -> dict[str, Any]:
    """Calibrate (int8_sq: SmoothQuant, int4_awq: AWQ) and quantize every linear of a float model, in place.

    Returns a report (per-layer search results and timings) for kvflight_quantize.json.
    """
    from kvflight.quant.calibrate import run_layerwise
    from kvflight.quant.loading import quantize_model_
    from kvflight.quant.smoothing import awq_layer_, int4_view, smoothquant_layer_

    report: dict[str, Any] = {"scheme": config.scheme, "layers": []}
    t0 = time.perf_counter()
    if config.scheme in CALIBRATED_SCHEMES:
        if not sequences:
            raise QuantizationError(f"--qformat {config.scheme} needs calibration sequences (--calib-dataset)")
        if config.scheme == "int8_sq":
            def on_layer(index, layer, stats, search):
                report["layers"].append(smoothquant_layer_(layer, stats, config.smoothquant_alpha))
            run_layerwise(model, sequences, on_layer, max_samples=search_tokens if config.smoothquant_alpha is None
                          else 0)
        else:
            options = awq or AwqOptions(group_size=config.group_size, zero_point=config.zero_point)
            if (options.group_size, options.zero_point) != (config.group_size, config.zero_point):
                raise QuantizationError("AwqOptions.group_size / zero_point must match the QuantConfig's")
            report["awq_options"] = asdict(options)

            def on_layer(index, layer, stats, search):
                report["layers"].append(awq_layer_(layer, stats, search, options))
                logger.info("AWQ layer %d: %s", index, ", ".join(f"{k}={v:.2f}"
                                                                  for k, v in report["layers"][-1].items()))
            view = (lambda layer: int4_view(layer, options)) if options.sequential else None
            run_layerwise(model, sequences, on_layer, max_samples=search_tokens, quantized_view=view)
    report["calibration_seconds"] = time.perf_counter() - t0
    quantize_model_(model, config)
    report["total_seconds"] = time.perf_counter() - t0
    return report


# ---- CLI --------------------------------------------------------------------------------------------------------
def add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="HF model directory, .gguf file, dummy preset, or omitted for SmolLM2-135M-Instruct")
    p.add_argument("--qformat", required=True, choices=QUANT_SCHEMES,
                   help="fp8 (W8A8), int8_sq (SmoothQuant W8A8), int4_awq (AWQ W4A16), int8_wo (W8A16), "
                        "int4_wo (W4A16)")
    p.add_argument("--output", "--output-dir", "--output_dir", dest="output", required=True, metavar="DIR",
                   help="directory to write (config.json, safetensors, tokenizer)")
    p.add_argument("--calib-dataset", "--calib_dataset", default="default", metavar="FILE|default",
                   help="calibration text for int8_sq / int4_awq: 'default' (built-in, offline), a .jsonl of "
                        "{\"text\"|\"prompt\": ...} objects, or a plain-text file (paragraphs)")
    p.add_argument("--calib-size", "--calib_size", type=int, default=DEFAULT_CALIB_SIZE, metavar="N",
                   help=f"calibration sequences (default {DEFAULT_CALIB_SIZE})")
    p.add_argument("--calib-max-seq-length", "--calib_max_seq_length", type=int,
                   default=DEFAULT_CALIB_MAX_SEQ_LENGTH, metavar="L",
                   help=f"tokens per calibration sequence (default {DEFAULT_CALIB_MAX_SEQ_LENGTH})")
    p.add_argument("--group-size", "--awq-block-size", "--awq_block_size", dest="group_size", type=int,
                   default=128, help="int4 columns per group (default 128; per layer the largest of 128/64/32 "
                                     "dividing its input features)")
    p.add_argument("--no-zero-point", dest="zero_point", action="store_false",
                   help="int4: symmetric groups (zero point 8) instead of per-group zero points")
    p.add_argument("--smoothquant-alpha", "--smoothquant", dest="alpha", type=parse_alpha, default=None,
                   help="int8_sq migration strength in [0, 1] (TensorRT-LLM's example uses 0.5), or 'auto' (the "
                        "default): per layer and projection, the alpha of 0.3..0.9 with the smallest simulated W8A8 "
                        "error on the calibration rows")
    p.add_argument("--fp8-weight-scale", choices=("tensor", "channel"), default="tensor",
                   help="fp8 weight scales per tensor (default, one per projection, as TensorRT-LLM) or per output "
                        "channel")
    p.add_argument("--kv-cache-dtype", "--kv_cache_dtype", choices=("int8", "fp8"), default=None,
                   help="KV cache quantization: calibrate max |K| / |V| per layer and KV head on the calibration "
                        "data (after the weights are quantized) and record kv_cache_dtype, kv_cache_amax and "
                        "kv_cache_scales in config.json; `kvflight serve` then runs an int8 / fp8 KV cache with "
                        "these scales (kv_cache_dtype auto follows the checkpoint)")
    p.add_argument("--quantize-lm-head", "--quantize_lm_head", dest="quantize_lm_head", action="store_true",
                   help="record lm_head: int8_wo in config.json: `kvflight serve` makes the LM head int8 per output "
                        "row at load (the checkpoint keeps the float head; quantize_lm_head=off serves it float)")
    p.add_argument("--awq-grid", type=int, default=20, help="AWQ scale-exponent grid points (default 20)")
    p.add_argument("--no-awq-clip", dest="awq_clip", action="store_false", help="AWQ: skip the clipping search")
    p.add_argument("--awq-search-tokens", "--search-tokens", dest="awq_search_tokens", type=int,
                   default=DEFAULT_AWQ_SEARCH_TOKENS,
                   help="calibration rows per layer the AWQ / SmoothQuant-alpha searches score (default 512)")
    p.add_argument("--dtype", default="auto", help="calibration compute dtype: auto (bfloat16 on GPU, float32 on "
                                                   "CPU), float32, float16, bfloat16")
    p.add_argument("--output-dtype", default="auto",
                   help="dtype of the unquantized tensors written (embeddings, norms): auto (the source "
                        "checkpoint's torch_dtype, else bfloat16), float32, float16, bfloat16")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--load-format", default="auto", choices=("auto", "hf", "gguf", "dummy"))
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's own)")
    p.set_defaults(func=run_quantize)


def _output_dtype(name: str, hf_config: dict[str, Any]) -> torch.dtype:
    from kvflight.model.loader import DTYPES

    if name == "auto":
        name = str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "bfloat16")
    if name not in DTYPES:
        raise QuantizationError(f"--output-dtype {name!r}: supported: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def run_quantize(args: argparse.Namespace) -> int:
    from kvflight.model.loader import load_arch, load_model, load_tokenizer, resolve_model
    from kvflight.quant.checkpoint import source_hf_config, write_checkpoint
    from kvflight.quant.loading import describe_quantization

    if args.calib_size < 1 or args.calib_max_seq_length < 2:
        raise QuantizationError("--calib-size must be >= 1 and --calib-max-seq-length >= 2")
    t0 = time.perf_counter()
    resolved = resolve_model(args.model, args.load_format)
    arch = load_arch(resolved)
    hf_config = source_hf_config(resolved, arch)
    out_dtype = _output_dtype(args.output_dtype, hf_config)
    calibration: dict[str, Any] = {}
    if args.qformat in CALIBRATED_SCHEMES:
        calibration = {"dataset": args.calib_dataset, "num_sequences": args.calib_size,
                       "max_seq_length": args.calib_max_seq_length}
    config = QuantConfig(scheme=args.qformat, group_size=args.group_size, zero_point=args.zero_point,
                         weight_granularity=args.fp8_weight_scale, smoothquant_alpha=args.alpha,
                         kv_cache_dtype=args.kv_cache_dtype, calibration=calibration,
                         lm_head="int8_wo" if args.quantize_lm_head else "none")
    tokenizer = load_tokenizer(resolved, args.tokenizer)
    model = load_model(resolved, arch, args.dtype, args.device, quantization="none", quantize_lm_head="off")
    logger.info("loaded %s (%s) in %.1f s", resolved.name, arch.architecture, time.perf_counter() - t0)
    sequences = None
    if args.qformat in CALIBRATED_SCHEMES:
        sequences = calibration_sequences(tokenizer, args.calib_dataset, args.calib_size, args.calib_max_seq_length,
                                          arch.vocab_size)
        calibration["num_sequences"] = len(sequences)
        calibration["num_tokens"] = sum(len(s) for s in sequences)
        logger.info("calibrating %s on %d sequences (%d tokens)", args.qformat, len(sequences),
                    calibration["num_tokens"])
    awq = AwqOptions(group_size=args.group_size, zero_point=args.zero_point, scale_grid=args.awq_grid,
                     clip=args.awq_clip)
    report = quantize_in_memory(model, config, sequences, awq, args.awq_search_tokens)
    kv_amax = None
    if args.kv_cache_dtype is not None:
        from kvflight.quant.kv_cache import collect_kv_amax, fold_into_vocab
        kv_sequences = fold_into_vocab(sequences or calibration_sequences(
            tokenizer, args.calib_dataset, args.calib_size, args.calib_max_seq_length, arch.vocab_size),
            arch.vocab_size)
        kv_amax = collect_kv_amax(model, kv_sequences)  # through the quantized weights: what serving will see
        logger.info("KV cache %s: calibrated max |K| / |V| per layer and KV head on %d tokens", args.kv_cache_dtype,
                    sum(len(s) for s in kv_sequences))
    written = write_checkpoint(model, hf_config, config, args.output, tokenizer, out_dtype,
                               extra_info={"source": resolved.path or resolved.preset, "report": report})
    if kv_amax is not None:
        from kvflight.quant.kv_cache import record_kv_calibration
        record_kv_calibration(args.output, args.kv_cache_dtype, kv_amax)
    summary = {"output": args.output, "qformat": args.qformat, "linears": describe_quantization(model),
               "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
               "files": len(written), "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(summary))
    return 0
