"""``python -m tplab generate``: text (or token ids) in, tokens out, from a checkpoint split over tp ranks.

    python -m tplab generate --model PATH --tp 4 --prompt "Once upon a time" --max-new-tokens 32
    python -m tplab generate --tp 2 --backend gloo --prompt-ids 1,5,9 --prompt-ids 1,7 --json
    python -m tplab generate --tp 2 --pp 2 --prompt "The with statement"   # 2 stages of 2 ranks
    python -m tplab generate --model tiny-moe --ep 2 --prompt "An object is"   # whole experts on 2 ranks
    torchrun --nproc-per-node 4 -m tplab generate --tp 4 --prompt "..."   # NCCL on GPUs; rank 0 prints

Repeat --prompt or --prompt-ids to make a batch. Everything that can be
checked is checked here, before any rank starts or any weight is read; a bad
argument prints one line and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from tplab.comm.launch import BACKENDS, check_device, launch, rank_device_type, under_torchrun
from tplab.commands import (
    add_expert_options,
    add_pipeline_options,
    count,
    int_list,
    resolve_pp,
    resolve_tps,
    runtime_dtype,
    threads_per_rank,
)
from tplab.engine.generate import check_prompts, generate_rank_program, micro_batch_rows
from tplab.engine.runner import compile_note, weight_copies
from tplab.errors import InputError
from tplab.layers.weights import SCHEMES, prepack_problem
from tplab.memory import check_fits, rank_processes_bytes
from tplab.model.loading import check_checkpoint, checkpoint_config, dtype_note, resolve_dtype
from tplab.model.routing import routing_summary, run_counts
from tplab.model.sampling import SamplingParams
from tplab.specs.model import ModelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
STAGE_FIELDS = ("stage", "comm", "pipeline_comm", "bubble", "weight_bytes")
COMPILE_MODES = {"default": "compiled", "max-autotune": "autotuned"}  # --compile VALUE: the runner's decode mode


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate from a Hugging Face checkpoint on N tensor-parallel ranks")
    p.add_argument("--model", default="tiny", help="checkpoint directory, or 'tiny' for the bundled model")
    p.add_argument("--tp", default=None, help="tensor-parallel degree (default 1, or --ep's); several (e.g. 1,2,4,8) "
                                              "run one after another and a last line says whether they gave "
                                              "identical tokens")
    p.add_argument("--backend", choices=BACKENDS, default="threads",
                   help="threads or gloo processes (ignored under torchrun)")
    p.add_argument("--device", default=None,
                   help="thread ranks: cpu (default) or cuda (every rank on one GPU: a check of the CUDA path, "
                        "not a speed-up); under torchrun each process takes its own GPU")
    p.add_argument("--prompt", action="append", default=[], help="prompt text; repeat for a batch")
    p.add_argument("--prompt-ids", action="append", default=[], help="prompt token ids, e.g. 1,5,9; repeat for a batch")
    p.add_argument("--max-new-tokens", type=count("--max-new-tokens"), default=32, help="tokens to generate per prompt (fewer at EOS)")
    p.add_argument("--threads", type=threads_per_rank, default=None,
                   help="torch threads per rank (default: the cores shared out among the ranks, at least 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set with this much probability")
    p.add_argument("--seed", type=int, default=0, help="sampling seed: the same tokens on every rank and tp")
    p.add_argument("--dtype", type=runtime_dtype, default="auto",
                   help="weights dtype: auto (the checkpoint's), float32/fp32, bfloat16/bf16 or float16/fp16")
    p.add_argument("--quant", choices=SCHEMES, default=None,
                   help="weight-only int8 or fp8 for the decoder's linears, each rank quantizing its own slices")
    p.add_argument("--quant-embeddings", action="store_true",
                   help="with --quant: the embedding and the LM head too (one scale per vocabulary row)")
    p.add_argument("--prepack", action="store_true",
                   help="CPU ranks: the linears in oneDNN's blocked layout (faster GEMMs; the same tokens)")
    p.add_argument("--compile", nargs="?", const="default", choices=tuple(COMPILE_MODES), default=None,
                   help="decode through torch.compile: fused kernels, the weights frozen in the CPU's packed layout, "
                        "the all-reduces kept in one graph (compiled in the warm-up; the same tokens); max-autotune "
                        "also benchmarks GEMM kernels per shape (slower to compile, faster steps)")
    add_pipeline_options(p)
    add_expert_options(p)
    p.add_argument("--micro-batches", type=count("--micro-batches"), default=None,
                   help="with --pp: the batch's rows cut into this many micro-batches that fill the stages (default: "
                        "one per stage, at most one per row)")
    p.add_argument("--json", action="store_true", help="print one JSON object per tp")
    p.set_defaults(run=run)


def load_tokenizer(path: Path):
    """The checkpoint's HF tokenizer, or None when it ships none."""
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))


def parse_ids(text: str) -> list[int]:
    try:
        return int_list("--prompt-ids", text)
    except ValueError as e:
        raise InputError(str(e)) from None


def prepare(args: argparse.Namespace) -> tuple[ModelConfig, torch.dtype, object, list[list[int]], SamplingParams]:
    """Every check that needs no rank: model, architecture, tp, dtype, tokenizer, prompts, sampling, memory.

    Reads config.json once; the ModelConfig, the dtype and the SamplingParams go to the ranks as they are.
    Sets ``args.tps`` (the parsed --tp list).
    """
    if args.quant_embeddings and not args.quant:
        raise InputError("--quant-embeddings goes with --quant int8 or --quant fp8")
    config = checkpoint_config(args.model)
    args.tps = resolve_tps(args, config)
    args.pp = resolve_pp(args, config.num_layers)
    parameters = check_checkpoint(config)
    if under_torchrun() and [tp * args.pp for tp in args.tps] != [int(os.environ["WORLD_SIZE"])]:
        raise InputError(f"--tp {args.tp} --pp {args.pp} but torchrun started {os.environ['WORLD_SIZE']} processes: "
                         "pass one tp with tp x pp = that many")
    check_device(args.backend, args.device)
    dtype = resolve_dtype(args.dtype, config, rank_device_type(args.device))
    if args.prepack and (problem := prepack_problem(dtype, rank_device_type(args.device))):
        raise InputError(problem)
    if args.compile and (args.pp > 1 or config.num_experts):
        raise InputError("--compile compiles one step of the whole model at fixed shapes: not with --pp stages, "
                         "nor for a mixture of experts (its routing changes the shapes every step)")
    if not args.prompt and not args.prompt_ids:
        raise InputError("give at least one --prompt TEXT or --prompt-ids 1,2,3")
    tokenizer = load_tokenizer(config.directory)
    if args.prompt and tokenizer is None:
        raise InputError(f"{config.directory} has no tokenizer, so --prompt TEXT cannot be encoded; "
                         "use --prompt-ids 1,2,3")
    prompts = [tokenizer(text)["input_ids"] for text in args.prompt] + [parse_ids(t) for t in args.prompt_ids]
    check_prompts(prompts, config.vocab_size, args.max_new_tokens, config.max_position_embeddings)
    if args.micro_batches is not None:
        micro_batch_rows(len(prompts), args.micro_batches)
    if not under_torchrun() and (args.device or "cpu").startswith("cpu"):
        for runs, tp in enumerate(args.tps, 1):
            check_host_memory(config, parameters, dtype, prompts, tp, args, runs)
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    if (note := dtype_note(args.dtype, config, dtype)) and prints():  # every check passed: one line, then the run
        print(note, file=sys.stderr)
    if args.compile and prints():
        device = torch.device(rank_device_type(args.device))
        print(f"note: {compile_note(dtype, device, args.compile == 'max-autotune')}", file=sys.stderr)
    return config, dtype, tokenizer, prompts, sampling


def _usage_error(e: BaseException) -> int:
    if prints():
        print(f"error: {e}", file=sys.stderr)
    return 2


def check_host_memory(config: ModelConfig, parameters: int, dtype, prompts: list[list[int]], tp: int,
                      args: argparse.Namespace, runs: int = 1) -> None:
    """Every rank is on this machine: the weights once, each rank's KV cache, the rank processes must fit. A
    compiled step holds a frozen copy of the weights until its runner is collected: thread ranks run in this
    process, where the ``runs``-th tp of a --tp list follows the others (:func:`weight_copies`)."""
    element, longest = dtype.itemsize, max(map(len, prompts))
    kv = tp * config.kv_bytes_per_token(tp, dtype) * len(prompts) * (longest + args.max_new_tokens)
    copies = weight_copies(bool(args.compile), runs if args.backend == "threads" else 1)
    check_fits(copies * parameters * element + kv + rank_processes_bytes(args.backend, tp * args.pp),
               f"generating {len(prompts)} prompt(s) of up to {longest} tokens + {args.max_new_tokens} "
               f"new at tp={tp}, pp={args.pp} (weights {parameters * element / 1e9:.2f} GB, KV cache {kv / 1e9:.2f} GB)",
               "use fewer or shorter prompts, a smaller --max-new-tokens, or a smaller model")


def prints() -> bool:
    """Whether this process reports: always, except on ranks other than 0 under torchrun."""
    return not under_torchrun() or os.environ["RANK"] == "0"


def run(args: argparse.Namespace) -> int:
    try:
        config, dtype, tokenizer, prompts, sampling = prepare(args)
    except (ValueError, FileNotFoundError) as e:
        return _usage_error(e)
    backend = "torchrun" if under_torchrun() else args.backend
    tokens_by_tp = {}
    for tp in args.tps:
        try:
            results = launch(generate_rank_program, tp, args.backend, device=args.device, threads=args.threads,
                             pp=args.pp, ep=args.ep,
                             kwargs=dict(model=config, prompts=prompts, max_new_tokens=args.max_new_tokens,
                                         sampling=sampling, dtype=dtype, warmup=True, quant=args.quant,
                                         quant_embeddings=args.quant_embeddings, prepack=args.prepack,
                                         pp_layers=args.pp_layers, micro_batches=args.micro_batches,
                                         expert_dispatch=args.ep_dispatch,
                                         decode_mode=COMPILE_MODES.get(args.compile, "eager")))
        except InputError as e:  # found inside a rank (e.g. a damaged checkpoint): still bad input, not a bug
            return _usage_error(e)
        if not prints():
            continue
        result = tokens_by_tp[tp] = results[0]
        stages = results[::tp]  # rank 0 of each stage
        texts = [tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens] if tokenizer else None
        routing = None
        if config.num_experts and backend != "torchrun":  # under torchrun rank 0 sees its own counts only
            routing = routing_summary(run_counts([r.step_expert_tokens for r in results], tp, args.ep), args.ep)
        if args.json:
            report = {**result.to_dict(), "prompt_tokens": [len(p) for p in prompts], "backend": backend,
                      "routing": routing, "ep_dispatch": args.ep_dispatch if config.num_experts else None}
            if args.pp > 1:
                report["stages"] = [{k: v for k, v in r.to_dict().items() if k in STAGE_FIELDS} for r in stages]
            print(json.dumps(report if texts is None else {**report, "text": texts}))
        else:
            _print_report(result, texts, prompts, tokenizer, backend, stages)
            if routing is not None:
                print(routing_line(routing, result.ep, args.ep_dispatch))
    if len(tokens_by_tp) < 2:
        return 0
    same = compare_tokens({tp: r.tokens for tp, r in tokens_by_tp.items()})
    if not args.json:
        print(same or f"identical tokens at tp {', '.join(map(str, tokens_by_tp))}: every row, every token")
        if backend != "torchrun":
            print(f"what this compares: the tokens. The times are one run per tp, every rank on this machine's "
                  f"{os.cpu_count()} cores (threads per rank: {', '.join(str(r.threads) for r in tokens_by_tp.values())}"
                  "): the ranks share those cores and their memory, and other work on the machine moves each run, so "
                  "a difference between tps here is not what tp buys. For speed, `python -m tplab bench` (repeats, spreads); for what tp "
                  "buys on GPUs, `python -m tplab plan` (modelled)")
    return 1 if same else 0


def compare_tokens(tokens_by_tp: dict[int, list[list[int]]]) -> str | None:
    """None when every tp gave the same tokens; otherwise a line naming the first tp and row that differ."""
    first, reference = next(iter(tokens_by_tp.items()))
    for tp, tokens in tokens_by_tp.items():
        for row, (want, got) in enumerate(zip(reference, tokens)):
            if want != got:
                at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
                return f"tokens DIFFER: tp={tp} row {row} departs from tp={first} at new token {at}"
    return None


def routing_line(routing: dict, ep: int, dispatch: str) -> str:
    """One line on a mixture's routing: the experts' placement, the pairs, and the imbalances."""
    per_rank = routing["experts"] // ep
    where = "every expert split over the tp ranks" if ep == 1 else \
        f"{per_rank} whole expert{'s' * (per_rank > 1)} per rank, tokens by {dispatch}"
    at_ep = ", ".join(f"{r}: {v:.2f}" for r, v in routing["rank_imbalance_at_ep"].items())
    return (f"experts: {routing['experts']} per layer, {where}; {routing['pairs']} (token, expert) pairs; imbalance "
            f"(max/mean per step and layer) over experts {routing['expert_imbalance']:.2f}, over ranks at ep {at_ep}")


def _comm_line(ops: dict) -> str:
    return ", ".join(f"{op} x{int(s['count'])} ({int(s['bytes'])} B)" for op, s in ops.items()) or "no collectives"


def _print_report(result, texts, prompts, tokenizer, backend, stages) -> None:
    for b, tokens in enumerate(result.tokens):
        print(f"--- tp={result.tp} row {b}: {len(prompts[b])} prompt tokens, {len(tokens)} new "
              f"({result.finish_reasons[b]}) ---")
        if tokenizer is not None:
            print(f"[prompt]    {tokenizer.decode(prompts[b], skip_special_tokens=True)}")
            print(f"[generated] {texts[b]}")
        else:
            print(f"[prompt]    {prompts[b]}")
            print(f"[generated] {tokens}")
    per_token = "n/a" if result.ms_per_token is None else f"{result.ms_per_token:.2f} ms/token"
    grid = f"tp={result.tp}" if result.pp == 1 else f"tp={result.tp} x pp={result.pp} ({result.micro_batches} micro-batch{'es' * (result.micro_batches > 1)})"
    print(f"{grid} ({backend}, {result.device}, {result.threads} thread(s) per rank; timed after a warm-up): "
          f"TTFT {1000 * result.ttft_s:.1f} ms, decode {per_token}; weights {result.weight_bytes / 1e6:.2f} MB per rank"
          f"{' of stage 0' if result.pp > 1 else ''}")
    for r in stages:
        if r.pp > 1:
            bubble = "" if r.bubble is None else f"; blocked on the other stages {100 * r.bubble:.0f}% of the decode time"
            print(f" stage {r.stage}: weights {r.weight_bytes / 1e6:.2f} MB per rank{bubble}")
        for phase, ops in r.comm.items():
            pipeline = f"; pipeline: {_comm_line(r.pipeline_comm[phase])}" if r.pp > 1 else ""
            experts = f"; experts: {_comm_line(r.expert_comm[phase])}" if r.expert_comm else ""
            print(f"  {phase}: {_comm_line(ops)}{pipeline}{experts}")
