"""Quantization on the real SmolLM2-135M-Instruct (float32, CPU): perplexity and greedy agreement of every scheme
against the float model, a quantized checkpoint served through LLM, and the `quantize` / `eval ppl` commands."""

from __future__ import annotations

import copy
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvflight import LLM, SamplingParams
from kvflight.model.loader import load_arch, load_model, load_tokenizer, resolve_model
from kvflight.quant.checkpoint import source_hf_config, write_checkpoint
from kvflight.quant.evaluate import eval_sequences, format_ppl_table, perplexity
from kvflight.quant.loading import describe_quantization
from kvflight.quant.quantize import calibration_sequences, quantize_in_memory
from kvflight.quant.schemes import QuantConfig
from kvflight.quant.smoothing import AwqOptions

SCHEMES = ("fp8", "int8_wo", "int8_sq", "int4_wo", "int4_awq")
# small on purpose (CPU time): the held-out default text (~670 tokens), 8 x 128 calibration tokens, a coarse AWQ
# grid; `kvflight eval ppl` with more text and calibration gives the closing note's table
CALIB_SEQUENCES, CALIB_LEN = 8, 128
AWQ = AwqOptions(group_size=128, scale_grid=10, clip=False)


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    resolved = resolve_model(smollm2_path)
    arch = load_arch(resolved)
    tokenizer = load_tokenizer(resolved)
    model = load_model(resolved, arch, "float32", "cpu")
    eval_seqs = eval_sequences(tokenizer, "default", 256, None)
    calib = calibration_sequences(tokenizer, "default", CALIB_SEQUENCES, CALIB_LEN, arch.vocab_size)
    return {"resolved": resolved, "arch": arch, "tokenizer": tokenizer, "model": model, "eval": eval_seqs,
            "calib": calib, "base": perplexity(model, eval_seqs)}


@pytest.fixture(scope="module")
def quantized(smollm2):
    """scheme -> (perplexity result, the quantized model for int4_awq only)."""
    results, awq_model = {}, None
    for scheme in SCHEMES:
        model = copy.deepcopy(smollm2["model"])
        quantize_in_memory(model, QuantConfig(scheme), smollm2["calib"], AWQ, search_tokens=CALIB_LEN)
        results[scheme] = perplexity(model, smollm2["eval"])
        if scheme == "int4_awq":
            awq_model = model
        else:
            del model
    return results, awq_model


def test_perplexity_and_greedy_agreement_per_scheme(smollm2, quantized) -> None:
    base = smollm2["base"]
    results, _ = quantized
    rows = [{"quantization": "none", "perplexity": base.perplexity, "linears": "float32"}]
    for scheme, res in results.items():
        rows.append({"quantization": scheme, "perplexity": res.perplexity, "linears": scheme,
                     "delta_vs_first": res.perplexity / base.perplexity - 1,
                     "top1_agreement_vs_first": res.top1_agreement(base)})
    print("\n" + format_ppl_table(rows, "none"))
    delta = {r["quantization"]: r.get("delta_vs_first", 0.0) for r in rows}
    agree = {r["quantization"]: r.get("top1_agreement_vs_first", 1.0) for r in rows}
    assert 20 < base.perplexity < 40 and base.num_predicted_tokens > 600
    # 8-bit schemes: a few percent at most on this small (and already Q4_1-quantized) model
    assert abs(delta["int8_wo"]) < 0.03 and agree["int8_wo"] > 0.93
    assert abs(delta["int8_sq"]) < 0.04 and agree["int8_sq"] > 0.88
    assert abs(delta["fp8"]) < 0.06 and agree["fp8"] > 0.85
    # 4-bit: AWQ must beat plain round-to-nearest on the same groups
    assert delta["int4_awq"] < delta["int4_wo"] < 0.6
    assert agree["int4_awq"] > agree["int4_wo"] - 0.02 and agree["int4_awq"] > 0.65


def test_quantized_checkpoint_loads_and_generates(smollm2, quantized, tmp_path) -> None:
    _, awq_model = quantized
    out = tmp_path / "smollm2-int4-awq"
    config = QuantConfig("int4_awq", calibration={"dataset": "default"})
    write_checkpoint(awq_model, source_hf_config(smollm2["resolved"], smollm2["arch"]), config, str(out),
                     smollm2["tokenizer"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "kvflight_quantize.json"} <= \
        {p.name for p in out.iterdir()}
    llm = LLM(str(out), device="cpu", dtype="float32", max_seq_len=512, kv_cache_bytes=32 << 20)
    model = llm.engine.runner.model
    assert describe_quantization(model) == "int4_awq(g64) x 90, int4_awq(g128) x 30"
    # the served model is the calibrated one (bf16 embeddings / norms in the file: within a fraction of a percent)
    res = perplexity(model, smollm2["eval"])
    assert res.perplexity == pytest.approx(quantized[0]["int4_awq"].perplexity, rel=0.01)
    assert res.top1_agreement(quantized[0]["int4_awq"]) > 0.95  # the same greedy choices (bf16 file: ~3% flip)
    # still a language model on topic (a 135M model at 4 bits need not get the capital right: with
    # transformers 5.24 / tokenizers 0.23 the calibrated model answers "L'Étoile, the capital of France is a")
    out_text = llm.chat([[{"role": "user", "content": "What is the capital of France?"}]],
                        SamplingParams(max_tokens=12, temperature=0.0))[0].outputs[0]
    assert len(out_text.token_ids) == 12 and ("Paris" in out_text.text or "France" in out_text.text)


def test_online_quantization_through_llm(smollm2_path) -> None:
    from kvflight.runner.model_runner import ModelRunner

    if "quantization" not in inspect.getsource(ModelRunner.__init__):
        pytest.skip("ModelRunner does not pass config.model.quantization to load_model yet (one-line wiring)")
    llm = LLM(smollm2_path, device="cpu", dtype="float32", max_seq_len=256, kv_cache_bytes=16 << 20,
              quantization="int8_wo")
    assert describe_quantization(llm.engine.runner.model) == "int8_wo x 120"
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=4, temperature=0.0))[0]
    assert "Paris" in out.outputs[0].text


# ---- the commands ----------------------------------------------------------------------------------------------
def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvflight.server.cli", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tmp_path_factory, smollm2):
    """A random 2-layer Llama with SmolLM2's tokenizer (vocab 49152), written as an HF directory."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
    from test_quant_model import _write_tiny

    directory = _write_tiny(tmp_path_factory.mktemp("tiny_tok") / "model", vocab=len(smollm2["tokenizer"]))
    smollm2["tokenizer"].save_pretrained(directory)
    return directory


def test_quantize_and_eval_commands(tiny_with_tokenizer, tmp_path) -> None:
    calib = tmp_path / "calib.jsonl"
    calib.write_text("\n".join(json.dumps({"text": f"Sample {i}: the quick brown fox jumps over the lazy dog "
                                                   f"{i} times, then rests."}) for i in range(40)),
                     encoding="utf-8")
    out = tmp_path / "sq"
    res = _run("quantize", str(tiny_with_tokenizer), "--qformat", "int8_sq", "--calib-dataset", str(calib),
               "--calib-size", "4", "--calib-max-seq-length", "32", "--smoothquant-alpha", "0.6",
               "--kv-cache-dtype", "fp8", "--quantize-lm-head", "--output", str(out), "--device", "cpu")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["linears"].startswith("int8_sq") and summary["output"] == str(out)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["scheme"] == "int8_sq" and qcfg["smoothquant_alpha"] == 0.6 and qcfg["kv_cache_dtype"] == "fp8"
    assert qcfg["lm_head"] == "int8_wo"  # served with an int8 LM head (quantize_lm_head auto)
    assert qcfg["calibration"]["dataset"] == str(calib) and qcfg["calibration"]["num_sequences"] == 4
    text = tmp_path / "eval.txt"
    text.write_text("A small paragraph of text to score.\n\nAnother paragraph, with different words in it.\n",
                    encoding="utf-8")
    res = _run("eval", "ppl", str(tiny_with_tokenizer), "--dataset", str(text), "--quantization",
               "none,int8_wo,int4_wo", "--max-seq-len", "16", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    # quantize_lm_head auto: int4 weights come with the int8 LM head, named in the row
    assert lines[0].startswith("quantization") and [ln.split()[0] for ln in lines[2:]] == [
        "none", "int8_wo", "int4_wo+lm_head:int8"]
    res = _run("eval", "ppl", str(out), "--dataset", str(text), "--json", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    row = json.loads(res.stdout.strip().splitlines()[-1])
    assert row["quantization"] == "auto+lm_head:int8" and row["linears"].startswith("int8_sq")
    assert row["perplexity"] > 1
    # the same checkpoint through its fp8 KV cache (the checkpoint's calibrated scales) and an online-calibrated
    # int8 cache: each scored against the float cache on the same tokens
    res = _run("eval", "ppl", str(out), "--dataset", str(text), "--json", "--device", "cpu", "--max-seq-len", "16",
               "--kv-cache-dtype", "auto,fp8,int8")
    assert res.returncode == 0, res.stderr
    rows = [json.loads(ln) for ln in res.stdout.strip().splitlines()]
    assert [r["quantization"] for r in rows] == [f"auto+lm_head:int8{kv}" for kv in ("", "+kv:fp8", "+kv:int8")]
    for r in rows[1:]:
        assert abs(r["delta_vs_first"]) < 0.05 and r["top1_agreement_vs_first"] > 0.8, r
        assert r["perplexity"] != rows[0]["perplexity"]  # the quantized cache was really read back
    res = _run("eval", "ppl", str(out), "--dataset", str(text), "--device", "cpu", "--kv-cache-dtype", "int4")
    assert res.returncode == 2 and "--kv-cache-dtype" in res.stderr
    res = _run("quantize", str(tiny_with_tokenizer), "--qformat", "int4_awq", "--calib-dataset",
               str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "x"), "--device", "cpu")
    assert res.returncode == 2 and "missing.jsonl" in res.stderr and "no such file" in res.stderr
