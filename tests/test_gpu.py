"""The GPU paths on one CUDA device. Skipped where none is visible, as on CI's CPU machines.

Run them first on any machine with a GPU (one is enough), before a sweep:

    python -m pytest tests/test_gpu.py -v

* The TP model on CUDA: tp 1, 2 and 4 thread ranks sharing one GPU (real
  collectives, each adding the ranks' tensors on the device) give Hugging
  Face's greedy tokens, HF running on the same GPU in fp32, for different
  prompts of different lengths; logits within 1e-4; exact collective counts.
* The three decode loops of the benchmark (eager, static shapes, CUDA graph)
  give the tokens of ``generate``, over two requests replaying one graph;
  a captured step records its collectives once, at capture.
* The roofline is timed with CUDA events and lands in a physically possible
  range (a timer that missed a synchronize would not).
* An emulated sweep on the GPU (CUDA-graph decode, HF baseline) writes
  records that name the GPU, its driver and CUDA, and its peak memory.
* ``tplab generate --device cuda`` gives the CPU's tokens.
* The fp8 GEMM of the quantized layers (``torch._scaled_mm``, per-token and per-row
  scales) against their dequantized weights, on a GPU with FP8 tensor cores.
* torchrun with one process initialises NCCL (a group of one still runs
  NCCL's kernels), and ``tplab generate`` and ``tplab bench`` run through it.

``TPLAB_TEST_DEVICE=cpu`` runs the tests that need no CUDA-only feature on
the CPU, to check the tests themselves where no GPU is at hand.
"""
from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch
from probes import expected_greedy_comm, generation_comm
from torchrun_helpers import run_under_torchrun, stdout_or_raise

from tplab import launch
from tplab.bench.emulation import emulated_dist
from tplab.bench.roofline import measure_copy_bandwidth, measure_matmul_tflops
from tplab.bench.sweep import BenchSpec, run_bench
from tplab.cli import main
from tplab.engine.generate import generate
from tplab.engine.runner import DECODE_MODES, ModelRunner
from tplab.model.loading import from_hf_model
from tplab.testing import SPECS, build_hf_model, distinct_prompts, hf_config, hf_greedy

DEVICE = os.environ.get("TPLAB_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
ON_CUDA = DEVICE is not None and torch.device(DEVICE).type == "cuda"
pytestmark = pytest.mark.skipif(DEVICE is None, reason="no CUDA device (TPLAB_TEST_DEVICE=cpu runs these on the CPU)")
needs_cuda = pytest.mark.skipif(not ON_CUDA, reason="a CUDA-only feature (CUDA graphs, CUDA events)")

LENGTHS = [5, 11, 8]  # a different length in every row
NEW_TOKENS = 6
ATOL = 1e-4


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("cfg")
    hf_config("llama31", num_hidden_layers=2).save_pretrained(directory)
    return str(directory / "config.json")


def greedy_with_logits(dist, hf_model, prompts):
    model = from_hf_model(hf_model, dist)
    result = generate(model, prompts, NEW_TOKENS, eos_token_ids=(), keep_logits=True)
    return result.tokens, [x.cpu() for x in result.logits], result.comm, str(model.device)


@pytest.mark.parametrize("name", list(SPECS))
def test_tp_ranks_sharing_one_gpu_give_hf_greedy_tokens(name):
    hf = build_hf_model(name, seed=3).to(DEVICE)
    prompts = distinct_prompts(hf.config.vocab_size, LENGTHS, seed=3)
    references = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    for tp in (1, 2, 4):
        for tokens, logits, comm, device in launch(greedy_with_logits, tp, device=DEVICE, args=(hf, prompts)):
            assert torch.device(device).type == torch.device(DEVICE).type
            assert tokens == [hf_tokens for hf_tokens, _ in references]
            for step, step_logits in enumerate(logits):
                for row, (_, hf_logits) in enumerate(references):
                    torch.testing.assert_close(step_logits[row], hf_logits[step].cpu(), rtol=0, atol=ATOL)
            assert generation_comm(comm) == expected_greedy_comm(
                hf.config.num_hidden_layers, hf.config.hidden_size, len(LENGTHS), max(LENGTHS), NEW_TOKENS, tp)


def decode_tokens(model, prompts, mode: str, steps: int, requests: int = 2) -> list[list[list[int]]]:
    """The tokens of ``requests`` identical requests through one runner (a graph is captured once, replayed)."""
    runner = ModelRunner(model, mode)
    return [generate(runner, prompts, steps, eos_token_ids=()).tokens for _ in range(requests)]


@pytest.mark.parametrize("name", ["llama31", "mistral"])
def test_decode_loops_give_the_tokens_of_generate(name):
    """tp=1 on the device (the group of one is the real model); mistral's window of 6 is shorter than the cache."""
    hf = build_hf_model(name, seed=4)
    prompts = distinct_prompts(hf.config.vocab_size, [9, 9, 9], seed=4)
    model = from_hf_model(hf, emulated_dist(1, DEVICE))
    reference = generate(model, prompts, 8, eos_token_ids=()).tokens
    modes = DECODE_MODES if ON_CUDA else [m for m in DECODE_MODES if m != "graph"]
    for mode in modes:
        assert decode_tokens(model, prompts, mode, 8) == [reference, reference], mode


@needs_cuda
def test_a_captured_decode_step_replays_a_partial_rank_exactly():
    """Rank 0 of an emulated tp=4 group (a quarter of the heads): the graph replays what eager decoding computes."""
    hf = build_hf_model("llama", seed=5)
    prompts = distinct_prompts(hf.config.vocab_size, [7, 7], seed=5)
    model = from_hf_model(hf, emulated_dist(4, DEVICE))
    eager = decode_tokens(model, prompts, "eager", 6)
    assert decode_tokens(model, prompts, "static", 6) == eager
    assert decode_tokens(model, prompts, "graph", 6) == eager


@needs_cuda
def test_a_cuda_graph_records_one_step_of_collectives_at_capture():
    hf = build_hf_model("llama31", seed=6)
    model = from_hf_model(hf, emulated_dist(2, DEVICE))
    runner = ModelRunner(model, "graph")
    prompts = distinct_prompts(hf.config.vocab_size, [6, 6], seed=6)
    generate(runner, prompts, 2, eos_token_ids=())  # the prefill, then the first decode step captures the graph
    captured = [r.op for r in runner.captured_records]
    assert Counter(captured) == {"all_reduce": 2 * hf.config.num_hidden_layers + 1}  # the forward pass
    before = len(model.dist.stats.records)
    generate(runner, prompts, 2, eos_token_ids=())
    after = [r.op for r in model.dist.stats.records[before:]]
    # the prefill's collectives and both LM-head picks run eagerly; the replayed step records nothing
    assert Counter(after) == {"all_reduce": 2 * hf.config.num_hidden_layers + 1, "all_gather": 2}


@needs_cuda
def test_a_capture_pauses_collective_timing_and_restores_it():
    """A Dist that times its collectives synchronizes the device, which a capture forbids: paused, then restored."""
    hf = build_hf_model("llama31", seed=7)
    dist = emulated_dist(1, DEVICE)
    dist.time_collectives = True  # as a real rank's Dist
    model = from_hf_model(hf, dist)
    prompts = distinct_prompts(hf.config.vocab_size, [5, 5], seed=7)
    assert decode_tokens(model, prompts, "graph", 4) == decode_tokens(model, prompts, "eager", 4)
    assert dist.time_collectives and dist.stats.tag == ""


@needs_cuda
def test_the_roofline_is_timed_with_cuda_events_and_physically_possible():
    copy = measure_copy_bandwidth(DEVICE, 256 * 2**20)
    matmul = measure_matmul_tflops(DEVICE, torch.bfloat16, 4096)
    assert "CUDA events" in copy["method"]
    assert 100 < copy["gb_s"] < 20_000  # HBM of any GPU: 0.1 to 20 TB/s (read + write)
    assert 1 < matmul["tflops"] < 5_000  # dense bf16 of any GPU
    assert "random" in matmul["method"]


def test_an_emulated_sweep_on_the_device_names_it_and_its_memory(config_path, tmp_path):
    records = run_bench(BenchSpec(model=config_path, tps=[1, 2], batches=[1, 3], prompt_lens=[6], decode_steps=3,
                                  repeats=2, warmup=1, emulate=True, device=DEVICE, quick_roofline=True), out=tmp_path)
    assert len(records) == 4
    lines = [json.loads(line) for f in tmp_path.glob("*.jsonl") for line in f.read_text().splitlines()]
    assert lines == json.loads(json.dumps(records))
    for r in records:
        assert r["kind"] == "emulated" and r["label"].startswith("EMULATED")
        assert r["setting"]["decode_mode"] == ("graph" if ON_CUDA else "eager")
        assert r["baseline"]["decode_speed_vs_hf"] > 0 and r["comm"]["source"].startswith("modelled")
        device = r["env"]["device"]
        assert device["type"] == torch.device(DEVICE).type
        if ON_CUDA:
            assert device["name"] == torch.cuda.get_device_name() and device["driver"] and device["cuda"]
            assert r["memory"]["cuda_peak_bytes"] >= r["memory"]["weights_bytes"] > 0


def test_the_cli_runs_thread_ranks_on_the_device(capsys):
    outputs = {}
    for device in ("cpu", DEVICE):
        assert main(["generate", "--tp", "2", "--device", device, "--prompt", "The with statement",
                     "--max-new-tokens", "8", "--json"]) == 0
        outputs[device] = json.loads(capsys.readouterr().out)
    assert outputs[DEVICE]["device"].startswith(torch.device(DEVICE).type)
    assert outputs[DEVICE]["tokens"] == outputs["cpu"]["tokens"]


def test_torchrun_with_one_process_generates_and_benchmarks(config_path, tmp_path):
    """Under torchrun the rank takes cuda:0 and NCCL (gloo on a CPU); generate and bench run through it."""
    prompt = ["--prompt", "The with statement", "--max-new-tokens", "8", "--json"]
    under_torchrun = json.loads(stdout_or_raise(run_under_torchrun(1, ["tplab", "generate", "--tp", "1", *prompt])))
    assert under_torchrun["device"].startswith(torch.device(DEVICE).type)
    bench = ["tplab", "bench", "--model", config_path, "--tp", "1", "--batch", "1,3", "--prompt-len", "6",
             "--decode-steps", "3", "--repeats", "2", "--quick-roofline", "--quiet", "--json", "--out", str(tmp_path)]
    records = [json.loads(line) for line in stdout_or_raise(run_under_torchrun(1, bench)).splitlines()]
    assert [r["setting"]["backend"] for r in records] == ["torchrun", "torchrun"]
    assert {r["kind"] for r in records} == {"measured"}
    assert {r["env"]["device"]["type"] for r in records} == {torch.device(DEVICE).type}
    for r in records:  # the prefill's collectives are timed; a graph decode's run inside the replay
        assert r["setting"]["decode_mode"] == ("graph" if ON_CUDA else "eager")
        assert r["ttft_comm_ms"] is not None and (r["decode_comm_ms"] is None) == ON_CUDA


@needs_cuda
def test_the_fp8_gemm_matches_the_dequantized_weights_on_a_gpu_with_fp8_tensor_cores():
    from tplab.layers.weights import dequantize, fp8_gemm, fp8_gemm_supported, quantize_rows

    if not fp8_gemm_supported(torch.device(DEVICE)):
        pytest.skip("this GPU has no FP8 tensor cores (compute capability < 8.9)")
    torch.manual_seed(0)
    w = torch.randn(256, 512, device=DEVICE)
    x = torch.randn(32, 512, device=DEVICE, dtype=torch.bfloat16)
    q, scale = quantize_rows(w, "fp8")
    got = fp8_gemm(x, q, scale, None).float()
    want = x.float() @ dequantize(q, scale, torch.float32).T
    assert (got - want).abs().max() < 0.1 * want.abs().max()  # e4m3 activations: a few % of the output's range
