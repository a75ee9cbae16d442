"""``python -m tplab demo``: a Megatron MLP on 1, 2 and 4 ranks, threads and gloo, checked against dense."""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

from tplab.comm.launch import BACKENDS, launch, under_torchrun
from tplab.commands import int_list
from tplab.lab.layer_programs import megatron_mlp_forward
from tplab.specs.sharding import check_divisible

HIDDEN, FFN = 64, 256


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="column-then-row MLP on several TP degrees, checked against the dense MLP")
    p.add_argument("--tp", default="1,2,4", help="comma-separated TP degrees (default 1,2,4)")
    p.add_argument("--backend", default="threads,gloo", help="comma-separated backends (default threads,gloo)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        tps, backends = int_list("--tp", args.tp), args.backend.split(",")
        for tp in tps:
            check_divisible("ffn", FFN, tp)
        unknown = sorted(set(backends) - set(BACKENDS))
        if unknown:
            raise ValueError(f"--backend {','.join(unknown)}: choose from {','.join(BACKENDS)}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    say = print if not under_torchrun() or os.environ["RANK"] == "0" else (lambda *a, **k: None)
    torch.manual_seed(0)
    hidden, ffn = HIDDEN, FFN
    up, down = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)
    x = torch.randn(3, 5, hidden)
    with torch.no_grad():
        dense = down(torch.nn.functional.gelu(up(x)))
    say(f"Megatron MLP Y = GELU(X A) B, X {tuple(x.shape)}, A {hidden}x{ffn} column-parallel, B {ffn}x{hidden} row-parallel")
    say(f"{'backend':8} {'tp':>3} {'A shard/rank':>13} {'all-reduces':>11} {'bytes':>7} {'max |Y_tp - Y_dense|':>21}")
    for backend in backends:
        for tp in tps:
            with torch.no_grad():
                out = launch(megatron_mlp_forward, tp, backend, args=(up, down, x))
            err = max((o["y"] - dense).abs().max().item() for o in out)
            ar = out[0]["comm"].get("all_reduce", {"count": 0, "bytes": 0})
            label = "torchrun" if under_torchrun() else backend
            say(f"{label:8} {tp:>3} {str(out[0]['local_up_weight']):>13} {ar['count']:>11} {ar['bytes']:>7} {err:>21.2e}")
            if err > 1e-5:
                print(f"error: tp={tp} on {backend} differs from the dense MLP by {err}", file=sys.stderr)
                return 1
    return 0
