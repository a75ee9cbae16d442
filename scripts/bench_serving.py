"""Continuous against static batching at the same load, and the simulator against the engine, in one run.

    python scripts/bench_serving.py                      # tp 2 thread ranks, the tiny model
    python scripts/bench_serving.py --tp 1 --rounds 3 --out /tmp/serving.jsonl

1. Throughput: the same requests (all arriving at once, so the offered load is
   above every policy's capacity and tokens/s is that capacity) served by
   continuous batching, by static batches of the scheduler (a new batch when
   the last is done, no padding) and by static batches through the generation
   loop (left-padded, every row until the longest is done: what a server
   built on ``generate()`` does). Rounds interleave the policies; the median
   of each is compared. Two workloads: outputs of 8-48 tokens, and 8-128.
2. The simulator: fit the step cost t = a + b·tokens + c·rows + d·attended to
   one calibration run's measured steps, then serve Poisson loads at several
   rates on the engine and replay each in the simulator with that cost; the
   relative error of p50 and p95 of TTFT, TPOT and latency, and their median.

Every run is appended to one JSON-lines file (default a new file in
data/measurements/serving/), with a last line holding the ratios and the agreement.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import uuid
from pathlib import Path

from tplab.bench.env import environment, hardware_slug
from tplab.bench.records import RecordLog, run_file_name
from tplab.bench.serving import serve_measured, serving_record, simulator_agreement
from tplab.paths import default_measurements_dir
from tplab.serving.load import synthetic_load
from tplab.serving.scheduler import SchedulerConfig
from tplab.serving.step_cost import fit_step_cost
from tplab.specs.model import resolve_model
from tplab.specs.tiny import TINY_DIR

POLICIES = ("padded", "static", "continuous")
WORKLOADS = {"outputs 8-48": (16, 128, 8, 48), "outputs 8-128": (16, 128, 8, 128)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--backend", default="threads", choices=("threads", "gloo"))
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the three policies")
    p.add_argument("--rates", default="2,4,8,16", help="Poisson rates (requests/s) the simulator is checked at")
    p.add_argument("--out", default=None, help="a .jsonl file to append to (default: a new file in "
                                               "data/measurements/serving/)")
    args = p.parse_args()
    model = resolve_model("tiny")
    special = frozenset(model.eos_token_ids) | {0}
    config = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=256, block_size=16,
                             num_blocks=args.max_num_seqs * 16, max_model_len=model.max_position_embeddings)
    env = environment("cpu")
    busy = env["load_average"] and env["load_average"][0] > 0.5 * (os.cpu_count() or 1)
    if busy:
        print(f"the machine is busy (load average {env['load_average']}); time it when it is idle", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else default_measurements_dir() / "serving" / run_file_name(
        env, "serving-bench", uuid.uuid4().hex[:8], hardware_slug(env))
    log = RecordLog(out)

    def measured(requests, policy_config, role, **extra):
        run = serve_measured(TINY_DIR, requests, policy_config, args.tp, args.backend)
        load = {"num_requests": len(requests), **extra}
        log.append({**serving_record(run, "tiny", policy_config, load, "torch.float32"), "role": role})
        return run

    ratios = {}
    for name, (p_lo, p_hi, o_lo, o_hi) in WORKLOADS.items():
        requests = synthetic_load(args.num_requests, None, (p_lo, p_hi), (o_lo, o_hi), model.vocab_size, seed=0,
                                  special_ids=special)
        tok_s = {policy: [] for policy in POLICIES}
        for _ in range(args.rounds):
            for policy in POLICIES:
                run = measured(requests, SchedulerConfig(**{**config.__dict__, "policy": policy}), "throughput",
                               workload=name, rate=None)
                tok_s[policy].append(run["summary"]["throughput_tok_s"])
        median = {policy: statistics.median(v) for policy, v in tok_s.items()}
        ratios[name] = {"tok_s": median, "continuous_over_padded": median["continuous"] / median["padded"],
                        "continuous_over_static": median["continuous"] / median["static"]}
        print(f"[MEASURED: tp={args.tp} {args.backend}, tiny model, {args.num_requests} requests at once, prompts "
              f"{p_lo}-{p_hi}, {name}, max_num_seqs {args.max_num_seqs}] output tok/s (median of {args.rounds}): "
              + ", ".join(f"{k} {v:.0f}" for k, v in median.items())
              + f"; continuous / padded static = {ratios[name]['continuous_over_padded']:.2f}x, "
                f"continuous / static = {ratios[name]['continuous_over_static']:.2f}x")

    calibration = measured(synthetic_load(args.num_requests, None, (16, 128), (8, 48), model.vocab_size, seed=100,
                                          special_ids=special), config, "calibration", rate=None)
    cost = fit_step_cost(calibration["steps"])
    print(f"step cost fitted to {len(calibration['steps'])} measured steps: {cost}")
    agreement = {}
    for rate in [float(r) for r in args.rates.split(",")]:
        requests = synthetic_load(args.num_requests, rate, (16, 128), (8, 48), model.vocab_size, seed=int(rate),
                                  special_ids=special)
        run = measured(requests, config, "simulator check", rate=rate)
        agreement[rate] = simulator_agreement(run, requests, config, cost)
        errors = agreement[rate]["errors"]
        print(f"rate {rate:g} req/s: median error {100 * agreement[rate]['median_error']:.1f}%, max "
              f"{100 * agreement[rate]['max_error']:.1f}% (" + ", ".join(f"{k} {100 * v:.0f}%" for k, v in
                                                                       errors.items()) + ")")
    every = [e for a in agreement.values() for e in a["errors"].values()]
    overall = statistics.median(every)
    print(f"simulator against engine: median relative error {100 * overall:.1f}% over {len(every)} percentiles "
          f"(p50 and p95 of TTFT, TPOT, latency at {len(agreement)} rates), max {100 * max(every):.1f}%")
    log.append({"schema": "tplab.serving-bench/1", "kind": "measured", "env": env, "tp": args.tp,
                "backend": args.backend, "num_requests": args.num_requests, "max_num_seqs": args.max_num_seqs,
                "rounds": args.rounds, "throughput": ratios, "step_cost": agreement[next(iter(agreement))]["cost"],
                "agreement": {str(k): v for k, v in agreement.items()}, "median_error": overall,
                "max_error": max(every)})
    print(f"recorded in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
