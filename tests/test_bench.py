"""The benchmark harness: decoders, records, sweeps on real and emulated ranks, the CLI, and early errors.

* The timing loops decode exactly the tokens of tplab.engine.generate (eager and
  fixed-shape, with a sliding window, tp 1 and 2).
* An emulated sweep: one record per point, labelled emulated, with exact
  collective counts, total = measured compute + modelled collectives, the
  extrapolation to all layers, the HF baseline ratio, and a JSON-lines file.
* A measured sweep on threads and on gloo: real collectives, timed.
* Bad sweeps fail before any weight is allocated, with what to do.
* A dry run sizes a sweep (exact memory, modelled time) and allocates nothing.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tplab import launch
from tplab.bench import env as bench_env
from tplab.bench import plan as bench_plan
from tplab.bench import point as bench_point
from tplab.bench import sweep as bench
from tplab.bench.emulation import emulated_dist, modelled_seconds
from tplab.bench.preview import preview
from tplab.bench.records import load_records, scale_to_full, spread, throughput
from tplab.bench.roofline import decode_bytes, measure_copy_bandwidth
from tplab.bench.sweep import BenchSpec, plan, run_bench
from tplab.bench.timing import time_tplab
from tplab.cli import main
from tplab.engine.generate import generate
from tplab.engine.runner import ModelRunner
from tplab.model.loading import from_hf_model
from tplab.perf.estimate import estimate
from tplab.specs.efficiency import load_efficiency
from tplab.specs.hardware import load_gpu
from tplab.specs.model import resolve_model
from tplab.testing import build_hf_model, distinct_prompts, hf_config

FAST = dict(batches=[1, 3], prompt_lens=[6], decode_steps=3, repeats=2, warmup=1, quick_roofline=True)


@pytest.fixture(scope="module")
def config_path(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cfg")
    hf_config("llama31", num_hidden_layers=2).save_pretrained(directory)
    return str(directory / "config.json")


@pytest.fixture(scope="module")
def emulated(config_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("measurements")
    records = run_bench(BenchSpec(model=config_path, tps=[1, 4], emulate=True, layers=1, **FAST), out=out)
    return records, out


@pytest.mark.parametrize("spec", ["llama31", "mistral"])
def test_timing_loops_decode_the_tokens_of_generate(spec):
    hf = build_hf_model(spec)
    prompts = distinct_prompts(hf.config.vocab_size, [9, 9, 9])

    def program(dist):
        model = from_hf_model(hf, dist)
        reference = generate(model, prompts, 8, eos_token_ids=()).tokens
        out = {}
        for mode in ("eager", "static"):
            runner = ModelRunner(model, mode)
            out[mode] = [generate(runner, prompts, 8, eos_token_ids=()).tokens for _ in range(2)]  # cache reused
        return reference, out

    for tp in (1, 2):
        reference, out = launch(program, tp)[0]
        assert out["eager"] == out["static"] == [reference] * 2  # mistral's window of 6 < 16 slots


def test_emulated_sweep_records(emulated, config_path):
    records, out = emulated
    assert [(r["setting"]["tp"], r["setting"]["batch"]) for r in records] == [(1, 1), (1, 3), (4, 1), (4, 3)]
    link, eff = load_gpu("h100-sxm").link("nvlink"), load_efficiency()
    for r in records:
        assert r["kind"] == "emulated" and r["label"].startswith("EMULATED: rank 0 of tp=")
        assert "modelled" in r["comm"]["source"] and r["setting"]["link"]["interconnect"] == "nvlink"
        tp, batch = r["setting"]["tp"], r["setting"]["batch"]
        step = r["comm"]["decode_step"]
        assert step["all_reduce"]["count"] == 2 * 1 + 1 and step["all_gather"]["count"] == 1  # 1 layer built
        assert step["all_reduce"]["bytes"] == 3 * batch * 64 * 2  # (batch, 1, hidden) bf16, 3 calls
        modelled = sum(modelled_seconds(op, s["bytes"] / s["count"], tp, link, eff) * s["count"] for op, s in step.items())
        assert math.isclose(r["decode_comm_ms"], 1e3 * modelled)
        for key in ("median", "p10", "p90", "min", "max"):  # total = measured compute + modelled collectives
            assert math.isclose(r["decode_ms_per_token"][key], r["decode_compute_ms"][key] + r["decode_comm_ms"])
        assert r["decode_ms_per_token"]["n"] == 2
        assert (r["decode_comm_ms"] == 0) == (tp == 1)
        scaled = r["scaled"]
        assert scaled["layers"] == 2 and scaled["from_layers"] == 1 and "not a measurement" in scaled["note"]
        assert scaled["decode_comm_ms"] == pytest.approx(_scaled_comm(step, tp, link, eff))
        base = r["baseline"]
        assert base["decode_speed_vs_hf"] == pytest.approx(base["decode_ms_per_token"]["median"]
                                                           / r["decode_compute_ms"]["median"])
        assert r["memory"]["weights_bytes"] > 0 and r["roofline"]["copy_gb_s"] > 0
        assert r["env"]["device"]["type"] == "cpu" and r["env"]["torch"] == torch.__version__
        assert {"commit", "dirty"} <= set(r["env"]["git"]) and r["model"]["config"]["num_attention_heads"] == 8
    files = list(out.glob("*_emulated_*.jsonl"))
    assert len(files) == 1 and len(files[0].read_text().splitlines()) == 4
    loaded = load_records(out)
    assert [r["source_file"] for r in loaded] == [files[0].name] * 4
    assert loaded[2]["decode_ms_per_token"] == records[2]["decode_ms_per_token"]


def _scaled_comm(step, tp, link, eff):
    """All-reduces scale from 2·1+1 to 2·2+1 calls; the all-gather stays one call."""
    reduce = modelled_seconds("all_reduce", step["all_reduce"]["bytes"] / 3, tp, link, eff)
    gather = modelled_seconds("all_gather", step["all_gather"]["bytes"], tp, link, eff)
    return 1e3 * (5 * reduce + gather)


@pytest.mark.parametrize("backend", ["threads", "gloo"])
def test_measured_sweep_times_real_collectives(config_path, backend):
    records = run_bench(BenchSpec(model=config_path, tps=[2], backend=backend, baseline=False,
                                  **{**FAST, "batches": [2]}))
    r = records[0]
    assert r["kind"] == "measured" and r["setting"]["backend"] == backend and r["baseline"] is None
    assert r["label"].startswith(f"MEASURED: tp=2 real ranks ({backend})")
    assert r["comm"]["source"].startswith("measured") and r["comm"]["decode_step"]["all_reduce"]["count"] == 5
    assert 0 < r["decode_comm_ms"] < r["decode_ms_per_token"]["max"]
    assert r["decode_compute_ms"]["median"] > 0 and r["scaled"] is None
    assert r["roofline"]["ranks_sharing_memory"] == 2


def test_a_graph_decode_record_has_measured_prefill_collectives_only(config_path, monkeypatch):
    """Under a CUDA graph the decode's collectives run inside the replay (not timed); the eager prefill's are."""
    def as_under_a_graph(*args, **kwargs):
        timing = time_tplab(*args, **kwargs)
        timing.comm_timed = False  # what time_tplab reports for a graph decode
        return timing
    monkeypatch.setattr(bench_point, "time_tplab", as_under_a_graph)
    records = run_bench(BenchSpec(model=config_path, tps=[2], layers=1, baseline=False, decode_mode="static", **FAST))
    for r in records:
        assert r["comm"]["source"].startswith("measured") and "decode: not timed" in r["comm"]["source"]
        assert 0 < r["ttft_comm_ms"] < r["ttft_ms"]["median"] and r["ttft_compute_ms"]["median"] > 0
        assert r["decode_comm_ms"] is None and r["decode_compute_ms"] is None and r["decode_comm_share"] is None
        assert r["comm"]["decode_step"]["all_reduce"]["count"] == 3  # 1 layer built: 2 + the embedding's
        assert r["scaled"]["ttft_comm_ms"] > 0 and r["scaled"]["decode_comm_share"] is None


def test_arithmetic_of_records():
    s = spread([4.0, 1.0, 3.0, 2.0])
    assert s == {"median": 2.5, "p10": 1.3, "p90": 3.7, "min": 1.0, "max": 4.0, "n": 4}
    assert throughput(batch=8, decode_steps=3, ttft_ms=100.0, step_ms=10.0) == pytest.approx(8 * 4 / 0.13)
    comm = {"all_reduce": {"count": 3, "bytes": 0, "seconds": 0.003}, "all_gather": {"count": 1, "bytes": 0, "seconds": 0.001}}
    scaled = scale_to_full(compute_ms=12.0, edges_ms=2.0, comm=comm, layers_built=1, layers_full=80)
    assert scaled["compute_ms"] == pytest.approx(2 + 80 * 10)
    assert scaled["comm_ms"] == pytest.approx(3 * 161 / 3 + 1)
    assert scaled["total_ms"] == pytest.approx(scaled["compute_ms"] + scaled["comm_ms"])


def test_roofline_inputs(config_path):
    from tplab.bench.models import bench_model, build_shard

    model = build_shard(bench_model(config_path), emulated_dist(2), torch.bfloat16)
    got = decode_bytes(model, batch=3, context=10)
    assert got["weights"] == model.parameter_bytes() - model.embed.weight.nbytes
    assert got["kv_cache"] == 2 * 2 * 1 * 8 * 2 * 3 * 10  # K and V, 2 layers, 1 KV head at tp=2, head_dim 8, bf16
    copy = measure_copy_bandwidth("cpu", 1 << 20, repeats=2)
    assert copy["gb_s"] > 0 and "read plus the bytes written" in copy["method"]


def test_a_gpu_plan_names_the_device_index(config_path, monkeypatch):
    """A bare "cuda" becomes cuda:<current>: torch.cuda.set_device, which the sweep calls, refuses a bare "cuda"."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(bench_plan, "_free_bytes", lambda device: 80 * 10**9)
    for device in (None, "cuda"):
        p = plan(BenchSpec(model=config_path, emulate=True, device=device, prompt_lens=[8]))
        assert p.device == torch.device("cuda", 0) and p.mode == "graph"


def test_bad_sweeps_fail_before_allocating(config_path):
    with pytest.raises(ValueError, match="valid tp: 1, 2, 4, 8"):
        plan(BenchSpec(model=config_path, tps=[3]))
    with pytest.raises(ValueError, match=r"needs 141.1 GB of weights \+ 943.7 GB of KV cache .*--layers N"):
        plan(BenchSpec(model="llama-3-70b", tps=[1], batches=[20000], device="cpu"))
    with pytest.raises(ValueError, match="'graph' .* needs a GPU"):
        plan(BenchSpec(model=config_path, prompt_lens=[8], decode_mode="graph", device="cpu"))
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings=128"):
        plan(BenchSpec(model=config_path, prompt_lens=[120], decode_steps=16))
    with pytest.raises(ValueError, match="repeats must be an integer >= 1"):
        plan(BenchSpec(model=config_path, prompt_lens=[8], repeats=0))
    with pytest.raises(ValueError, match="real ranks on GPUs run under torchrun|no CUDA device is visible"):
        plan(BenchSpec(model=config_path, prompt_lens=[8], device="cuda"))
    with pytest.raises(ValueError, match="joins at most 2 GPUs"):
        plan(BenchSpec(model=config_path, prompt_lens=[8], tps=[4], emulate=True, gpu="a100-pcie-80gb",
                       interconnect="nvlink"))
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        plan(BenchSpec(model="nope"))
    assert plan(BenchSpec(model="llama-3-70b", tps=[8], emulate=True, layers=1, device="cpu")).points == [(1, 128)]


def test_a_compiled_cpu_sweep_counts_the_frozen_copies_of_the_weights(config_path, monkeypatch):
    spec = dict(model=config_path, tps=[1], batches=[1, 2], prompt_lens=[8, 16], device="cpu", dtype="float32")
    need = bench_plan.rank_bytes(resolve_model(config_path), 1, torch.float32, 2, 16 + BenchSpec().decode_steps)
    monkeypatch.setattr(bench_plan, "_free_bytes", lambda device: 2 * sum(need.values()) / bench_plan.MEMORY_USE_LIMIT)
    assert plan(BenchSpec(**spec, decode_mode="eager")).points == [(1, 8), (1, 16), (2, 8), (2, 16)]
    with pytest.raises(ValueError, match=r"GB of weights \(3 copies: the module's and compiled steps' frozen ones"):
        plan(BenchSpec(**spec, decode_mode="compiled"))


def test_cli_prints_a_labelled_table_or_json(config_path, capsys, tmp_path):
    args = ["bench", "--model", config_path, "--tp", "2", "--batch", "2", "--prompt-len", "4", "--decode-steps", "2",
            "--repeats", "1", "--emulate-rank", "--layers", "1", "--quiet", "--no-baseline", "--quick-roofline"]
    assert main(args + ["--out", str(tmp_path / "run.jsonl")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("EMULATED: rank 0 of tp=2") and "EXTRAPOLATED to all 2 layers" in out
    assert len((tmp_path / "run.jsonl").read_text().splitlines()) == 1
    assert main(args + ["--json", "--no-save"]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[0])
    assert record["kind"] == "emulated" and record["setting"]["tp"] == 2
    assert main(["bench", "--model", config_path, "--tp", "3", "--prompt-len", "8"]) == 2
    assert "valid tp: 1, 2, 4, 8" in capsys.readouterr().err


def test_an_unwritable_out_fails_before_anything_is_measured(config_path, capsys, tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where a folder would have to be made
    measured = []
    monkeypatch.setattr(bench, "_run", lambda *a: measured.append(a))
    args = ["bench", "--model", config_path, "--tp", "2", "--prompt-len", "4", "--emulate-rank", "--quiet"]
    assert main(args + ["--out", str(blocked / "sub")]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot write {blocked / 'sub'}")
    assert measured == []


def test_a_copy_without_git_takes_its_commit_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_env, "REPO_DIR", tmp_path)  # not a git checkout
    monkeypatch.delenv(bench_env.COMMIT_VARIABLE, raising=False)
    assert bench_env.git_commit() == {"commit": None, "dirty": None}
    monkeypatch.setenv(bench_env.COMMIT_VARIABLE, "c47ffae")
    assert bench_env.git_commit()["commit"] == "c47ffae" and bench_env.git_commit()["dirty"] is None
    monkeypatch.setattr(bench_env, "REPO_DIR", bench_env.CHECKOUT_DIR)
    assert bench_env.git_commit()["commit"] != "c47ffae"  # a real checkout's own commit wins


def test_a_dry_run_sizes_a_sweep_without_allocating(capsys, tmp_path):
    spec = BenchSpec(model="llama-3-70b", tps=[8, 2], batches=[1, 64], prompt_lens=[2048], decode_steps=8, repeats=3,
                     emulate=True, layers=20, gpu="h200")
    sweep = preview(spec)
    points = sweep.points
    assert (sweep.layers_built, sweep.layers_full, sweep.gpu_memory_gb) == (20, 80, 141)
    assert [(p.tp, p.batch) for p in points] == [(8, 1), (8, 64), (2, 1), (2, 64)]
    by = {(p.tp, p.batch): p for p in points}
    assert by[8, 1].weights_gb == pytest.approx(4.80, abs=0.01)  # 20 of 80 layers + embedding and LM head shards
    assert by[2, 1].weights_gb == pytest.approx(19.21, abs=0.01) and all(p.fits for p in points)
    assert by[2, 64].kv_cache_gb == pytest.approx(2 * 20 * 4 * 128 * 2 * 64 * 2056 / 1e9)  # K and V, 4 KV heads
    assert by[2, 64].seconds > by[8, 64].seconds > by[8, 1].seconds > 0
    built = resolve_model("llama-3-70b").with_layers(20)
    e = estimate(model=built, gpu="h200", tp=2, batch=64, prompt_len=2048, output_len=8)
    assert by[2, 64].seconds == pytest.approx(2 * 4 * (e.ttft_ms + 8 * e.decode_ms_per_token) / 1e3)
    assert (by[2, 64].total_gb, by[2, 64].usable_gb) == (e.memory_per_gpu_gb, e.usable_memory_gb)

    # one sizing rule: the dry run refuses what plan refuses (Llama-3-70B bf16 at tp 2 on an H100: weights alone fit)
    tight = preview(BenchSpec(model="llama-3-70b", tps=[2, 4], batches=[1], prompt_lens=[3840], decode_steps=256,
                              gpu="h100-sxm")).points
    for point in tight:
        planned = estimate(model="llama-3-70b", gpu="h100-sxm", tp=point.tp, batch=1, prompt_len=3840, output_len=256)
        assert point.fits == planned.fits and point.total_gb == pytest.approx(planned.memory_per_gpu_gb)
    assert [p.fits for p in tight] == [False, True] and tight[0].weights_gb + tight[0].kv_cache_gb < tight[0].usable_gb

    whole = preview(BenchSpec(model="llama-3-70b", tps=[2], batches=[64], prompt_lens=[2048], gpu="h100-sxm",
                              dtype="float32"))
    # 141 GB of fp32 weights; the cost model has no fp32
    assert not whole.points[0].fits and whole.points[0].seconds is None and whole.seconds is None

    assert main(["bench", "--model", "llama-3-70b", "--emulate-rank", "--gpu", "h200", "--layers", "20", "--tp",
                 "8,2", "--batch", "1,64", "--prompt-len", "2048", "--decode-steps", "8", "--repeats", "3",
                 "--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("DRY RUN: nothing allocated") and "modelled (not measured)" in out
    assert f"modelled total: {sweep.seconds:.0f} s" in out
    assert list(tmp_path.iterdir()) == []


def test_a_dry_run_with_pipeline_stages_sizes_stage_0_and_models_the_pipeline(capsys):
    """Llama-3-70B at tp 4 x pp 2 on H100s: rank 0 holds 40 layers and the embedding, and plan's pipeline estimate
    gives the times and the fullest stage's total; a measured sweep refuses --pp in one line."""
    from tplab.perf.pipeline import estimate_pipeline

    point = preview(BenchSpec(model="llama-3-70b", tps=[4], batches=[32], prompt_lens=[1024], decode_steps=8,
                              gpu="h100-sxm", pp=2)).points[0]
    whole = preview(BenchSpec(model="llama-3-70b", tps=[4], batches=[32], prompt_lens=[1024], decode_steps=8,
                              gpu="h100-sxm")).points[0]
    assert point.kv_cache_gb == pytest.approx(whole.kv_cache_gb / 2)  # 40 of the 80 layers' KV
    assert 0.45 < point.weights_gb / whole.weights_gb < 0.55
    e = estimate_pipeline(model="llama-3-70b", gpu="h100-sxm", tp=4, pp=2, micro_batches=2, batch=32, prompt_len=1024,
                          output_len=8, network=None)
    assert (point.decode_ms_per_token, point.total_gb) == (e.decode_ms_per_token, e.stage_memory_gb)
    assert main(["bench", "--model", "llama-3-70b", "--tp", "4", "--pp", "2", "--dry-run"]) == 0
    assert "2 pipeline stages of tp GPUs" in capsys.readouterr().out
    assert main(["bench", "--model", "llama-3-70b", "--tp", "4", "--pp", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "with --pp it sizes and models a sweep (--dry-run)" in err
    assert main(["bench", "--model", "llama-3-70b", "--tp", "4", "--pp", "81", "--dry-run"]) == 2
    assert "valid pp: 1 to 80" in capsys.readouterr().err


def run_gpu_session(config_path: str, out, **settings: str) -> subprocess.CompletedProcess:
    """scripts/gpu_session.sh on the small model of ``config_path``, tp 2 and 1, with ``settings`` on top."""
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "MODEL": config_path, "GPU": "h100-sxm",
           "LAYERS": "1", "TPS": "2 1", "PROMPTS": "6", "STEPS": "2", "REPEATS": "1", **settings}
    return subprocess.run(["bash", "scripts/gpu_session.sh"], cwd=bench_env.REPO_DIR, env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_gpu_session_script_runs_every_step_on_a_cpu_and_falls_back_to_eager_decode(config_path, tmp_path):
    """scripts/gpu_session.sh on a small model: every step runs, and the calibration refuses (CPU records). The
    first bench fails (here: --decode graph on a CPU), so it and the next ones run with eager decoding."""
    done = run_gpu_session(config_path, tmp_path, BATCHES="1", DECODE="graph", TEST_TIMEOUT="1")
    assert done.returncode == 1 and done.stdout.strip().endswith("with failures: test_gpu,bench tp=2,calibrate"), \
        done.stdout[-2000:]
    assert "CPU measurements cannot calibrate" in done.stdout
    assert {"machine.txt", "test_gpu.log", "bench.log"} <= {f.name for f in tmp_path.iterdir()}
    log = (tmp_path / "bench.log").read_text()
    assert "DRY RUN" in log and "needs a GPU" in log and "=== retrying with --decode eager" in log
    records = load_records(*tmp_path.glob("*_emulated_*.jsonl"))
    assert sorted(r["setting"]["tp"] for r in records) == [1, 2]
    assert {r["setting"]["decode_mode"] for r in records} == {"eager"}
