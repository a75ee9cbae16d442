"""The serving engine on real ranks: every request gets the tokens it gets alone, with exact collective counts."""
import pytest
import torch

from tplab.bench.serving import serve_measured
from tplab.comm.launch import launch
from tplab.engine.runner import compiled_paged_attention
from tplab.model.attention import attention_mask, grouped_query_attention
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


@pytest.mark.parametrize("tp,backend,compiled", [(1, "threads", False), (2, "threads", False), (4, "threads", False),
                                                 (2, "gloo", False), (2, "threads", True)])
def test_every_request_gets_the_tokens_it_gets_alone(tp, backend, compiled):
    """``compiled``: the engine's decodes through the compiled paged-attention kernel, the requests alone eager."""
    requests = staggered_load()
    results = launch(serve_then_alone, tp, backend, kwargs=dict(model=TINY_DIR, requests=requests, config=TIGHT,
                                                                eos=EOS, compiled_attention=compiled))
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


@pytest.mark.parametrize("compiled", [False, True])
def test_sliding_window_attention_through_the_paged_cache_matches_hugging_face(tmp_path, compiled):
    """Mistral's 6-token window, read through the block-diagonal mask (or by the compiled paged-attention kernel),
    against HF's own greedy decoding alone."""
    directory, hf = make_checkpoint("mistral", tmp_path / "mistral", seed=3)
    requests = [Request(i, tuple(range(3 + i, 3 + i + n)), 8, 0.0) for i, n in enumerate((4, 19, 11, 30))]
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=12, num_blocks=32, block_size=4,
                             max_model_len=128)
    results = launch(serve_then_alone, 2, "threads", kwargs=dict(model=directory, requests=requests, config=config,
                                                                 eos=(2,), compiled_attention=compiled))
    for request, row in zip(requests, results[0]["run"]["requests"]):
        assert row["output_ids"] == hf_greedy(hf, list(request.prompt), request.max_new_tokens, (2,))[0]


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_the_paged_attention_kernel_matches_attention_over_gathered_keys(dtype, tolerance):
    """compiled_paged_attention reads the keys in shuffled blocks; grouped_query_attention reads the same keys
    gathered, left-padded: GQA (8 query heads on 2 KV heads), a 5-token window, rows of 1 to 37 keys, and a step
    of one row (a size the compiled graph must not have specialized on). Each dtype is a layout of its own, compiled
    though dynamo would run the second graph of one code object eagerly (its limit set to 1 here)."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    torch.manual_seed(0)
    block, heads, kv_heads, head_dim = 4, 8, 2, 16
    blocks = torch.randperm(40)
    store_k, store_v = (torch.randn(40 * block, kv_heads, head_dim, dtype=dtype) for _ in range(2))
    kernel = compiled_paged_attention()
    for lengths in ([37, 1, 12, 20], [9]):
        longest, tables, first = max(lengths), [], 0
        for n in lengths:
            tables.append(blocks[first:first + -(-n // block)])
            first += len(tables[-1])
        pos = torch.arange(longest)[None] - (longest - torch.tensor(lengths))[:, None]  # left-padded
        read = torch.stack([t[p.clamp_min(0) // block] * block + p.clamp_min(0) % block for t, p in zip(tables, pos)])
        mask = attention_mask(torch.tensor([longest - 1]), pos >= 0, 5)  # (rows, 1, 1, S)
        q = torch.randn(len(lengths), heads, head_dim, dtype=dtype)
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1):
            out = kernel(q, store_k, store_v, read, mask[:, 0, 0], head_dim ** -0.5)
        keys, values = (s[read].permute(0, 2, 1, 3) for s in (store_k, store_v))
        expected = grouped_query_attention(q[:, :, None], keys, values, mask, head_dim ** -0.5)[:, :, 0]
        assert out.dtype == dtype and out.shape == expected.shape
        torch.testing.assert_close(out.float(), expected.float(), atol=tolerance, rtol=tolerance)
    assert counters["stats"]["unique_graphs"] == graphs + 1, "one graph for this layout, for both steps"


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


def test_a_max_model_len_beyond_the_models_context_is_refused_in_one_line():
    config = SchedulerConfig(max_model_len=2 * TINY.max_position_embeddings)
    with pytest.raises(ValueError, match=f"max_model_len={config.max_model_len} exceeds the model's context of "
                                         f"{TINY.max_position_embeddings} positions"):
        serve_measured(TINY_DIR, [Request(0, (5, 6, 7), 2)], config, 1)


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
