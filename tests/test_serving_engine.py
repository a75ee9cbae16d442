"""The serving engine on real ranks: every request gets the tokens it gets alone, with exact collective counts."""
import pytest

from tplab.bench.serving import serve_measured
from tplab.comm.launch import launch
from tplab.serving.load import synthetic_load
from tplab.serving.requests import Request
from tplab.serving.scheduler import SchedulerConfig
from tplab.specs.model import resolve_model
from tplab.specs.tiny import TINY_DIR
from tplab.testing import hf_greedy, make_checkpoint
from tplab.testing.serving_probe import serve_then_alone

TINY = resolve_model("tiny")
EOS = (1,)


def staggered_load() -> list[Request]:
    """Different prompt lengths (5..60), a shared prefix on most, arrivals spread over ~0.1 s."""
    load = synthetic_load(14, 150.0, (5, 60), (3, 20), TINY.vocab_size, seed=4, prefix_share=0.6,
                          special_ids=frozenset({0, 1}))
    sampled = [Request(len(load) + i, tuple(range(60 + i, 80 + 2 * i)), 10, 0.01 * i, temperature=0.9, seed=i)
               for i in range(2)]
    return [*load, *sampled]


# chunked prefill (16-token budget), preemption (24 blocks of 8 for 6 sequences), prefix hits (shared prefix)
TIGHT = SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=16, num_blocks=24, block_size=8, max_model_len=256)


@pytest.mark.parametrize("tp,backend", [(1, "threads"), (2, "threads"), (4, "threads"), (2, "gloo")])
def test_every_request_gets_the_tokens_it_gets_alone(tp, backend):
    requests = staggered_load()
    results = launch(serve_then_alone, tp, backend, kwargs=dict(model=TINY_DIR, requests=requests, config=TIGHT,
                                                                eos=EOS))
    run = results[0]["run"]
    served = [r["output_ids"] for r in run["requests"]]
    assert served == results[0]["alone"]
    assert [r["id"] for r in run["requests"]] == [r.id for r in requests]  # input order
    summary = run["summary"]
    assert summary["preemptions"] > 0 and summary["prefix_hit_rate"] > 0.1 and summary["rejected"] == 0
    steps = run["steps"]
    assert any(s["decodes"] and s["tokens"] > s["decodes"] for s in steps), "a prefill chunk rode with decodes"
    assert max(s["tokens"] for s in steps) <= TIGHT.max_num_batched_tokens


@pytest.mark.parametrize("tp,pp,backend", [(1, 2, "threads"), (2, 2, "threads"), (1, 3, "threads"),
                                           (2, 2, "gloo")])
def test_with_pipeline_stages_every_request_gets_the_tokens_it_gets_alone(tp, pp, backend):
    """Steps in flight on pp stages (4 layers: pp 3 splits them 1, 2, 1), chunked prefill, prefix hits, sampling."""
    requests = staggered_load()
    results = launch(serve_then_alone, tp, backend, pp=pp, kwargs=dict(model=TINY_DIR, requests=requests,
                                                                       config=TIGHT, eos=EOS))
    run = results[0]["run"]
    assert [r["output_ids"] for r in run["requests"]] == results[0]["alone"]
    assert all(rank["alone"] == results[0]["alone"] for rank in results)
    steps = run["steps"]  # a step starts before the one submitted ahead of it has come back: steps in flight
    assert sum(b["t"] < a["t"] + a["seconds"] for a, b in zip(steps, steps[1:])) > len(steps) // 2
    assert run["summary"]["prefix_hit_rate"] > 0.1


def test_exact_collectives_per_stage_with_steps_in_flight():
    """tp 2 x pp 2, every row emitting (no chunk splits a prompt): per step, stage 0 runs 2·2 + 1 all-reduces and
    hands on the plan (2 sends) and its activations (1 send); stage 1 runs 2·2 all-reduces and the argmax's
    all-gather, and its rank 0 returns the tokens (1 send) to global rank 0."""
    requests = synthetic_load(6, None, (4, 30), (2, 6), TINY.vocab_size, seed=2, special_ids=frozenset({0, 1}))
    config = SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=256, num_blocks=64, block_size=8)
    results = launch(serve_then_alone, 2, "threads", pp=2, kwargs=dict(model=TINY_DIR, requests=requests,
                                                                       config=config, eos=EOS))
    steps, warmup_steps = len(results[0]["run"]["steps"]), 1 + 3
    plans = 2 * (steps + warmup_steps) + 2  # length and contents of every plan, and one stop per phase
    for tp_rank, stage in ((0, 0), (1, 0), (0, 1), (1, 1)):
        rank = results[2 * stage + tp_rank]
        assert rank["stage"] == stage
        layers = 2  # the even split of 4 layers
        assert rank["serve"]["all_reduce"]["count"] == (2 * layers + (stage == 0)) * steps
        assert rank["serve"].get("all_gather", {"count": 0})["count"] == (steps if stage == 1 else 0)
        pipe, schedule = rank["pipe_serve"], rank["pipe_schedule"]
        if stage == 0:
            assert pipe["send"]["count"] == steps and schedule["send"]["count"] == plans
            assert pipe.get("recv", {"count": 0})["count"] == (steps if tp_rank == 0 else 0)  # the token return
        else:
            assert pipe["recv"]["count"] == steps and schedule["recv"]["count"] == plans
            assert pipe.get("send", {"count": 0})["count"] == (steps if tp_rank == 0 else 0)
        assert pipe.get("send", pipe.get("recv"))["bytes"] > 0
    hidden_bytes = sum(4 * TINY.hidden_size * s["tokens"] for s in results[0]["run"]["steps"])
    assert results[0]["pipe_serve"]["send"]["bytes"] == hidden_bytes  # float32 activations of every token fed


def test_exact_collectives_and_kv_bytes_per_rank():
    requests = synthetic_load(6, None, (4, 30), (2, 6), TINY.vocab_size, seed=2, special_ids=frozenset({0, 1}))
    by_tp = {tp: launch(serve_then_alone, tp, "threads", kwargs=dict(model=TINY_DIR, requests=requests, config=TIGHT,
                                                                     eos=EOS)) for tp in (1, 2)}
    for tp, results in by_tp.items():
        steps = len(results[0]["run"]["steps"])
        warmup_steps = 1 + 3  # the warm-up request: a 16-token prompt in one chunk, then 3 decodes
        for rank in results:
            assert rank["serve"]["all_reduce"]["count"] == (2 * TINY.num_layers + 1) * steps
            assert rank["serve"]["all_gather"]["count"] == steps  # greedy: the vocab-parallel argmax, once per step
            assert rank["schedule"]["broadcast"]["count"] == 2 * (steps + warmup_steps) + 2
        block = 2 * TINY.num_layers * TIGHT.block_size * TINY.kv_heads_per_rank(tp) * TINY.head_dim * 4
        assert results[0]["cache_bytes"] == TIGHT.num_blocks * block
    assert by_tp[2][0]["cache_bytes"] * 2 == by_tp[1][0]["cache_bytes"]  # each rank holds half the KV heads


def test_sliding_window_attention_through_the_paged_cache_matches_hugging_face(tmp_path):
    """Mistral's 6-token window, read through the block-diagonal mask, against HF's own greedy decoding alone."""
    directory, hf = make_checkpoint("mistral", tmp_path / "mistral", seed=3)
    requests = [Request(i, tuple(range(3 + i, 3 + i + n)), 8, 0.0) for i, n in enumerate((4, 19, 11, 30))]
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=12, num_blocks=32, block_size=4,
                             max_model_len=128)
    results = launch(serve_then_alone, 2, "threads", kwargs=dict(model=directory, requests=requests, config=config,
                                                                 eos=(2,)))
    for request, row in zip(requests, results[0]["run"]["requests"]):
        assert row["output_ids"] == hf_greedy(hf, list(request.prompt), request.max_new_tokens, (2,))[0]


def test_static_batching_through_the_generation_loop_gives_the_same_tokens():
    requests = synthetic_load(10, None, (4, 40), (2, 12), TINY.vocab_size, seed=5, special_ids=frozenset({0, 1}))
    config = SchedulerConfig(max_num_seqs=4, num_blocks=64, block_size=16)
    continuous = serve_measured(TINY_DIR, requests, config, 2)
    padded = serve_measured(TINY_DIR, requests, SchedulerConfig(**{**config.__dict__, "policy": "padded"}), 2)
    assert [r["output_ids"] for r in padded["requests"]] == [r["output_ids"] for r in continuous["requests"]]
    assert padded["summary"]["completed"] == 10


def test_a_stop_sequence_ends_its_own_request_only():
    requests = synthetic_load(5, None, (6, 30), (12, 12), TINY.vocab_size, seed=8, special_ids=frozenset({0, 1}))
    config = SchedulerConfig(max_num_seqs=5, num_blocks=64, block_size=16)
    free = [r["output_ids"] for r in serve_measured(TINY_DIR, requests, config, 2)["requests"]]
    stop = tuple(free[1][3:5])
    stopped = [Request(r.id, r.prompt, r.max_new_tokens, stop=(stop,) if r.id == 1 else ()) for r in requests]
    rows = serve_measured(TINY_DIR, stopped, config, 2)["requests"]
    end = next(i for i in range(2, len(free[1]) + 1) if tuple(free[1][i - 2:i]) == stop)
    assert rows[1]["output_ids"] == free[1][:end] and rows[1]["finish_reason"] == "stop"
    assert [r["output_ids"] for i, r in enumerate(rows) if i != 1] == [f for i, f in enumerate(free) if i != 1]


@pytest.mark.parametrize("backend", ["threads", "gloo"])
def test_a_stage_that_fails_while_steps_are_in_flight_stops_every_rank_with_its_error(backend):
    import time

    from probes import STAGE_FAILURE, serve_with_a_failing_last_stage

    requests = synthetic_load(8, None, (4, 20), (4, 8), TINY.vocab_size, seed=1, special_ids=frozenset({0, 1}))
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=128, num_blocks=64, block_size=8)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=STAGE_FAILURE):
        launch(serve_with_a_failing_last_stage, 1, backend, pp=2, timeout=60,
               kwargs=dict(requests=requests, config=config, fail_at=8))
    assert time.monotonic() - started < 30, "the other ranks stopped at once, not at the timeout"
