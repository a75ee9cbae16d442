"""Benchmark: one decode step of grouped-query attention on a Llama-3-70B rank, two ways.

* ``copied``: K and V repeated G = H/KV times along the head axis (``repeat_interleave``),
  then one SDPA call. This is what tplab did before, and what HF's eager/SDPA Llama does
  (``repeat_kv``): every step writes G copies of the rank's whole cache for this layer.
* ``stacked``: ``tplab.model.attention.grouped_query_attention``: the G query heads of a KV head
  stacked along the query axis, K and V read in place.

Both run in the same process on the same tensors; the script prints stacked's speed-up
(copied time / stacked time) per shape and checks the outputs agree. Shapes per rank at
tp: 64/tp query heads, max(1, 8/tp) KV heads, head_dim 128, one new token against a
cache of --context tokens. Each run appends its records to
data/measurements/attention/<date>_<hardware>_gqa-attention.jsonl (--no-save: print only).

    python scripts/bench_gqa_attention.py --tp 2,4,8 --batch 1,8,32 --context 2048
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tplab.bench.env import environment, hardware_slug
from tplab.bench.timing import synchronize
from tplab.commands import int_list
from tplab.model.attention import attention_mask, grouped_query_attention
from tplab.paths import DATA_DIR

HEADS, KV_HEADS, HEAD_DIM = 64, 8, 128  # Llama-3-70B


def copied_kv_attention(q, keys, values, mask, scale):
    groups = q.shape[1] // keys.shape[1]
    return F.scaled_dot_product_attention(q, keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1),
                                          attn_mask=mask, scale=scale)


def median_ms(fn, repeats: int, device: torch.device) -> tuple[float, list[float]]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times), times


def measure(tp: int, batch: int, context: int, dtype: torch.dtype, device: torch.device, repeats: int) -> dict:
    heads, kv_heads = HEADS // tp, max(1, KV_HEADS // tp)
    gen = torch.Generator(device=device).manual_seed(tp * 1000 + batch)
    q = torch.randn(batch, heads, 1, HEAD_DIM, generator=gen, device=device, dtype=dtype)
    keys, values = (torch.randn(batch, kv_heads, context, HEAD_DIM, generator=gen, device=device, dtype=dtype)
                    for _ in range(2))
    pads = torch.arange(batch, device=device) * 7 % 64  # rows of different lengths, as in a real batch
    key_valid = torch.arange(context, device=device)[None, :] >= pads[:, None]
    mask = attention_mask(torch.tensor([context - 1], device=device), key_valid, window=None)
    scale = HEAD_DIM ** -0.5
    ways = {"copied": copied_kv_attention, "stacked": grouped_query_attention}
    outputs = {name: fn(q, keys, values, mask, scale) for name, fn in ways.items()}
    torch.testing.assert_close(outputs["stacked"].float(), outputs["copied"].float(), rtol=2e-2, atol=2e-2)
    timed = {name: median_ms(lambda fn=fn: fn(q, keys, values, mask, scale), repeats, device)
             for name, fn in ways.items()}
    return {"benchmark": "gqa_attention_decode_step", "kind": "measured",
            "setting": {"tp": tp, "query_heads": heads, "kv_heads": kv_heads, "head_dim": HEAD_DIM, "batch": batch,
                        "context": context, "dtype": str(dtype).removeprefix("torch."), "repeats": repeats},
            "cache_bytes_per_layer": 2 * keys.numel() * keys.element_size(),
            **{f"{name}_ms": {"median": med, "all": runs} for name, (med, runs) in timed.items()},
            "speedup_stacked_vs_copied": timed["copied"][0] / timed["stacked"][0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=lambda text: int_list("--tp", text), default=[2, 4, 8])
    parser.add_argument("--batch", type=lambda text: int_list("--batch", text), default=[1, 8, 32])
    parser.add_argument("--context", type=lambda text: int_list("--context", text), default=[2048])
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    env = environment(device)
    out = DATA_DIR / "measurements" / "attention" / f"{env['date'][:10]}_{hardware_slug(env)}_gqa-attention.jsonl"
    print(f"MEASURED on {env['device']['type']} {env['device']['name']}, {args.dtype}, median of {args.repeats}")
    print(f"{'tp':>3} {'q/kv heads':>10} {'batch':>5} {'context':>7} {'cache MB':>8} "
          f"{'copied ms':>9} {'stacked ms':>10} {'speed-up':>8}")
    for tp in args.tp:
        for batch in args.batch:
            for context in args.context:
                r = measure(tp, batch, context, dtype, device, args.repeats)
                s = r["setting"]
                print(f"{tp:>3} {s['query_heads']:>5}/{s['kv_heads']:<4} {batch:>5} {context:>7} "
                      f"{r['cache_bytes_per_layer'] / 1e6:>8.1f} {r['copied_ms']['median']:>9.3f} "
                      f"{r['stacked_ms']['median']:>10.3f} {r['speedup_stacked_vs_copied']:>7.2f}x")
                if not args.no_save:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with Path(out).open("a") as f:
                        f.write(json.dumps({**r, "env": env}, sort_keys=True) + "\n")
    if not args.no_save:
        print(f"appended to {out}")


if __name__ == "__main__":
    main()
