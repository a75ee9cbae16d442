"""The generation loop: seeded sampling identical on every rank and tp, EOS / stop per row, results and errors."""
import json

import pytest
import torch

from tplab import launch
from tplab.engine.generate import generate, generate_rank_program, left_pad
from tplab.model.loading import from_hf_model
from tplab.model.sampling import SamplingParams, filtered_probabilities, sample
from tplab.testing import distinct_prompts, hf_greedy, make_checkpoint

PROMPT_LENGTHS = [4, 9, 6]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, hf = make_checkpoint("llama31", tmp_path_factory.mktemp("llama31"), seed=3)
    prompts = distinct_prompts(hf.config.vocab_size, PROMPT_LENGTHS, seed=3)
    return path, hf, prompts


def run(tp, backend, path, prompts, **sampling):
    return launch(generate_rank_program, tp, backend,
                  kwargs=dict(model=str(path), prompts=prompts, max_new_tokens=8, eos_token_ids=(),
                              sampling=SamplingParams(**sampling)))


def test_seeded_sampling_is_identical_on_every_rank_tp_and_backend(checkpoint):
    path, hf, prompts = checkpoint
    params = dict(temperature=0.9, top_k=50, top_p=0.95, seed=7)
    runs = {(tp, "threads"): run(tp, "threads", path, prompts, **params) for tp in (1, 2, 4)}
    runs[(2, "gloo")] = run(2, "gloo", path, prompts, **params)
    reference = runs[(1, "threads")][0].tokens
    for results in runs.values():
        assert all(r.tokens == reference for r in results)
    greedy = run(1, "threads", path, prompts)[0].tokens
    assert reference != greedy, "with temperature 0.9 the samples should leave the greedy path"
    assert run(2, "threads", path, prompts, **{**params, "seed": 8})[0].tokens != reference
    assert run(2, "threads", path, prompts, temperature=1.0, top_k=1, seed=7)[0].tokens == greedy
    # sampling gathers the full logits: one all-gather of (batch, padded vocab) per step
    comm = runs[(4, "threads")][0].comm
    assert comm["prefill"]["all_gather"] == {"count": 1, "bytes": 3 * 300 * 4, "seconds": comm["prefill"]["all_gather"]["seconds"]}


def test_filters_keep_the_right_tokens():
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0, -1.0]])
    probs = filtered_probabilities(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (probs[0] > 0).tolist() == [True, True, True, False, False]  # ties with the k-th stay
    full = torch.softmax(logits.double(), -1)[0]
    probs = filtered_probabilities(logits, SamplingParams(temperature=1.0, top_p=float(full[0]) + 1e-6))
    assert (probs[0] > 0).tolist() == [True, True, False, False, False]  # smallest set reaching top_p
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, dtype=torch.float64))
    cold = filtered_probabilities(logits, SamplingParams(temperature=0.1))
    assert cold[0, 0] > 0.99
    with pytest.raises(ValueError, match="greedy"):
        filtered_probabilities(logits, SamplingParams())
    for bad in (dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_inverse_cdf_draws_follow_the_filtered_distribution():
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -3.0]).repeat(40000, 1)
    params = SamplingParams(temperature=1.0, top_k=4, seed=1)
    tokens = sample(logits, params, params.generator())
    freq = torch.bincount(tokens, minlength=5).double() / len(tokens)
    expected = filtered_probabilities(logits[:1], params)[0]
    assert freq[4] == 0
    torch.testing.assert_close(freq, expected, rtol=0, atol=0.01)
    assert torch.equal(tokens, sample(logits, params, params.generator()))  # same seed, same draws


def expected_row(ref: list[int], eos: set[int], stops: list[list[int]]) -> tuple[list[int], str]:
    for i, token in enumerate(ref):
        row = ref[:i + 1]
        if token in eos:
            return row, "eos"
        if any(row[-len(s):] == s for s in stops):
            return row, "stop"
    return ref, "length"


def test_eos_and_stop_sequences_end_rows_independently(checkpoint):
    _, hf, prompts = checkpoint
    refs = [hf_greedy(hf, p, 8)[0] for p in prompts]
    eos = {refs[0][2]}
    stops = [refs[1][1:3]]

    def rank(dist):
        model = from_hf_model(hf, dist)
        return (generate(model, prompts, 8, eos_token_ids=tuple(eos), stop_sequences=stops),
                generate(model, prompts, 8, eos_token_ids=tuple(r[0] for r in refs)))

    for tp in (1, 4):
        for result, all_stop_at_once in launch(rank, tp, "threads"):
            expected = [expected_row(r, eos, stops) for r in refs]
            assert result.tokens == [e[0] for e in expected]
            assert result.finish_reasons == [e[1] for e in expected]
            assert result.finish_reasons[:2] == ["eos", "stop"]
            assert len(result.step_seconds) == max(len(t) for t in result.tokens)
            assert all_stop_at_once.tokens == [[r[0]] for r in refs]
            assert all_stop_at_once.step_seconds == all_stop_at_once.step_seconds[:1] and all_stop_at_once.ms_per_token is None


def test_result_reports_timings_and_per_step_comm(checkpoint):
    path, _, prompts = checkpoint
    result = run(2, "threads", path, prompts)[0]
    report = json.loads(json.dumps(result.to_dict()))
    assert report["ttft_ms"] > 0 and report["ms_per_token"] > 0 and report["load"]["bytes_read"] > 0
    assert [s["phase"] for s in result.step_comm] == ["prefill"] + ["decode"] * 7
    assert all(s["counts"] == {"all_reduce": 5, "all_gather": 1} for s in result.step_comm)
    assert sum(s["bytes"] for s in result.step_comm) == sum(
        op["bytes"] for phase in result.comm.values() for op in phase.values())


def test_left_padding_gives_each_row_its_own_positions():
    ids, positions, key_valid = left_pad([[7, 8, 9], [5]], extra_slots=2)
    assert ids.tolist() == [[7, 8, 9], [0, 0, 5]]
    assert positions.tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]
    assert key_valid.tolist() == [[True] * 5, [False, False, True, True, True]]


def test_bad_requests_fail_before_any_work(checkpoint):
    _, hf, _ = checkpoint

    def rank(dist):
        model = from_hf_model(hf, dist)
        errors = []
        for prompts, new in [([[1] * 125], 4), ([[1, 300]], 2), ([[1], []], 2), ([], 2), ([[1]], 0)]:
            try:
                generate(model, prompts, new)
            except ValueError as e:
                errors.append(str(e))
        return errors, dist.stats.count()

    errors, collectives = launch(rank, 2, "threads")[0]
    assert len(errors) == 5 and collectives == 0
    assert "more than the model's context (max_position_embeddings=128)" in errors[0]
    assert "outside [0, 300)" in errors[1]
