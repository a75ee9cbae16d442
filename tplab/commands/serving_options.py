"""The options ``serve-bench`` and ``simulate`` share: the load, the scheduler, the SLO, and the report.

Checked before any rank starts or any weight is read: a rate <= 0, a block size
that is not a positive power of two, a request longer than the model's
context, or more requests in a file than ``--num-requests`` each exit 2 with one line.
"""
from __future__ import annotations

import argparse
import json
import math
from functools import partial

from tplab.commands import checked, count, positive
from tplab.serving.blocks import check_block_size
from tplab.serving.load import bounded, parse_range, read_requests, synthetic_load
from tplab.serving.metrics import METRICS, PERCENTILES, SLO
from tplab.serving.requests import Request
from tplab.serving.scheduler import POLICIES, SchedulerConfig, check_serving


def _percentile_list(text: str) -> tuple[float, ...]:
    """An argparse type: "50,90,95,99" -> (50.0, 90.0, 95.0, 99.0), each in (0, 100]."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(0 < q <= 100 for q in values):  # NaN too
        raise argparse.ArgumentTypeError(f"--percentiles takes numbers in (0, 100], e.g. 50,90,95,99; got {text!r}")
    return values


def _check_rate(rate: float) -> None:
    if not rate > 0:  # NaN too
        raise ValueError(f"--rate must be > 0 requests/s (inf: all at once), got {rate}")


ENGINE_SCHEDULER = {"max_num_seqs": 8, "max_batched_tokens": 256,
                    "num_blocks": "--max-num-seqs sequences of the full context"}  # tplab's engine on CPU ranks


def add_serving_options(p: argparse.ArgumentParser, scheduler: dict = ENGINE_SCHEDULER) -> None:
    """The shared options; ``scheduler``: the defaults of --max-num-seqs and --max-batched-tokens (None: chosen
    by the command) and what --num-blocks defaults to, in words."""
    load = p.add_argument_group("load")
    load.add_argument("--rate", type=checked("--rate", float, _check_rate), default=math.inf,
                      help="Poisson arrivals at this many requests/s; inf: all at once (default)")
    load.add_argument("--num-requests", type=count("--num-requests", 1_000_000, "a longer run, not a bigger load: split it"), default=None,
                      help="requests to generate (default 64); with --requests, the most the file may hold")
    load.add_argument("--prompt-len", default="16:128", help="prompt tokens: N, or LOW:HIGH drawn uniformly")
    load.add_argument("--output-len", default="8:48", help="max new tokens per request: N, or LOW:HIGH")
    load.add_argument("--prefix-share", type=float, default=0.0,
                      help="the first fraction of every prompt comes from one shared prefix (0 to <1)")
    load.add_argument("--requests", default=None, metavar="FILE",
                      help="replay JSON lines {prompt_ids (or prompt), max_new_tokens, arrival_s (optional)}")
    load.add_argument("--duration", type=positive("--duration"), default=None, help="drop requests arriving after this many seconds")
    load.add_argument("--seed", type=int, default=0, help="seed of the load (arrivals, lengths, prompt ids)")
    load.add_argument("--concurrency", type=count("--concurrency", 100_000, "more than any engine keeps in flight"),
                      default=None, help="closed loop: at most N requests in flight, the next sent as one finishes "
                                         "(times count from sending); default: open loop, sent at arrival")
    sched = p.add_argument_group("scheduler")
    sched.add_argument("--max-num-seqs", type=count("--max-num-seqs"), default=scheduler["max_num_seqs"],
                       help="admission control: sequences running at once")
    sched.add_argument("--max-batched-tokens", type=count("--max-batched-tokens"), default=scheduler["max_batched_tokens"],
                       help="token budget of one step")
    sched.add_argument("--block-size", type=checked("--block-size", int, partial(check_block_size, "--block-size")), default=16, help="tokens per KV block (a power of two)")
    sched.add_argument("--num-blocks", type=count("--num-blocks"), default=None,
                       help=f"KV blocks per rank (default: {scheduler['num_blocks']})")
    sched.add_argument("--policy", choices=POLICIES, default="continuous",
                       help="continuous batching, or static batches (a new batch when the last has finished)")
    sched.add_argument("--no-prefix-cache", action="store_true", help="compute every prompt in full")
    sched.add_argument("--no-chunked-prefill", action="store_true", help="prefill each prompt whole in one step")
    slo = p.add_argument_group("service-level objective (goodput counts the requests meeting every bound given)")
    slo.add_argument("--slo-ttft-ms", type=positive("--slo-ttft-ms"), default=None, help="time to first token, ms")
    slo.add_argument("--slo-tpot-ms", type=positive("--slo-tpot-ms"), default=None, help="time per output token, ms")
    slo.add_argument("--percentiles", type=_percentile_list,
                     default=PERCENTILES, help="the percentiles to report, e.g. 50,95,99.9")
    p.add_argument("--json", action="store_true", help="print one JSON object: requests (in input order) and summary")


def build_load(args: argparse.Namespace, vocab_size: int, context: int, special_ids: frozenset[int],
               tokenize=None, compiled_attention: bool = False) -> list[Request]:
    """The requests of ``args``; ValueError (exit 2) for a bad flag (``compiled_attention``: ``--compile`` was
    given) or a request longer than ``context``."""
    rate = None if math.isinf(args.rate) else args.rate
    check_serving(args.policy, args.concurrency, args.pp or 1, compiled_attention)
    if args.requests:
        requests = bounded(read_requests(args.requests, rate, args.seed, tokenize, args.num_requests), args.duration)
    else:
        prompt_len, output_len = parse_range("--prompt-len", args.prompt_len), parse_range("--output-len", args.output_len)
        if prompt_len[1] + output_len[1] > context:  # refused before a single prompt is drawn
            raise ValueError(f"--prompt-len up to {prompt_len[1]} plus --output-len up to {output_len[1]} is "
                             f"{prompt_len[1] + output_len[1]} positions, more than the model's context of {context}")
        requests = synthetic_load(args.num_requests or 64, rate, prompt_len, output_len, vocab_size, args.seed,
                                  args.prefix_share, args.duration, special_ids)
    for r in requests:
        bad = [t for t in r.prompt if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"request {r.id} has token ids outside [0, {vocab_size}): {bad[:5]}")
        if r.max_tokens > context:
            raise ValueError(f"request {r.id}: prompt {len(r.prompt)} + max_new_tokens {r.max_new_tokens} = "
                             f"{r.max_tokens} positions, more than the model's context of {context}")
    if not requests:
        raise ValueError("no request arrives within --duration")
    return requests


def scheduler_config(args: argparse.Namespace, context: int, requests: list[Request],
                     num_blocks: int | None = None) -> SchedulerConfig:
    """The scheduler of ``args``: --num-blocks, else ``num_blocks``, else max_num_seqs full contexts; a ValueError
    when the blocks cannot hold the longest of ``requests`` (every run would reject it)."""
    size = args.block_size
    if args.num_blocks is not None:
        num_blocks = args.num_blocks
    blocks = num_blocks or args.max_num_seqs * -(-context // size)
    longest = max(r.max_tokens for r in requests)
    if blocks * size < longest:
        raise ValueError(f"{blocks} KV blocks of {size} tokens hold {blocks * size} positions; the longest request "
                         f"needs {longest}: give --num-blocks {-(-longest // size)} or more")
    return SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_batched_tokens,
                           num_blocks=blocks, block_size=size, max_model_len=context,
                           prefix_caching=not args.no_prefix_cache, chunked_prefill=not args.no_chunked_prefill,
                           policy=args.policy)


def slo_of(args: argparse.Namespace) -> SLO:
    return SLO(args.slo_ttft_ms, args.slo_tpot_ms, args.percentiles)


def _fmt(value, unit: str = "", digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def print_report(run: dict, label: str) -> None:
    """The summary as a few lines, each figure labelled ``label`` (measured or modelled)."""
    s = run["summary"]
    print(f"[{label}] {s['completed']} of {s['requests']} requests served ({s['rejected']} rejected) in "
          f"{s['duration_s']:.2f} s, {s['steps']} steps")
    goodput = ("n/a (no SLO: give --slo-ttft-ms and/or --slo-tpot-ms)" if s["goodput_req_s"] is None else
               f"{s['goodput_req_s']:.2f} req/s ({100 * s['slo_met_fraction']:.0f}% within the SLO)")
    print(f"  throughput {_fmt(s['throughput_tok_s'])} output tok/s, {_fmt(s['throughput_req_s'], digits=2)} req/s; "
          f"goodput {goodput}")
    print(f"  concurrency: {_fmt(s['concurrency_mean'])} requests in flight on average"
          + ("" if run.get("concurrency") is None else f" (closed loop of {run['concurrency']})"))
    for metric in (*METRICS, "itl_ms"):
        print(f"  {metric.removesuffix('_ms'):8s} " + "  ".join(f"{q} {_fmt(v, ' ms'):>11s}" for q, v in s[metric].items()))
    if run.get("scheduler_s") is not None and s["duration_s"]:
        print(f"  scheduler: {1000 * run['scheduler_s']:.1f} ms planning and updating, "
              f"{100 * run['scheduler_s'] / s['duration_s']:.1f}% of the run")
    hit = "n/a" if s["prefix_hit_rate"] is None else f"{100 * s['prefix_hit_rate']:.1f}%"
    print(f"  preemptions {s['preemptions']}, prefix-cache hit rate {hit}, KV blocks used: mean "
          f"{100 * (s['kv_utilization_mean'] or 0):.0f}%, max {100 * (s['kv_utilization_max'] or 0):.0f}%")
    for row in run["requests"]:
        if str(row["finish_reason"]).startswith("rejected"):
            print(f"  request {row['id']} {row['finish_reason']}")


def print_json(run: dict, **extra) -> None:
    print(json.dumps({"requests": run["requests"], "summary": run["summary"], **extra}))
