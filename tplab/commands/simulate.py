"""``python -m tplab simulate``: the serving engine's scheduler on modelled GPUs. Every figure is modelled.

    python -m tplab simulate --model llama-3-70b --gpu h100-sxm --tp 4 --dtype fp8 --rate 2 \\
        --prompt-len 1024:4096 --output-len 128:512 --max-num-seqs 24 --max-batched-tokens 8192

The same load, scheduler and SLO options as ``serve-bench``; each step's
time comes from the cost model (:class:`tplab.perf.batch.ModelledStepCost`)
instead of real ranks (with ``--pp``, each stage's share and the hops between stages, up to pp steps in flight), and the KV blocks from what the GPU's memory leaves
after the weights (``--num-blocks`` to set them). The scheduler defaults to what
the modelled engine would run: vLLM's defaults for its OpenAI server
(:data:`tplab.perf.batch.VLLM_BATCH_DEFAULTS`), printed with the run.
"""
from __future__ import annotations

import argparse
import sys

from tplab.commands import add_expert_options, count, precision_of
from tplab.commands import serving_options as serving
from tplab.perf.batch import VLLM_BATCH_DEFAULTS, ModelledStepCost, simulate_on, vllm_batch_defaults
from tplab.perf.estimate import ENGINES, MODELLED
from tplab.perf.experts import ExpertSplit
from tplab.perf.shapes import KV_BYTES, WEIGHT_BYTES
from tplab.specs.efficiency import load_efficiency
from tplab.specs.model import resolve_model


def register(subparsers) -> None:
    p = subparsers.add_parser("simulate", help="the serving scheduler on modelled GPUs (every figure modelled)")
    p.add_argument("--model", required=True, help="shipped model name (e.g. llama-3-70b) or path to a config.json")
    p.add_argument("--gpu", required=True, help="shipped GPU name (e.g. h100-sxm)")
    p.add_argument("--tp", type=count("--tp"), default=None, help="tensor-parallel degree (default 1, or --ep's)")
    p.add_argument("--dtype", default="bf16", type=precision_of(tuple(WEIGHT_BYTES)), help="weights precision")
    p.add_argument("--kv-dtype", default="bf16", type=precision_of(tuple(KV_BYTES)), help="KV cache precision")
    p.add_argument("--interconnect", default=None, help="nvlink, pcie or a network (default: the fastest)")
    p.add_argument("--pp", type=count("--pp"), default=1,
                   help="pipeline stages of tp GPUs each, with up to pp steps in flight (default 1)")
    p.add_argument("--stage-link", default=None,
                   help="the link between stages (default: the node's link when tp x pp GPUs fit in one node, "
                        "else ib-ndr-400)")
    p.add_argument("--engine", default="graph", choices=ENGINES, help="the engine profile of the fixed overheads")
    add_expert_options(p, modelled=True)
    p.add_argument("--max-model-len", type=count("--max-model-len"), default=None,
                   help="longest request in positions (default: the model's context)")
    p.add_argument("--efficiency", default=None, help="JSON file overriding data/efficiency.json")
    serving.add_serving_options(p, {"max_num_seqs": None, "max_batched_tokens": None,
                                    "num_blocks": "what each GPU's memory leaves after the weights, the activations "
                                                  "and the runtime, as vLLM sizes its cache; --max-num-seqs and "
                                                  "--max-batched-tokens default to vLLM's for the GPU"})
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        model = resolve_model(args.model, strict=False)
        args.tp = args.tp or args.ep
        split = ExpertSplit(args.ep, args.ep_dispatch, args.imbalance)
        if not model.num_experts:
            model.check_ep(args.tp, args.ep)
        costs = {ep: ModelledStepCost(model, args.gpu, args.tp, args.dtype, args.kv_dtype, args.interconnect,
                                      args.engine, load_efficiency(args.efficiency), args.pp, args.stage_link,
                                      ExpertSplit() if ep == 1 else split)
                 for ep in dict.fromkeys([args.ep, 1] if model.num_experts else [1])}
        cost = costs[args.ep]
        context = model.max_position_embeddings if args.max_model_len is None else args.max_model_len
        if context > model.max_position_embeddings:
            raise ValueError(f"--max-model-len must be in [1, {model.max_position_embeddings}], got {context}")
        requests = serving.build_load(args, model.vocab_size, context, frozenset(model.eos_token_ids))
        defaulted = [flag for flag, value in (("--max-num-seqs", args.max_num_seqs),
                                              ("--max-batched-tokens", args.max_batched_tokens)) if value is None]
        chosen = f"{' and '.join(defaulted)} from {VLLM_BATCH_DEFAULTS}" if defaulted else "given"
        seqs, tokens = vllm_batch_defaults(cost.gpu)
        args.max_num_seqs = args.max_num_seqs or seqs
        args.max_batched_tokens = args.max_batched_tokens or tokens
        blocks = None if args.num_blocks is not None else cost.kv_blocks(args.block_size, args.max_num_seqs,
                                                             args.max_batched_tokens)
        config = serving.scheduler_config(args, context, requests, blocks)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs = {ep: simulate_on(c, requests, config, serving.slo_of(args), args.concurrency) for ep, c in costs.items()}
    run = runs[args.ep]
    result = {**run.to_dict(), "concurrency": args.concurrency}
    stages = "" if args.pp == 1 else f", {args.pp} stages over {cost.stage_link.name}"
    setting = {"model": model.name, "gpu": cost.gpu.name, "tp": args.tp, "pp": args.pp, "dtype": args.dtype,
               "kv_dtype": args.kv_dtype, "interconnect": cost.link.name,
               "stage_link": None if cost.stage_link is None else cost.stage_link.name, "engine": args.engine,
               "num_blocks": config.num_blocks, "max_num_seqs": config.max_num_seqs,
               "max_num_batched_tokens": config.max_num_batched_tokens, "scheduler_defaults": chosen,
               "notes": list(cost.notes), "ep": args.ep,
               "ep_dispatch": args.ep_dispatch if model.num_experts else None, "imbalance": args.imbalance}
    if len(runs) > 1:
        result["tp_of_experts"] = runs[1].to_dict()["summary"]
    if args.json:
        serving.print_json(result, label=MODELLED, setting=setting)
        return 0
    serving.print_report(result, f"MODELLED, not measured: {model.name} on {args.tp} x {cost.gpu.name} over {cost.link.name}"
                         f"{stages}, {args.dtype} weights, {config.num_blocks} KV blocks of {config.block_size} per GPU")
    print(f"  scheduler: max_num_seqs {config.max_num_seqs}, max_num_batched_tokens {config.max_num_batched_tokens} "
          f"({chosen}), chunked prefill {'on' if config.chunked_prefill else 'off'}, prefix caching "
          f"{'on' if config.prefix_caching else 'off'}")
    for note in cost.notes:
        print(f"  note: {note}")
    if len(runs) > 1:
        print(experts_line(result["summary"], result["tp_of_experts"], args))
    return 0


def experts_line(ep: dict, tp: dict, args: argparse.Namespace) -> str:
    """One line: the run with whole experts against the same load with every expert split over the tp GPUs."""
    def part(s: dict) -> str:
        return (f"{s['throughput_tok_s']:.0f} output tok/s, TPOT p50 {s['tpot_ms']['p50']:.1f} ms, "
                f"TTFT p50 {s['ttft_ms']['p50']:.0f} ms")
    return (f"  experts whole on {args.ep} GPUs ({args.ep_dispatch}): {part(ep)}; the same load with every expert "
            f"split over the {args.tp} GPUs: {part(tp)} (modelled)")
