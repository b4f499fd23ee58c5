"""`kvflight generate` as a user runs it: a real subprocess on the embedded default model."""

import json
import subprocess
import sys


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvflight.server.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_generate_default_model_json(smollm2_tokenizer):
    res = _run("generate", "--chat", "--prompt", "What is the capital of France?", "--max-tokens", "12",
               "--json", "--device", "cpu", "--kv-cache-bytes", "64MiB", "--max-seq-len", "512")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    comp = out["outputs"][0]
    assert "Paris" in comp["text"]
    assert comp["finish_reason"] in ("stop", "length") and 0 < len(comp["token_ids"]) <= 12
    assert out["prompt_token_ids"] == smollm2_tokenizer.encode(out["prompt"], add_special_tokens=False)
    assert "memory:" in res.stderr and "KV cache" in res.stderr  # the memory breakdown is logged at start


def test_generate_bad_flag_is_a_clear_error():
    res = _run("generate", "--prompt", "hi", "--tokens-per-block", "24", "--device", "cpu")
    assert res.returncode == 2
    assert "tokens_per_block" in res.stderr and "power of two" in res.stderr
    res = _run("generate", "/nonexistent/model.gguf", "--prompt", "hi")
    assert res.returncode == 2 and "/nonexistent/model.gguf" in res.stderr
