"""The TP model against Hugging Face transformers, run on each batch row alone.

For every spec of tplab.testing (Llama 2, Llama 3.1 with llama3 RoPE, Mistral
with a sliding window, Qwen2 with qkv bias and tied embeddings, an MQA model
with tied embeddings and biases) and tp in {1, 2, 4, 8} (so tp > KV heads and
a vocabulary not divisible by tp both occur), on threads and on gloo:

* greedy tokens of a batch of different prompts of different lengths equal
  HF's greedy tokens for each prompt alone, on every rank;
* the logits of every step, and of a whole unpadded batch, are within 1e-4;
* the collectives are exactly 2 all-reduces per layer + 1 (embedding) per
  forward, and one small all-gather for the greedy argmax: counts and bytes.
"""
from dataclasses import dataclass

import pytest
import torch
from probes import equivalence_probe, expected_greedy_comm, generation_comm

from tplab import launch
from tplab.testing import SPECS, build_hf_model, distinct_prompts, hf_greedy, make_checkpoint

TPS = (1, 2, 4, 8)
LENGTHS = [5, 11, 8]  # a different length in every row
NEW_TOKENS = 6
ATOL = 1e-4


@dataclass
class Case:
    job: dict
    hf_tokens: list[list[int]]
    hf_logits: list[list[torch.Tensor]]
    hf_score: torch.Tensor
    config: object


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Case]:
    out = {}
    for seed, name in enumerate(SPECS):
        path, hf = make_checkpoint(name, tmp_path_factory.mktemp(name), seed=seed)
        vocab = hf.config.vocab_size
        prompts = distinct_prompts(vocab, LENGTHS, seed=seed)
        score_ids = distinct_prompts(vocab, [9, 9], seed=100 + seed)
        refs = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
        with torch.no_grad():
            hf_score = hf(torch.tensor(score_ids)).logits
        job = dict(path=str(path), prompts=prompts, max_new_tokens=NEW_TOKENS, score_ids=score_ids)
        out[name] = Case(job, [r[0] for r in refs], [r[1] for r in refs], hf_score, hf.config)
    return out


def check_rank(case: Case, got: dict, tp: int) -> None:
    assert got["tokens"] == case.hf_tokens
    for step, logits in enumerate(got["logits"]):
        for row in range(len(LENGTHS)):
            torch.testing.assert_close(logits[row], case.hf_logits[row][step], rtol=0, atol=ATOL)
    torch.testing.assert_close(got["score"], case.hf_score, rtol=0, atol=ATOL)
    check_collectives(got["comm"], case.config, tp)


def check_collectives(comm: dict, config, tp: int) -> None:
    """Exact counts and bytes (fp32) of one greedy generation of NEW_TOKENS tokens."""
    assert generation_comm(comm) == expected_greedy_comm(
        config.num_hidden_layers, config.hidden_size, len(LENGTHS), max(LENGTHS), NEW_TOKENS, tp)


@pytest.mark.parametrize("name", list(SPECS))
def test_threads_match_hf_for_every_tp(cases, name):
    case = cases[name]
    for tp in TPS:
        for got in launch(equivalence_probe, tp, "threads", args=([case.job],)):
            check_rank(case, got[0], tp)


@pytest.mark.parametrize("tp", TPS)
def test_gloo_matches_hf_for_every_spec(cases, tp):
    names = list(SPECS)
    results = launch(equivalence_probe, tp, "gloo", args=([cases[n].job for n in names],))
    for per_rank in results:
        for name, got in zip(names, per_rank):
            check_rank(cases[name], got, tp)


def test_the_sliding_window_is_exercised():
    """Mistral's window (6) is shorter than the test prompts: without it HF's logits would differ."""
    ids = torch.tensor(distinct_prompts(256, [11], seed=5))
    with torch.no_grad():
        windowed = build_hf_model("mistral", seed=2)(ids).logits
        full = build_hf_model("mistral", seed=2, sliding_window=None)(ids).logits
    assert (windowed[0, -1] - full[0, -1]).abs().max() > 1e-2
