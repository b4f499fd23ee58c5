"""Config: flat keys, vLLM aliases, YAML sections, CLI flags overriding YAML, clear errors."""

import argparse

import pytest

from kvflight.config import ConfigError, EngineConfig, add_cli_args, flat_from_args, load_yaml, parse_size
from kvflight.types import SamplingParams


def test_defaults_and_flat_round_trip():
    cfg = EngineConfig()
    assert cfg.scheduler.batch_scheduler_policy == "max_utilization"
    assert EngineConfig.from_flat(cfg.to_flat()) == cfg


def test_vllm_aliases_and_string_values():
    cfg = EngineConfig.from_flat({"max_num_seqs": "8", "max-num-batched-tokens": 512, "block_size": 16,
                                  "enable_prefix_caching": "false", "max_model_len": "2k"})
    assert cfg.scheduler.max_batch_size == 8
    assert cfg.scheduler.max_num_tokens == 512
    assert cfg.cache.tokens_per_block == 16
    assert cfg.cache.enable_kv_cache_reuse is False
    assert cfg.scheduler.max_seq_len == 2000


@pytest.mark.parametrize("flat, words", [
    ({"max_batch_sise": 4}, ["max_batch_sise", "max_batch_size"]),
    ({"tokens_per_block": 24}, ["tokens_per_block", "power of two"]),
    ({"kv_cache_free_gpu_memory_fraction": 1.5}, ["kv_cache_free_gpu_memory_fraction", "(0, 1]"]),
    ({"batch_scheduler_policy": "fastest"}, ["batch_scheduler_policy", "guaranteed_no_evict"]),
    ({"max_batch_size": "many"}, ["max_batch_size", "int"]),
    ({"max_input_len": 100, "max_seq_len": 100}, ["max_input_len", "max_seq_len"]),
    ({"enable_chunked_context": False, "max_input_len": 9000, "max_num_tokens": 8192}, ["chunked"]),
    ({"enable_kv_cache_reuse": "maybe"}, ["enable_kv_cache_reuse", "bool"]),
])
def test_bad_settings_name_the_field(flat, words):
    with pytest.raises(ConfigError) as info:
        EngineConfig.from_flat(flat)
    for w in words:
        assert w in str(info.value)


def test_yaml_sections_and_cli_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("scheduler:\n  max_batch_size: 32\n  max_num_tokens: 4096\ntokens_per_block: 64\n")
    flat = load_yaml(path)
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args(["--max-num-tokens", "1024", "--no-enable-kv-cache-reuse"])
    flat.update(flat_from_args(args))
    cfg = EngineConfig.from_flat(flat)
    assert (cfg.scheduler.max_batch_size, cfg.scheduler.max_num_tokens) == (32, 1024)
    assert cfg.cache.tokens_per_block == 64 and cfg.cache.enable_kv_cache_reuse is False


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(bad)


def test_parse_size():
    assert parse_size("4096") == 4096
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("1.5G") == 1_500_000_000
    assert parse_size("512MiB") == 512 << 20


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"logprobs": 50}, "logprobs"),
    ({"top_k": -3}, "top_k"),
    ({"min_p": 2.0}, "min_p"),
    ({"stop": [""]}, "stop"),
])
def test_sampling_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_normalisation():
    sp = SamplingParams(stop="END", top_k=-1)
    assert sp.stop == ["END"] and sp.top_k == 0


def _subparsers(parser):
    """Every parser under `parser` (itself included), with its command words."""
    yield (), parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                for words, p in _subparsers(sub):
                    yield (name, *words), p


def test_every_command_help_renders():
    """`kvflight ... --help` for every command: argparse %-formats help text, so a bare % in a setting's help
    (e.g. "perplexity +0.2%") made `kvflight serve --help` raise instead of printing."""
    from kvflight.server.cli import build_parser

    seen = {}
    for words, parser in _subparsers(build_parser()):
        seen[words] = parser.format_help()
    assert {("serve",), ("generate",), ("bench", "serve"), ("bench", "latency"), ("plan",), ("tune",)} <= set(seen)
    assert "perplexity +0.2%." in seen[("serve",)] and "--quantize-lm-head" in seen[("bench", "serve")]
