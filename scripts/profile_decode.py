"""Where a CPU decode step's time goes: GEMMs, attention, collectives and everything else, at tp 1 and 2.

    python scripts/profile_decode.py                             # eager, bf16 prepacked where the CPU can
    python scripts/profile_decode.py --mode autotuned --tp 1     # the compiled step with inductor's GEMM kernels

The random 374M Llama of bench_vs_vllm.py. Per tp: the wall ms of a decode step (batch 1, 20 steps, no profiler),
then torch.profiler over 10 more steps, its self CPU time grouped into the GEMMs, attention and the other ops
(norms, RoPE, residual adds, views, sampling: many small ones), beside the rank's collectives (Dist's own timings)
and the Python between the ops, and the ops that took longest. A compiled mode is profiled on a second compiled
step whose generated kernels report to the profiler one by one (inductor's ``cpp.enable_kernel_profile``, which
slows them, so the wall ms comes from the first): its GEMM templates are the ``gemm_m…n…k…`` kernels, its fused
element-wise ones ``cpp_fused_…`` (attention's: ``cpp_fused__softmax…``). The profiler adds a little to every op, so
the groups are shares, not exact ms. Appended to data/measurements/vs_vllm/.
"""
from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from tplab.bench.env import environment, hardware_slug
from tplab.bench.records import RecordLog, run_file_name
from tplab.comm.launch import launch
from tplab.engine.runner import COMPILED_MODES, ModelRunner
from tplab.layers.weights import prepack_problem
from tplab.model.loading import from_pretrained
from tplab.paths import default_measurements_dir

sys.path.insert(0, str(Path(__file__).parent))
from bench_vs_vllm import build_llama_374m  # noqa: E402

GROUPS = {"linears": ("_linear_pointwise", "aten::mm", "aten::addmm", "_gemm_m"),
          "attention": ("scaled_dot_product", "cpp_fused__softmax")}


def profile_rank(dist, model: str, mode: str = "eager", dtype: str = "bfloat16", prepack: bool = True,
                 steps: int = 20) -> dict:
    shard = from_pretrained(model, dist, dtype=getattr(torch, dtype), prepack=prepack)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    max_len = 8 + 2 * steps + 20

    def decode(runner: ModelRunner, token: torch.Tensor, start: int, count: int) -> tuple[torch.Tensor, int]:
        for _ in range(count):
            token, start = shard.greedy(runner.decode(token, start))[:, None], start + 1
        return token, start

    runner = ModelRunner(shard, mode)
    runner.start(1, max_len)
    token, start = decode(runner, shard.greedy(runner.prefill(ids))[:, None], 8, 5)  # the first compiles
    t0 = time.perf_counter()
    decode(runner, token, start, steps)
    wall_ms = 1000 * (time.perf_counter() - t0) / steps
    if mode in COMPILED_MODES:  # another compiled step whose kernels report to the profiler (which slows them)
        runner = ModelRunner(shard, mode)
        runner.start(1, max_len)
        with torch._inductor.config.patch({"cpp.enable_kernel_profile": True, "force_disable_caches": True}):
            token, start = decode(runner, shard.greedy(runner.prefill(ids))[:, None], 8, 5)
    first = len(dist.stats.records)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        decode(runner, token, start, 10)
        profiled_wall_ms = 1000 * (time.perf_counter() - t0) / 10
    comm_ms = 1000 * sum(r.seconds for r in dist.stats.records[first:]) / 10
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total_ms = sum(e.self_cpu_time_total for e in events) / 1000 / 10
    shares = {name: sum(e.self_cpu_time_total for e in events if any(k in e.key for k in keys)) / 1000 / 10
              for name, keys in GROUPS.items()}
    longest = sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]
    return {"wall_ms_per_step": wall_ms, "profiled_wall_ms_per_step": profiled_wall_ms, "ops_ms": total_ms,
            "collectives_ms": comm_ms, **{f"{k}_ms": v for k, v in shares.items()},
            "ops_per_step": sum(e.count for e in events) / 10, "other_ops_ms": total_ms - sum(shares.values()),
            "between_ops_ms": profiled_wall_ms - total_ms - comm_ms,
            "longest_ops": [{"op": e.key, "ms_per_step": e.self_cpu_time_total / 1000 / 10,
                             "calls_per_step": e.count / 10} for e in longest]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("eager", *COMPILED_MODES), default="eager", help="the decode step (eager)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="the weights' dtype (the checkpoint's is bfloat16; default %(default)s)")
    p.add_argument("--tp", type=int, nargs="+", choices=(1, 2), default=[1, 2], help="tp degrees (1 2)")
    args = p.parse_args()
    model = build_llama_374m(Path("/tmp/tplab-bench-checkpoints") / "llama-374m-bf16")
    problem = prepack_problem(getattr(torch, args.dtype))
    prepack = args.mode == "eager" and problem is None  # a compiled step packs its frozen weights itself
    if args.mode == "eager" and problem:
        print(f"not prepacked: {problem}")
    env = environment("cpu")
    out = default_measurements_dir() / "vs_vllm" / run_file_name(env, "decode-profile", uuid.uuid4().hex[:8],
                                                                 hardware_slug(env))
    log = RecordLog(out)
    path = f"{args.dtype}, {args.mode}{', prepacked' if prepack else ''}"
    for tp in args.tp:
        rank0 = launch(profile_rank, tp, "gloo", timeout=600,
                       args=(str(model), args.mode, args.dtype, prepack))[0]
        print(f"tp={tp} ({path}): {rank0['wall_ms_per_step']:.1f} ms/step (no profiler); profiled "
              f"{rank0['profiled_wall_ms_per_step']:.1f} ms: linears {rank0['linears_ms']:.1f}, attention "
              f"{rank0['attention_ms']:.1f}, {rank0['ops_per_step']:.0f} ops in all, the others "
              f"{rank0['other_ops_ms']:.1f}, collectives {rank0['collectives_ms']:.1f} (some of it inside the ops' "
              f"time), Python between ops {rank0['between_ops_ms']:.1f} ms (measured)")
        for op in rank0["longest_ops"]:
            print(f"    {op['ms_per_step']:6.2f} ms  {op['calls_per_step']:4.0f}×  {op['op'][:90]}")
        log.append({"schema": "tplab.decode-profile/1", "kind": "measured", "env": env, "checkpoint":
                    f"llama-374m bf16, as {path}", "tp": tp, "batch": 1, **rank0})
    print(f"recorded in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
