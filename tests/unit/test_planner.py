"""Memory planner: figures equal hand arithmetic (Llama-3.1-8B, Qwen2.5-7B, Llama-3.1-70B at tp 8), the verdict and
its fixes, the refusal message, the YAML config round trip through EngineConfig, the CLI."""

import json

import pytest

from kvflight.config import ConfigError, EngineConfig, load_yaml
from kvflight.model.arch import ModelArch
from kvflight.model.presets import get_preset
from kvflight.server.cli import main
from kvflight.tune.planner import (
    FITS,
    GRAPHS_DO_NOT_FIT,
    KV_TOO_SMALL,
    NO_MEMORY_LEFT,
    MeasuredMemory,
    PlanError,
    PlanInputs,
    gpu_memory_bytes_of,
    guide_max_num_tokens,
    params_per_gpu,
    plan_memory,
    shard_shape,
)

MiB, GiB = 2**20, 2**30
H100 = 81559 * MiB  # nvidia-smi's memory.total of an H100 80GB HBM3
CONTEXT = GiB  # the planner's default allowance for the driver's reserve + the CUDA context
LOGIT = 42  # bytes per logit of the sampling peak: float32 logits, softmax, sort values / indices and buffers


def arch(name: str) -> ModelArch:
    return ModelArch.from_hf_config(get_preset(name))


def test_llama31_8b_on_h100_by_hand():
    r = plan_memory(arch("llama-3.1-8b"), {"max_seq_len": 8192}, H100)
    # weights: embed 128256*4096 + 32 layers * (2*4096*4096 + 2*4096*1024 + 3*4096*14336 + 2*4096) + 4096 + head
    params = 128256 * 4096 * 2 + 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096) + 4096
    assert params == 8_030_261_248 == r.num_params_per_gpu
    weights = params * 2 + 131072 * 128 * 4  # + the float32 rotary cos/sin cache of the 131072-token context
    assert r.weights_bytes == weights == 16_060_522_496 + 64 * MiB
    assert r.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 128 * 1024
    assert r.kv_bytes_per_block == 32 * 128 * 1024 == 4 * MiB
    # activations: forward 8192 tokens x 2 B x (4H + 2I + I) (the MLP beats attention's 4H + 6144 + 5120 + 4096),
    # but the logits of 256 rows with the sampler's sort are larger
    assert r.profile_num_tokens == 8192 and r.profile_num_rows == 256
    assert r.forward_peak_bytes == 8192 * 2 * (4 * 4096 + 3 * 14336) == 928 * MiB
    logits = 8192 * 4096 * 2 + 256 * 128256 * LOGIT
    assert r.logits_peak_bytes == logits == r.activation_bytes
    # CUDA graphs: decode batch 256's forward, its bf16 logits, the shared float32 logits buffer, 16 MiB; then the
    # 2048-token mixed-step graphs: 1.25 x their forward and their hidden-states buffer
    assert r.cuda_graph_max_batch_size == 256 and r.cuda_graph_max_num_tokens == 2048
    decode_graphs = 256 * 2 * 59392 + 256 * 128256 * (2 + 4) + 16 * MiB
    assert r.cuda_graph_bytes == decode_graphs + 2048 * 2 * 59392 * 5 // 4 + 2048 * 4096 * 2
    no_mixed = plan_memory(arch("llama-3.1-8b"), {"max_seq_len": 8192, "cuda_graph_max_num_tokens": 0}, H100)
    assert no_mixed.cuda_graph_max_num_tokens == 0 and no_mixed.cuda_graph_bytes == decode_graphs
    assert no_mixed.num_blocks == r.num_blocks  # graphs come out of what the KV cache leaves
    usable = H100 - CONTEXT - weights - logits
    assert r.usable_bytes == usable
    assert r.num_blocks == int(0.9 * usable) // (4 * MiB) == 14349  # the engine on an H100 allocated 14317
    assert r.kv_capacity_tokens == 14349 * 32
    assert r.blocks_per_max_seq_len == 256 and r.requests_at_max_seq_len == 14349 // 256 == 56
    # a batch of 56: its logits stay below the forward peak, so the activations shrink to the forward's
    blocks_small_batch = int(0.9 * (H100 - CONTEXT - weights - 928 * MiB)) // (4 * MiB)
    assert r.largest_max_batch_size == blocks_small_batch // 256 == 56
    assert r.max_num_tokens_guide == round(256 * 8191 * 0.1 + 256 * 1 * 0.9) == 209920
    # capacity-based: the same formula at the 56 requests the KV cache holds; suggested: that, rounded to 256
    assert r.batch_held == 56 and r.max_num_tokens_capacity == round(56 * 8191 * 0.1 + 56 * 0.9) == 45920
    assert r.max_num_tokens_suggested == 179 * 256
    assert r.verdict == FITS and r.fits and r.refusal_message() == ""
    assert r.leftover_bytes == usable - 14349 * 4 * MiB and r.leftover_bytes > r.cuda_graph_bytes


def test_qwen25_7b_on_h100_by_hand():
    a = arch("qwen2.5-7b")
    r = plan_memory(a, {}, H100)
    assert r.max_seq_len == 32768  # the model's context length
    # q/k/v biases (3584 + 2*512), head_dim 3584/28 = 128, 4 KV heads
    per_layer = 2 * 3584 * 3584 + 2 * 3584 * 512 + (3584 + 1024) + 3 * 3584 * 18944 + 2 * 3584
    params = 152064 * 3584 * 2 + 28 * per_layer + 3584
    assert params == a.num_params() == r.num_params_per_gpu == 7_615_616_512
    assert r.kv_bytes_per_token == 2 * 28 * 4 * 128 * 2 == 57344
    assert r.kv_bytes_per_block == 57344 * 32
    assert r.forward_peak_bytes == 8192 * 2 * (4 * 3584 + 3 * 18944)
    assert r.logits_peak_bytes == 8192 * 3584 * 2 + 256 * 152064 * LOGIT == r.activation_bytes
    assert r.weights_bytes == params * 2 + 32768 * 128 * 4
    usable = H100 - CONTEXT - r.weights_bytes - r.logits_peak_bytes
    assert r.num_blocks == int(0.9 * usable) // (57344 * 32)
    assert r.blocks_per_max_seq_len == 1024 and r.requests_at_max_seq_len == r.num_blocks // 1024
    fp8 = plan_memory(a, {"kv_cache_dtype": "fp8"}, H100)
    assert fp8.kv_bytes_per_token == 57344 // 2 and fp8.num_blocks == int(0.9 * usable) // (57344 * 16)
    with pytest.raises(PlanError) as info:
        plan_memory(a, {"tensor_parallel_size": 8}, H100)
    assert "tensor_parallel_size=8" in str(info.value) and "num_heads=28" in str(info.value)
    assert str(info.value).endswith("use one of 1, 2, 4")  # 7 and 14 do not split intermediate_size 18944


def test_llama31_70b_tp8_by_hand():
    a = arch("llama-3.1-70b")
    r = plan_memory(a, {"tensor_parallel_size": 8}, H100)
    # per GPU: vocab-parallel embed / head (128256/8 = 16032 rows), 8 q heads, 1 KV head, intermediate 28672/8
    per_layer = 8192 * 1024 + 2 * 8192 * 128 + 1024 * 8192 + 3 * 8192 * 3584 + 2 * 8192
    params = 2 * 16032 * 8192 + 80 * per_layer + 8192
    assert params == 8_820_367_360 == r.num_params_per_gpu
    assert (r.num_heads_per_gpu, r.num_kv_heads_per_gpu) == (8, 1) and not r.kv_heads_replicated
    assert r.weights_bytes == params * 2 + 131072 * 128 * 4  # the rotary cache is whole on every GPU
    assert r.kv_bytes_per_token == 2 * 80 * 1 * 128 * 2 == 40960
    assert r.forward_peak_bytes == 8192 * 2 * (4 * 8192 + 3 * 3584)
    assert r.logits_peak_bytes == 8192 * 8192 * 2 + 256 * 128256 * LOGIT == r.activation_bytes  # logits win
    usable = H100 - CONTEXT - r.weights_bytes - r.logits_peak_bytes
    assert r.num_blocks == int(0.9 * usable) // (40960 * 32) == 44787
    assert r.requests_at_max_seq_len == 44787 // 4096 == 10
    assert any("per GPU" in n for n in r.notes)
    # at tp 1 the same model does not fit an H100 at all; tp 4 is the first split that does
    alone = plan_memory(a, {}, H100)
    assert alone.verdict == NO_MEMORY_LEFT
    assert alone.shortfall_bytes == -(H100 - CONTEXT - a.num_params() * 2 - 64 * MiB - alone.activation_bytes)
    assert [(f.field, f.value) for f in alone.fixes] == [("tensor_parallel_size", 4)]
    msg = alone.refusal_message()
    assert "exceed the GPU's memory by" in msg and "tensor_parallel_size 4" in msg


def test_kv_heads_replicated_when_fewer_than_tp():
    a = arch("smollm2-135m")  # 9 query heads, 3 KV heads
    s = shard_shape(a, 3)
    assert (s.num_heads, s.num_kv_heads) == (3, 1)
    assert params_per_gpu(a, shard_shape(a, 1)) == a.num_params()
    llama = arch("llama-3.1-70b")  # 8 KV heads
    assert shard_shape(llama, 16).num_kv_heads == 1  # replicated: 2 GPUs hold each KV head


def test_refusal_message_names_the_shortfall_and_the_fixes():
    a = arch("llama-3.1-8b")
    r = plan_memory(a, {"max_seq_len": 131072}, 32 * GiB, gpu_name="test GPU")
    assert r.verdict == KV_TOO_SMALL and not r.fits
    usable = 32 * GiB - CONTEXT - (16_060_522_496 + 64 * MiB) - (8192 * 4096 * 2 + 256 * 128256 * LOGIT)
    blocks = int(0.9 * usable) // (4 * MiB)
    assert r.num_blocks == blocks and r.shortfall_blocks == 4096 - blocks
    assert r.shortfall_bytes == (4096 - blocks) * 4 * MiB
    msg = r.refusal_message()
    for words in ("max_seq_len=131072", "4096 KV blocks", f"holds {blocks} blocks", f"short by {4096 - blocks} "
                  "blocks", "weights 15.02 GiB", "Fix:", f"lower max_seq_len to {blocks * 32}",
                  "kv_cache_dtype fp8", "tensor_parallel_size 2"):
        assert words in msg, words
    fields = {f.field: f.value for f in r.fixes}
    assert fields["max_seq_len"] == blocks * 32 and fields["kv_cache_dtype"] == "fp8"
    # every fix really fits (the KV cache; graphs may then need their own fix, which the text names)
    for f in r.fixes:
        if f.field in ("max_seq_len", "kv_cache_dtype", "tensor_parallel_size", "max_num_tokens"):
            changed = plan_memory(a, {"max_seq_len": 131072, f.field: f.value}
                                  if f.field != "max_seq_len" else {"max_seq_len": f.value}, 32 * GiB)
            assert changed.verdict in (FITS, GRAPHS_DO_NOT_FIT), f
    with pytest.raises(ConfigError, match="short by"):
        r.raise_if_not_fits()


def test_cuda_graphs_that_do_not_fit_in_the_rest():
    a = arch("llama-3.1-8b")
    a10g = gpu_memory_bytes_of("A10G")
    settings = {"max_seq_len": 8192, "kv_cache_free_gpu_memory_fraction": 0.99,  # ~60 MiB left for the graphs
                "cuda_graph_max_num_tokens": 0}
    r = plan_memory(a, settings, a10g)
    assert r.verdict == GRAPHS_DO_NOT_FIT and r.cuda_graph_bytes > r.leftover_bytes
    assert r.shortfall_bytes == r.cuda_graph_bytes - r.leftover_bytes
    assert [f.field for f in r.fixes] == ["cuda_graph_max_batch_size", "kv_cache_free_gpu_memory_fraction",
                                          "enforce_eager"]
    assert "CUDA graphs of decode batches up to 256" in r.refusal_message()
    eager = plan_memory(a, {**settings, "enforce_eager": True}, a10g)
    assert eager.fits and eager.cuda_graph_bytes == 0
    size, fraction = r.fixes[0].value, r.fixes[1].value
    assert plan_memory(a, {**settings, "cuda_graph_max_batch_size": size}, a10g).fits
    assert not plan_memory(a, {**settings, "cuda_graph_max_batch_size": size + 1}, a10g).fits
    assert plan_memory(a, {**settings, "kv_cache_free_gpu_memory_fraction": fraction}, a10g).fits
    assert plan_memory(a, {"max_seq_len": 8192}, a10g).fits  # the default 0.9 leaves room


def test_mixed_step_graphs_that_do_not_fit_name_their_own_fix():
    a = arch("llama-3.1-8b")
    a10g = gpu_memory_bytes_of("A10G")
    # a fraction that leaves room for the decode graphs but not for the 2048-token mixed-step graphs
    fraction = next(f / 1000 for f in range(990, 900, -1)
                    if plan_memory(a, {"max_seq_len": 8192, "cuda_graph_max_num_tokens": 0,
                                       "kv_cache_free_gpu_memory_fraction": f / 1000}, a10g).fits)
    settings = {"max_seq_len": 8192, "kv_cache_free_gpu_memory_fraction": fraction, "cuda_graph_max_num_tokens": 2048}
    r = plan_memory(a, settings, a10g)
    assert r.verdict == GRAPHS_DO_NOT_FIT and r.cuda_graph_max_num_tokens == 2048
    assert "and steps up to 2048 tokens" in r.refusal_message()
    fixes = {f.field: f.value for f in r.fixes}
    tokens = fixes["cuda_graph_max_num_tokens"]
    assert 0 < tokens < 2048
    assert plan_memory(a, {**settings, "cuda_graph_max_num_tokens": tokens}, a10g).fits
    assert not plan_memory(a, {**settings, "cuda_graph_max_num_tokens": tokens + 1}, a10g).fits
    # left unset, the mixed-step size shrinks (in steps of 64 tokens) to what fits
    auto = plan_memory(a, {"max_seq_len": 8192, "kv_cache_free_gpu_memory_fraction": fraction}, a10g)
    assert auto.fits and auto.cuda_graph_max_num_tokens == tokens // 64 * 64
    roomy = plan_memory(a, {"max_seq_len": 8192}, a10g)  # the default fraction 0.9 leaves 10 %
    assert roomy.fits and 0 < roomy.cuda_graph_max_num_tokens <= 2048


def test_caps_cpu_budget_and_measured_figures():
    a = arch("smollm2-135m")
    # CPU: the runner's budget is kv_cache_bytes; float32 KV = 2 * 30 * 3 * 64 * 4 B per token
    cpu = plan_memory(a, EngineConfig.from_flat({"kv_cache_bytes": "64MiB", "max_seq_len": 512}), None)
    assert cpu.kv_bytes_per_token == 46080 and cpu.num_blocks == 64 * MiB // (46080 * 32) == 45
    small = plan_memory(a, {"max_tokens_in_paged_kv_cache": 256, "max_seq_len": 512}, None)
    assert small.verdict == KV_TOO_SMALL and small.num_blocks == 8
    assert [(f.field, f.value) for f in small.fixes][:2] == [("max_seq_len", 256),
                                                            ("max_tokens_in_paged_kv_cache", 512)]
    # GPU with the runner's measured figures instead of the estimates
    llama = arch("llama-3.1-8b")
    measured = MeasuredMemory(weights_bytes=15 * GiB, activation_bytes=2 * GiB, non_torch_bytes=GiB)
    r = plan_memory(llama, {"max_seq_len": 8192}, 80 * GiB, measured=measured)
    assert r.weights_bytes == 15 * GiB and r.activation_bytes == 2 * GiB and r.non_torch_bytes == GiB
    assert r.num_blocks == int(0.9 * (80 - 15 - 2 - 1) * GiB) // (4 * MiB)
    util = plan_memory(llama, {"max_seq_len": 8192, "gpu_memory_utilization": 0.5}, 80 * GiB, measured=measured)
    assert util.num_blocks == (40 - 15 - 2 - 1) * GiB // (4 * MiB)


def test_inputs_and_gpus():
    assert gpu_memory_bytes_of("h100-80gb") == gpu_memory_bytes_of("H100 SXM") == H100
    with pytest.raises(PlanError, match="--gpu-memory"):
        gpu_memory_bytes_of("TPU-v5")
    with pytest.raises(PlanError, match="kv_cache_dtype"):
        PlanInputs(kv_cache_dtype="fp4")
    assert PlanInputs.from_config({"max_num_seqs": 8, "block_size": 16, "tp": 2}) == PlanInputs(
        max_batch_size=8, tokens_per_block=16, tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="max_batch_sise"):
        PlanInputs.from_config({"max_batch_sise": 8})
    assert guide_max_num_tokens(64, 1024, 0.2) == round(64 * 1024 * 0.2 + 64 * 0.8) == 13158  # the guide's example


def test_cli_table_yaml_round_trip(tmp_path, capsys):
    path = tmp_path / "plan.yaml"
    code = main(["plan", "llama-3.1-8b", "--gpu", "H100-80GB", "--max-seq-len", "8192", "--max-batch-size", "64",
                 "--no-enable-kv-cache-reuse", "--output-config", str(path)])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "weights per GPU" in out.out and "KV capacity" in out.out and "verdict: fits" in out.out
    flat = load_yaml(path)
    cfg = EngineConfig.from_flat(flat)  # what `kvflight serve --config` does
    assert flat["model"] == "llama-3.1-8b" and cfg.model.load_format == "dummy"
    assert (cfg.scheduler.max_seq_len, cfg.scheduler.max_batch_size) == (8192, 64)
    assert cfg.cache.enable_kv_cache_reuse is False and cfg.cache.tokens_per_block == 32
    assert flat["max_seq_len"] == 8192 and flat["max_batch_size"] == 64  # typed values, not the flags' strings
    assert path.read_text().startswith("# kvflight plan: llama-3.1-8b on H100-80GB")
    # --apply-suggestions plans the suggested max_num_tokens (and a batch that fits) instead
    code = main(["plan", "llama-3.1-8b", "--gpu-memory", "80GiB", "--max-seq-len", "2048", "--max-input-len", "1024",
                 "--apply-suggestions", "--output-config", str(path), "--json"])
    doc = json.loads(capsys.readouterr().out)
    batch, tokens = doc["inputs"]["max_batch_size"], doc["inputs"]["max_num_tokens"]
    assert code == 0 and 0 < batch < 256  # the largest batch of 2048-token requests that fits
    guide = round(batch * 1024 * 0.1 + batch * 0.9)  # the guide's formula at that batch and max_input_len
    assert doc["max_num_tokens_guide"] == guide and tokens == round(guide / 256) * 256
    assert EngineConfig.from_flat(load_yaml(path)).scheduler.max_num_tokens == tokens


def test_cli_refuses_and_reports(tmp_path, capsys):
    path = tmp_path / "never.yaml"
    code = main(["plan", "llama-3.1-8b", "--gpu", "A10G", "--enforce-eager", "--output-config", str(path)])
    out = capsys.readouterr()
    assert code == 1 and not path.exists()
    assert "DOES NOT FIT" in out.out and "lower max_seq_len to" in out.out and "not writing" in out.err
    assert main(["plan", "llama-3.1-8b", "--gpu", "TPU"]) == 2
    assert "--gpu-memory" in capsys.readouterr().err
    assert main(["plan", "llama-3.1-8b"]) == 2
    assert "--gpu" in capsys.readouterr().err
    # tp 8 with an fp8 KV cache (both taken by the engine now) is written as planned
    code = main(["plan", "llama-3.1-70b", "--gpu", "H100", "--tp", "8", "--kv-cache-dtype", "fp8",
                 "--max-seq-len", "32768", "--output-config", str(path)])
    out = capsys.readouterr()
    assert code == 0 and path.exists()
    assert load_yaml(path)["tensor_parallel_size"] == 8 and load_yaml(path)["kv_cache_dtype"] == "fp8"


def test_cli_reads_a_model_directory(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(get_preset("qwen2.5-7b")))  # no weights needed
    assert main(["plan", str(tmp_path), "--gpu", "H200", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["num_params_per_gpu"] == 7_615_616_512 and doc["gpu_memory_bytes"] == 143771 * MiB


def test_quantized_weights_shrink_the_linear_layers_only() -> None:
    from kvflight.tune.planner import linear_params_per_gpu, plan_memory, shard_shape

    base = plan_memory(arch("llama-3.1-8b"), {"max_seq_len": 8192}, 80 << 30)
    fp8 = plan_memory(arch("llama-3.1-8b"), {"max_seq_len": 8192, "quantization": "fp8"}, 80 << 30)
    int4 = plan_memory(arch("llama-3.1-8b"), {"max_seq_len": 8192, "quantization": "int4_awq",
                                              "quantize_lm_head": "off"}, 80 << 30)
    linear = linear_params_per_gpu(arch("llama-3.1-8b"), shard_shape(arch("llama-3.1-8b"), 1))
    assert linear == 32 * (4096 * 4096 * 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336)  # q, o, k, v, gate/up/down
    assert base.weights_bytes - fp8.weights_bytes == linear  # 2 bytes -> 1 byte per linear weight
    assert base.weights_bytes - int4.weights_bytes == linear * 2 - int(linear * (0.5 + 4 / 128))
    # quantize_lm_head auto under int4 weights: the head's rows in int8 + a float32 scale each
    auto = plan_memory(arch("llama-3.1-8b"), {"max_seq_len": 8192, "quantization": "int4_awq"}, 80 << 30)
    assert int4.weights_bytes - auto.weights_bytes == 128256 * 4096 * 2 - 128256 * (4096 + 4)
    assert fp8.num_blocks > base.num_blocks  # the memory saved goes to the KV cache
