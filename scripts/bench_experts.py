"""The experts of tiny-moe on this CPU: TP of the experts against EP, the bytes and time of their collectives, and
the trained router's imbalance.

    .venv/bin/python scripts/bench_experts.py                    # threads, batch 8, 16 new tokens
    .venv/bin/python scripts/bench_experts.py --backend gloo --repeats 5 --out /tmp/experts.jsonl

In one run, on the same prompts (8 rows of 24 tokens from the corpus' held-out text): tp 1 (the baseline), then at
2 and 4 ranks every expert split over them (ep 1), whole experts with the tokens replicated (all-reduce) and
dispatched (all-to-all). Each point is the fastest of --repeats generations, one torch thread per rank. It checks
that every split gave the baseline's tokens, prints each point's decode ms/token against the baseline's, what one
MoE layer's collectives carried and took per decode step on rank 0 (against the payload formula of
tplab.perf.experts), and the routing's imbalance, and appends one record per point, with the environment, to --out.
Ranks share this machine's cores: with more ranks than cores they take turns, which the figures include.
"""
from __future__ import annotations

import argparse

from transformers import AutoTokenizer

from tplab.bench.experts import measure_split
from tplab.bench.script_runs import append_records, cpu_run_options, start_run
from tplab.perf.experts import layer_payload
from tplab.specs.model import resolve_model
from tplab.specs.tiny import TINY_DIR, TINY_MOE_DIR, validation_texts

SPLITS = [(2, 1, "all-reduce"), (2, 2, "all-reduce"), (2, 2, "all-to-all"),
          (4, 1, "all-reduce"), (4, 4, "all-reduce"), (4, 4, "all-to-all")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cpu_run_options(p, new_tokens=16, folder="experts")
    args = p.parse_args()
    env, out = start_run(args.out, "experts")
    tokenizer = AutoTokenizer.from_pretrained(TINY_MOE_DIR)
    prompts = [tokenizer(text[:400])["input_ids"][:24] for text in validation_texts(TINY_DIR)[:8]]
    config = resolve_model("tiny-moe")
    base = measure_split("tiny-moe", prompts, args.new_tokens, backend=args.backend, repeats=args.repeats)
    r = base.routing
    print(f"tiny-moe ({config.num_experts} experts, {config.experts_per_token} per token), batch {len(prompts)}, "
          f"{args.new_tokens} new tokens, {args.backend}, best of {args.repeats}; baseline tp 1: "
          f"{base.decode_ms_per_token:.2f} ms/token")
    print(f"routing: {r['pairs']} pairs, per expert {r['tokens_per_expert']}; imbalance per step and layer: over "
          f"experts {r['expert_imbalance']:.2f}, over ranks " +
          ", ".join(f"at ep {e}: {v:.2f}" for e, v in r["rank_imbalance_at_ep"].items()))
    print(f"{'tp':>3} {'ep':>3} {'dispatch':>10} {'ms/token':>9} {'vs tp 1':>8} {'MoE B/layer':>12} "
          f"{'(formula)':>10} {'MoE us/layer':>13}")
    rows = []
    for tp, ep, dispatch in [(1, 1, "all-reduce")] + SPLITS:
        run = base if tp == 1 else measure_split("tiny-moe", prompts, args.new_tokens, tp, ep, dispatch,
                                                 args.backend, args.repeats)
        if run.tokens != base.tokens:
            raise SystemExit(f"tp={tp} ep={ep} {dispatch} gave other tokens than tp 1")
        formula = sum(layer_payload(len(prompts), config.hidden_size, config.experts_per_token, tp, dispatch,
                                    4).values())
        print(f"{tp:>3} {ep:>3} {dispatch:>10} {run.decode_ms_per_token:>9.2f} "
              f"{run.decode_ms_per_token / base.decode_ms_per_token:>8.2f} {run.moe_bytes_per_layer:>12.0f} "
              f"{formula:>10.0f} {1e6 * run.moe_seconds_per_layer:>13.0f}")
        rows.append({"kind": "measured", "benchmark": "experts: TP of experts against EP", "model": "tiny-moe",
                     "backend": args.backend, "repeats": args.repeats, "new_tokens": args.new_tokens,
                     "prompt_lens": [len(q) for q in prompts], "torch_threads_per_rank": 1, **run.to_dict(),
                     "payload_formula_bytes_per_layer": formula,
                     "baseline_tp1_decode_ms_per_token": base.decode_ms_per_token,
                     "vs_baseline": run.decode_ms_per_token / base.decode_ms_per_token, "env": env})
    append_records(rows, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
