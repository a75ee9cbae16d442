"""Where a serving run's time goes, in tplab's engine and in vLLM-CPU's, on the same load: GEMMs, attention, the
other ops, and the Python between them.

    python scripts/profile_serving.py     # the load and 374M bf16 checkpoint of bench_vs_vllm.py --serving, tp 1

Each engine serves the load once untimed (vLLM: a warm-up and one run), then once under torch.profiler (tplab: its
fastest path, prepacked linears and the compiled paged-attention kernel; vLLM: its default compiled mode). Each op's
self time (its time less that of the ops it calls) is read from the profiler's trace and grouped by name; "between
ops" is the profiled run's wall time less every op's self time. The profiler adds to every op, so the groups are
shares of a profiled run, not exact seconds. Appended to data/measurements/vs_vllm/.
"""
from __future__ import annotations

import gzip
import json
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from tplab.bench.env import environment, hardware_slug
from tplab.bench.records import RecordLog, run_file_name
from tplab.comm.launch import launch
from tplab.model.loading import from_pretrained
from tplab.paths import default_measurements_dir
from tplab.serving.engine import serve
from tplab.serving.scheduler import SchedulerConfig

sys.path.insert(0, str(Path(__file__).parent))
from bench_vs_vllm import (  # noqa: E402
    BIND,
    SERVING_BUDGET,
    build_llama_374m,
    ensure_vllm_venv,
    serving_config,
    serving_requests,
    vllm_worker,
)

# op names (substrings) per group; the rest is "other ops". tplab's compiled graph is its paged-attention kernel;
# vLLM's is its whole step but the GEMMs and attention (norms, RoPE, SiLU·mul, residual adds, fused)
GROUPS = {"tplab": {"gemm": ("_linear_pointwise", "aten::mm", "aten::addmm"),
                    "attention": ("scaled_dot_product", "CompiledFxGraph", "index_copy_")},
          "vllm": {"gemm": ("onednn_mm", "aten::mm", "aten::addmm"),
                   "attention": ("cpu_attention", "reshape_and_cache", "unified_"),
                   "fused graph": ("CompiledFxGraph",)}}


def self_seconds(trace: dict) -> Counter:
    """Each op's self seconds from a chrome trace: its duration less that of the ops nested in it, per thread."""
    by_thread: dict[tuple, list] = {}
    for e in trace["traceEvents"]:
        if e.get("ph") == "X" and e.get("cat") == "cpu_op":
            by_thread.setdefault((e["pid"], e["tid"]), []).append(e)
    own: Counter = Counter()
    for events in by_thread.values():
        stack: list[dict] = []
        for e in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            if stack:
                own[stack[-1]["name"]] -= e["dur"] / 1e6
            own[e["name"]] += e["dur"] / 1e6
            stack.append(e)
    return own


def grouped(own: Counter, groups: dict[str, tuple[str, ...]], wall_s: float) -> dict[str, float]:
    out = {name: sum(s for op, s in own.items() if any(k in op for k in keys)) for name, keys in groups.items()}
    ops = sum(own.values())
    return {**out, "other ops": ops - sum(out.values()), "between ops": wall_s - ops, "profiled wall": wall_s}


def tplab_rank(dist, model: str, requests: list, config: SchedulerConfig, trace: str) -> dict:
    shard = from_pretrained(model, dist, dtype=torch.bfloat16, prepack=True)
    run = serve(shard, requests, config, frozenset(), compiled_attention=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        serve(shard, requests, config, frozenset(), warmup=False, compiled_attention=True)
        wall = time.perf_counter() - t0
    prof.export_chrome_trace(trace)
    return {"wall_s": wall, "unprofiled_s": run["summary"]["duration_s"]}


def main() -> int:
    python = ensure_vllm_venv()
    model = build_llama_374m(Path("/tmp/tplab-bench-checkpoints") / "llama-374m-bf16")
    requests = serving_requests(32000)
    config = serving_config()
    env = environment("cpu")
    out = default_measurements_dir() / "vs_vllm" / run_file_name(env, "serving-profile", uuid.uuid4().hex[:8],
                                                                 hardware_slug(env))
    log = RecordLog(out)
    with tempfile.TemporaryDirectory() as tmp:
        trace = str(Path(tmp) / "tplab.json")
        rank0 = launch(tplab_rank, 1, "gloo", timeout=1800, args=(str(model), requests, config, trace))[0]
        tplab = grouped(self_seconds(json.loads(Path(trace).read_text())), GROUPS["tplab"], rank0["wall_s"])
        spec = dict(task="serve", model=str(model), tp=1, dtype="bfloat16", enforce_eager=False, repeats=1,
                    requests=[[list(r.prompt), r.max_new_tokens] for r in requests], profile_dir=tmp,
                    **SERVING_BUDGET)
        seconds = vllm_worker(python, spec)["seconds"][-1]
        traces = list(Path(tmp).glob("*.json.gz"))
        vllm = grouped(self_seconds(json.load(gzip.open(traces[0]))), GROUPS["vllm"], seconds)
    for engine, shares in (("tplab (prepacked, paged-attention kernel)", tplab), ("vLLM compiled", vllm)):
        print(f"{engine}: " + ", ".join(f"{k} {v:.2f} s" for k, v in shares.items()) + " (measured, profiled)")
    log.append({"schema": "tplab.serving-profile/1", "kind": "measured", "env": env, "checkpoint": "llama-374m bf16",
                "tp": 1, "bind": BIND[1], "load": "bench_vs_vllm.SERVING_LOAD", "budget": SERVING_BUDGET,
                "tplab_unprofiled_s": rank0["unprofiled_s"], "seconds": {"tplab": tplab, "vllm": vllm}})
    print(f"recorded in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
