"""Pipeline stages in the serving loop and the cost model: steps in flight, the simulator's stages and hops, and
``plan``/``simulate`` with --pp (pure Python, no rank)."""
import json
import math

import pytest
from cli_helpers import run_cli

from tplab.bench.published import load_tp_vs_pp, model_tp_vs_pp
from tplab.perf.batch import ModelledStepCost, simulate_on
from tplab.perf.pipeline import estimate_pipeline
from tplab.serving.requests import Request
from tplab.serving.scheduler import SchedulerConfig
from tplab.serving.simulator import simulate

CONFIG = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, num_blocks=64, block_size=8, max_model_len=64)



def test_two_steps_in_flight_share_the_sequences_and_skip_those_not_back():
    """Four requests (prompts of 8 to 11 tokens, 3 outputs) through 2 stages of 10 ms: each step takes half of them,
    a sequence whose step has not come back waits, and both stages stay busy until the last step."""
    requests = [Request(i, tuple(range(1, 9 + i)), 3) for i in range(4)]
    plans = []
    run = simulate(requests, CONFIG, lambda rows: plans.append(rows) or 0.01, stages=2)
    assert plans == [[(0, 8), (0, 9)], [(0, 10), (0, 11)], [(8, 1), (9, 1)], [(10, 1), (11, 1)],
                     [(9, 1), (10, 1)], [(11, 1), (12, 1)]]
    assert math.isclose(run.summary["duration_s"], 0.07)  # 6 steps enter stage 1 back to back, the last leaves at 0.07
    assert [len(r["output_ids"]) for r in run.requests] == [3] * 4


def test_one_request_crosses_every_stage_and_hop_for_each_token():
    """3 stages of 10 ms, 2 ms a hop, 1 ms for the token return: 35 ms a token, first and every other."""
    run = simulate([Request(0, (1, 2, 3), 4)], CONFIG, lambda rows: 0.01, stages=3,
                   hop_seconds=lambda tokens: 0.002, return_seconds=lambda rows: 0.001)
    row = run.requests[0]
    assert math.isclose(row["ttft_ms"], 35) and math.isclose(run.summary["duration_s"], 4 * 0.035)


@pytest.mark.parametrize("tp, pp", [(4, 1), (4, 2), (2, 4), (8, 2)])
def test_plan_and_simulate_agree_at_batch_1(tp, pp):
    """One request alone: the simulator's TTFT and time per token are the pipeline estimate's, within 2%."""
    kw = dict(model="llama-3-70b", gpu="h100-sxm", dtype="fp8")
    e = estimate_pipeline(tp=tp, pp=pp, micro_batches=1, batch=1, prompt_len=1024, output_len=128, network=None, **kw)
    cost = ModelledStepCost(kw["model"], kw["gpu"], tp, kw["dtype"], pp=pp)
    config = SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=2048, num_blocks=2048, block_size=16,
                             max_model_len=2048)
    run = simulate_on(cost, [Request(0, tuple(range(1, 1025)), 128)], config)
    s = run.summary
    assert math.isclose(s["ttft_ms"]["p50"], e.ttft_ms, rel_tol=0.02)
    assert math.isclose(s["tpot_ms"]["p50"], e.decode_ms_per_token, rel_tol=0.02)
    assert e.stage_link == ("-" if pp == 1 else "nvlink" if tp * pp <= 8 else "ib-ndr-400")


def test_the_stage_cost_takes_each_stage_its_layers_and_the_fullest_stage_its_memory():
    one, two = (ModelledStepCost("llama-3-70b", "h100-sxm", 4, "fp8", pp=pp) for pp in (1, 2))
    rows = [(2048, 1)] * 8
    assert 0.45 < two(rows) / one(rows) < 0.6  # 40 of 80 layers, and the end stage's embedding or head
    assert two.kv_blocks(16, 64, 8192) > 2 * one.kv_blocks(16, 64, 8192)  # half the layers' KV per token, and room
    assert two.activation_hop_seconds(8) > two.token_return_seconds(8) > 0 and one.activation_hop_seconds(8) == 0


def test_plan_gpus_puts_tp_pp_and_tp_x_pp_side_by_side(capsys):
    code, out, _ = run_cli(capsys, "plan", "--model", "llama-3-70b", "--gpu", "h100-sxm", "--gpus", "16", "--dtype",
                           "fp8", "--context", "2048", "--output", "256")
    assert code == 0 and out.startswith("MODELLED estimates, not measurements")
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["tp", "pp"])
    rows = {(int(r[0]), int(r[1])): r for r in (line.split() for line in lines[header + 1:header + 6])}
    assert sorted(rows) == [(1, 16), (2, 8), (4, 4), (8, 2), (16, 1)]
    tp16, tp8pp2 = rows[16, 1], rows[8, 2]
    assert tp16[4:6] == ["ib-ndr-400", "-"] and tp8pp2[4:6] == ["nvlink", "ib-ndr-400"]
    decode = {k: float(r[8]) for k, r in rows.items()}
    assert decode[8, 2] < decode[16, 1]  # TP's all-reduces over InfiniBand cost more than one hop per stage
    assert decode[8, 2] < decode[4, 4] < decode[2, 8] < decode[1, 16]  # more stages, more serial time per token
    assert float(tp8pp2[14]) > 2 * float(tp16[14])  # throughput at the largest batch that fits
    assert [r[12] for r in (rows[1, 16], rows[16, 1])] == ["16", "0"]  # hops per token
    assert lines[-1] == "all figures above are modelled (not measured)"


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "1000"], "--gpus=1000 splits into no tp x pp that llama-3-70b takes"),
    (["--pp", "0"], "pp must be a positive integer, got 0"),
    (["--pp", "81"], "pp=81 is more than the model's 80 decoder layers: each stage needs at least one; valid pp: 1 to 80"),
    (["--pp", "2", "--stage-link", "carrier-pigeon"], "carrier-pigeon"),
])
def test_plan_pp_errors_are_one_line(capsys, argv, message):
    code, out, err = run_cli(capsys, "plan", "--model", "llama-3-70b", "--gpu", "h100-sxm", *argv)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and message in err


def test_simulate_pp_keeps_steps_in_flight_and_says_over_which_link(capsys):
    base = ["simulate", "--model", "llama-3-70b", "--gpu", "h100-sxm", "--tp", "2", "--dtype", "fp8",
            "--num-requests", "40", "--prompt-len", "256:1024", "--output-len", "32:128", "--max-num-seqs", "32"]
    code, out, _ = run_cli(capsys, *base, "--pp", "2")
    assert code == 0 and out.startswith("[MODELLED, not measured: llama-3-70b on 2 x h100-sxm over nvlink, 2 stages "
                                        "over nvlink")
    reports = {}
    for pp in (1, 2):
        code, out, _ = run_cli(capsys, *base, "--pp", str(pp), "--json")
        reports[pp] = json.loads(out)
    assert reports[2]["setting"]["pp"] == 2 and reports[2]["setting"]["stage_link"] == "nvlink"
    assert reports[1]["setting"]["stage_link"] is None
    one, two = reports[1]["summary"], reports[2]["summary"]
    assert two["steps"] > 1.8 * one["steps"]  # two steps in flight, each with about half the sequences
    # at the same 32 sequences, a memory-bound round reads each stage's weights once per step in flight: twice the
    # GPUs buy little throughput here; what stages buy is memory for a larger batch (plan's "max batch")
    assert 1.0 < two["throughput_tok_s"] / one["throughput_tok_s"] < 1.3
    code, out, err = run_cli(capsys, *base, "--pp", "81")
    assert code == 2 and out == "" and "valid pp: 1 to 80" in err and len(err.strip().splitlines()) == 1


def test_the_model_against_published_tp_pp_comparisons():
    """NVIDIA's Llama 3.1 405B on 8 H200s (TP8 5.6x PP8 per user at minimum latency, PP8 1.5x TP8 at maximum
    throughput) and a TensorRT-LLM user's Llama 13B on 4 A100s (p90 latency at 3 requests/s: TP4 < TP2 x PP2 < PP4)."""
    comparisons = {c["id"]: c for c in load_tp_vs_pp()}
    assert all(c["source"]["where"] and c["notes"] for c in comparisons.values())
    latency = model_tp_vs_pp(comparisons["tpp-001"])
    assert latency["modelled"] == pytest.approx(latency["published"], rel=0.2)
    throughput = model_tp_vs_pp(comparisons["tpp-002"])
    # the direction holds (pipelines win when full); the model's 1.17x falls short of the 1.5x measured
    assert 1.0 < throughput["modelled"] < throughput["published"]
    order = model_tp_vs_pp(comparisons["tpp-003"])
    assert order["modelled"] == order["published"] == ["tp4pp1", "tp2pp2", "tp1pp4"]
