"""What each compiled decode shape keeps: resident memory after the compiled step of each of several shapes.

    python scripts/measure_compiled_memory.py --shapes 4 [--mode compiled] [--out FILE]

A random Llama (hidden 1024, 4 layers, float32, about 245 MB of weights) is saved as a checkpoint in a temporary
folder and loaded on one rank; one ModelRunner then decodes a step at batch 1, 2, ..., each a new shape compiled
from its own code, the last shape's step freed first. The record holds the weight bytes and the RSS after each
shape, so the growth per shape reads against the weights (torch alone keeps a frozen copy per graph until the
process ends). Recorded under data/measurements/compiled/ with this machine's environment.
"""
from __future__ import annotations

import argparse
import gc
import resource
import tempfile
from pathlib import Path

import torch

from tplab.bench.env import environment, hardware_slug
from tplab.bench.script_runs import append_records
from tplab.comm.group import Dist
from tplab.engine.runner import COMPILED_MODES, ModelRunner
from tplab.model.loading import from_pretrained
from tplab.paths import default_measurements_dir
from tplab.testing import make_checkpoint

SHAPE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=4, head_dim=64)


def rss_bytes() -> int:
    """This process's resident memory now (Linux: /proc/self/statm's second field, in pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", type=int, default=4, help="how many batch sizes (1..N) to compile, one after another")
    p.add_argument("--mode", choices=COMPILED_MODES, default="compiled")
    p.add_argument("--out", default=None, help="JSON-lines file to append to (default: data/measurements/compiled/)")
    args = p.parse_args()
    env = environment("cpu")
    with tempfile.TemporaryDirectory() as folder:
        path, hf = make_checkpoint("llama", folder, **SHAPE)
        del hf
        model = from_pretrained(path, Dist(0, 1, torch.device("cpu"), transport=None), dtype="float32")
    gc.collect()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = [{"shapes_compiled": 0, "rss_bytes": rss_bytes()}]
    runner = ModelRunner(model, args.mode)
    for batch in range(1, args.shapes + 1):
        runner.start(batch, 32)
        runner.prefill(torch.randint(3, 100, (batch, 4)))
        runner.decode(torch.randint(3, 100, (batch, 1)), 4)
        gc.collect()
        rows.append({"shapes_compiled": batch, "rss_bytes": rss_bytes()})
        print(f"{batch} shape(s) compiled: RSS {rows[-1]['rss_bytes'] / 1e6:.0f} MB "
              f"(+{(rows[-1]['rss_bytes'] - rows[-2]['rss_bytes']) / 1e6:.0f} MB; weights {weights / 1e6:.0f} MB)")
    record = {"schema": "tplab.compiled_memory/1", "kind": "measured", "env": env, "mode": args.mode,
              "model": {"type": "llama", "dtype": "float32", **SHAPE}, "weight_bytes": weights, "rss": rows}
    out = Path(args.out) if args.out else (default_measurements_dir() / "compiled" /
                                           f"{env['date'][:10]}_{hardware_slug(env)}_compiled-memory.jsonl")
    append_records([record], out)


if __name__ == "__main__":
    main()
