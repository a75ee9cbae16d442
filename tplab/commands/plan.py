"""``python -m tplab plan``: a table of modelled memory, latency, throughput and cost for each TP degree and batch."""
from __future__ import annotations

import argparse
import sys

from tplab.commands import add_expert_options, count, int_list, positive, precision_of
from tplab.perf.batch import link_for
from tplab.perf.estimate import ENGINES, MODELLED, Estimate, engine_overheads_us, estimate, max_batch, min_tp
from tplab.perf.pipeline import PipelineEstimate, estimate_pipeline, max_batch_pipeline
from tplab.perf.shapes import KV_BYTES, WEIGHT_BYTES
from tplab.specs.efficiency import load_efficiency
from tplab.specs.hardware import load_gpu
from tplab.specs.model import resolve_model
from tplab.specs.sharding import stage_layers

COLUMNS = [("tp", 3), ("batch", 6), ("link", 10), ("weights GB", 11), ("KV GB", 8), ("act+rt GB", 10),
           ("total/usable GB", 16),
           ("fits", 5), ("decode ms/tok", 14), ("TTFT ms", 9), ("tok/s", 8), ("tok/s/GPU", 10), ("USD/1M tok", 11),
           ("bound", 7)]


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="modelled memory, latency, throughput and cost per TP degree (no GPU needed)",
                              description="Every figure printed is modelled from datasheet numbers and the efficiencies "
                                          "in data/efficiency.json, not measured.")
    p.add_argument("--model", required=True, help="shipped model name (e.g. llama-3-70b) or path to a config.json")
    p.add_argument("--gpu", required=True, help="shipped GPU name (e.g. h100-sxm)")
    p.add_argument("--tp", default=None, help="comma-separated TP degrees (default 1,2,4,8, or --ep's)")
    p.add_argument("--pp", default=None,
                   help="comma-separated pipeline stages, each of tp GPUs: prints TP x PP side by side (latency, "
                        "throughput at the largest batch that fits, memory, hops, bubble)")
    p.add_argument("--gpus", type=count("--gpus", 4096, "a cluster of more GPUs is a typo"), default=None,
                   help="compare every tp x pp = GPUS that the model can take, side by side (instead of --tp/--pp)")
    p.add_argument("--stage-link", default=None,
                   help="the link between stages (default: the node's link when tp x pp GPUs fit in one node, "
                        "else ib-ndr-400)")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    p.add_argument("--context", type=int, default=4096, help="tokens per sequence, prompt plus output (default 4096)")
    p.add_argument("--output", type=int, default=256, help="output tokens, part of --context (default 256)")
    p.add_argument("--dtype", default="bf16", type=precision_of(tuple(WEIGHT_BYTES)),
                   help=f"weight precision: {', '.join(WEIGHT_BYTES)} (bfloat16 and float16 spelled out work too)")
    p.add_argument("--kv-dtype", default="bf16", type=precision_of(tuple(KV_BYTES)),
                   help=f"KV-cache precision: {', '.join(KV_BYTES)}")
    p.add_argument("--interconnect", default=None, help="nvlink, pcie or a network (default: the fastest that reaches tp GPUs)")
    p.add_argument("--price", type=positive("--price", allow_zero=True), default=None, help="your price in USD per GPU-hour (no default: enables the cost column)")
    p.add_argument("--efficiency", default=None, help="JSON file overriding data/efficiency.json")
    p.add_argument("--engine", default="graph", choices=ENGINES,
                   help="graph: CUDA graphs / compiled; served: the same behind an HTTP server, timed at the client; "
                        "eager: one kernel launch per op (its overheads are assumptions, not fitted)")
    add_expert_options(p, modelled=True)
    p.set_defaults(run=run)


def _experts(e: Estimate) -> list[str]:
    """The experts column of a mixture: "TP" (every expert split), or "EP-ar" / "EP-a2a" (whole, by dispatch)."""
    if e.experts is None:
        return []
    return ["TP" if e.experts.ep == 1 else f"EP-{'ar' if e.experts.dispatch == 'all-reduce' else 'a2a'}"]


def _row(e: Estimate) -> list[str]:
    m = e.breakdown["memory_gb"]
    cost = "-" if e.cost_per_million_tokens is None else f"{e.cost_per_million_tokens:.2f}"
    link = "-" if e.tp == 1 else e.interconnect  # one GPU: no collectives, no link
    return [str(e.tp), *_experts(e), str(e.batch), link, f"{m['weights']:.1f}", f"{m['kv_cache']:.1f}",
            f"{m['activations'] + m['runtime_overhead']:.1f}",
            f"{e.memory_per_gpu_gb:.1f}/{e.usable_memory_gb:.1f}", "yes" if e.fits else "NO",
            f"{e.decode_ms_per_token:.2f}", f"{e.ttft_ms:.0f}", f"{e.throughput_tok_s:.0f}",
            f"{e.throughput_per_gpu_tok_s:.0f}", cost, e.bound]


def _print_table(rows: list[list[str]], experts: bool = False) -> None:
    columns = COLUMNS[:1] + [("experts", 7)] * experts + COLUMNS[1:]
    print("  ".join(f"{name:>{width}}" for name, width in columns))
    for row in rows:
        print("  ".join(f"{cell:>{width}}" for cell, (_, width) in zip(row, columns)))


PIPELINE_COLUMNS = [("tp", 3), ("pp", 3), ("batch", 6), ("m", 3), ("tp link", 10), ("stage link", 10),
                    ("GB/GPU", 12), ("fits", 5), ("decode ms/tok", 14), ("TTFT ms", 9), ("tok/s", 8),
                    ("bubble", 7), ("hops/tok", 9), ("max batch", 10), ("tok/s at max", 13), ("tok/s/GPU", 10)]


def _grid(args: argparse.Namespace, spec) -> list[tuple[int, int]]:
    """(tp, pp) pairs: every split of --gpus the model takes (tp divides the heads, pp at most the layers), or
    --tp x --pp."""
    if args.gpus is None:
        tps, pps = int_list("--tp", args.tp or "1,2,4,8"), int_list("--pp", args.pp or "1")
        for tp in tps:
            spec.check_tp(tp)
        for pp in pps:
            stage_layers(spec.num_layers, pp)
        return [(tp, pp) for tp in tps for pp in pps]
    pairs = [(tp, args.gpus // tp) for tp in spec.valid_tp() if args.gpus % tp == 0
             and args.gpus // tp <= spec.num_layers]
    if not pairs:
        raise ValueError(f"--gpus={args.gpus} splits into no tp x pp that {spec.name} takes (tp dividing its "
                         f"{spec.num_heads} heads, pp at most its {spec.num_layers} layers); valid tp: "
                         f"{', '.join(map(str, spec.valid_tp()))}")
    return pairs


def _pipeline_row(e: PipelineEstimate, tp_link: str, largest: int, at_largest: PipelineEstimate | None) -> list[str]:
    saturated = "-" if at_largest is None else f"{at_largest.throughput_tok_s:.0f}"
    per_gpu = "-" if at_largest is None else f"{at_largest.throughput_tok_s / e.gpus:.0f}"
    return [str(e.tp), str(e.pp), str(e.batch), str(e.micro_batches), "-" if e.tp == 1 else tp_link, e.stage_link,
            f"{e.stage_memory_gb:.1f}/{e.usable_memory_gb:.1f}", "yes" if e.fits else "NO",
            f"{e.decode_ms_per_token:.2f}", f"{e.ttft_ms:.0f}", f"{e.throughput_tok_s:.0f}",
            f"{e.bubble_fraction:.2f}", str(e.pp if e.pp > 1 else 0), str(largest), saturated, per_gpu]


def plan_pipelines(args: argparse.Namespace, spec, hw, kw: dict) -> None:
    """TP, PP and TP x PP side by side: per (tp, pp) and batch, m = min(pp, batch) micro-batches in flight."""
    pairs, batches = _grid(args, spec), int_list("--batch", args.batch)
    rows = []
    for tp, pp in pairs:
        tp_link = link_for(hw, args.interconnect, tp)
        common = dict(tp=tp, pp=pp, interconnect=tp_link.name, network=args.stage_link, engine=args.engine, **kw)
        largest = max_batch_pipeline(**common)
        at_largest = estimate_pipeline(batch=largest, micro_batches=min(pp, largest), **common) if largest else None
        rows += [_pipeline_row(estimate_pipeline(batch=b, micro_batches=min(pp, b), **common), tp_link.name,
                               largest, at_largest) for b in batches]
    print(f"MODELLED estimates, not measurements: {spec.name} on {hw.label}, {args.dtype} weights, {args.kv_dtype} KV "
          f"cache, {args.context - args.output} prompt + {args.output} output tokens per sequence, tp x pp GPUs: each "
          f"stage a TP group of tp GPUs")
    print("  ".join(f"{name:>{width}}" for name, width in PIPELINE_COLUMNS))
    for row in rows:
        print("  ".join(f"{cell:>{width}}" for cell, (_, width) in zip(row, PIPELINE_COLUMNS)))
    print("m: micro-batches in flight (min(pp, batch)); GB/GPU: the fullest stage (its layers' weights and KV cache, "
          "activations, runtime) against the usable memory; bubble: the share of a round each stage idles; hops/tok: "
          "pp - 1 activation hops and the token return per token; max batch: the largest that fits, with its tok/s")
    print(f"all figures above are {MODELLED}")


def plan(args: argparse.Namespace) -> None:
    """Check every input, then print the table, the minimum tp per batch and the largest batch per tp (or, with
    --pp or --gpus, TP x PP side by side)."""
    spec, hw, eff = resolve_model(args.model, strict=False), load_gpu(args.gpu), load_efficiency(args.efficiency)
    if not 0 < args.output < args.context:
        raise ValueError(f"--output={args.output} must be at least 1 and less than --context={args.context}")
    kw = dict(model=spec, gpu=hw, dtype=args.dtype, prompt_len=args.context - args.output, output_len=args.output,
              kv_dtype=args.kv_dtype, efficiency=eff)
    if args.pp is not None or args.gpus is not None:
        if args.ep != 1:
            raise ValueError("--ep compares experts on one TP group: leave out --pp and --gpus with it")
        return plan_pipelines(args, spec, hw, kw)
    tps = int_list("--tp", args.tp or ("1,2,4,8" if args.ep == 1 else str(args.ep)))
    batches = int_list("--batch", args.batch)
    splits = [dict(ep=1)] if args.ep == 1 else [dict(ep=1), dict(ep=args.ep, dispatch=args.ep_dispatch,
                                                              imbalance=args.imbalance)]
    if args.ep != 1 and not spec.num_experts:
        spec.check_ep(tps[0], args.ep)
    estimates = [estimate(tp=tp, batch=b, interconnect=args.interconnect, price_per_gpu_hour=args.price,
                          engine=args.engine, **split, **kw) for tp in tps for split in splits for b in batches]
    print(f"MODELLED estimates, not measurements: {spec.name} on {hw.label}, {args.dtype} weights, {args.kv_dtype} KV "
          f"cache, {args.context - args.output} prompt + {args.output} output tokens per sequence")
    layer, step = engine_overheads_us(eff, args.engine)
    print(f"efficiencies (data/efficiency.json or --efficiency, fitted to published GPU measurements): memory "
          f"bandwidth {eff.memory_bandwidth:.3g}, GEMM peak {eff.compute:.3g} (fp8 {eff.compute_fp8:.3g}) reached "
          f"at n/(n+{eff.gemm_half_tokens:.0f}) for n tokens, link {eff.link:g}; {args.engine} engine: "
          f"{layer:.0f} us per layer + {step:.0f} us per step; {eff.memory_headroom_fraction:.0%} of memory kept free")
    _print_table([_row(e) for e in estimates], experts=bool(spec.num_experts))
    if spec.num_experts:
        print(f"experts: {spec.num_experts} per layer, {spec.experts_per_token} per token; TP: every expert split "
              f"over the tp GPUs (one all-reduce per layer); EP-ar / EP-a2a: E/ep whole experts per GPU, the tokens "
              f"replicated (one all-reduce) or dispatched (3 all-to-alls and an all-gather per layer); with whole "
              f"experts the busiest GPU sets the pace: {_imbalance_note(args)}")
    print(f"total = weights + KV + act+rt: the activations of one forward pass (up to {eff.prefill_chunk_tokens} "
          f"tokens) and {eff.runtime_overhead_gb:g} GB of runtime overhead per GPU (CUDA context, workspaces); "
          f"usable = memory less {eff.memory_headroom_fraction:.0%} headroom; link '-': tp=1 runs no collectives")
    for note in dict.fromkeys(n for e in estimates for n in e.notes):
        print(f"note: {note}")
    for b in batches:
        try:
            needed = f"tp={min_tp(batch=b, interconnect=args.interconnect, **kw)}"
        except ValueError as e:
            needed = f"none ({e})"
        print(f"minimum tp that fits batch {b}: {needed}")
    for tp in tps:
        print(f"largest batch that fits at tp={tp}: {max_batch(tp=tp, **kw)}")
    if args.price is not None:
        print(f"cost uses your price of {args.price:g} USD per GPU-hour, per million output tokens")
    print(f"all figures above are {MODELLED}")


def _imbalance_note(args: argparse.Namespace) -> str:
    if args.imbalance is not None:
        return f"it gets {args.imbalance:g} x the mean pairs (--imbalance)"
    return "its share of the pairs is the expectation under uniform routing (--imbalance to give a measured one)"


def run(args: argparse.Namespace) -> int:
    try:
        plan(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
