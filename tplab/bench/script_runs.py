"""What the CPU measurement scripts share (``scripts/bench_pipeline.py``, ``scripts/bench_experts.py``): their options
(backend, repeats, new tokens, where to record) and appending their records, each with its environment, to one
JSON-lines file per day and machine under ``data/measurements/<folder>/``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tplab.bench.env import environment, hardware_slug
from tplab.paths import default_measurements_dir


def cpu_run_options(p: argparse.ArgumentParser, new_tokens: int, folder: str) -> None:
    """--backend (threads or gloo), --repeats, --new-tokens and --out (default: data/measurements/``folder``/)."""
    p.add_argument("--backend", choices=("threads", "gloo"), default="threads")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=new_tokens)
    p.add_argument("--out", default=None, help=f"JSON-lines file to append to (default: data/measurements/{folder}/)")


def start_run(out: str | None, folder: str) -> tuple[dict, Path]:
    """(this machine's environment, the file the run's records go to: ``out``, or the day's and machine's file
    under data/measurements/``folder``/)."""
    env = environment("cpu")
    path = Path(out) if out else (default_measurements_dir() / folder /
                                  f"{env['date'][:10]}_{hardware_slug(env)}_{folder}.jsonl")
    return env, path


def append_records(rows: list[dict], out: Path) -> None:
    """Append ``rows`` to ``out`` as JSON lines (the folder made if need be) and say where."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"recorded {len(rows)} points in {out}")
