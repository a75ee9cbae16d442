"""Select the published figures of data/published/ from their public sources (run once; the output is committed).

    .venv/bin/python scripts/collect_published.py --trt trt_llm_0_9_0_dli.csv --nim nim.csv --force

The two CSV files are NVIDIA Deep Learning Institute datasets published in github.com/wbing520/ai-performance-engineering
(code/ch11_inference/inference_gpu_cluster_sizing/dataset/trt_llm_0_9_0_dli.csv at commit 5a4d0c3, and
code/ch10_inference/inference_gpu_cluster_sizing/dataset/nim.csv at commit 0e25b2e); the gpt-fast figures are typed
from its README. What is selected, and why, is in data/published/README.md.
"""
from __future__ import annotations

import argparse
import collections
import csv
import json
import statistics
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "data" / "published"
TRT_SRC = {"title": "TensorRT-LLM 0.9.0 benchmark sweep (gptSessionBenchmark, static batches), NVIDIA Deep Learning Institute course dataset",
           "where": "github.com/wbing520/ai-performance-engineering, code/ch11_inference/inference_gpu_cluster_sizing/dataset/trt_llm_0_9_0_dli.csv",
           "commit": "5a4d0c37a3231b2ff8a268df7f129be259c48a48"}
NIM_SRC = {"title": "NVIDIA NIM for LLMs (TensorRT-LLM backend) benchmark sweep with GenAI-Perf, NVIDIA Deep Learning Institute course dataset",
           "where": "github.com/wbing520/ai-performance-engineering, code/ch10_inference/inference_gpu_cluster_sizing/dataset/nim.csv",
           "commit": "0e25b2e236211ad01ed2221bd2c1cfa5b3f47b55"}
GPTFAST_SRC = {"title": "gpt-fast README, Benchmarks (8xA100-80GB power limited to 330 W, hybrid cube mesh)",
               "where": "github.com/pytorch-labs/gpt-fast, README.md", "commit": "0f925b5d4ce457b89a7ca6c9ce50f42bf2576945"}
GPU = {"A100-SXM4-80GB": "a100-sxm-80gb", "H100 80GB HBM3": "h100-sxm", "H200 141GB HBM3": "h200", "L40S": "l40s",
       "H100_80GB_HBM3": "h100-sxm"}
LINK = {"a100-sxm-80gb": "nvlink", "h100-sxm": "nvlink", "h200": "nvlink", "l40s": "pcie"}
MODEL = {"LLaMA v2 7B": "llama-2-7b", "LLaMA v2 13B": "llama-2-13b", "Mistral 7B": "mistral-7b", "LLaMA v2 70B": "llama-2-70b",
         "meta-llama3-8b-instruct": "llama-3-8b", "meta-llama3-70b-instruct": "llama-3-70b", "Mixtral 8x7B": "mixtral-8x7b"}
# The sweep ran with fake weights ("Use Fake Weight": Yes): a mixture's router then sends every token to the same
# experts, which the decode times show (flat from batch 1 to 8, where reading every expert would take 2-3x longer).
COLLAPSED = ("; a mixture of experts run with fake weights: its routing is taken as collapsed (every token to the "
             "same 2 experts), inferred from the flat decode times, not stated by the source")


def collect(trt_csv: str, nim_csv: str) -> dict[str, str]:
    """{file name: JSON lines} of the fitted figures, of the held-out 70B ones and of the held-out mixtures."""
    out, held, moe = [], [], []
    def add(row):
        if row["model"] == "mixtral-8x7b":
            moe.append({**row, "routing": "collapsed", "notes": row["notes"] + COLLAPSED})
        else:
            (held if row["model"] in ("llama-2-70b", "llama-3-70b") else out).append(row)

    rows = list(csv.DictReader(open(trt_csv)))
    seen = set()
    WANT = {(1, "128,128"), (8, "128,128"), (64, "128,128"), (1, "2048,128"), (8, "2048,128")}
    for r in rows:
        model, gpu = MODEL.get(r["Model"]), GPU.get(r["GPU"])
        if model is None or gpu is None:
            continue
        batch, io = int(r["Batch Size"]), r["Input/Output Lengths"]
        if not r["Token-to-token Latency (ms)"] or not r["1st Token Latency (ms)"]:
            continue
        tp = int(r["Tensor Model Parallel Size"])
        if (batch, io) not in WANT or int(r["Pipeline Model Parallel Size"]) != 1:
            continue
        dtype = "fp8" if r["Precision"] == "FP8" else "fp16"
        key = (model, gpu, tp, dtype, batch, io)
        if key in seen:
            continue
        seen.add(key)
        isl, osl = map(int, io.split(","))
        base = dict(source=TRT_SRC, engine="TensorRT-LLM", engine_version="0.9.0", engine_profile="graph", model=model, gpu=gpu,
                    interconnect=LINK[gpu], tp=tp, batch=batch, concurrency=None, prompt_len=isl, output_len=osl, dtype=dtype)
        note = (f"static batch of {batch}; precision column '{r['Precision']}'" + ("" if dtype == "fp8" else " (FP16 activations and weights)")
                + f"; custom all-reduce {r['Enable Custom All Reduce']}, XQA {r['Enable XQA']}, fake weights {r['Use Fake Weight']}")
        add({**base, "metric": "decode_ms_per_token", "value": round(float(r["Token-to-token Latency (ms)"]), 3), "unit": "ms",
             "notes": note + "; column 'Token-to-token Latency (ms)'"})
        if io == "2048,128" or batch == 1:
            add({**base, "metric": "ttft_ms", "value": float(r["1st Token Latency (ms)"]), "unit": "ms",
                 "notes": note + "; column '1st Token Latency (ms)', the prefill of the whole batch"})
        if batch == 64:
            add({**base, "metric": "throughput_tok_s", "value": float(r["Throughput (tokens / sec)"]), "unit": "output tokens/s",
                 "notes": note + "; column 'Throughput (tokens / sec)' for the TP group"})

    nim = list(csv.DictReader(open(nim_csv)))
    groups = collections.defaultdict(list)
    for r in nim:
        c = int(r["input_config-concurrency"])
        isl, osl = int(r["input_config-synthetic_input_tokens_mean"]), int(r["input_config-output_tokens_mean"])
        if c not in (1, 10) or (isl, osl) not in ((200, 200), (2000, 200)):
            continue
        groups[(r["task_inputs-model"], r["task_inputs-GPU"], int(r["task_inputs-n_gpus"]), r["task_inputs-precision"], c, isl, osl)].append(r)
    for (m, g, tp, prec, c, isl, osl), rs in sorted(groups.items()):
        model, gpu = MODEL[m], GPU[g]
        dtype = {"fp16": "fp16", "bf16": "bf16", "fp8": "fp8"}[prec]
        itl = statistics.median(float(r["inter_token_latency-avg"]) / 1e6 for r in rs)
        ttft = statistics.median(float(r["time_to_first_token-avg"]) / 1e6 for r in rs)
        base = dict(source=NIM_SRC, engine="NIM (TensorRT-LLM backend)", engine_version="NIM for LLMs, 2024 (meta-llama3 profiles)",
                    engine_profile="served", model=model, gpu=gpu, interconnect=LINK[gpu], tp=tp, batch=c, concurrency=c,
                    prompt_len=isl, output_len=osl, dtype=dtype)
        note = (f"in-flight batching at concurrency {c} (taken as a decode batch of {c}); median of {len(rs)} run(s) of the "
                "average over requests; synthetic prompts")
        add({**base, "metric": "decode_ms_per_token", "value": round(itl, 3), "unit": "ms", "notes": note + "; column inter_token_latency-avg"})
        if c == 1:
            add({**base, "metric": "ttft_ms", "value": round(ttft, 2), "unit": "ms",
                 "notes": note + "; column time_to_first_token-avg, measured at the HTTP client (includes serving overhead)"})

    for tp, tok_s in ((1, 104.9), (2, 168.84), (4, 254.02), (8, 328.43)):
        add(dict(source=GPTFAST_SRC, engine="gpt-fast", engine_version="README at the commit above", engine_profile="graph",
                 model="llama-2-7b", gpu="a100-sxm-80gb", interconnect="nvlink", tp=tp, batch=1, concurrency=None, prompt_len=5,
                 output_len=200, dtype="bf16", metric="decode_ms_per_token", value=round(1000 / tok_s, 3), unit="ms",
                 notes=f"published as {tok_s} tokens/s at batch 1 (value = 1000 / that); torch.compile with CUDA graphs; "
                       "prompt of 5 tokens; output length not stated (200 assumed, it barely matters at this context); "
                       "GPUs power-limited to 330 W"))
    for tp, tok_s in ((2, 21.32), (4, 38.01), (8, 62.50)):
        add(dict(source=GPTFAST_SRC, engine="gpt-fast", engine_version="README at the commit above", engine_profile="graph",
                 model="llama-2-70b", gpu="a100-sxm-80gb", interconnect="nvlink", tp=tp, batch=1, concurrency=None, prompt_len=5,
                 output_len=200, dtype="bf16", metric="decode_ms_per_token", value=round(1000 / tok_s, 3), unit="ms",
                 notes=f"published as {tok_s} tokens/s at batch 1 (value = 1000 / that); torch.compile with CUDA graphs; "
                       "GPUs power-limited to 330 W"))
    for i, r in enumerate(out):
        r["id"] = f"pub-{i + 1:03d}"
    for i, r in enumerate(held):
        r["id"] = f"held-{i + 1:03d}"
    for i, r in enumerate(moe):
        r["id"] = f"moe-{i + 1:03d}"
    order = ["id", "metric", "value", "unit", "model", "gpu", "interconnect", "tp", "batch", "concurrency", "prompt_len",
             "output_len", "dtype", "engine", "engine_version", "engine_profile", "source", "notes", "routing"]
    return {name: "".join(json.dumps({k: r[k] for k in order if k in r}, ensure_ascii=False) + "\n" for r in rows_)
            for name, rows_ in (("figures.jsonl", out), ("held_out_70b.jsonl", held), ("held_out_moe.jsonl", moe))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trt", required=True, help="trt_llm_0_9_0_dli.csv")
    p.add_argument("--nim", required=True, help="nim.csv")
    p.add_argument("--force", action="store_true", help="replace the files of data/published")
    args = p.parse_args()
    files = collect(args.trt, args.nim)
    if any((OUT / name).exists() for name in files) and not args.force:
        print(f"error: {OUT} already holds {', '.join(files)}; pass --force to replace them", file=sys.stderr)
        return 2
    for name, text in files.items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}: {text.count(chr(10))} figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
