"""``python -m tplab bench``: measure (or emulate) decode latency, TTFT and throughput, and calibrate the cost model.

Real ranks on a CPU (threads or gloo), a small model::

    python -m tplab bench --model tiny --tp 1,2,4 --batch 1,8 --prompt-len 32,128

Real ranks on GPUs, NCCL under torchrun (one tp per command: tp = processes)::

    torchrun --nproc-per-node 8 -m tplab bench --model llama-3-70b --tp 8 --batch 1,8,32,64 --prompt-len 128,2048

One GPU emulating rank 0 of each tp (real shapes, random weights, collectives
modelled by the α-β model over --gpu's --interconnect)::

    python -m tplab bench --emulate-rank --model llama-3-70b --tp 2,4,8 --batch 1,8,32,64 --prompt-len 128,2048

Calibrate the cost model's efficiencies from GPU measurements (writes a file
that ``python -m tplab plan --efficiency FILE`` and ``tplab.perf.estimate(...,
efficiency=FILE)`` load)::

    python -m tplab bench --calibrate data/measurements/FILE.jsonl --gpu h100-sxm --efficiency-out eff-h100.json

Size a sweep before running it (allocates nothing; times modelled for --gpu)::

    python -m tplab bench --emulate-rank --model llama-3-70b --gpu h200 --layers 20 --tp 2,4,8 --dry-run

Records are appended to --out (data/measurements/local/ in a checkout, ignored by git, else the current directory) as JSON lines; the table
printed says for every row whether it was measured or emulated.

The GPU paths (CUDA-graph decode, NCCL under torchrun, CUDA-event roofline)
were written without a GPU to run them on: tests/test_gpu.py checks them on
any GPU (run it first), but no GPU has run it yet. CPU runs (threads, gloo,
torchrun with gloo, emulation) are tested.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tplab.bench.calibration import calibrate, write_efficiency
from tplab.bench.records import load_records
from tplab.comm.launch import BACKENDS, under_torchrun
from tplab.commands import add_expert_options, count, int_list, threads_per_rank, torch_dtype_name
from tplab.engine.runner import DECODE_MODES
from tplab.layers.weights import SCHEMES
from tplab.paths import local_records_dir
from tplab.specs import cpu

COLUMNS = [("kind", 8), ("tp", 3), ("batch", 5), ("prompt", 6), ("TTFT ms", 10), ("decode ms/tok", 13),
           ("p10-p90", 15), ("comm %", 6), ("tok/s", 8), ("mem GB", 7), ("BW % copy", 9), ("vs HF", 6)]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="measure decode ms/token, TTFT and throughput per tp (real ranks, or one emulated rank)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny', a checkpoint directory, a config.json, or a shipped "
                                                   "config name such as llama-3-70b (random weights)")
    p.add_argument("--tp", default=None, help="comma-separated TP degrees (default 1, or --ep's)")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    p.add_argument("--prompt-len", default="128", help="comma-separated prompt lengths in tokens (default 128)")
    p.add_argument("--decode-steps", type=count("--decode-steps"), default=16, help="decode steps per request (default 16)")
    p.add_argument("--repeats", type=count("--repeats"), default=5, help="timed requests per point (default 5)")
    p.add_argument("--warmup", type=count("--warmup", low=0), default=1, help="untimed requests first (default 1)")
    p.add_argument("--quant", choices=SCHEMES, default=None,
                   help="weight-only int8 or fp8 for the decoder's linears (the HF baseline stays unquantized)")
    p.add_argument("--dtype", type=torch_dtype_name, default=None,
                   help="weights and KV cache: bfloat16/bf16, float16/fp16 or float32/fp32 (default: bfloat16, or "
                        "float32 on a CPU without native bf16 matmul, said in one line)")
    p.add_argument("--emulate-rank", action="store_true",
                   help="time rank 0 alone on one device with real shapes; collectives modelled (alpha-beta)")
    p.add_argument("--layers", type=count("--layers"), default=None,
                   help="build only the first N decoder layers; results are also extrapolated to all layers")
    p.add_argument("--backend", choices=BACKENDS, default="threads", help="real CPU ranks: threads or gloo processes")
    p.add_argument("--threads", type=threads_per_rank, default=None,
                   help="torch intra-op threads per rank (CPU); 1 gives steadier timings on a shared machine")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when a GPU is visible)")
    p.add_argument("--decode", choices=DECODE_MODES, default=None,
                   help="eager, static (fixed shapes), compiled (torch.compile of the static step), autotuned (the "
                        "same, GEMM kernels autotuned per shape) or graph (CUDA graph); default graph on GPU, eager "
                        "on CPU")
    p.add_argument("--gpu", default="h100-sxm", help="emulation / calibration: the GPU spec whose link models the "
                                                     "collectives, or that the calibration is for (default h100-sxm)")
    p.add_argument("--interconnect", default=None, help="emulation: nvlink, pcie, or a network (default: the fastest)")
    p.add_argument("--efficiency", default=None, help="emulation: JSON file overriding data/efficiency.json")
    p.add_argument("--no-baseline", action="store_true", help="skip the Hugging Face eager baseline")
    p.add_argument("--quick-roofline", action="store_true",
                   help="measure the copy and matmul roofs on small buffers (fast, but lower roofs)")
    p.add_argument("--out", default=None,
                   help="folder for a new run file, or a .jsonl file to append to (default: data/measurements/local in a "
                        "checkout of tplab, else the current directory)")
    p.add_argument("--no-save", action="store_true", help="print only; write no record")
    add_expert_options(p)
    p.add_argument("--pp", type=count("--pp"), default=1,
                   help="with --dry-run: pipeline stages of tp GPUs each, sized (stage 0's memory) and modelled")
    p.add_argument("--dry-run", action="store_true",
                   help="allocate and measure nothing: print each point's memory on rank 0 and the sweep's modelled "
                        "duration on --gpu, to size a sweep before running it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the records as JSON lines instead of a table")
    p.add_argument("--calibrate", nargs="+", default=None, metavar="FILE",
                   help="instead of measuring: fit the cost model's efficiencies to these measurement files")
    p.add_argument("--efficiency-out", default=None, help="with --calibrate: the JSON file to write (required)")
    p.add_argument("--force", action="store_true", help="with --calibrate: replace an existing --efficiency-out file")
    p.set_defaults(run=run)


def spec_from_args(args: argparse.Namespace):
    """The :class:`tplab.bench.sweep.BenchSpec` the flags describe (checked later by tplab.bench.plan)."""
    from tplab.bench.sweep import BenchSpec  # imports transformers: only when benchmarking

    dtype, args.dtype_note = (args.dtype, None) if args.dtype else \
        ("bfloat16", None) if args.dry_run else default_dtype(args.device)  # a dry run models a GPU
    tps = int_list("--tp", args.tp or str(args.ep))
    return BenchSpec(model=args.model, tps=tps, batches=int_list("--batch", args.batch),
                     prompt_lens=int_list("--prompt-len", args.prompt_len), decode_steps=args.decode_steps,
                     repeats=args.repeats, warmup=args.warmup, dtype=dtype, quant=args.quant, emulate=args.emulate_rank,
                     layers=args.layers, backend=args.backend, device=args.device, decode_mode=args.decode,
                     gpu=args.gpu, interconnect=args.interconnect, efficiency=args.efficiency,
                     baseline=not args.no_baseline, threads=args.threads, quick_roofline=args.quick_roofline,
                     pp=args.pp, ep=args.ep, expert_dispatch=args.ep_dispatch)


def default_dtype(device: str | None) -> tuple[str, str | None]:
    """(bfloat16, None), or float32 and the line that says why on a CPU whose bf16 matmul is emulated."""
    from tplab.bench.plan import default_device  # imports transformers: only when benchmarking

    if default_device(device).type == "cpu" and not cpu.native_bf16():
        return "float32", (f"note: this CPU has no native bf16 matmul ({cpu.describe()}): benchmarked in float32; "
                           "pass --dtype bfloat16 to insist")
    return "bfloat16", None


def _row(r: dict) -> list[str]:
    s = r["setting"]
    ttft, decode = r["ttft_ms"], r["decode_ms_per_token"]
    share = "-" if r["decode_comm_share"] is None else f"{100 * r['decode_comm_share']:.0f}"
    memory = (r["memory"]["cuda_peak_bytes"] or r["memory"]["weights_bytes"] + r["memory"]["kv_cache_bytes"]) / 1e9
    vs_hf = "-" if r["baseline"] is None else f"{r['baseline']['decode_speed_vs_hf']:.2f}"
    return [r["kind"], str(s["tp"]), str(s["batch"]), str(s["prompt_len"]), f"{ttft['median']:.1f}",
            f"{decode['median']:.2f}", f"{decode['p10']:.2f}-{decode['p90']:.2f}", share,
            f"{r['throughput_tok_s']:.0f}", f"{memory:.2f}",
            _percent(r["roofline"]["decode_fraction_of_copy"]), vs_hf]


def _percent(fraction: float | None) -> str:
    """A fraction of a roof as a percentage; "cache" where the step beat the roof (no memory bound applies)."""
    return "cache" if fraction is None else f"{100 * fraction:.0f}"


GPU_NOTE = ("note: tplab's GPU paths (CUDA graphs, NCCL, CUDA-event timing) were written without a GPU to test "
            "them on: run `python -m pytest tests/test_gpu.py` on this machine, sanity-check these numbers (e.g. "
            "against --decode eager) and report what looks wrong")


def print_table(records: list[dict]) -> None:
    """The measured (or emulated) points, then the extrapolations to all layers where fewer were built."""
    first = records[0]
    print(first["label"])
    if first["env"]["device"]["type"] == "cuda":
        print(GPU_NOTE)
    print(f"model {first['model']['name']} ({first['model']['weights']} weights), {first['model']['layers_built']} of "
          f"{first['model']['layers_full']} layers built, {first['setting']['dtype']}"
          f"{' with ' + first['setting']['quant'] + ' linears' if first['setting'].get('quant') else ''}, "
          f"{first['setting']['decode_steps']} decode steps, median of {first['setting']['repeats']} repeats")
    print("  ".join(f"{name:>{width}}" for name, width in COLUMNS))
    for r in records:
        print("  ".join(f"{cell:>{width}}" for cell, (_, width) in zip(_row(r), COLUMNS)))
    print("mem GB: weights + KV cache allocated on rank 0 (CUDA: max_memory_allocated); BW % copy: the decode step's "
          "bytes / its compute time, against this device's measured copy bandwidth; vs HF: HF eager time / tplab "
          "time over the same shapes (> 1: tplab faster)")
    for r in records:
        if r.get("routing"):
            x, at_ep = r["routing"], ", ".join(f"{e}: {v:.2f}" for e, v in r["routing"]["rank_imbalance_at_ep"].items())
            print(f"routing at tp={r['setting']['tp']} batch={r['setting']['batch']}: {x['pairs']} (token, expert) "
                  f"pairs in the point's timed passes, per layer max/mean over experts {x['expert_imbalance']:.2f}, "
                  f"over ranks holding whole experts at ep {at_ep}")
    scaled = [r for r in records if r["scaled"]]
    if scaled:
        print(f"EXTRAPOLATED to all {scaled[0]['scaled']['layers']} layers (not measured: {scaled[0]['scaled']['note']}):")
        for r in scaled:
            x, s = r["scaled"], r["setting"]
            print(f"  tp={s['tp']} batch={s['batch']} prompt={s['prompt_len']}: TTFT {x['ttft_ms']:.0f} ms, decode "
                  f"{x['decode_ms_per_token']:.1f} ms/token ({100 * x['decode_comm_share']:.0f}% collectives), "
                  f"{x['throughput_tok_s']:.0f} tok/s, weights {x['weights_bytes'] / 1e9:.1f} GB/rank")


def _calibrate(args: argparse.Namespace) -> int:
    if not args.efficiency_out:
        raise ValueError("--calibrate needs --efficiency-out FILE, the efficiency JSON to write")
    records = load_records(*args.calibrate)
    result = calibrate(records, args.gpu)
    write_efficiency(result, args.efficiency_out, force=args.force)
    for key, entry in result.items():
        if isinstance(entry, dict):
            print(f"{key} = {entry['value']:.3g}  ({entry['provenance']})")
    print(f"wrote {args.efficiency_out}: load it with `python -m tplab plan --efficiency {args.efficiency_out}`")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        if args.calibrate:
            return _calibrate(args)
        if args.dry_run:
            from tplab.bench.preview import preview, print_preview

            spec = spec_from_args(args)
            print_preview(spec, preview(spec))
            return 0
        from tplab.bench.sweep import run_bench

        out = None if args.no_save else Path(args.out) if args.out else local_records_dir()
        records = run_bench(spec_from_args(args), out=out,
                            progress=False if args.quiet else None)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if under_torchrun() and int(os.environ["RANK"]) != 0:
        return 0
    if args.dtype_note:
        print(args.dtype_note, file=sys.stderr)
    if args.json:
        for r in records:
            print(json.dumps(r))
    elif records:
        print_table(records)
    return 0
