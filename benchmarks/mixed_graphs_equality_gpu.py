"""On the GPU: greedy float32 tokens of mixed-step CUDA graphs (cuda_graph_max_num_tokens) against eager Triton
launches and the plain-torch backend, on tiny random models (tests/tiny_models.py) with chunked prompts, a prefix
hit and asynchronous scheduling. Exit 1 when they differ.

    python benchmarks/mixed_graphs_equality_gpu.py TOKENIZER_DIR   (any tokenizer covering ids < 160)
"""
import gc
import os
import sys
import tempfile
from pathlib import Path
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from tiny_models import VOCAB, write_hf_checkpoint
from transformers import AutoTokenizer
from kvflight import LLM, SamplingParams
tok = AutoTokenizer.from_pretrained(sys.argv[1] if len(sys.argv) > 1 else ".gpuassets/smollm2-tokenizer")
ok = True
for name in ("llama_gqa", "qwen3_qknorm", "qwen2_bias"):
    path = Path(tempfile.mkdtemp()) / name
    write_hf_checkpoint(name, path); tok.save_pretrained(path)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (5, 23, 40, 9, 61, 2)]
    prompts.append(prompts[2][:33] + [7, 8])
    res = {}
    for label, backend, mixed, eager in (("torch", "torch", 0, True), ("triton-eager", "triton", 0, False),
                                         ("mixed-graphs", "triton", 48, False)):
        llm = LLM(str(path), kernel_backend=backend, dtype="float32", tokens_per_block=4, enforce_eager=eager,
                  cuda_graph_max_num_tokens=mixed,
                  max_num_tokens=48, max_batch_size=4, kv_cache_bytes=1 << 20,
                  async_scheduling="on" if backend == "triton" else "off")
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        res[label] = [o.outputs[0].token_ids for o in outs]
        if mixed:
            graphs = llm.engine.runner.mixed_graphs
            print(name, "mixed-step graphs:", 0 if graphs is None else len(graphs.buckets))
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    same = res["mixed-graphs"] == res["torch"] == res["triton-eager"]
    ok &= same
    print(name, "equal" if same else f"DIFFER {res}")
print("OK" if ok else "FAIL")
sys.exit(0 if ok else 1)
