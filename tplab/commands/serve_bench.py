"""``python -m tplab serve-bench``: a serving engine under load on tp (x pp) real ranks, measured.

    python -m tplab serve-bench --model tiny --tp 2 --backend threads --rate 4 --num-requests 64 \\
        --prompt-len 16:128 --output-len 8:48 --max-num-seqs 8 --max-batched-tokens 256 --block-size 16
    torchrun --nproc-per-node 2 -m tplab serve-bench --tp 2 ...   # NCCL on GPUs; rank 0 reports

Requests arrive by a Poisson process (or all at once, or from a file); the
engine batches them continuously (:mod:`tplab.serving.engine`); with ``--pp`` it runs pipeline stages of tp
ranks each and keeps one step in flight per stage. It prints TTFT,
TPOT, latency and queueing percentiles, throughput and goodput, and appends
the run to data/measurements/local/serving/ in a checkout, ignored by git (``--out``; ``--no-save`` writes nothing).
"""
from __future__ import annotations

import argparse
import sys

from tplab.bench.records import check_record_target
from tplab.bench.serving import serve_measured, serving_record, write_serving_record
from tplab.comm.launch import BACKENDS, rank_device_type, under_torchrun
from tplab.commands import (
    add_expert_options,
    add_pipeline_options,
    count,
    resolve_pp,
    resolve_tp,
    runtime_dtype,
    threads_per_rank,
)
from tplab.commands import serving_options as serving
from tplab.commands.generate import load_tokenizer, prints
from tplab.errors import InputError
from tplab.layers.weights import prepack_problem
from tplab.memory import check_fits, rank_processes_bytes
from tplab.model.loading import check_checkpoint, checkpoint_config, dtype_note, resolve_dtype
from tplab.paths import local_records_dir


def register(subparsers) -> None:
    p = subparsers.add_parser("serve-bench", help="a continuous-batching engine under load on N ranks, measured")
    p.add_argument("--model", default="tiny", help="checkpoint directory, or 'tiny' for the bundled model")
    p.add_argument("--tp", type=count("--tp"), default=None, help="tensor-parallel degree (default 1, or --ep's)")
    add_pipeline_options(p)
    add_expert_options(p)
    p.add_argument("--backend", choices=BACKENDS, default="threads", help="threads or gloo processes")
    p.add_argument("--dtype", type=runtime_dtype, default="auto", help="weights dtype: auto (the checkpoint's), ...")
    p.add_argument("--threads", type=threads_per_rank, default=None, help="torch threads per rank (default: cores shared out)")
    p.add_argument("--prepack", action="store_true",
                   help="CPU ranks: the linears in oneDNN's blocked layout (faster GEMMs; the same tokens)")
    p.add_argument("--compile", action="store_true",
                   help="the decodes' attention through a compiled paged-attention kernel that reads the keys in "
                        "their blocks (torch.compile, seconds to compile before the run; the same tokens)")
    p.add_argument("--out", default=None, help="folder (a run file goes to FOLDER/serving/) or .jsonl file to "
                                               "append to (default: data/measurements/local in a checkout, ignored by git)")
    p.add_argument("--no-save", action="store_true", help="print only; write no record")
    serving.add_serving_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        config = checkpoint_config(args.model)
        args.tp = resolve_tp(config, args.tp, args)
        args.pp = resolve_pp(args, config.num_layers)
        parameters = check_checkpoint(config)
        dtype = resolve_dtype(args.dtype, config, rank_device_type(None))
        if args.prepack and (problem := prepack_problem(dtype, rank_device_type(None))):
            raise InputError(problem)
        context = config.max_position_embeddings
        tokenizer = load_tokenizer(config.directory)
        tokenize = (lambda text: tokenizer(text)["input_ids"]) if tokenizer is not None else None
        requests = serving.build_load(args, config.vocab_size, context, frozenset(config.eos_token_ids) | {0}, tokenize,
                                      args.compile)
        sched = serving.scheduler_config(args, context, requests)
        ranks = args.tp * args.pp
        kv = args.tp * sched.num_blocks * sched.block_size * config.kv_bytes_per_token(args.tp, dtype)
        check_fits(parameters * dtype.itemsize + kv + rank_processes_bytes(args.backend, ranks),
                   f"serving at tp={args.tp}, pp={args.pp} with {sched.num_blocks} KV blocks per rank",
                   "use fewer --num-blocks or a smaller model")
        out = None if args.no_save else check_record_target(args.out or local_records_dir())
        backend = "torchrun" if under_torchrun() else args.backend
        if (note := dtype_note(args.dtype, config, dtype)) and prints():  # every check passed: one line, then the run
            print(note, file=sys.stderr)
        run_ = {**serve_measured(config, requests, sched, args.tp, args.backend, dtype, serving.slo_of(args), args.threads,
                                 concurrency=args.concurrency, pp=args.pp, pp_layers=args.pp_layers, ep=args.ep,
                                 expert_dispatch=args.ep_dispatch, prepack=args.prepack,
                                 compiled_attention=args.compile),
                "backend": backend, "concurrency": args.concurrency}
    except (ValueError, FileNotFoundError) as e:  # InputError too, found inside a rank (a damaged file)
        if prints():
            print(f"error: {e}", file=sys.stderr)
        return 2
    if not prints():  # under torchrun, rank 0 reports
        return 0
    where = None
    if out is not None:
        load = {k: getattr(args, k) for k in ("rate", "num_requests", "prompt_len", "output_len", "prefix_share",
                                               "requests", "duration", "seed", "concurrency")}
        where = write_serving_record(serving_record(run_, str(args.model), sched, load, str(dtype)), out)
    if args.json:
        serving.print_json(run_, tp=args.tp, pp=args.pp, backend=backend, record=str(where) if where else None,
                           pipeline_comm=run_["pipeline_comm"], scheduler_s=run_.get("scheduler_s"))
        return 0
    grid = f"tp={args.tp}" if args.pp == 1 else f"tp={args.tp} x pp={args.pp} ({ranks})"
    grid += f", ep={args.ep} ({args.ep_dispatch})" if args.ep > 1 else ""
    serving.print_report(run_, f"MEASURED: {grid} real ranks ({backend}), {run_['threads']} thread(s) each")
    if where:
        print(f"recorded in {where}")
    return 0
