"""Mixtures of experts (Mixtral, Qwen3-MoE, Qwen2-MoE with its shared expert) split three ways: every expert over
the TP ranks, whole experts with the tokens replicated (one all-reduce), whole experts with the tokens dispatched
(all-to-all). Each gives the unsharded HF model's greedy tokens and logits, with exact collective counts and bytes
per group; the routing is counted; the serving engine gives each request its tokens alone."""
import json
import math

import pytest
import torch

from tplab import launch
from tplab.engine.generate import generate_rank_program
from tplab.model.moe import TPMoE
from tplab.model.routing import imbalance, routing_summary, run_counts
from tplab.perf.experts import ExpertSplit, layer_payload, layer_wire_bytes
from tplab.specs.model import MODEL_DIR, ModelConfig
from tplab.testing import MOE_SPECS, distinct_prompts, hf_greedy, make_checkpoint
from tplab.testing.serving_probe import serve_then_alone

NEW_TOKENS = 6
LENGTHS = [4, 9, 6]
ATOL = 1e-4
# (tp, ep, dispatch, backend, pp)
SPLITS = [(1, 1, "all-reduce", "threads", 1), (2, 1, "all-reduce", "threads", 1), (4, 1, "all-reduce", "threads", 1),
          (2, 2, "all-reduce", "threads", 1), (4, 4, "all-reduce", "threads", 1), (2, 2, "all-to-all", "threads", 1),
          (4, 4, "all-to-all", "threads", 1), (2, 1, "all-reduce", "threads", 2), (2, 2, "all-reduce", "gloo", 1),
          (2, 2, "all-to-all", "gloo", 1)]


@pytest.fixture(scope="module")
def mixtures(tmp_path_factory):
    out = {}
    for seed, name in enumerate(MOE_SPECS, start=1):
        path, hf = make_checkpoint(name, tmp_path_factory.mktemp(name), seed=seed)
        prompts = distinct_prompts(hf.config.vocab_size, LENGTHS, seed=3)
        refs = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
        out[name] = path, ModelConfig.from_file(path), prompts, [r[0] for r in refs], [r[1] for r in refs]
    return out


def run(path, prompts, tp, backend="threads", pp=1, ep=1, dispatch="all-reduce", **kwargs):
    return launch(generate_rank_program, tp, backend, pp=pp, ep=ep,
                  kwargs=dict(model=str(path), prompts=prompts, max_new_tokens=NEW_TOKENS, eos_token_ids=(),
                              expert_dispatch=dispatch, **kwargs))


def expected_comm(config: ModelConfig, tokens: int, steps: int, tp: int, dispatch: str) -> dict:
    """Per phase, {group: {op: (count, bytes summed over the group's ranks)}} of the collectives of the layers
    (the LM head's greedy all-gather aside), for ``steps`` forward passes of ``tokens`` tokens each, fp32."""
    layers, h, k = config.num_layers, config.hidden_size, config.experts_per_token
    per_token = h * 4
    if dispatch == "all-reduce":
        return {"tp": {"all_reduce": (steps * (2 * layers + 1), tp * steps * (2 * layers + 1) * tokens * per_token)}}
    payload = layer_payload(tokens, h, k, tp, dispatch, 4)
    return {"tp": {"all_reduce": (steps * (layers + 1), tp * steps * (layers + 1) * tokens * per_token)},
            "ep": {"all_to_all": (3 * steps * layers, round(tp * steps * layers * payload["all_to_all"])),
                   "all_gather": (steps * layers, tp * steps * layers * payload["all_gather"])}}


def measured_comm(results, phase: str) -> dict:
    def group(attr):
        ops = {}
        for r in results:
            for op, s in getattr(r, attr).get(phase, {}).items():
                count, nbytes = ops.get(op, (0, 0))
                ops[op] = (int(s["count"]), nbytes + int(s["bytes"]))
        return ops
    tp = {op: v for op, v in group("comm").items() if op != "all_gather"}  # the LM head's gather: as dense models
    ep = group("expert_comm")
    return {"tp": tp, **({"ep": ep} if ep else {})}


@pytest.mark.parametrize("tp,ep,dispatch,backend,pp", SPLITS)
@pytest.mark.parametrize("name", MOE_SPECS)
def test_every_split_gives_hf_greedy_tokens_logits_and_exact_collectives(mixtures, name, tp, ep, dispatch, backend,
                                                                         pp):
    path, config, prompts, tokens, logits = mixtures[name]
    results = run(path, prompts, tp, backend, pp, ep, dispatch, keep_logits=True)
    assert all(r.tokens == tokens for r in results)
    for step, kept in enumerate(results[-1].logits):  # the last stage keeps the logits
        for b in range(len(prompts)):
            assert (kept[b] - logits[b][step]).abs().max() < ATOL
    if pp == 1:
        batch = len(prompts)
        assert measured_comm(results, "prefill") == expected_comm(config, batch * max(LENGTHS), 1, tp, dispatch)
        assert measured_comm(results, "decode") == expected_comm(config, batch, NEW_TOKENS - 1, tp, dispatch)
    else:  # the first stage: its layers' all-reduces and the embedding's, per micro-batch and step
        micro_batches, layers = min(pp, len(prompts)), config.num_layers // pp
        for r in results[:tp]:
            assert r.comm["decode"]["all_reduce"]["count"] == micro_batches * (2 * layers + 1) * (NEW_TOKENS - 1)


@pytest.mark.parametrize("name", MOE_SPECS)
def test_every_split_routes_the_same_pairs_and_counts_them_per_expert_and_rank(mixtures, name):
    path, config, prompts, *_ = mixtures[name]
    k, experts, layers = config.experts_per_token, config.num_experts, config.num_layers
    counts = {(tp, ep, dispatch): run_counts([r.step_expert_tokens for r in run(path, prompts, tp, ep=ep,
                                                                                 dispatch=dispatch)], tp, ep)
              for tp, ep, dispatch in [(1, 1, "all-reduce"), (2, 1, "all-reduce"), (2, 2, "all-reduce"),
                                       (2, 2, "all-to-all")]}
    reference = counts[1, 1, "all-reduce"]
    assert reference.shape == (NEW_TOKENS, layers, experts)
    tokens_per_step = [len(prompts) * max(LENGTHS)] + [len(prompts)] * (NEW_TOKENS - 1)
    assert reference.sum(-1).tolist() == [[n * k] * layers for n in tokens_per_step]
    for split, c in counts.items():  # the router is replicated: every split routes every token alike
        assert torch.equal(c, reference), split
    summary = routing_summary(reference, 2)
    assert sum(summary["tokens_per_rank"]) == sum(summary["tokens_per_expert"]) == summary["pairs"]
    assert summary["rank_imbalance"] == summary["rank_imbalance_at_ep"][2] >= 1
    assert 1 <= summary["expert_imbalance"] <= experts / k


def test_imbalance_is_max_over_mean_per_step_and_layer():
    counts = torch.tensor([[[4, 0, 0, 0], [1, 1, 1, 1]], [[2, 2, 0, 0], [0, 0, 0, 0]]])
    assert imbalance(counts) == pytest.approx((4.0 + 1.0 + 2.0) / 3)  # the empty layer is skipped
    assert routing_summary(counts, 2)["tokens_per_rank"] == [10, 2]


def test_dispatching_moves_more_bytes_than_reducing_when_every_rank_holds_the_tokens():
    """Per layer, with TP attention: 2 k / p + 1 times the all-reduce's payload (2 k = 4 > 2 at p = 2, 4, 8)."""
    for ranks in (2, 4, 8):
        reduce = layer_payload(64, 4096, 2, ranks, "all-reduce", 2)["all_reduce"]
        dispatch = sum(layer_payload(64, 4096, 2, ranks, "all-to-all", 2).values())
        assert dispatch == pytest.approx(reduce * (2 * 2 / ranks + 1), rel=1e-3)
        assert layer_wire_bytes(64, 4096, 2, ranks, "all-to-all", 2) > layer_wire_bytes(64, 4096, 2, ranks,
                                                                                         "all-reduce", 2) * 0.7
    assert layer_wire_bytes(64, 4096, 2, 2, "all-reduce", 2) == 64 * 4096 * 2  # a ring of 2: each sends half, twice
    assert layer_payload(5, 8, 2, 2, "all-to-all", 4)["all_gather"] == math.ceil(5 / 2) * 2 * 8 * 4


def test_the_router_sends_tokens_to_different_experts_and_every_rank_routes_alike(mixtures):
    path, config, *_ = mixtures["mixtral"]
    from tplab.model.loading import from_pretrained

    def routes(dist):
        moe = from_pretrained(str(path), dist).layers[0].mlp
        assert isinstance(moe, TPMoE) and len(moe.experts) == config.num_experts
        x = torch.randn(32, config.hidden_size, generator=torch.Generator().manual_seed(0))
        return moe.route(x)

    (w1, c1), (w2, c2) = launch(routes, 2)
    assert torch.equal(c1, c2) and torch.equal(w1, w2)
    assert len(c1.unique()) > 1 and torch.allclose(w1.sum(-1), torch.ones(32))


def test_qwen_weights_are_renormalised_only_with_norm_topk_prob(mixtures):
    assert mixtures["qwen3_moe"][1].normalize_expert_weights is True
    qwen2 = mixtures["qwen2_moe"][1]
    assert (qwen2.normalize_expert_weights, qwen2.shared_expert_intermediate_size, qwen2.qkv_bias) == (False, 48, True)
    assert mixtures["qwen3_moe"][1].qk_norm and not qwen2.qk_norm


@pytest.mark.parametrize("ep", [1, 2])
def test_quantized_experts_give_the_same_tokens_at_every_split(mixtures, ep):
    path, _, prompts, *_ = mixtures["mixtral"]
    assert run(path, prompts, 1, quant="int8")[0].tokens == run(path, prompts, 2, ep=ep, quant="int8")[0].tokens


@pytest.mark.parametrize("ep,dispatch", [(1, "all-reduce"), (2, "all-to-all")])
def test_the_serving_engine_gives_each_request_its_tokens_alone(mixtures, ep, dispatch):
    from tplab.serving.requests import Request
    from tplab.serving.scheduler import SchedulerConfig

    path, _, prompts, *_ = mixtures["qwen2_moe"]
    requests = [Request(i, tuple(p), 5, arrival_s=0.002 * i) for i, p in enumerate(prompts)]
    config = SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=8, num_blocks=32, block_size=4, max_model_len=64)
    results = launch(serve_then_alone, 2, ep=ep, kwargs=dict(model=str(path), requests=requests, config=config,
                                                             eos=(), expert_dispatch=dispatch))
    assert [r["output_ids"] for r in results[0]["run"]["requests"]] == results[0]["alone"]


@pytest.mark.parametrize("change,tp,ep,dispatch,message", [
    ({}, 2, 3, "all-reduce", "ep=3 with tp=2: experts are whole on every rank of the TP group .*valid ep at tp=2: 1, 2"),
    ({}, 4, 4, "all-reduce", "the 6 experts do not divide by ep=4; valid ep at tp=4: 1"),
    ({}, 2, 1, "all-to-all", "the all-to-all dispatch sends tokens to whole experts: it needs ep = tp"),
    ({"num_local_experts": 0}, 1, 1, "all-reduce", "num_local_experts must be a positive integer"),
    ({"moe_intermediate_size": 30}, 4, 1, "all-reduce", "moe_intermediate_size=30 is not divisible by tp=4"),
    ({"mlp_only_layers": [1]}, 1, 1, "all-reduce", "dense layers among the sparse ones"),
])
def test_impossible_expert_splits_are_refused_with_the_valid_choices(change, tp, ep, dispatch, message):
    from tplab.specs.sharding import check_dispatch
    from tplab.testing import hf_config

    name = "qwen3_moe" if "moe_intermediate_size" in change or "mlp_only_layers" in change else "mixtral"
    d = hf_config(name, **({"num_local_experts": 6} if name == "mixtral" and not change else {})).to_dict() | change
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(d).check_tp(tp, ep)
        check_dispatch(dispatch, tp, ep)


def test_a_dense_model_refuses_ep_and_the_cli_says_so_in_one_line(mixtures, tmp_path, capsys):
    from tplab.cli import main
    from tplab.testing import hf_config

    with pytest.raises(ValueError, match="is a dense model: leave ep at 1"):
        ModelConfig.from_dict(hf_config("llama").to_dict()).check_tp(2, 2)
    path = mixtures["mixtral"][0]
    assert main(["generate", "--model", str(path), "--ep", "3", "--prompt-ids", "5,6,7"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the 8 experts do not divide by ep=3; valid ep at tp=3: 1" in err
    assert main(["generate", "--model", str(path), "--tp", "4", "--ep", "2", "--prompt-ids", "5,6,7"]) == 2
    assert "valid ep at tp=4: 1, 4" in capsys.readouterr().err


def test_generate_reports_the_routing_and_the_expert_group(mixtures, capsys):
    from tplab.cli import main

    path = mixtures["mixtral"][0]
    assert main(["generate", "--model", str(path), "--ep", "2", "--ep-dispatch", "all-to-all", "--prompt-ids",
                 "5,6,7", "--prompt-ids", "9,8", "--max-new-tokens", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tp"] == report["ep"] == 2 and report["ep_dispatch"] == "all-to-all"
    assert report["routing"]["pairs"] == 2 * 2 * (2 * 3 + 2 * 2)  # top-2, 2 layers: a (2, 3) prefill, 2 decodes
    assert report["expert_comm"]["decode"]["all_to_all"]["count"] == 2 * 3 * 2
    assert main(["generate", "--model", str(path), "--ep", "2", "--prompt-ids", "5,6,7", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "experts: 8 per layer, 4 whole experts per rank, tokens by all-reduce" in out


def test_a_checkpoint_mixture_is_planned_with_its_experts(mixtures, capsys):
    from tplab.cli import main

    path = mixtures["qwen2_moe"][0]
    assert main(["plan", "--model", str(path / "config.json"), "--gpu", "h100-sxm", "--ep", "2", "--context", "64",
                 "--output", "16"]) == 0
    out = capsys.readouterr().out
    assert "experts: 4 per layer, 2 per token" in out and "   TP " in out and "EP-ar" in out


def test_the_cost_model_counts_every_expert_in_memory_and_the_touched_ones_in_a_step():
    from tplab.perf.estimate import estimate
    from tplab.perf.experts import rank_imbalance, touched_fraction
    from tplab.perf.shapes import step_work

    spec = ModelConfig.from_dict({**json.loads((MODEL_DIR / "mixtral-8x7b.json").read_text())}, name="mixtral")
    assert touched_fraction(1, 2, 8) == 0.25 and touched_fraction(256, 2, 8) > 0.999
    assert rank_imbalance(1, 2, 8, 8) == 4.0  # one pair on the busiest of 8 ranks, a quarter on average
    assert rank_imbalance(1, 2, 8, 1) == 1.0
    assert rank_imbalance(1024, 2, 8, 8) < rank_imbalance(64, 2, 8, 8) < rank_imbalance(4, 2, 8, 8)
    kw = dict(model=spec, gpu="h100-sxm", tp=8, prompt_len=1024, output_len=256)
    tp1, ep1 = estimate(batch=1, **kw), estimate(batch=1, ep=8, **kw)
    assert tp1.breakdown["memory_gb"] == ep1.breakdown["memory_gb"]  # every expert, split or whole
    assert ep1.decode_ms_per_token > tp1.decode_ms_per_token  # at batch 1 the busiest GPU reads a whole expert
    full = [estimate(batch=512, ep=ep, **kw).decode_ms_per_token for ep in (1, 8)]
    assert full[1] == pytest.approx(full[0], rel=0.05)  # every expert touched: the same bytes, the same time
    dense_read = step_work(spec, 8, "bf16", "bf16", 512, 1, 1024).weight_bytes
    assert step_work(spec, 8, "bf16", "bf16", 1, 1, 1024).weight_bytes < dense_read / 2
    dispatched = step_work(spec, 8, "bf16", "bf16", 64, 1, 1024, experts=ExpertSplit(8, "all-to-all"))
    assert (dispatched.all_reduces, dispatched.all_to_alls) == (spec.num_layers + 1, 3 * spec.num_layers)
    with pytest.raises(ValueError, match="imbalance is the busiest rank's share over the mean"):
        estimate(batch=1, ep=8, imbalance=0.5, **kw)


def test_plan_and_simulate_print_tp_of_experts_against_ep(capsys):
    from tplab.cli import main

    assert main(["plan", "--model", "mixtral-8x7b", "--gpu", "h100-sxm", "--ep", "8", "--batch", "1,64",
                 "--context", "2048", "--output", "256"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("8 ")]
    assert [(r[1], r[2]) for r in rows] == [("TP", "1"), ("TP", "64"), ("EP-ar", "1"), ("EP-ar", "64")]
    assert main(["simulate", "--model", "qwen3-30b-a3b", "--gpu", "h100-sxm", "--ep", "4", "--ep-dispatch",
                 "all-to-all", "--rate", "8", "--num-requests", "40", "--prompt-len", "128:512",
                 "--output-len", "16:64"]) == 0
    assert "experts whole on 4 GPUs (all-to-all)" in capsys.readouterr().out
    assert main(["plan", "--model", "llama-3-8b", "--gpu", "h100-sxm", "--ep", "2"]) == 2
    assert "is a dense model: leave ep at 1" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_an_in_memory_hf_mixture_loads_its_fused_experts(mixtures, name):
    """transformers keeps the experts fused in memory (gate_up_proj, down_proj); from_hf_model reads them as the
    files name them, and gives the checkpoint's tokens."""
    from tplab.engine.generate import generate
    from tplab.model.loading import from_hf_model
    from tplab.testing import build_hf_model

    _, _, prompts, tokens, _ = mixtures[name]
    hf = build_hf_model(name, seed=MOE_SPECS.index(name) + 1)
    assert any(n.endswith("mlp.experts.gate_up_proj") for n in hf.state_dict())
    results = launch(lambda dist: generate(from_hf_model(hf, dist), prompts, NEW_TOKENS, eos_token_ids=()).tokens, 2)
    assert results == [tokens, tokens]


def test_a_mixture_decodes_in_static_mode_and_refuses_a_cuda_graph(mixtures):
    from tplab.bench.emulation import emulated_dist
    from tplab.engine.generate import generate
    from tplab.engine.runner import ModelRunner
    from tplab.model.loading import from_pretrained

    path, _, prompts, tokens, _ = mixtures["qwen3_moe"]
    model = from_pretrained(str(path), emulated_dist(1, "cpu"))
    assert generate(ModelRunner(model, "static"), prompts, NEW_TOKENS, eos_token_ids=()).tokens == tokens
    with pytest.raises(ValueError, match="use mode 'static' or 'eager'"):
        ModelRunner(model, "graph")


def test_the_bundled_tiny_moe_gives_hf_greedy_text_whole_or_split():
    """tiny-moe, trained (data/tiny_moe): HF's own greedy tokens with every expert split over 2 ranks and with
    whole experts dispatched to 2 ranks; its checksum is pinned."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tplab.specs.tiny import TINY_MOE_DIR, verify_bundled

    assert verify_bundled("tiny-moe") == TINY_MOE_DIR
    tokenizer = AutoTokenizer.from_pretrained(TINY_MOE_DIR)
    hf = AutoModelForCausalLM.from_pretrained(TINY_MOE_DIR, dtype=torch.float32).eval()
    prompts = [tokenizer(t)["input_ids"] for t in ("The with statement", "An object is a")]
    want = [hf_greedy(hf, p, 8)[0] for p in prompts]
    for tp, ep, dispatch in [(2, 1, "all-reduce"), (2, 2, "all-to-all")]:
        results = launch(generate_rank_program, tp, ep=ep, kwargs=dict(
            model="tiny-moe", prompts=prompts, max_new_tokens=8, eos_token_ids=(), expert_dispatch=dispatch))
        assert results[0].tokens == want


def test_the_held_out_mixtral_figures_are_predicted_under_the_routing_they_ran_with():
    """TensorRT-LLM's Mixtral 8x7B sweep (tp 2 on A100, H100, H200, tp 4 on L40S; fake weights): never fitted.
    With the routing collapsed, as fake weights route, the decode step is predicted within 20% (median); uniform routing, which
    reads every expert from batch 8 on, is off by more than half: what a router does is half the model."""
    import statistics

    from tplab.bench.published import HELD_OUT_MOE_FILE, load_figures, predict
    from tplab.specs.efficiency import load_efficiency

    figures = [f for f in load_figures(HELD_OUT_MOE_FILE) if f["metric"] == "decode_ms_per_token"]
    assert len(figures) == 20 and {f["gpu"] for f in figures} == {"a100-sxm-80gb", "h100-sxm", "h200", "l40s"}
    eff = load_efficiency(None)
    error = {routing: statistics.median(abs(predict(f, eff, routing) / f["value"] - 1) for f in figures)
             for routing in ("collapsed", "uniform")}
    assert error["collapsed"] < 0.2 < 0.5 < error["uniform"]


def test_bench_times_a_mixture_against_hf_of_its_family_and_reports_its_routing(mixtures, tmp_path, capsys):
    from tplab.cli import main

    path = mixtures["qwen2_moe"][0]
    assert main(["bench", "--model", str(path), "--tp", "1,2", "--batch", "2", "--prompt-len", "8", "--decode-steps",
                 "2", "--repeats", "1", "--quick-roofline", "--dtype", "fp32", "--out", str(tmp_path)]) == 0
    assert "routing at tp=2 batch=2" in capsys.readouterr().out
    records = [json.loads(line) for f in tmp_path.glob("*.jsonl") for line in f.read_text().splitlines()]
    assert [r["setting"]["tp"] for r in records] == [1, 2]
    for r in records:
        assert "Qwen2MoeForCausalLM" in r["baseline"]["what"]
        assert r["model"]["config"]["num_experts"] == 4 and r["routing"]["experts"] == 4
    assert records[0]["routing"]["pairs"] == records[1]["routing"]["pairs"] > 0
    out = tmp_path / "whole"
    assert main(["bench", "--model", str(path), "--ep", "2", "--ep-dispatch", "all-to-all", "--batch", "2",
                 "--prompt-len", "8", "--decode-steps", "2", "--repeats", "1", "--quick-roofline", "--dtype", "fp32",
                 "--out", str(out)]) == 0
    (whole,) = [json.loads(line) for f in out.glob("*.jsonl") for line in f.read_text().splitlines()]
    assert (whole["setting"]["tp"], whole["setting"]["ep"], whole["baseline"]) == (2, 2, None)
    assert whole["routing"]["tokens_per_expert"] == records[1]["routing"]["tokens_per_expert"]  # the ranks' sum


def test_quality_compares_a_quantized_mixture_with_whole_experts(capsys):
    from tplab.cli import main

    assert main(["quality", "--model", "tiny-moe", "--quant", "int8", "--ep", "2", "--windows", "2",
                 "--max-new-tokens", "6", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tp"] == 2 and report["token_agreement"] > 0.5 and report["prompts"] > 10
