"""The scheduler, block manager, load generator, metrics and simulator: pure Python, no rank."""
import ast
import json
import math
from pathlib import Path

import pytest

from tplab.perf.batch import ModelledStepCost
from tplab.serving.blocks import BlockManager
from tplab.serving.load import arrival_times, parse_range, read_requests, synthetic_load
from tplab.serving.metrics import SLO, percentile, summarize
from tplab.serving.requests import Request, Sequence
from tplab.serving.scheduler import Scheduler, SchedulerConfig
from tplab.serving.simulator import simulate
from tplab.serving.step_cost import LinearStepCost, fit_step_cost

SERVING = Path(__file__).resolve().parent.parent / "tplab" / "serving"
PURE_PYTHON = ("requests", "blocks", "scheduler", "load", "metrics", "loop", "step_cost", "simulator")


def test_the_scheduler_and_the_simulator_never_import_torch():
    """What a serving engine plans with, and the simulator replays, is pure Python: the engine on ranks and the
    static baseline beside them in tplab/serving are the only modules there that touch tensors."""
    for path in (SERVING / f"{name}.py" for name in PURE_PYTHON):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(name.split(".")[0] == "torch" for name in names), path.name
        assert not any(name.startswith(("tplab.perf", "tplab.engine", "tplab.model", "tplab.comm", "tplab.serving.engine",
                                        "tplab.serving.static", "tplab.serving.plan")) for name in names), path.name


def seq(tokens, max_new=4, rid=0):
    return Sequence(Request(rid, tuple(tokens), max_new))


def test_prefix_blocks_are_shared_by_reference_count_and_never_the_last_token():
    blocks = BlockManager(num_blocks=8, block_size=4)
    a = seq(range(10), rid=0)  # 2 full blocks + 2 tokens
    blocks.admit(a, blocks.cached_prefix(a))
    blocks.grow(a, 10)
    a.num_computed = 10
    blocks.register_full(a)
    b = seq([*range(8), 99, 98], rid=1)  # same first 8 tokens
    hit = blocks.cached_prefix(b)
    assert hit == a.block_ids[:2]
    blocks.admit(b, hit)
    assert b.num_computed == 8 and [blocks.blocks[i].ref_count for i in hit] == [2, 2]
    c = seq(range(8), rid=2)  # exactly two full blocks: the last token is computed, so only one block hits
    assert blocks.cached_prefix(c) == a.block_ids[:1]
    d = seq([1, *range(1, 10)], rid=3)  # differs in the first block: no hit at all
    assert blocks.cached_prefix(d) == []
    blocks.release(a)
    assert [blocks.blocks[i].ref_count for i in hit] == [1, 1] and blocks.used == 2
    blocks.release(b)
    assert blocks.used == 0
    e = seq(range(12), rid=4)  # freed blocks keep their contents: still a hit, revived from the free list
    assert blocks.cached_prefix(e) == hit
    assert blocks.can_admit(e, 4, hit)


def test_block_sizes_must_be_powers_of_two():
    with pytest.raises(ValueError, match="power of two"):
        BlockManager(8, 12)
    with pytest.raises(ValueError, match="power of two"):
        SchedulerConfig(block_size=24)


def drive(requests, config, step_time=0.01):
    """Run the scheduler with a fixed step time, checking each plan's invariants."""
    seen_mixed = False

    def cost(rows):
        return step_time

    scheduler_plans = []
    run = simulate(requests, config, lambda rows: scheduler_plans.append(rows) or cost(rows))
    for rows in scheduler_plans:
        assert sum(n for _, n in rows) <= config.max_num_batched_tokens or config.policy == "static"
        assert len(rows) <= config.max_num_seqs
        seen_mixed |= any(n == 1 for _, n in rows) and any(n > 1 for _, n in rows)
    return run, scheduler_plans, seen_mixed


def test_chunked_prefill_splits_long_prompts_and_batches_them_with_decodes():
    requests = [Request(0, tuple(range(3, 23)), 30), Request(1, tuple(range(40, 140)), 5, arrival_s=0.05)]
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, num_blocks=64, block_size=4)
    run, plans, mixed = drive(requests, config)
    assert mixed, "a prefill chunk ran in the same step as a decode"
    long_chunks = [n for rows in plans for start, n in rows if n > 1]
    assert max(long_chunks) <= 16 and sum(long_chunks) >= 100
    assert [len(r["output_ids"]) for r in run.requests] == [30, 5]


def test_admission_control_caps_the_running_sequences_first_come_first_served():
    requests = [Request(i, (5,) * 8, 6) for i in range(10)]
    run, plans, _ = drive(requests, SchedulerConfig(max_num_seqs=3, num_blocks=64, block_size=4))
    assert max(len(rows) for rows in plans) == 3
    firsts = [r["ttft_ms"] for r in run.requests]
    assert firsts == sorted(firsts)


def test_preemption_by_recompute_never_deadlocks_a_full_cache():
    requests = [Request(i, tuple(range(3 + i, 19 + i)), 24) for i in range(6)]
    config = SchedulerConfig(max_num_seqs=6, num_blocks=16, block_size=4, prefix_caching=False)
    run, _, _ = drive(requests, config)
    assert run.summary["preemptions"] > 0
    assert [len(r["output_ids"]) for r in run.requests] == [24] * 6


def test_a_request_that_can_never_fit_is_rejected_with_its_reason():
    scheduler = Scheduler(SchedulerConfig(num_blocks=4, block_size=4, max_model_len=64))
    seq_ = scheduler.add(Request(0, tuple(range(3, 20)), 10), 0.0)
    assert seq_.finish_reason.startswith("rejected") and "the cache has 4" in seq_.finish_reason
    seq_ = scheduler.add(Request(1, tuple(range(3, 60)), 10), 0.0)
    assert "max_model_len=64" in seq_.finish_reason
    assert not scheduler.has_work


def test_static_batches_admit_only_when_the_last_batch_is_done():
    requests = [Request(i, (7,) * 5, 3 if i % 2 else 12) for i in range(4)]
    run, plans, _ = drive(requests, SchedulerConfig(max_num_seqs=2, num_blocks=32, block_size=4, policy="static"))
    ttft = [r["ttft_ms"] for r in run.requests]
    assert ttft[2] > max(r["latency_ms"] for r in run.requests[:2]) - 1e-9  # batch 2 starts after batch 1 ends


def test_padded_policy_belongs_to_the_generation_loop():
    with pytest.raises(ValueError, match="generation loop"):
        Scheduler(SchedulerConfig(policy="padded"))


def test_load_generator_ranges_rates_prefixes_and_bounds():
    assert parse_range("--prompt-len", "16:128") == (16, 128) and parse_range("--x", "7") == (7, 7)
    for bad in ("0", "9:3", "a:b", "1:2:3"):
        with pytest.raises(ValueError, match="LOW:HIGH"):
            parse_range("--prompt-len", bad)
    import random
    times = arrival_times(4000, 5.0, random.Random(0))
    assert abs(len(times) / times[-1] - 5.0) < 0.3
    with pytest.raises(ValueError, match="> 0"):
        arrival_times(3, 0.0, random.Random(0))
    load = synthetic_load(50, None, (20, 40), (2, 9), 100, seed=3, prefix_share=0.5, special_ids=frozenset({0, 1}))
    assert all(20 <= len(r.prompt) <= 40 and 2 <= r.max_new_tokens <= 9 for r in load)
    assert all(0 not in r.prompt and 1 not in r.prompt for r in load)
    shortest = min(len(r.prompt) for r in load)
    assert len({r.prompt[:shortest // 2] for r in load}) == 1  # one shared system prompt
    assert synthetic_load(50, None, (20, 40), (2, 9), 100, seed=3) == synthetic_load(50, None, (20, 40), (2, 9), 100,
                                                                                     seed=3)
    assert len(synthetic_load(100, 10.0, (4, 4), (2, 2), 50, duration_s=2.0)) < 40


def test_replayed_requests_and_their_errors(tmp_path):
    good = tmp_path / "load.jsonl"
    good.write_text(json.dumps({"prompt_ids": [5, 6, 7], "max_new_tokens": 4, "arrival_s": 0.5}) + "\n\n"
                    + json.dumps({"prompt": "hi", "max_new_tokens": 2}) + "\n")
    requests = read_requests(good, tokenize=lambda text: [9] * len(text))
    assert [(r.prompt, r.max_new_tokens, r.arrival_s) for r in requests] == [((5, 6, 7), 4, 0.5), ((9, 9), 2, 0.0)]
    with pytest.raises(ValueError, match="more than --num-requests=1"):
        read_requests(good, max_requests=1)
    with pytest.raises(ValueError, match="no tokenizer"):
        read_requests(good)
    bad = tmp_path / "bad.jsonl"
    for text, message in [("{", "load.jsonl|bad.jsonl:1 is not JSON"), ('{"prompt_ids": [1]}', "needs max_new_tokens"),
                          ('{"prompt_ids": [1.5], "max_new_tokens": 2}', "list of integers"),
                          ('{"prompt_ids": [1], "max_new_tokens": 0}', "positive integer"),
                          ('{"prompt_ids": [1], "max_new_tokens": 2, "arrival_s": 1e9}', r"arrival_s must be in \[0, 86400\]"),
                          ('{"prompt_ids": [1], "max_new_tokens": 2, "arrival_s": Infinity}', "arrival_s must be"),
                          ('{"prompt_ids": [1], "max_new_tokens": 2, "arrival_s": NaN}', "arrival_s must be")]:
        bad.write_text(text + "\n")
        with pytest.raises(ValueError, match=message.split("|")[-1]):
            read_requests(bad)


def test_percentiles_and_goodput():
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5 and percentile([], 50) is None
    assert percentile(list(range(101)), 90) == 90
    rows = [{"ttft_ms": t, "tpot_ms": p, "latency_ms": 1, "queue_ms": 0, "output_ids": [1, 2]}
            for t, p in [(10, 5), (30, 5), (10, 50)]]
    summary = summarize(rows, 2.0, 0, None, [(0.0, 0.5), (1.0, 1.0)], SLO(ttft_ms=20, tpot_ms=10))
    assert summary["goodput_req_s"] == 0.5 and summary["throughput_tok_s"] == 3.0
    assert summary["kv_utilization_mean"] == 0.75 and summary["ttft_ms"]["p50"] == 10


def test_the_step_cost_fit_recovers_known_coefficients():
    truth = LinearStepCost(0.002, 3e-5, 2e-4, 1e-7)
    steps = []
    for rows in ([(0, 64)], [(10, 1)] * 5, [(50, 1)] * 3 + [(0, 100)], [(7, 1), (0, 30)], [(90, 1)] * 8, [(0, 9)]):
        steps.append({"tokens": sum(n for _, n in rows), "rows": len(rows),
                      "attended": sum(n * s + n * (n + 1) // 2 for s, n in rows), "seconds": truth(rows)})
    fitted = fit_step_cost(steps)
    for name in ("fixed", "per_token", "per_row", "per_key"):
        assert math.isclose(getattr(fitted, name), getattr(truth, name), rel_tol=1e-6)


def test_the_modelled_step_reads_the_weights_once_per_step():
    cost = ModelledStepCost("llama-3-70b", "h100-sxm", 4, "fp8")
    one, eight = cost([(2048, 1)]), cost([(2048, 1)] * 8)
    assert one < eight < 2 * one  # decode is memory-bound: 8 rows cost far less than 8 steps
    assert cost([(0, 2048)]) > 5 * one  # a 2048-token prefill chunk is compute-bound
    assert cost.kv_blocks(16, 24, 8192) * 16 >= 24 * 8192  # TP4 FP8 on H100 holds 24 sequences of 8K
    with pytest.raises(ValueError, match="no memory for a KV cache"):
        ModelledStepCost("llama-3-70b", "h100-sxm", 1, "bf16").kv_blocks(16, 24, 8192)


def test_the_simulator_is_deterministic_and_labels_nothing_measured():
    load = synthetic_load(40, 4.0, (64, 256), (16, 64), 1000, seed=1)
    config = SchedulerConfig(max_num_seqs=8, num_blocks=512, block_size=16, max_model_len=512)
    cost = ModelledStepCost("llama-3-8b", "h100-sxm", 1, "bf16")
    first, second = simulate(load, config, cost), simulate(load, config, cost)
    assert first.summary == second.summary
    assert all(len(r["output_ids"]) == q.max_new_tokens for r, q in zip(first.requests, load))


def test_a_closed_loop_keeps_at_most_n_requests_in_flight_and_times_them_from_sending():
    """All 12 requests arrive at 0; with concurrency 3 the client sends a new one only when one finishes."""
    requests = [Request(i, tuple(range(1, 9)), 4) for i in range(12)]
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, num_blocks=64, block_size=8, max_model_len=64)
    run = simulate(requests, config, lambda rows: 0.01, concurrency=3)
    assert run.summary["completed"] == 12
    for row in run.requests:  # each request's clock starts when it is sent, and it is scheduled at once
        assert row["ttft_ms"] > 0 and row["queue_ms"] == 0
    assert 2.5 < run.summary["concurrency_mean"] <= 3
    open_loop = simulate(requests, config, lambda rows: 0.01)
    assert max(r["ttft_ms"] for r in open_loop.requests) > max(r["ttft_ms"] for r in run.requests)


def test_padded_generation_refuses_a_closed_loop_and_pipeline_stages():
    from tplab.serving.scheduler import check_serving

    for policy in ("continuous", "static", "padded"):
        check_serving(policy, None)
    check_serving("static", 4, pp=2)
    with pytest.raises(ValueError, match="--concurrency needs continuous or static"):
        check_serving("padded", 4)
    with pytest.raises(ValueError, match="policy 'padded' runs the generation loop on one stage: --pp 2 needs"):
        check_serving("padded", None, pp=2)
