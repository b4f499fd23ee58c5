"""Benchmark datasets: the BenchRequest record, synthetic and real-text generators, TensorRT-LLM's file formats.

Formats read and written (the same files TensorRT-LLM's prepare_dataset.py makes, so datasets move between tools):

* JSONL, one request a line: ``{"task_id": 0, "input_ids": [..] | "prompt": "..", "output_tokens": 128}``
  (what ``prepare_dataset.py --stdout`` prints and ``trtllm-bench`` reads). Both keys may be present; then
  ``input_ids`` are the exact prompt and ``prompt`` is the text they came from.
* legacy JSON, one object: ``{"metadata": {...}, "samples": [{"input_len": N, "input_ids": [..],
  "output_len": M, "task_id": 0}, ...]}`` (what ``prepare_dataset.py --output x.json`` writes and
  ``gptManagerBenchmark --dataset`` reads). ``metadata`` carries the generator settings and a ``workload_name``.
* ShareGPT JSON (read only): ``[{"conversations": [{"from": "human", "value": ..}, {"from": "gpt", ...}]}]``.
* prompt JSONL (read only): lines with ``"prompt"`` or ``"text"``, optional ``"output_tokens"`` / ``"max_tokens"``.

`load_dataset(path)` tells these apart by content. The CLI is ``kvflight bench dataset KIND ...``:
`add_dataset_args(parser)` / `run_dataset(args)`.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

DATASET_KINDS: tuple[str, ...] = ("token-norm-dist", "fixed", "sharegpt", "jsonl")
FILE_FORMATS: tuple[str, ...] = ("jsonl", "legacy")
DEFAULT_OUTPUT_TOKENS = 128  # for prompt files whose lines give no output length
# ShareGPT filtering, the same bounds vLLM's benchmark uses
SHAREGPT_MIN_TOKENS = 4
SHAREGPT_MAX_PROMPT_TOKENS = 1024
SHAREGPT_MAX_TOTAL_TOKENS = 2048


class DatasetError(ValueError):
    """A dataset file or generator setting is wrong; the message names the file / line / flag and the fix."""


class Tokenizer(Protocol):
    """What the dataset code needs from a tokenizer (any transformers tokenizer fits)."""

    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


@dataclass
class BenchRequest:
    """One benchmark request: a prompt (text and / or token ids) and how many tokens to generate."""

    prompt: str | None
    input_ids: list[int] | None
    output_tokens: int
    task_id: int = 0

    def __post_init__(self) -> None:
        if self.prompt is None and self.input_ids is None:
            raise DatasetError(f"request task_id={self.task_id} has neither a prompt nor input_ids; give one")
        if not isinstance(self.output_tokens, int) or isinstance(self.output_tokens, bool) or self.output_tokens < 1:
            raise DatasetError(f"request task_id={self.task_id}: output_tokens={self.output_tokens!r} must be an "
                               "integer >= 1")

    @property
    def num_input_tokens(self) -> int | None:
        """The prompt length in tokens when the ids are known, else None."""
        return len(self.input_ids) if self.input_ids is not None else None


# ---- tokenizers ---------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def get_tokenizer(tokenizer: str | None = None, model: str | None = None) -> Any:
    """A tokenizer for datasets: `tokenizer` (a directory or .gguf file) if given, else `model`'s own, else the
    embedded SmolLM2 one. Nothing is downloaded."""
    try:
        from kvflight.model.loader import load_tokenizer, resolve_model
    except ImportError:  # loader not importable: plain transformers on a path
        if tokenizer is None and model is None:
            raise DatasetError("no tokenizer given and kvflight's model loader is unavailable: pass "
                               "--tokenizer DIR") from None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer or model, local_files_only=True)
    if tokenizer is not None:
        path = os.path.abspath(os.path.expanduser(tokenizer))
        if os.path.isdir(path) or os.path.isfile(path):
            return load_tokenizer(resolve_model(None, "dummy"), path)
        from transformers import AutoTokenizer  # a name already in the local HF cache

        try:
            return AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"tokenizer '{tokenizer}' not found: pass a tokenizer directory or a .gguf file "
                               f"(nothing is downloaded): {exc}") from None
    resolved = resolve_model(model, "auto")
    tok = load_tokenizer(resolved, None)
    if tok is None:
        raise DatasetError(f"model '{model}' has no tokenizer files (a preset with dummy weights): pass "
                           "--tokenizer DIR, or --vocab-size N for random token ids")
    return tok


def special_token_ids(tokenizer: Any) -> set[int]:
    """Every special token id of a tokenizer (BOS, EOS, PAD, chat markers ...), never drawn as random prompt ids."""
    ids: set[int] = set(int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            ids.add(value)
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for token_id, token in added.items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return ids


def _allowed_token_ids(vocab_size: int | None, tokenizer: Any | None) -> np.ndarray:
    if tokenizer is not None:
        size = int(vocab_size or tokenizer.vocab_size)
        excluded = special_token_ids(tokenizer)
    elif vocab_size is not None:
        size, excluded = int(vocab_size), set()
    else:
        raise DatasetError("random token ids need a vocabulary: pass a tokenizer or vocab_size")
    if size < 1:
        raise DatasetError(f"vocab_size={size} must be >= 1")
    allowed = np.setdiff1d(np.arange(size, dtype=np.int64), np.fromiter(excluded, dtype=np.int64, count=len(excluded)))
    if allowed.size == 0:
        raise DatasetError(f"every id of the vocabulary (size {size}) is a special token; nothing to draw from")
    return allowed


# ---- synthetic generators -----------------------------------------------------------------------------------------
def norm_dist_lengths(mean: float, stdev: float, num: int, rng: np.random.Generator) -> list[int]:
    """`num` lengths max(1, ceil(x)) with x ~ N(mean, stdev)."""
    if stdev < 0:
        raise DatasetError(f"a standard deviation must be >= 0, got {stdev}")
    if stdev == 0:
        return [max(1, math.ceil(mean))] * num
    return [max(1, math.ceil(x)) for x in rng.normal(mean, stdev, size=num).tolist()]


def token_norm_dist(num_requests: int, input_mean: float, input_stdev: float, output_mean: float,
                    output_stdev: float, vocab_size: int | None = None, tokenizer: Any | None = None,
                    seed: int = 0) -> list[BenchRequest]:
    """Random prompts: input / output lengths max(1, ceil(N(mean, stdev))), token ids drawn uniformly from the
    tokenizer's vocabulary minus its special ids (or from [0, vocab_size) without a tokenizer).

    The same arguments and seed always give the same requests.
    """
    if num_requests < 1:
        raise DatasetError(f"num_requests={num_requests} must be >= 1")
    allowed = _allowed_token_ids(vocab_size, tokenizer)
    rng = np.random.default_rng(seed)
    input_lens = norm_dist_lengths(input_mean, input_stdev, num_requests, rng)
    output_lens = norm_dist_lengths(output_mean, output_stdev, num_requests, rng)
    requests = []
    for task_id, (n_in, n_out) in enumerate(zip(input_lens, output_lens)):
        ids = allowed[rng.integers(0, allowed.size, size=n_in)].tolist()
        requests.append(BenchRequest(prompt=None, input_ids=ids, output_tokens=n_out, task_id=task_id))
    return requests


def fixed_lengths(num_requests: int, input_len: int, output_len: int, vocab_size: int | None = None,
                  tokenizer: Any | None = None, seed: int = 0) -> list[BenchRequest]:
    """Random prompts of exactly `input_len` tokens, each asking for exactly `output_len` tokens."""
    if input_len < 1 or output_len < 1:
        raise DatasetError(f"input_len={input_len} and output_len={output_len} must both be >= 1")
    return token_norm_dist(num_requests, input_len, 0, output_len, 0, vocab_size, tokenizer, seed)


# ---- real text ----------------------------------------------------------------------------------------------------
def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise DatasetError(f"dataset file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path} is not valid JSON: {exc}") from None


def sharegpt_pairs(data: Any, path: str = "<sharegpt>") -> list[tuple[str, str]]:
    """(first human turn, the gpt answer after it) of every conversation that has both."""
    if not isinstance(data, list):
        raise DatasetError(f"{path}: ShareGPT data must be a JSON list of {{'conversations': [...]}} objects")
    pairs = []
    for entry in data:
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list):
            continue
        human = next((i for i, t in enumerate(turns) if isinstance(t, dict) and t.get("from") == "human"), None)
        if human is None:
            continue
        answer = next((t for t in turns[human + 1:] if isinstance(t, dict) and t.get("from") == "gpt"), None)
        if answer is None:
            continue
        prompt, completion = turns[human].get("value"), answer.get("value")
        if isinstance(prompt, str) and isinstance(completion, str):
            pairs.append((prompt, completion))
    return pairs


def from_sharegpt(path: str, tokenizer: Any, num_requests: int | None = None, seed: int = 0,
                  output_len: int | None = None, min_tokens: int = SHAREGPT_MIN_TOKENS,
                  max_prompt_tokens: int = SHAREGPT_MAX_PROMPT_TOKENS,
                  max_total_tokens: int = SHAREGPT_MAX_TOTAL_TOKENS) -> list[BenchRequest]:
    """Requests from a ShareGPT file: the first human turn is the prompt, the token count of the gpt answer that
    follows is the output length (or `output_len` for all).

    Conversations are shuffled with `seed`; pairs whose prompt or answer is shorter than `min_tokens`, whose prompt
    is longer than `max_prompt_tokens`, or whose prompt + answer exceed `max_total_tokens` are skipped (vLLM's rule).
    """
    if tokenizer is None:
        raise DatasetError("ShareGPT needs a tokenizer to count prompt and answer tokens: pass --tokenizer or --model")
    pairs = sharegpt_pairs(_read_json(path), path)
    random.Random(seed).shuffle(pairs)
    requests: list[BenchRequest] = []
    for prompt, completion in pairs:
        if num_requests is not None and len(requests) >= num_requests:
            break
        ids = list(tokenizer.encode(prompt))
        n_out = output_len if output_len is not None else len(tokenizer.encode(completion, add_special_tokens=False))
        if len(ids) < min_tokens or (output_len is None and n_out < min_tokens):
            continue
        if len(ids) > max_prompt_tokens or len(ids) + n_out > max_total_tokens:
            continue
        requests.append(BenchRequest(prompt=prompt, input_ids=ids, output_tokens=n_out, task_id=len(requests)))
    if not requests:
        raise DatasetError(f"{path}: no ShareGPT conversation passed the length filter (prompt and answer >= "
                           f"{min_tokens} tokens, prompt <= {max_prompt_tokens}, total <= {max_total_tokens})")
    return requests


def _request_from_obj(obj: Any, where: str, default_output_tokens: int | None, task_id: int) -> BenchRequest:
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    prompt = obj.get("prompt", obj.get("text"))
    input_ids = obj.get("input_ids")
    if prompt is not None and not isinstance(prompt, str):
        raise DatasetError(f"{where}: 'prompt' must be a string")
    if input_ids is not None:
        if not isinstance(input_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                      for t in input_ids):
            raise DatasetError(f"{where}: 'input_ids' must be a list of token ids (integers >= 0)")
        if not input_ids:
            raise DatasetError(f"{where}: 'input_ids' is empty; a prompt needs at least one token")
    if prompt is None and input_ids is None:
        raise DatasetError(f"{where}: has neither 'input_ids' nor 'prompt' (or 'text'); add one")
    out = next((obj[k] for k in ("output_tokens", "max_tokens", "output_len") if obj.get(k) is not None),
               default_output_tokens)
    if out is None:
        raise DatasetError(f"{where}: no output length ('output_tokens'); add it, or give a default")
    if not isinstance(out, int) or isinstance(out, bool) or out < 1:
        raise DatasetError(f"{where}: output length {out!r} must be an integer >= 1")
    tid = obj.get("task_id", task_id)
    return BenchRequest(prompt=prompt, input_ids=input_ids, output_tokens=out,
                        task_id=tid if isinstance(tid, int) else task_id)


def _iter_jsonl(path: str) -> Iterable[tuple[int, Any]]:
    try:
        fh = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"dataset file not found: {path}") from None
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{lineno}: not valid JSON ({exc}); each line must be one JSON "
                                   "object") from None


def read_jsonl(path: str, default_output_tokens: int | None = None,
               num_requests: int | None = None) -> list[BenchRequest]:
    """TensorRT-LLM JSONL (or any JSONL with prompt / text / input_ids and an output length)."""
    requests: list[BenchRequest] = []
    for lineno, obj in _iter_jsonl(path):
        if num_requests is not None and len(requests) >= num_requests:
            break
        requests.append(_request_from_obj(obj, f"{path}:{lineno}", default_output_tokens, len(requests)))
    if not requests:
        raise DatasetError(f"{path} holds no requests")
    return requests


def from_jsonl_prompts(path: str, tokenizer: Any | None = None, num_requests: int | None = None,
                       output_tokens: int = DEFAULT_OUTPUT_TOKENS) -> list[BenchRequest]:
    """Prompts from JSONL lines ``{"prompt" | "text": .., "output_tokens" | "max_tokens": N}``; lines without an
    output length get `output_tokens`. With a tokenizer, prompts are also tokenized (exact input lengths)."""
    requests = read_jsonl(path, output_tokens, num_requests)
    if tokenizer is not None:
        for req in requests:
            if req.input_ids is None and req.prompt is not None:
                req.input_ids = list(tokenizer.encode(req.prompt))
    return requests


# ---- TensorRT-LLM formats -----------------------------------------------------------------------------------------
def request_to_json(req: BenchRequest) -> dict[str, Any]:
    """One TensorRT-LLM JSONL line: task_id, input_ids and / or prompt, output_tokens."""
    obj: dict[str, Any] = {"task_id": req.task_id}
    if req.prompt is not None:
        obj["prompt"] = req.prompt
    if req.input_ids is not None:
        obj["input_ids"] = req.input_ids
    obj["output_tokens"] = req.output_tokens
    return obj


def _open_out(path: str) -> Any:
    if path == "-":
        return None
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    return open(path, "w", encoding="utf-8")


def write_jsonl(path: str, requests: Sequence[BenchRequest]) -> None:
    """Write TensorRT-LLM JSONL (`path` '-' = stdout)."""
    fh = _open_out(path)
    out = fh or sys.stdout
    try:
        for req in requests:
            out.write(json.dumps(request_to_json(req), separators=(",", ":"), ensure_ascii=False) + "\n")
    finally:
        if fh is not None:
            fh.close()


def workload_metadata(workload_type: str, requests: Sequence[BenchRequest], **settings: Any) -> dict[str, Any]:
    """The legacy file's metadata: the generator settings, max lengths and a workload_name built from them."""
    meta: dict[str, Any] = {"workload_type": workload_type}
    meta.update({k: int(v) if isinstance(v, float) and v.is_integer() else v
                 for k, v in settings.items() if v is not None})
    meta["num_requests"] = len(requests)
    lens = [r.num_input_tokens for r in requests if r.num_input_tokens is not None]
    meta["max_input_len"] = max(lens) if lens else None
    meta["max_output_len"] = max(r.output_tokens for r in requests) if requests else None
    meta["workload_name"] = "__".join(f"{k}:{v}" for k, v in meta.items() if k != "tokenizer")
    return meta


def write_legacy_json(path: str, requests: Sequence[BenchRequest], metadata: dict[str, Any] | None = None,
                      tokenizer: Any | None = None) -> None:
    """Write the legacy single-JSON format ({"metadata", "samples": [{input_len, input_ids, output_len, task_id}]}).

    It stores token ids only: prompts without ids are tokenized with `tokenizer`.
    """
    samples = []
    for req in requests:
        ids = req.input_ids
        if ids is None:
            if tokenizer is None:
                raise DatasetError(f"task_id={req.task_id} has a text prompt but no input_ids, and the legacy format "
                                   "stores token ids only: pass a tokenizer, or write --format jsonl")
            ids = list(tokenizer.encode(req.prompt))
        samples.append({"input_len": len(ids), "input_ids": ids, "output_len": req.output_tokens,
                        "task_id": req.task_id})
    meta = dict(metadata) if metadata else workload_metadata("custom", requests)
    fh = _open_out(path)
    out = fh or sys.stdout
    try:
        json.dump({"metadata": meta, "samples": samples}, out, separators=(",", ":"), ensure_ascii=False)
        out.write("\n")
    finally:
        if fh is not None:
            fh.close()


def _samples_to_requests(samples: Any, path: str, num_requests: int | None) -> list[BenchRequest]:
    if not isinstance(samples, list):
        raise DatasetError(f"{path}: 'samples' must be a list")
    requests = []
    for i, sample in enumerate(samples):
        if num_requests is not None and len(requests) >= num_requests:
            break
        requests.append(_request_from_obj(sample, f"{path}: samples[{i}]", None, i))
    if not requests:
        raise DatasetError(f"{path} holds no samples")
    return requests


def read_legacy_json(path: str, num_requests: int | None = None) -> tuple[list[BenchRequest], dict[str, Any]]:
    """Read the legacy format; returns (requests, metadata)."""
    data = _read_json(path)
    if not isinstance(data, dict) or "samples" not in data:
        raise DatasetError(f"{path} is not a legacy TensorRT-LLM dataset: expected {{'metadata': .., 'samples': "
                           "[..]}}")
    return _samples_to_requests(data["samples"], path, num_requests), dict(data.get("metadata") or {})


# ---- auto-detection -----------------------------------------------------------------------------------------------
def detect_format(path: str) -> str:
    """'legacy', 'legacy-list' (a bare list of samples), 'sharegpt' or 'jsonl', from the file's content."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise DatasetError(f"dataset file not found: {path}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return "jsonl"  # several JSON values: one per line (or broken; the JSONL reader names the line)
    if isinstance(data, dict):
        return "legacy" if "samples" in data else "jsonl"
    if isinstance(data, list):
        first = next((d for d in data if isinstance(d, dict)), None)
        if first is None:
            raise DatasetError(f"{path}: a JSON list of what? expected ShareGPT conversations or samples")
        if "conversations" in first:
            return "sharegpt"
        if "input_ids" in first or "prompt" in first:
            return "legacy-list"
    raise DatasetError(f"{path}: unknown dataset format; supported: TensorRT-LLM JSONL, legacy JSON "
                       "({'metadata', 'samples'}), ShareGPT JSON, prompt JSONL")


def load_dataset(path: str, tokenizer: Any | None = None, num_requests: int | None = None, seed: int = 0,
                 default_output_tokens: int = DEFAULT_OUTPUT_TOKENS) -> list[BenchRequest]:
    """Any supported dataset file, format detected from the content. ShareGPT needs `tokenizer`."""
    fmt = detect_format(path)
    if fmt == "legacy":
        return read_legacy_json(path, num_requests)[0]
    if fmt == "legacy-list":
        return _samples_to_requests(_read_json(path), path, num_requests)
    if fmt == "sharegpt":
        return from_sharegpt(path, tokenizer, num_requests, seed)
    return read_jsonl(path, default_output_tokens, num_requests)


# ---- CLI ----------------------------------------------------------------------------------------------------------
def add_generator_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `bench dataset` and the inline generator of `bench serve`."""
    g = parser.add_argument_group("dataset generation")
    g.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer directory or .gguf (default: the --model's, else the embedded SmolLM2)")
    g.add_argument("--vocab-size", type=int, default=None, metavar="N",
                   help="draw random ids from [0, N) without loading a tokenizer (token-norm-dist / fixed)")
    g.add_argument("--num-requests", "--num-prompts", type=int, default=None, metavar="N",
                   help="how many requests to make")
    g.add_argument("--input-mean", type=float, default=None, metavar="TOKENS", help="mean prompt length")
    g.add_argument("--input-stdev", type=float, default=0.0, metavar="TOKENS", help="prompt length stdev (0)")
    g.add_argument("--output-mean", type=float, default=None, metavar="TOKENS", help="mean output length")
    g.add_argument("--output-stdev", type=float, default=0.0, metavar="TOKENS", help="output length stdev (0)")
    g.add_argument("--input-len", type=int, default=None, metavar="TOKENS", help="fixed: the prompt length")
    g.add_argument("--output-len", type=int, default=None, metavar="TOKENS",
                   help="fixed: the output length; sharegpt / jsonl: override every request's output length")
    g.add_argument("--seed", dest="dataset_seed", type=int, default=0, help="random seed of the dataset (0)")


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    """`kvflight bench dataset {token-norm-dist|fixed|sharegpt|jsonl} ... --output FILE [--format jsonl|legacy]`."""
    parser.add_argument("kind", choices=DATASET_KINDS, help="generator: random token-norm-dist / fixed lengths, or "
                        "real prompts from a ShareGPT / JSONL file (--input)")
    parser.add_argument("--model", default=None, help="use this model's tokenizer (default: embedded SmolLM2)")
    add_generator_args(parser)
    parser.add_argument("--input", "--dataset-path", dest="input_path", default=None, metavar="FILE",
                        help="sharegpt / jsonl: the source file")
    parser.add_argument("--output", default="-", metavar="FILE", help="where to write ('-' = stdout, the default)")
    parser.add_argument("--format", dest="file_format", choices=FILE_FORMATS, default=None,
                        help="jsonl (trtllm-bench) or legacy ({'metadata','samples'} for gptManagerBenchmark); "
                             "default: legacy when --output ends in .json, else jsonl")


def _tokenizer_from_args(args: argparse.Namespace) -> Any:
    return get_tokenizer(getattr(args, "tokenizer", None), getattr(args, "model", None))


def generate_from_args(args: argparse.Namespace, kind: str, tokenizer: Any | None = None
                       ) -> tuple[list[BenchRequest], dict[str, Any]]:
    """Build the dataset a `bench dataset` / `bench serve` command line asks for; returns (requests, metadata).
    `tokenizer` is loaded from the args when needed and not given."""
    seed = args.dataset_seed
    n = args.num_requests
    if kind in ("token-norm-dist", "fixed"):
        n = 100 if n is None else n
        if kind == "fixed":
            n_in = args.input_len if args.input_len is not None else args.input_mean
            n_out = args.output_len if args.output_len is not None else args.output_mean
            if n_in is None or n_out is None:
                raise DatasetError("fixed needs --input-len and --output-len (token counts)")
            mean_in, sd_in, mean_out, sd_out = float(n_in), 0.0, float(n_out), 0.0
        else:
            if args.input_mean is None or args.output_mean is None:
                raise DatasetError("token-norm-dist needs --input-mean and --output-mean (with optional "
                                   "--input-stdev / --output-stdev), e.g. --input-mean 2048 --output-mean 128")
            mean_in, sd_in, mean_out, sd_out = args.input_mean, args.input_stdev, args.output_mean, args.output_stdev
        if tokenizer is None and args.vocab_size is None:
            tokenizer = _tokenizer_from_args(args)
        requests = token_norm_dist(n, mean_in, sd_in, mean_out, sd_out, vocab_size=args.vocab_size,
                                   tokenizer=tokenizer, seed=seed)
        vocab = args.vocab_size or (tokenizer.vocab_size if tokenizer is not None else None)
        meta = workload_metadata("token-norm-dist", requests, input_mean=mean_in, input_stdev=sd_in,
                                 output_mean=mean_out, output_stdev=sd_out, tokenize_vocabsize=vocab)
        return requests, meta
    path = getattr(args, "input_path", None) or getattr(args, "dataset", None)
    if not path:
        raise DatasetError(f"{kind} reads prompts from a file: pass --input FILE")
    if kind == "sharegpt":
        if tokenizer is None:
            tokenizer = _tokenizer_from_args(args)
        requests = from_sharegpt(path, tokenizer, n, seed, output_len=args.output_len)
    else:
        default_out = args.output_len or (int(args.output_mean) if args.output_mean else DEFAULT_OUTPUT_TOKENS)
        requests = from_jsonl_prompts(path, tokenizer, n, default_out)
        if args.output_len is not None:
            for req in requests:
                req.output_tokens = args.output_len
    return requests, workload_metadata(kind, requests, source=os.path.basename(path))


def run_dataset(args: argparse.Namespace) -> int:
    """Generate the dataset and write it; returns the exit code."""
    try:
        tokenizer = None
        fmt = args.file_format or ("legacy" if args.output.endswith(".json") else "jsonl")
        if fmt == "legacy" and args.kind == "jsonl" and args.vocab_size is None:
            tokenizer = _tokenizer_from_args(args)  # legacy stores ids: tokenize the prompts
        requests, meta = generate_from_args(args, args.kind, tokenizer)
        if fmt == "legacy":
            write_legacy_json(args.output, requests, meta, tokenizer)
        else:
            write_jsonl(args.output, requests)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.output != "-":
        print(f"wrote {len(requests)} requests to {args.output} ({fmt})", file=sys.stderr)
    return 0
