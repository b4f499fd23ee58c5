"""Benchmark datasets: token-norm-dist statistics and seed determinism, lengths >= 1, special ids never drawn,
round trips of TensorRT-LLM's JSONL and legacy JSON formats, prompt JSONL, ShareGPT, format detection, the CLI."""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

from kvflight.bench.dataset import (BenchRequest, DatasetError, add_dataset_args, detect_format, fixed_lengths,
                                    from_jsonl_prompts, from_sharegpt, load_dataset, read_jsonl, read_legacy_json,
                                    run_dataset, token_norm_dist, write_jsonl, write_legacy_json)


class WordTokenizer:
    """A tiny deterministic tokenizer: one id per whitespace word; ids 0-2 are special (pad, bos, eos)."""

    vocab_size = 1000
    all_special_ids = [0, 1, 2]
    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [3 + zlib.crc32(w.encode()) % (self.vocab_size - 3) for w in text.split()]
        return ([self.bos_token_id] if add_special_tokens else []) + ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return " ".join(f"w{t}" for t in token_ids)


def test_token_norm_dist_statistics_and_determinism() -> None:
    tok = WordTokenizer()
    reqs = token_norm_dist(2000, input_mean=64, input_stdev=8, output_mean=32, output_stdev=4, tokenizer=tok, seed=7)
    assert len(reqs) == 2000
    n_in = np.array([len(r.input_ids) for r in reqs])
    n_out = np.array([r.output_tokens for r in reqs])
    # ceil shifts the mean up by about 0.5 token
    assert abs(n_in.mean() - 64.5) < 1.0 and abs(n_in.std() - 8) < 1.0
    assert abs(n_out.mean() - 32.5) < 0.5 and abs(n_out.std() - 4) < 0.5
    ids = np.concatenate([r.input_ids for r in reqs])
    assert ids.min() >= 3 and ids.max() < tok.vocab_size  # special ids 0, 1, 2 never drawn
    assert [r.task_id for r in reqs[:3]] == [0, 1, 2] and all(r.prompt is None for r in reqs)
    again = token_norm_dist(2000, 64, 8, 32, 4, tokenizer=tok, seed=7)
    assert [(r.input_ids, r.output_tokens) for r in again] == [(r.input_ids, r.output_tokens) for r in reqs]
    other = token_norm_dist(2000, 64, 8, 32, 4, tokenizer=tok, seed=8)
    assert [r.input_ids for r in other] != [r.input_ids for r in reqs]


def test_lengths_are_at_least_one() -> None:
    reqs = token_norm_dist(500, input_mean=1, input_stdev=5, output_mean=0, output_stdev=3, vocab_size=50, seed=0)
    assert min(len(r.input_ids) for r in reqs) >= 1 and min(r.output_tokens for r in reqs) >= 1
    assert max(max(r.input_ids) for r in reqs) < 50


def test_fixed_lengths_exact() -> None:
    reqs = fixed_lengths(10, input_len=17, output_len=5, vocab_size=100, seed=3)
    assert {len(r.input_ids) for r in reqs} == {17} and {r.output_tokens for r in reqs} == {5}
    with pytest.raises(DatasetError, match="must both be >= 1"):
        fixed_lengths(3, 0, 5, vocab_size=10)


def test_generator_errors_are_clear() -> None:
    with pytest.raises(DatasetError, match="vocabulary"):
        token_norm_dist(3, 4, 0, 4, 0)
    with pytest.raises(DatasetError, match="num_requests"):
        token_norm_dist(0, 4, 0, 4, 0, vocab_size=10)
    with pytest.raises(DatasetError, match="standard deviation"):
        token_norm_dist(3, 4, -1, 4, 0, vocab_size=10)
    with pytest.raises(DatasetError, match="neither a prompt nor input_ids"):
        BenchRequest(prompt=None, input_ids=None, output_tokens=3)
    with pytest.raises(DatasetError, match="output_tokens"):
        BenchRequest(prompt="hi", input_ids=None, output_tokens=0)


def test_jsonl_round_trip(tmp_path: Path) -> None:
    reqs = token_norm_dist(20, 12, 3, 6, 2, vocab_size=500, seed=1)
    reqs.append(BenchRequest(prompt="hello 世界", input_ids=None, output_tokens=9, task_id=20))
    reqs.append(BenchRequest(prompt="both", input_ids=[5, 6], output_tokens=2, task_id=21))
    path = tmp_path / "data.jsonl"
    write_jsonl(str(path), reqs)
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert set(first) == {"task_id", "input_ids", "output_tokens"}  # TensorRT-LLM's keys
    assert detect_format(str(path)) == "jsonl"
    back = load_dataset(str(path))
    assert back == reqs


def test_legacy_json_round_trip(tmp_path: Path) -> None:
    reqs = token_norm_dist(15, 30, 5, 8, 1, vocab_size=300, seed=2)
    path = tmp_path / "legacy.json"
    write_legacy_json(str(path), reqs, {"workload_type": "token-norm-dist", "input_mean": 30})
    data = json.loads(path.read_text())
    assert set(data) == {"metadata", "samples"}
    sample = data["samples"][0]
    assert set(sample) == {"input_len", "input_ids", "output_len", "task_id"}
    assert sample["input_len"] == len(sample["input_ids"])
    assert detect_format(str(path)) == "legacy"
    back, meta = read_legacy_json(str(path))
    assert meta["input_mean"] == 30
    assert [(r.input_ids, r.output_tokens, r.task_id) for r in back] == \
        [(r.input_ids, r.output_tokens, r.task_id) for r in reqs]
    assert load_dataset(str(path), num_requests=4) == back[:4]
    # text prompts need token ids in this format: a tokenizer, or a clear error
    text_only = [BenchRequest(prompt="a b c", input_ids=None, output_tokens=3)]
    with pytest.raises(DatasetError, match="token ids only"):
        write_legacy_json(str(tmp_path / "x.json"), text_only)
    write_legacy_json(str(tmp_path / "x.json"), text_only, tokenizer=WordTokenizer())
    assert read_legacy_json(str(tmp_path / "x.json"))[0][0].input_ids == WordTokenizer().encode("a b c")


def test_bare_sample_list_is_read(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    path.write_text(json.dumps([{"input_ids": [1, 2, 3], "output_len": 4}, {"input_ids": [7], "output_len": 1}]))
    assert detect_format(str(path)) == "legacy-list"
    reqs = load_dataset(str(path))
    assert [(r.input_ids, r.output_tokens) for r in reqs] == [([1, 2, 3], 4), ([7], 1)]


def test_jsonl_prompts(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "one two three"}, {"text": "four five", "max_tokens": 7}, {"prompt": "six", "output_tokens": 3}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    reqs = from_jsonl_prompts(str(path), output_tokens=11)
    assert [(r.prompt, r.output_tokens) for r in reqs] == [("one two three", 11), ("four five", 7), ("six", 3)]
    assert all(r.input_ids is None for r in reqs)
    tok = WordTokenizer()
    with_ids = from_jsonl_prompts(str(path), tokenizer=tok, num_requests=2)
    assert len(with_ids) == 2 and with_ids[0].input_ids == tok.encode("one two three")


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "output_tokens": 2}\n{"output_tokens": 2}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: has neither"):
        read_jsonl(str(path))
    path.write_text('{"prompt": "ok", "output_tokens": 2}\n{not json\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: not valid JSON"):
        load_dataset(str(path))
    path.write_text('{"input_ids": [1, "x"], "output_tokens": 2}\n')
    with pytest.raises(DatasetError, match="input_ids"):
        read_jsonl(str(path))
    path.write_text('{"prompt": "no length"}\n')
    with pytest.raises(DatasetError, match="no output length"):
        read_jsonl(str(path))
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(str(tmp_path / "missing.jsonl"))


def _sharegpt_file(tmp_path: Path) -> Path:
    def conv(*turns: tuple[str, str]) -> dict:
        return {"id": "x", "conversations": [{"from": f, "value": v} for f, v in turns]}

    words = lambda n, w="w": " ".join(f"{w}{i}" for i in range(n))  # noqa: E731
    data = [
        conv(("human", words(10, "q")), ("gpt", words(20, "a"))),  # kept: prompt 11 (with BOS), answer 20
        conv(("system", "be nice"), ("human", words(6, "p")), ("gpt", words(8, "b"))),  # kept: first human turn
        conv(("human", "hi"), ("gpt", words(30))),  # prompt too short (< 4 tokens)
        conv(("human", words(10)), ("gpt", "ok")),  # answer too short
        conv(("human", words(1100)), ("gpt", words(10))),  # prompt > 1024 tokens
        conv(("human", words(1000)), ("gpt", words(1100))),  # total > 2048
        conv(("human", words(10))),  # no answer
        {"no": "conversations"},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    return path


def test_sharegpt_filters_and_counts(tmp_path: Path) -> None:
    path = _sharegpt_file(tmp_path)
    tok = WordTokenizer()
    assert detect_format(str(path)) == "sharegpt"
    reqs = from_sharegpt(str(path), tok, seed=0)
    got = sorted((len(r.input_ids), r.output_tokens) for r in reqs)
    assert got == [(7, 8), (11, 20)]
    assert all(r.prompt and r.input_ids == tok.encode(r.prompt) for r in reqs)
    assert sorted(r.task_id for r in reqs) == [0, 1]
    assert len(from_sharegpt(str(path), tok, num_requests=1)) == 1
    assert {r.output_tokens for r in from_sharegpt(str(path), tok, output_len=5)} == {5}
    assert [r.prompt for r in load_dataset(str(path), tokenizer=tok, seed=3)] == \
        [r.prompt for r in from_sharegpt(str(path), tok, seed=3)]
    with pytest.raises(DatasetError, match="needs a tokenizer"):
        load_dataset(str(path))


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_dataset_args(parser)
    return parser.parse_args(argv)


def test_cli_writes_both_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    legacy = tmp_path / "out.json"
    argv = ["token-norm-dist", "--vocab-size", "1000", "--num-requests", "8", "--input-mean", "20", "--input-stdev",
            "4", "--output-mean", "10", "--output-stdev", "2", "--seed", "5", "--output", str(legacy)]
    assert run_dataset(_parse(argv)) == 0
    reqs, meta = read_legacy_json(str(legacy))
    assert len(reqs) == 8 and meta["workload_type"] == "token-norm-dist" and meta["input_mean"] == 20
    assert meta["tokenize_vocabsize"] == 1000 and "workload_name" in meta
    assert meta["max_input_len"] == max(len(r.input_ids) for r in reqs)
    jsonl = tmp_path / "out.jsonl"
    assert run_dataset(_parse(argv[:-1] + [str(jsonl)])) == 0
    assert [r.input_ids for r in load_dataset(str(jsonl))] == [r.input_ids for r in reqs]
    assert run_dataset(_parse(["fixed", "--vocab-size", "50", "--num-requests", "2", "--input-len", "3",
                               "--output-len", "4", "--format", "jsonl"])) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and json.loads(out[0])["output_tokens"] == 4
    # a missing flag is an error message, not a traceback
    assert run_dataset(_parse(["token-norm-dist", "--vocab-size", "10", "--input-mean", "5"])) == 2
    assert "--output-mean" in capsys.readouterr().err
    assert run_dataset(_parse(["jsonl", "--vocab-size", "10"])) == 2
    assert "--input FILE" in capsys.readouterr().err


def test_cli_jsonl_prompts_override_output_len(tmp_path: Path) -> None:
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "a b"}\n{"text": "c d e", "max_tokens": 2}\n')
    out = tmp_path / "o.jsonl"
    assert run_dataset(_parse(["jsonl", "--input", str(src), "--output-len", "6", "--output", str(out)])) == 0
    assert [(r.prompt, r.output_tokens) for r in load_dataset(str(out))] == [("a b", 6), ("c d e", 6)]
