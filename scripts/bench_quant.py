"""Decode ms/token of the quantized model (int8, fp8) against the unquantized one, measured in one run on this CPU.

    .venv/bin/python scripts/bench_quant.py                 # tiny in bf16, tp 1 and 2, batch 1 and 8
    .venv/bin/python scripts/bench_quant.py --repeats 5 --out /tmp/quant.jsonl

Every setting runs the three weight formats interleaved (none, int8, fp8, none, int8, ...), each a warmed-up
generate of the same prompts on thread ranks, and reports the median decode ms/token and its ratio to the
unquantized median of the same setting. On a CPU, fp8 (and int8 with fp32 activations) dequantizes its weights on
the fly; int8 with bf16 activations runs torch's int8 weight-only kernel. A GPU's kernels are a different matter. Appends one JSON line per
setting and format, with the environment, to --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import uuid

from tplab import launch
from tplab.bench.env import environment
from tplab.engine.generate import generate_rank_program
from tplab.lab.tp_experiment import corpus_prompts
from tplab.paths import default_measurements_dir

FORMATS = (None, "int8", "fp8")
KERNEL_PATH = {None: "unquantized", "int8": "torch's int8 weight-only kernel with bf16 activations",
               "fp8": "weights dequantized on the fly"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--tp", default="1,2")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(default_measurements_dir() / "quantized" / "decode.jsonl"))
    args = p.parse_args()
    env, run_id = environment("cpu"), uuid.uuid4().hex[:8]
    print(f"measured on {env['cpu']} ({env['cpu_cores']} cores), torch {env['torch']}, tiny in {args.dtype}")
    print(f"{'tp':>3} {'batch':>5} {'format':>6} {'decode ms/token':>16} {'vs none':>8}")
    lines = []
    for tp in map(int, args.tp.split(",")):
        for batch in map(int, args.batch.split(",")):
            prompts = corpus_prompts(batch, 16)
            times = {f: [] for f in FORMATS}
            for _ in range(args.repeats):
                for f in FORMATS:
                    result = launch(generate_rank_program, tp, "threads", kwargs=dict(
                        model="tiny", prompts=prompts, max_new_tokens=args.new_tokens, dtype=args.dtype,
                        eos_token_ids=(), warmup=True, quant=f))[0]
                    times[f].append(result.ms_per_token)
            base = statistics.median(times[None])
            for f in FORMATS:
                median = statistics.median(times[f])
                print(f"{tp:>3} {batch:>5} {f or 'none':>6} {median:>16.2f} {median / base:>7.2f}x")
                path = KERNEL_PATH[f] if not (f == "int8" and args.dtype not in ("bf16", "bfloat16")) else \
                    KERNEL_PATH["fp8"]
                lines.append({"kind": "measured", "run": run_id, "benchmark": f"quantized decode ({path})", "model": "tiny", "dtype": args.dtype, "quant": f, "tp": tp, "batch": batch,
                              "new_tokens": args.new_tokens, "repeats": args.repeats,
                              "decode_ms_per_token": {"median": median, "all": times[f]},
                              "ratio_to_unquantized": median / base, "env": env})
    with open(args.out, "a") as out:
        out.writelines(json.dumps(line) + "\n" for line in lines)
    print(f"appended {len(lines)} records to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
