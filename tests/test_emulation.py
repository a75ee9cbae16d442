"""One emulated rank: the unchanged model runs on it, does rank 0's real work, and its collectives are modelled.

* EmulatedTransport returns every collective's shape and moves no data;
  dist.stats still counts it (ops and bytes).
* An emulated rank 0 holds exactly the parameter shapes of a real rank 0 and
  issues exactly its collectives (op, shape, bytes), prefill and decode.
* The α-β seconds match hand-calculated values and the cost model's own charge.
* HF's baseline model has one rank's shapes: the same number of weights.
"""
import math

import pytest
import torch

from tplab import launch
from tplab.bench.emulation import CommModel, EmulatedTransport, emulated_dist, modelled_seconds
from tplab.bench.models import bench_model, build_hf_shard, build_shard, hf_shard_config
from tplab.engine.generate import generate
from tplab.perf.estimate import collective_seconds
from tplab.perf.shapes import step_work
from tplab.specs.efficiency import load_efficiency
from tplab.specs.hardware import load_gpu
from tplab.specs.model import resolve_model
from tplab.testing import hf_config

H100 = load_gpu("h100-sxm")
NVLINK = H100.link("nvlink")
EFF = load_efficiency()


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """Llama 3.1 shapes with GQA (8 heads, 2 KV heads) and a vocabulary of 300 (not divisible by 8)."""
    directory = tmp_path_factory.mktemp("cfg")
    hf_config("llama31", num_hidden_layers=3).save_pretrained(directory)
    return bench_model(str(directory / "config.json"))


def test_emulated_collectives_have_the_right_shapes_and_are_counted():
    dist = emulated_dist(4)
    x = torch.arange(6.0).reshape(2, 3)
    assert dist.all_reduce(x) is x  # this rank's partial sum: nothing arrives
    assert torch.equal(dist.all_gather(x, dim=-1), torch.cat([x] * 4, dim=-1))
    assert dist.all_gather(x, dim=0).shape == (8, 3)
    y = torch.arange(8.0).reshape(2, 4)
    assert torch.equal(dist.reduce_scatter(y, dim=-1), y[:, :1])
    assert dist.broadcast(x, 2) is x
    assert dist.recv(x, 1) is x
    dist.send(x, 1)
    dist.barrier()
    assert dist.stats.counts() == {"all_reduce": 1, "all_gather": 2, "reduce_scatter": 1, "broadcast": 1,
                                   "send": 1, "recv": 1}
    assert dist.stats.total_bytes("all_gather") == 2 * 4 * 6 * 4  # the gathered output, nccl-tests convention
    assert dist.stats.total_bytes("all_reduce") == 6 * 4


def test_emulated_transport_rejects_bad_groups():
    with pytest.raises(ValueError, match="world_size must be a positive integer"):
        EmulatedTransport(0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        EmulatedTransport(2, rank=2)


def test_alpha_beta_seconds_match_hand_calculation_and_the_cost_model():
    nbytes, n = 1_000_000, 8
    alpha, beta, base = 0.47e-6, 450e9 * 0.8, load_efficiency().collective_base_us * 1e-6
    assert math.isclose(modelled_seconds("all_reduce", nbytes, n, NVLINK, EFF),
                        base + 2 * 7 * (alpha + nbytes / (8 * beta)))
    assert math.isclose(modelled_seconds("all_gather", nbytes, n, NVLINK, EFF), base + 7 * (alpha + nbytes / (8 * beta)))
    assert modelled_seconds("all_reduce", nbytes, 1, NVLINK, EFF) == 0.0
    with pytest.raises(ValueError, match="no alpha-beta formula for 'send'"):
        modelled_seconds("send", nbytes, n, NVLINK, EFF)
    # a whole forward pass of Llama-3-70B at tp=8, batch 4: what the cost model charges for its all-reduces
    work = step_work(resolve_model("llama-3-70b"), 8, "bf16", "bf16", 4, 1, 100)
    per_call = modelled_seconds("all_reduce", work.all_reduce_bytes, 8, NVLINK, EFF)
    no_gather = work.__class__(**{**work.__dict__, "gather_bytes": 0.0})
    assert math.isclose(work.all_reduces * per_call, collective_seconds(no_gather, NVLINK, 8, EFF))


def _work_of_rank0(model, dist, ids):
    """Parameter shapes and the collectives of one prefill and two decode steps."""
    shard = build_shard(model, dist, torch.float32, seed=1)
    generate(shard, ids.tolist(), 3, eos_token_ids=())  # one prefill and two decode steps
    shapes = {name: tuple(p.shape) for name, p in shard.named_parameters()}
    return shapes, [(r.op, r.shape, r.dtype, r.bytes) for r in dist.stats.records]


@pytest.mark.parametrize("tp", [2, 8])
def test_emulated_rank_does_the_work_of_a_real_rank_0(small_model, tp):
    ids = torch.randint(0, 300, (3, 5), generator=torch.Generator().manual_seed(0))
    real = launch(lambda dist: _work_of_rank0(small_model, dist, ids), tp)[0]
    emulated = _work_of_rank0(small_model, emulated_dist(tp), ids)
    assert emulated == real
    layers = small_model.config.num_layers
    ops = [op for op, *_ in emulated[1]]
    assert ops.count("all_reduce") == 3 * (2 * layers + 1) and ops.count("all_gather") == 3  # 3 forward passes


def test_comm_model_summary_uses_the_records_bytes(small_model):
    dist = emulated_dist(4)
    shard = build_shard(small_model, dist, torch.float32)
    shard.greedy(shard(torch.zeros(2, 7, dtype=torch.long))[:, -1])
    summary = CommModel(NVLINK, EFF).summary(dist.stats.records, 4)
    hidden = small_model.config.hidden_size
    assert summary["all_reduce"]["count"] == 2 * 3 + 1
    assert summary["all_reduce"]["bytes"] == 7 * 2 * 7 * hidden * 4
    assert math.isclose(summary["all_reduce"]["seconds"],
                        7 * modelled_seconds("all_reduce", 2 * 7 * hidden * 4, 4, NVLINK, EFF))


def test_hf_baseline_has_one_ranks_shapes(small_model):
    config = small_model.config.with_layers(2)
    for tp in (1, 2, 8):
        hf_cfg = hf_shard_config(config, tp)
        assert hf_cfg.num_attention_heads == 8 // tp and hf_cfg.num_key_value_heads == max(1, 2 // tp)
        assert hf_cfg.intermediate_size == 128 // tp and hf_cfg.vocab_size == math.ceil(300 / tp)
        hf = build_hf_shard(config, tp, torch.float32, "cpu")
        shard = build_shard(small_model, emulated_dist(tp), torch.float32, layers=2)
        assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in shard.parameters())
        assert torch.isfinite(hf(torch.tensor([[1, 2, 3]])).logits).all()
    with pytest.raises(ValueError, match="valid tp: 1, 2, 4, 8"):
        hf_shard_config(config, 3)
