"""Pipeline stages: a model split into pp stages of tp ranks gives the unsharded HF model's tokens and logits.

The checkpoints have 5 decoder layers, so no pp in 2, 3, 4 divides them evenly; the rows of a batch have
different prompts of different lengths. Per decode step and stage, the collectives are counted exactly: the
stage's TP all-reduces for each micro-batch, one activation send/recv per micro-batch between neighbouring
stages, and one token return.
"""
import pytest
import torch

from tplab import launch
from tplab.engine.generate import generate_rank_program, micro_batch_rows
from tplab.model.sampling import SamplingParams
from tplab.specs.sharding import stage_layers
from tplab.testing import distinct_prompts, hf_greedy, make_checkpoint

LAYERS = 5
LENGTHS = [4, 9, 6]
NEW_TOKENS = 6
ATOL = 1e-4
GRIDS = [(1, 2, "threads"), (2, 2, "threads"), (1, 3, "threads"), (1, 4, "threads"), (2, 4, "threads"),
         (2, 2, "gloo")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for seed, name in enumerate(("llama31", "qwen2")):  # qwen2: q/k/v biases, tied embeddings
        path, hf = make_checkpoint(name, tmp_path_factory.mktemp(name), seed=seed, num_hidden_layers=LAYERS)
        prompts = distinct_prompts(hf.config.vocab_size, LENGTHS, seed=10 + seed)
        refs = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
        out[name] = (path, hf.config, prompts, [r[0] for r in refs], [r[1] for r in refs])
    return out


def run(path, prompts, tp, pp, backend="threads", new_tokens=NEW_TOKENS, **kwargs):
    return launch(generate_rank_program, tp, backend, pp=pp,
                  kwargs=dict(model=str(path), prompts=prompts, max_new_tokens=new_tokens, eos_token_ids=(),
                              **kwargs))


def test_the_even_split_gives_the_leftover_layers_to_the_stages_before_the_last():
    assert [len(r) for r in stage_layers(5, 2)] == [3, 2]
    assert [len(r) for r in stage_layers(10, 4)] == [2, 3, 3, 2]
    assert [len(r) for r in stage_layers(80, 3)] == [27, 27, 26]
    assert stage_layers(5, 3, [1, 1, 3]) == [range(0, 1), range(1, 2), range(2, 5)]
    assert micro_batch_rows(5, 2) == [slice(0, 3), slice(3, 5)]
    with pytest.raises(ValueError, match="pp=6 is more than the model's 5 decoder layers.*valid pp: 1 to 5"):
        stage_layers(5, 6)
    with pytest.raises(ValueError, match="sum to the model's 5 layers, e.g. 3,2"):
        stage_layers(5, 2, [2, 2])
    with pytest.raises(ValueError, match="positive counts"):
        stage_layers(5, 2, [6, -1])
    with pytest.raises(ValueError, match="micro_batches=4 is more than the batch of 3"):
        micro_batch_rows(3, 4)


@pytest.mark.parametrize("name", ["llama31", "qwen2"])
@pytest.mark.parametrize("tp,pp,backend", GRIDS)
def test_stages_give_hf_greedy_tokens_and_logits(checkpoints, name, tp, pp, backend):
    path, _, prompts, hf_tokens, hf_logits = checkpoints[name]
    results = run(path, prompts, tp, pp, backend, keep_logits=True)
    assert [r.stage for r in results] == [g // tp for g in range(tp * pp)]
    for r in results:
        assert r.tokens == hf_tokens  # the token return gives every stage the same ids
    last = results[-1]
    assert last.micro_batches == min(pp, len(prompts))
    for step, logits in enumerate(last.logits):
        for row in range(len(prompts)):
            torch.testing.assert_close(logits[row], hf_logits[row][step], rtol=0, atol=ATOL)
    assert all(r.logits is None for r in results if r.stage < pp - 1)  # logits stay on the last stage


def test_layers_per_stage_as_given_and_one_micro_batch(checkpoints):
    path, _, prompts, hf_tokens, _ = checkpoints["llama31"]
    for r in run(path, prompts, 1, 2, pp_layers=[1, 4], micro_batches=1):
        assert r.tokens == hf_tokens and r.micro_batches == 1


def test_seeded_sampling_is_the_same_with_stages(checkpoints):
    path, _, prompts, _, _ = checkpoints["qwen2"]
    sampling = SamplingParams(temperature=0.9, top_k=50, seed=7)
    reference = run(path, prompts, 1, 1, sampling=sampling)[0].tokens
    for tp, pp in [(2, 2), (1, 3)]:
        assert all(r.tokens == reference for r in run(path, prompts, tp, pp, sampling=sampling))


@pytest.mark.parametrize("tp,pp,micro", [(2, 2, 2), (1, 3, 3), (1, 3, 1), (2, 4, 2)])
def test_exact_collectives_per_decode_step_and_stage(checkpoints, tp, pp, micro):
    path, config, prompts, _, _ = checkpoints["llama31"]
    batch, hidden, steps = len(prompts), config.hidden_size, NEW_TOKENS - 1
    results = run(path, prompts, tp, pp, micro_batches=micro)
    for r in results:
        layers, first, last = len(stage_layers(LAYERS, pp)[r.stage]), r.stage == 0, r.stage == pp - 1
        tp_ops = r.comm["decode"]
        assert tp_ops["all_reduce"]["count"] == steps * micro * (2 * layers + first)
        assert tp_ops["all_reduce"]["bytes"] == steps * (2 * layers + first) * batch * hidden * 4
        assert tp_ops.get("all_gather", {"count": 0})["count"] == (steps if last else 0)  # the greedy argmax
        pipe = r.pipeline_comm["decode"]
        hop = {"count": steps * micro, "bytes": steps * batch * hidden * 4}  # every row's (1, hidden) float32
        assert {k: pipe["send"][k] for k in hop} == hop if not last else "send" not in pipe
        assert {k: pipe["recv"][k] for k in hop} == hop if not first else "recv" not in pipe
        assert (pipe["broadcast"]["count"], pipe["broadcast"]["bytes"]) == (steps, steps * batch * 8)
        assert len(r.step_pipeline_s) == NEW_TOKENS and 0 <= r.bubble < 1


def test_a_stage_runs_eager_only(checkpoints):
    path, _, prompts, _, _ = checkpoints["llama31"]
    from tplab.engine.runner import ModelRunner
    from tplab.model.loading import from_pretrained

    def program(dist):
        with pytest.raises(ValueError, match="with pipeline stages use 'eager'"):
            ModelRunner(from_pretrained(str(path), dist), "static")
        return True

    assert launch(program, 1, pp=2) == [True, True]


def test_the_drain_model_and_the_measured_bubble_agree_in_kind():
    from tplab.bench.pipeline import measure_grid
    from tplab.perf.pipeline import drain_bubble

    assert [round(drain_bubble(2, m), 3) for m in (1, 2, 4)] == [0.5, 0.333, 0.2]
    assert drain_bubble(4, 1, stage_s=1.0, hop_s=1.0) == 1 - 1 / (4 + 3)
    prompts = distinct_prompts(300, [8] * 4, seed=1)
    run = measure_grid("tiny", prompts, 6, pp=2, micro_batches=2, repeats=1)
    assert run.model_bubble == pytest.approx(1 / 3) and len(run.bubble) == 2
    assert all(0 < b < 1 for b in run.bubble)  # each stage waits on the other for part of every step


@pytest.mark.parametrize("m", [1, 2])
def test_the_stage_timeline_alternates_work_and_waits_in_the_pipeline_group(m):
    """Per decode step, each stage of pp 2 waits m times in its pipeline group (stage 0 sends, stage 1 receives, one
    micro-batch each) and once in the token return: 2(m + 1) segments, alternating work and wait, in time order."""
    from tplab.bench.pipeline import stage_timeline_rank

    prompts = distinct_prompts(64, [5, 7, 3, 6], seed=2)
    results = launch(stage_timeline_rank, 1, pp=2, kwargs=dict(model="tiny", prompts=prompts, new_tokens=5,
                                                                micro_batches=m, steps=2))
    for stage, r in enumerate(results):
        assert r["stage"] == stage
        segments = r["segments"]
        assert len(segments) == 2 * 2 * (m + 1)
        assert [kind for _, kind, _, _ in segments] == ["work", "wait"] * 2 * (m + 1)
        assert all(start <= end for _, _, start, end in segments)
        assert all(a[3] <= b[2] + 1e-9 for a, b in zip(segments, segments[1:]))
