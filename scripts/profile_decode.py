"""Where a CPU decode step's time goes: linears, attention, collectives and everything else, at tp 1 and 2.

    python scripts/profile_decode.py            # the random 374M Llama of bench_vs_vllm.py, bf16, prepacked

Per tp: the wall ms of a decode step (batch 1, 20 steps, no profiler), then torch.profiler over 10 more steps,
its self CPU time grouped into the linears' GEMMs, attention and the other ops (norms, RoPE, residual adds, views,
sampling: many small ones), beside the rank's collectives (Dist's own timings) and the Python between the ops. The profiler
adds a little to every op, so the groups are shares, not exact ms. Appended to data/measurements/vs_vllm/.
"""
from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from tplab.bench.env import environment, hardware_slug
from tplab.bench.records import RecordLog, run_file_name
from tplab.comm.launch import launch
from tplab.engine.runner import ModelRunner
from tplab.model.loading import from_pretrained
from tplab.paths import default_measurements_dir

sys.path.insert(0, str(Path(__file__).parent))
from bench_vs_vllm import build_llama_374m  # noqa: E402

GROUPS = {"linears": ("_linear_pointwise", "aten::mm", "aten::addmm"), "attention": ("scaled_dot_product",)}


def profile_rank(dist, model: str, steps: int = 20) -> dict:
    shard = from_pretrained(model, dist, dtype=torch.bfloat16, prepack=True)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    runner = ModelRunner(shard)
    runner.start(1, 8 + 2 * steps + 20)
    token, start = shard.greedy(runner.prefill(ids))[:, None], 8
    for _ in range(5):
        token, start = shard.greedy(runner.decode(token, start))[:, None], start + 1
    t0 = time.perf_counter()
    for _ in range(steps):
        token, start = shard.greedy(runner.decode(token, start))[:, None], start + 1
    wall_ms = 1000 * (time.perf_counter() - t0) / steps
    first = len(dist.stats.records)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(10):
            token, start = shard.greedy(runner.decode(token, start))[:, None], start + 1
        profiled_wall_ms = 1000 * (time.perf_counter() - t0) / 10
    comm_ms = 1000 * sum(r.seconds for r in dist.stats.records[first:]) / 10
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total_ms = sum(e.self_cpu_time_total for e in events) / 1000 / 10
    shares = {name: sum(e.self_cpu_time_total for e in events if any(k in e.key for k in keys)) / 1000 / 10
              for name, keys in GROUPS.items()}
    ops = sum(e.count for e in events) / 10
    return {"wall_ms_per_step": wall_ms, "profiled_wall_ms_per_step": profiled_wall_ms, "ops_ms": total_ms,
            "collectives_ms": comm_ms, **{f"{k}_ms": v for k, v in shares.items()}, "ops_per_step": ops,
            "other_ops_ms": total_ms - sum(shares.values()),
            "between_ops_ms": profiled_wall_ms - total_ms - comm_ms}


def main() -> int:
    model = build_llama_374m(Path("/tmp/tplab-bench-checkpoints") / "llama-374m-bf16")
    env = environment("cpu")
    out = default_measurements_dir() / "vs_vllm" / run_file_name(env, "decode-profile", uuid.uuid4().hex[:8],
                                                                 hardware_slug(env))
    log = RecordLog(out)
    for tp in (1, 2):
        rank0 = launch(profile_rank, tp, "gloo", timeout=600, args=(str(model),))[0]
        print(f"tp={tp}: {rank0['wall_ms_per_step']:.1f} ms/step (no profiler); profiled "
              f"{rank0['profiled_wall_ms_per_step']:.1f} ms: linears {rank0['linears_ms']:.1f}, attention "
              f"{rank0['attention_ms']:.1f}, {rank0['ops_per_step']:.0f} other ops {rank0['other_ops_ms']:.1f}, "
              f"collectives {rank0['collectives_ms']:.1f} (some of it inside the ops' time), Python between ops "
              f"{rank0['between_ops_ms']:.1f} ms (measured)")
        log.append({"schema": "tplab.decode-profile/1", "kind": "measured", "env": env, "checkpoint":
                    "llama-374m bf16, prepacked", "tp": tp, "batch": 1, **rank0})
    print(f"recorded in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
