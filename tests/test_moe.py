"""Mixtral's mixture of experts with every expert split over the TP ranks: the unsharded HF model's greedy tokens
and logits, one all-reduce per MoE layer whatever the routing, and the serving engine's tokens alone."""
import json

import pytest

from tplab import launch
from tplab.engine.generate import generate_rank_program
from tplab.model.moe import TPMoE
from tplab.specs.model import ModelConfig
from tplab.testing import distinct_prompts, hf_greedy, make_checkpoint
from tplab.testing.serving_probe import serve_then_alone

NEW_TOKENS = 6
ATOL = 1e-4


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    path, hf = make_checkpoint("mixtral", tmp_path_factory.mktemp("mixtral"), seed=1)
    prompts = distinct_prompts(hf.config.vocab_size, [4, 9, 6], seed=3)
    refs = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    return path, hf.config, prompts, [r[0] for r in refs], [r[1] for r in refs]


def run(path, prompts, tp, backend="threads", pp=1, **kwargs):
    return launch(generate_rank_program, tp, backend, pp=pp,
                  kwargs=dict(model=str(path), prompts=prompts, max_new_tokens=NEW_TOKENS, eos_token_ids=(), **kwargs))


@pytest.mark.parametrize("tp,backend,pp", [(1, "threads", 1), (2, "threads", 1), (4, "threads", 1), (2, "gloo", 1),
                                           (2, "threads", 2)])
def test_tp_of_experts_gives_hf_greedy_tokens_and_logits(mixtral, tp, backend, pp):
    path, config, prompts, tokens, logits = mixtral
    results = run(path, prompts, tp, backend, pp, keep_logits=True)
    last = results[-1]  # the last stage keeps the logits
    assert all(r.tokens == tokens for r in results)
    for step, kept in enumerate(last.logits):
        for b in range(len(prompts)):
            assert (kept[b] - logits[b][step]).abs().max() < ATOL
    layers, micro_batches = config.num_hidden_layers // pp, min(pp, len(prompts))
    for r in results[:tp]:  # the first stage: its layers' all-reduces and the embedding's, per micro-batch and step
        assert r.comm["decode"]["all_reduce"]["count"] == micro_batches * (2 * layers + 1) * (NEW_TOKENS - 1)


def test_the_router_sends_tokens_to_different_experts_and_every_rank_routes_alike(mixtral):
    path, config, prompts, *_ = mixtral
    import torch

    from tplab.model.loading import from_pretrained

    def routes(dist):
        model = from_pretrained(str(path), dist)
        moe = model.layers[0].mlp
        assert isinstance(moe, TPMoE) and len(moe.experts) == config.num_local_experts
        x = torch.randn(32, config.hidden_size, generator=torch.Generator().manual_seed(0))
        weights, chosen = moe.route(x)
        return weights, chosen

    (w1, c1), (w2, c2) = launch(routes, 2)
    assert torch.equal(c1, c2) and torch.equal(w1, w2)
    assert len(c1.unique()) > 1 and torch.allclose(w1.sum(-1), torch.ones(32))


def test_quantized_experts_give_the_same_tokens_at_every_tp(mixtral):
    path, _, prompts, *_ = mixtral
    by_tp = [run(path, prompts, tp, quant="int8")[0].tokens for tp in (1, 2)]
    assert by_tp[0] == by_tp[1]


def test_the_serving_engine_gives_each_request_its_tokens_alone(mixtral):
    from tplab.serving.requests import Request
    from tplab.serving.scheduler import SchedulerConfig

    path, config, prompts, *_ = mixtral
    requests = [Request(i, tuple(p), 5, arrival_s=0.002 * i) for i, p in enumerate(prompts)]
    config = SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=8, num_blocks=32, block_size=4, max_model_len=64)
    results = launch(serve_then_alone, 2, kwargs=dict(model=str(path), requests=requests, config=config, eos=()))
    assert [r["output_ids"] for r in results[0]["run"]["requests"]] == results[0]["alone"]


def test_a_mixture_is_read_and_refused_where_it_cannot_be_modelled(mixtral, capsys):
    from tplab.cli import main

    path, config, *_ = mixtral
    spec = ModelConfig.from_file(path)
    assert (spec.num_experts, spec.experts_per_token) == (6, 2)
    bad = json.loads((path / "config.json").read_text()) | {"num_experts_per_tok": 7}
    with pytest.raises(ValueError, match="1 <= num_experts_per_tok <= num_local_experts"):
        ModelConfig.from_dict(bad)
    assert main(["plan", "--model", str(path / "config.json"), "--gpu", "h100-sxm", "--tp", "2", "--context", "64",
                 "--output", "16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a mixture of 6 experts: the cost model describes dense decoders only" in err


def test_an_in_memory_hf_mixtral_loads_its_fused_experts(mixtral):
    """transformers keeps the experts fused in memory (gate_up_proj, down_proj); from_hf_model reads them as the
    files name them, and gives the checkpoint's tokens."""
    from tplab.engine.generate import generate
    from tplab.model.loading import from_hf_model
    from tplab.testing import build_hf_model

    _, _, prompts, tokens, _ = mixtral
    hf = build_hf_model("mixtral", seed=1)
    assert any(name.endswith("mlp.experts.gate_up_proj") for name in hf.state_dict())
    results = launch(lambda dist: generate(from_hf_model(hf, dist), prompts, NEW_TOKENS, eos_token_ids=()).tokens, 2)
    assert results == [tokens, tokens]


def test_a_mixture_decodes_in_static_mode_and_refuses_a_cuda_graph(mixtral):
    from tplab.bench.emulation import emulated_dist
    from tplab.engine.generate import generate
    from tplab.engine.runner import ModelRunner
    from tplab.model.loading import from_pretrained

    path, _, prompts, tokens, _ = mixtral
    model = from_pretrained(str(path), emulated_dist(1, "cpu"))
    assert generate(ModelRunner(model, "static"), prompts, NEW_TOKENS, eos_token_ids=()).tokens == tokens
    with pytest.raises(ValueError, match="use mode 'static' or 'eager'"):
        ModelRunner(model, "graph")
