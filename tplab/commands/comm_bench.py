"""``python -m tplab comm-bench``: measured all-reduce time and bus bandwidth per message size,
with the α-β model fitted to those measurements.

    python -m tplab comm-bench --tp 2                       # gloo processes on this machine
    torchrun --nproc-per-node 8 -m tplab comm-bench --tp 8  # the torchrun group (NCCL on GPUs)
"""
from __future__ import annotations

import argparse
import os
import sys

from tplab.bench.comm import fit_alpha_beta, measure_all_reduce
from tplab.comm.launch import BACKENDS, under_torchrun
from tplab.commands import count, int_list
from tplab.memory import check_fits, rank_processes_bytes
from tplab.perf.comm import bus_bandwidth, ring_all_reduce_seconds

BUFFERS_PER_RANK = 3  # the message, the collective's result, and the threads backend's copy of every rank's input

DEFAULT_SIZES = ",".join(str(4 ** k) for k in range(1, 13))  # 4 B .. 16 MiB


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "comm-bench", help="measure all-reduce latency and bus bandwidth over message sizes; fit the α-β model",
        description="Times Dist.all_reduce of float32 buffers (a barrier before each call, median of the repeats, "
                    "slowest rank per size). Times and bandwidths are measured; the model column is the ring "
                    "formula T = 2(n-1)(α + S/(nβ)) fitted to these measurements.")
    p.add_argument("--tp", type=int, default=2, help="ranks (default 2; under torchrun: the number of processes)")
    p.add_argument("--backend", default="gloo", choices=BACKENDS, help="default gloo; ignored under torchrun")
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated bytes per rank, multiples of 4 "
                                                          "(default 4 B to 16 MiB in steps of 4x)")
    p.add_argument("--warmup", type=count("--warmup", low=0), default=3, help="untimed calls per size (default 3)")
    p.add_argument("--repeats", type=count("--repeats"), default=10, help="timed calls per size (default 10)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        sizes = int_list("--sizes", args.sizes)
        if not under_torchrun():  # every rank is on this machine
            check_fits(BUFFERS_PER_RANK * args.tp * max(sizes) + rank_processes_bytes(args.backend, args.tp),
                       f"an all-reduce of {max(sizes)} B on {args.tp} {args.backend} ranks",
                       "use smaller --sizes or a smaller --tp")
        seconds = measure_all_reduce(sizes, args.tp, args.backend, args.warmup, args.repeats)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if under_torchrun() and os.environ["RANK"] != "0":
        return 0
    n = args.tp
    fit, why_no_fit = None, "it needs tp >= 2 and at least two sizes"
    if n > 1 and len(set(sizes)) > 1:
        try:
            fit = fit_alpha_beta(sizes, seconds, n)
        except ValueError as e:  # the measurements stand; only the model of them is impossible
            why_no_fit = str(e)
    where = "torchrun" if under_torchrun() else args.backend
    print(f"all-reduce on {n} ranks ({where}), measured: median of {args.repeats}, slowest rank")
    print(f"{'bytes/rank':>11} {'time (µs)':>11} {'algbw (GB/s)':>13} {'busbw (GB/s)':>13} {'fitted model (µs)':>18}")
    for size, t in zip(sizes, seconds):
        model = f"{ring_all_reduce_seconds(size, n, *fit) * 1e6:>18.1f}" if fit else f"{'-':>18}"
        print(f"{size:>11} {t * 1e6:>11.1f} {size / t / 1e9:>13.4f} {bus_bandwidth(size, t, n) / 1e9:>13.4f} {model}")
    if fit:
        print(f"fitted to these measurements: α = {fit[0] * 1e6:.1f} µs, β = {fit[1] / 1e9:.3f} GB/s "
              "(effective values of the ring formula, not a hardware spec)")
    else:
        print(f"no α-β fit: {why_no_fit}")
    return 0
