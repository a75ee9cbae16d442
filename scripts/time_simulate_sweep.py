"""How long a 70B serving sweep takes the simulator: a closed-loop concurrency sweep, timed and recorded.

    .venv/bin/python scripts/time_simulate_sweep.py               # 40 points: concurrency 1..40
    .venv/bin/python scripts/time_simulate_sweep.py --points 10 --out /tmp/sweep.jsonl

Each point is one ``python -m tplab simulate`` run (in this process, output discarded) of Llama 3.1 70B at tp 4 on
H100s: 100 requests of 20,000-token prompts and 128-512 new tokens, with ``--concurrency`` c, vLLM's default
scheduler for the GPU. The simulator's figures are modelled; what this script measures is the simulator's own wall
time on this CPU, recorded (with the environment) in --out.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from pathlib import Path

from tplab.bench.env import environment
from tplab.cli import main as tplab
from tplab.paths import default_measurements_dir

ARGS = ["simulate", "--model", "llama-3.1-70b", "--gpu", "h100-sxm", "--tp", "4", "--num-requests", "100",
        "--prompt-len", "20000", "--output-len", "128:512", "--json"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=int, default=40)
    p.add_argument("--out", default=str(default_measurements_dir() / "tooling" / "simulate_sweep.jsonl"))
    args = p.parse_args()
    env = environment("cpu")
    seconds = []
    for concurrency in range(1, args.points + 1):
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            if tplab([*ARGS, "--concurrency", str(concurrency)]) != 0:
                raise SystemExit(f"simulate failed at concurrency {concurrency}")
        seconds.append(time.perf_counter() - start)
    total = sum(seconds)
    print(f"{args.points} points of `python -m tplab {' '.join(ARGS)} --concurrency 1..{args.points}`: "
          f"{total:.1f} s on {env['cpu']} ({env['cpu_cores']} cores), slowest point {max(seconds):.2f} s")
    record = {"kind": "measured", "benchmark": "simulator wall time of a closed-loop concurrency sweep",
              "command": " ".join(ARGS), "points": args.points, "total_s": total, "point_s": seconds, "env": env}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"recorded in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
