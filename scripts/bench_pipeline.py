"""Pipeline stages on this CPU: the bubble against the fill-and-drain model, and TP against PP against TP x PP.

    .venv/bin/python scripts/bench_pipeline.py                    # the tiny model, batch 8, 24 new tokens
    .venv/bin/python scripts/bench_pipeline.py --backend gloo --repeats 5 --out /tmp/pipeline.jsonl

In one run, on the same prompts (8 rows of 16 tokens): tp 1 alone (the baseline), pp 2 with 1, 2 and 4
micro-batches, then tp 2, pp 2 and tp 2 x pp 2. Each point is the fastest of --repeats generations, one torch thread
per rank. It checks that every grid gave the baseline's tokens, prints each point's decode ms/token against the
baseline's and each stage's bubble against (p - 1)/(m + p - 1), and appends one record per point, with the
environment, to --out. Then the same four grids serve one load through the serving engine (32 requests of 16-64
prompt and 16-32 new tokens, all sent at once; one step in flight per stage): the best of --repeats by throughput,
against tp 1's, with each stage's share of the run spent waiting in its pipeline group. Ranks share this machine's
cores: with more ranks than cores (tp 2 x pp 2 on 2 cores) they take turns, which the figures include.
"""
from __future__ import annotations

import argparse

from tplab.bench.pipeline import measure_grid
from tplab.bench.script_runs import append_records, cpu_run_options, start_run
from tplab.bench.serving import serve_measured
from tplab.serving.load import synthetic_load
from tplab.serving.scheduler import SchedulerConfig
from tplab.specs.tiny import TINY_DIR
from tplab.testing import distinct_prompts

BUBBLE_POINTS = [(1, 2, m) for m in (1, 2, 4)]
SPLIT_POINTS = [(2, 1, None), (1, 2, None), (2, 2, None)]
SERVING_GRIDS = [(1, 1), (2, 1), (1, 2), (2, 2)]


def serve_best(load, config, tp: int, pp: int, backend: str, repeats: int) -> dict:
    """The run of the highest output tokens/s among ``repeats`` (one thread per rank)."""
    runs = [serve_measured(TINY_DIR, load, config, tp, backend, threads=1, pp=pp) for _ in range(repeats)]
    return max(runs, key=lambda r: r["summary"]["throughput_tok_s"])


def serving_points(args, env) -> list[dict]:
    """TP1, TP2, PP2 and TP2 x PP2 serving one load; the same tokens from each, or exit."""
    load = synthetic_load(32, None, (16, 64), (16, 32), 3072, seed=0, special_ids=frozenset({0, 1}))
    config = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=512, num_blocks=256, block_size=16)
    runs = {grid: serve_best(load, config, *grid, args.backend, args.repeats) for grid in SERVING_GRIDS}
    base = runs[1, 1]["summary"]
    outputs = [r["output_ids"] for r in runs[1, 1]["requests"]]
    print(f"serving {len(load)} requests at once, best of {args.repeats} by throughput; baseline tp 1: "
          f"{base['throughput_tok_s']:.0f} output tok/s")
    print(f"{'tp':>3} {'pp':>3} {'tok/s':>7} {'vs tp 1':>8} {'TPOT p50':>9} {'p95':>6}  stages waiting")
    rows = []
    for (tp, pp), run in runs.items():
        if [r["output_ids"] for r in run["requests"]] != outputs:
            raise SystemExit(f"serving at tp={tp} pp={pp} gave other tokens than tp 1")
        s = run["summary"]
        idle = "-" if pp == 1 else ", ".join(f"{x:.3f}" for x in run["stage_idle"])
        print(f"{tp:>3} {pp:>3} {s['throughput_tok_s']:>7.0f} {s['throughput_tok_s'] / base['throughput_tok_s']:>8.2f} "
              f"{s['tpot_ms']['p50']:>9.1f} {s['tpot_ms']['p95']:>6.1f}  {idle}")
        rows.append({"kind": "measured", "benchmark": "pipeline stages: serving one load with steps in flight",
                     "model": "tiny", "backend": args.backend, "repeats": args.repeats, "tp": tp, "pp": pp,
                     "torch_threads_per_rank": 1, "requests": len(load), "scheduler": config.__dict__,
                     "summary": s, "stage_idle": run["stage_idle"],
                     "baseline_tp1_throughput_tok_s": base["throughput_tok_s"],
                     "vs_baseline": s["throughput_tok_s"] / base["throughput_tok_s"], "env": env})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cpu_run_options(p, new_tokens=24, folder="pipeline")
    args = p.parse_args()
    env, out = start_run(args.out, "pipeline")
    prompts = distinct_prompts(300, [16] * 8, seed=1)
    base = measure_grid("tiny", prompts, args.new_tokens, backend=args.backend, repeats=args.repeats)
    rows = []
    print(f"tiny model, batch {len(prompts)}, {args.new_tokens} new tokens, {args.backend}, best of {args.repeats}; "
          f"baseline tp 1: {base.decode_ms_per_token:.2f} ms/token")
    print(f"{'tp':>3} {'pp':>3} {'m':>3} {'ms/token':>9} {'vs tp 1':>8} {'tok/s':>7}  bubble per stage (model)")
    for tp, pp, m in BUBBLE_POINTS + SPLIT_POINTS:
        run = measure_grid("tiny", prompts, args.new_tokens, tp, pp, m, args.backend, args.repeats)
        if run.tokens != base.tokens:
            raise SystemExit(f"tp={tp} pp={pp} micro-batches={run.micro_batches} gave other tokens than tp 1")
        bubble = "-" if run.bubble is None else (", ".join(f"{b:.3f}" for b in run.bubble) +
                                                 f" (model {run.model_bubble:.3f})")
        print(f"{tp:>3} {pp:>3} {run.micro_batches:>3} {run.decode_ms_per_token:>9.2f} "
              f"{run.decode_ms_per_token / base.decode_ms_per_token:>8.2f} {run.decode_tok_s:>7.0f}  {bubble}")
        rows.append({"kind": "measured", "benchmark": "pipeline stages: bubble and TP against PP",
                     "model": "tiny", "backend": args.backend, "repeats": args.repeats, "new_tokens": args.new_tokens,
                     "prompt_lens": [len(q) for q in prompts], "torch_threads_per_rank": 1, **run.to_dict(),
                     "baseline_tp1_decode_ms_per_token": base.decode_ms_per_token,
                     "vs_baseline": run.decode_ms_per_token / base.decode_ms_per_token, "env": env})
    rows += serving_points(args, env)
    append_records(rows, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
