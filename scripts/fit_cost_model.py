"""Fit the cost model to published GPU measurements and report how well it predicts the ones it never saw.

    .venv/bin/python scripts/fit_cost_model.py                      # report only
    .venv/bin/python scripts/fit_cost_model.py --write --force      # and replace data/efficiency.json

Reads data/published/figures.jsonl, fits the parameters of tplab.bench.fit.FITTED (least squares on the log
error), and prints three tables of |predicted / published - 1| (median and max): the fit on its own figures,
leave-one-source-and-model-out cross-validation per metric and per GPU, and the held-out 70B figures of
data/published/held_out_70b.jsonl, which no fit ever sees. Every figure it prints is modelled.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tplab.bench.fit import FITTED, cross_validate, error_table, fit
from tplab.bench.published import FIGURES_FILE, HELD_OUT_FILE, load_figures, predict, source_key
from tplab.files import check_writable, write_new_file
from tplab.specs.efficiency import EFFICIENCY_FILE, load_efficiency

WHAT = {
    "memory_bandwidth": "the memory-bound decode steps",
    "compute": "the BF16/FP16 prefills",
    "compute_fp8": "the FP8 prefills",
    "gemm_half_tokens": "prefills of 128 to 16,384 tokens",
    "layer_overhead_us": "the decode steps of every model (a time per layer)",
    "step_overhead_us": "the decode steps timed inside the engine",
    "served_step_overhead_us": "the inter-token latencies timed at an HTTP client",
    "served_request_overhead_us": "the TTFTs timed at an HTTP client",
    "sequence_overhead_us": "the decode steps at batch 8 to 64",
    "collective_base_us": "the decode steps at tp 2 to 8 over NVLink",
}


def print_table(title: str, table: dict) -> None:
    print(title)
    for key, e in table.items():
        print(f"  {' / '.join(map(str, key)):40s} n={e['n']:3d}  median {100 * e['median']:5.1f}%  max {100 * e['max']:5.1f}%")


def efficiency_json(fitted, figures: list[dict], cv: dict) -> str:
    data = json.loads(EFFICIENCY_FILE.read_text())
    sources = sorted({f["source"]["title"].split(",")[0] for f in figures})
    cv_text = "; ".join(f"{k[0]} {100 * v['median']:.1f}% (max {100 * v['max']:.0f}%)" for k, v in cv.items())
    for name in FITTED:
        data[name] = {"value": round(getattr(fitted, name), 6),
                      "provenance": f"fitted by scripts/fit_cost_model.py (tplab.bench.fit: least squares on the log "
                                    f"error) to the {len(figures)} published figures of data/published/figures.jsonl "
                                    f"({'; '.join(sources)}); set mostly by {WHAT[name]}. Leave-one-source-and-model-out "
                                    f"error, median: {cv_text}. Llama-2/3-70B figures never enter the fit."}
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write", action="store_true", help="write the fitted values with their provenance to --out")
    p.add_argument("--out", default=str(EFFICIENCY_FILE), help="where --write writes")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args()
    if args.write:
        try:
            check_writable(args.out)
            if Path(args.out).exists() and not args.force:
                raise ValueError(f"{args.out} exists; pass --force to replace it, or choose another file")
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    figures, held = load_figures(FIGURES_FILE), load_figures(HELD_OUT_FILE)
    base = load_efficiency()
    fitted = fit(figures, base)
    print(f"[modelled] fitted to {len(figures)} figures in {len({source_key(f) for f in figures})} source/model groups:")
    for name in FITTED:
        print(f"  {name:28s} {getattr(fitted, name):10.4g}")
    print_table("fit, on its own figures:", error_table([(f, predict(f, fitted)) for f in figures]))
    pairs = cross_validate(figures, base)
    cv = error_table(pairs)
    print_table("cross-validated (each source/model group predicted by a fit without it), per metric:", cv)
    print_table("cross-validated, per metric and GPU:", error_table(pairs, ("metric", "gpu")))
    print_table("held-out Llama-2/3-70B figures (never fitted), per metric and engine:",
                error_table([(f, predict(f, fitted)) for f in held], ("metric", "engine")))
    if args.write:
        try:
            write_new_file(args.out, efficiency_json(fitted, figures, cv), force=args.force, validate=load_efficiency)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
