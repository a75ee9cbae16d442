"""``python -m tplab quality``: a quantized model against the unquantized one, on golden prompts and held-out text.

    python -m tplab quality --model tiny --quant int8 --tp 2
    python -m tplab quality --model tiny --quant fp8 --tp 4 --prompts prompts.txt --json

The golden prompts are the first ``--prompt-len`` tokens of each held-out
topic of the tiny model's corpus (or one prompt per line of ``--prompts``); the
perplexity and KL are measured on that held-out text (``--model tiny``) in
windows of the model's context. Bad input exits 2 with one line.
"""
from __future__ import annotations

import argparse
import json
import sys

from tplab.comm.launch import BACKENDS, launch
from tplab.commands import add_expert_options, count, resolve_tp
from tplab.commands.generate import load_tokenizer
from tplab.engine.quality import quality_rank_program, token_windows
from tplab.errors import InputError
from tplab.files import read_user_text
from tplab.layers.weights import SCHEMES
from tplab.model.loading import checkpoint_config
from tplab.specs.tiny import corpus_dir, validation_texts


def register(subparsers) -> None:
    p = subparsers.add_parser("quality", help="a quantized model's tokens, perplexity and KL against the unquantized one")
    p.add_argument("--model", default="tiny", help="checkpoint directory, or 'tiny' for the bundled model")
    p.add_argument("--quant", required=True, choices=SCHEMES, help="weight-only quantization of the decoder's linears")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (default 1, or --ep's)")
    p.add_argument("--backend", choices=BACKENDS, default="threads", help="threads or gloo processes")
    p.add_argument("--prompts", default=None, help="a text file, one golden prompt per line (default: the held-out "
                                                   "topics of the tiny model's corpus)")
    p.add_argument("--prompt-len", type=int, default=16, help="tokens of each corpus prompt")
    p.add_argument("--max-new-tokens", type=count("--max-new-tokens"), default=24, help="greedy tokens per prompt")
    p.add_argument("--windows", type=int, default=12, help="held-out windows of the model's context to score")
    add_expert_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run)


def _inputs(args: argparse.Namespace):
    config = checkpoint_config(args.model)
    args.tp = resolve_tp(config, args.tp, args)
    tokenizer = load_tokenizer(config.directory)
    if tokenizer is None:
        raise ValueError(f"{config.directory} has no tokenizer: quality needs text prompts")
    corpus = corpus_dir(config.directory)
    texts = [] if corpus is None else validation_texts(corpus)
    if args.prompts:
        lines = [line for line in read_user_text(args.prompts, "--prompts").splitlines() if line.strip()]
        if not lines:
            raise ValueError(f"{args.prompts} holds no prompt: write one per line")
        prompts = [tokenizer(line).input_ids for line in lines]
    elif texts:
        prompts = [tokenizer(t, verbose=False).input_ids[:args.prompt_len] for t in texts]
    else:
        raise ValueError(f"{config.directory} ships no held-out corpus: pass --prompts FILE")
    longest = max(map(len, prompts)) + args.max_new_tokens
    if longest > config.max_position_embeddings:
        raise ValueError(f"a prompt of {longest - args.max_new_tokens} tokens plus --max-new-tokens "
                         f"{args.max_new_tokens} exceeds the context of {config.max_position_embeddings}")
    held_out = [t for text in texts for t in tokenizer(text, verbose=False).input_ids]
    windows = token_windows(held_out, config.max_position_embeddings)[:args.windows]
    if not windows:
        raise ValueError(f"{config.directory} ships no held-out text to score perplexity on")
    return config, prompts, windows


def run(args: argparse.Namespace) -> int:
    try:
        if (args.tp is not None and args.tp < 1) or args.windows < 1 or args.prompt_len < 1 or args.max_new_tokens < 1:
            raise ValueError("--tp, --windows, --prompt-len and --max-new-tokens must be positive integers")
        config, prompts, windows = _inputs(args)
        ranks = launch(quality_rank_program, args.tp, args.backend, ep=args.ep,
                       kwargs=dict(model=config, quant=args.quant, prompts=prompts, max_new_tokens=args.max_new_tokens,
                                   windows=windows, expert_dispatch=args.ep_dispatch))
    except (ValueError, FileNotFoundError, InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = {k: v for k, v in ranks[0].items() if not k.startswith("tokens")}
    report["weight_bytes_per_rank"] = [r["weight_bytes"] for r in ranks]
    report["weight_bytes_reference_per_rank"] = [r["weight_bytes_reference"] for r in ranks]
    for key in ("weight_bytes", "weight_bytes_reference"):
        del report[key]
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{args.quant} against the unquantized model, tp={args.tp} ({args.backend}), {report['prompts']} golden "
          f"prompts of {args.max_new_tokens} greedy tokens, {report['positions']} held-out positions:")
    print(f"  token agreement {report['token_agreement']:.2f} (identical continuations), mean first divergence at "
          f"token {report['mean_first_divergence']:.1f} of {args.max_new_tokens}")
    print(f"  perplexity {report['perplexity']:.3f} against {report['perplexity_reference']:.3f} "
          f"({report['perplexity'] / report['perplexity_reference'] - 1:+.2%}); mean KL {report['kl_mean']:.2e} nats")
    print(f"  weights per rank: {[round(b / 1e6, 2) for b in report['weight_bytes_per_rank']]} MB against "
          f"{[round(b / 1e6, 2) for b in report['weight_bytes_reference_per_rank']]} MB unquantized")
    return 0
