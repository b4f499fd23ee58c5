"""The `kvflight` command line: generate, serve, quantize, eval, bench, plan, topo, tune."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from kvflight.config import ConfigError, add_cli_args, flat_from_args, load_yaml


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="HF model directory, .gguf file, dummy preset name, or omitted for SmolLM2-135M-Instruct")
    p.add_argument("--config", default=None, metavar="FILE.yaml", help="YAML file of settings; flags override it")
    add_cli_args(p)


def _flat_settings(args: argparse.Namespace) -> dict:
    flat = load_yaml(args.config) if args.config else {}
    flat.update(flat_from_args(args))
    if args.model is not None:
        flat["model"] = args.model
    return flat


def cmd_generate(args: argparse.Namespace) -> int:
    from kvflight.engine.llm import LLM
    from kvflight.types import SamplingParams

    llm = LLM(**_flat_settings(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed_sampling, stop=args.stop or [],
                            ignore_eos=args.ignore_eos, n=args.n)
    prompts = args.prompt or ["Hello!"]
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outs = llm.generate(prompts, params)
    for out in outs:
        if args.json:
            print(json.dumps({"prompt": out.prompt, "prompt_token_ids": out.prompt_token_ids,
                              "outputs": [{"index": c.index, "text": c.text, "token_ids": c.token_ids,
                                           "finish_reason": c.finish_reason} for c in out.outputs],
                              "metrics": out.metrics}, ensure_ascii=False))
        else:
            for c in out.outputs:
                print(c.text)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from kvflight.server.serve import run_serve

    return run_serve(args, _flat_settings(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvflight", description="LLM inference engine and server")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text offline for one or more prompts")
    _add_model_args(gen)
    gen.add_argument("--prompt", action="append", help="prompt text (repeat for several)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--n", type=int, default=1)
    gen.add_argument("--stop", action="append", help="stop string (repeat for several)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--sampling-seed", dest="seed_sampling", type=int, default=None)
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt")
    gen.set_defaults(func=cmd_generate)

    from kvflight.server.serve import add_serve_args as add_server_args

    srv = sub.add_parser("serve", help="OpenAI-compatible (and Triton-style) HTTP server")
    _add_model_args(srv)
    add_server_args(srv)
    srv.set_defaults(func=cmd_serve)

    from kvflight.quant.evaluate import add_eval_args
    from kvflight.quant.quantize import add_quantize_args

    quant = sub.add_parser("quantize", help="quantize a model (fp8, int8_sq, int4_awq, int8_wo, int4_wo) into a "
                                            "checkpoint that `kvflight serve DIR` loads")
    add_quantize_args(quant)
    evaluate = sub.add_parser("eval", help="accuracy checks: `eval ppl MODEL --dataset FILE`")
    add_eval_args(evaluate)

    from kvflight.bench.dataset import add_dataset_args, run_dataset
    from kvflight.bench.latency import add_latency_args, run_latency
    from kvflight.bench.serve import add_serve_args, run_serve

    bench = sub.add_parser("bench", help="benchmarks: dataset, latency (static batch), serve (in-flight load)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    for name, add, run, text in (
            ("dataset", add_dataset_args, run_dataset, "write a benchmark dataset (TensorRT-LLM formats)"),
            ("latency", add_latency_args, run_latency, "static-batch latency, in-process"),
            ("serve", add_serve_args, run_serve, "serving load against the engine or any OpenAI/Triton endpoint")):
        p = bench_sub.add_parser(name, help=text)
        add(p)
        p.set_defaults(func=run)

    from kvflight.tune.planner import add_plan_args, run_plan
    from kvflight.tune.topo import add_topo_args, run_topo
    from kvflight.tune.tuner import add_tune_args, run_tune

    for name, add, run, text in (
            ("plan", add_plan_args, run_plan, "memory plan for a model on a GPU, without the GPU; YAML config"),
            ("topo", add_topo_args, run_topo, "GPU topology: does a custom all-reduce pay, per GPU group"),
            ("tune", add_tune_args, run_tune, "search engine settings for the best goodput under an SLO")):
        p = sub.add_parser(name, help=text, description=text)
        add(p)
        p.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="[kvflight][%(levelname)s] %(message)s")
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"kvflight: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
