"""The rank programs of notebooks 03-05 against Hugging Face: one TP block, the KV cache after a prefill, the timeline."""
import pytest
import torch

from tplab import launch
from tplab.lab.block_programs import (
    decoder_block_rank,
    forward_labels,
    hf_block_reference,
    layer_state,
    pad_rows,
    prefill_cache_rank,
    timed_generation_rank,
)
from tplab.specs.model import ModelConfig
from tplab.testing import build_hf_model, distinct_prompts, hf_greedy, make_checkpoint


@pytest.mark.parametrize("spec", ["llama31", "mistral", "qwen2", "tied"])
def test_decoder_block_equals_hf_with_two_all_reduces(spec):
    hf = build_hf_model(spec)
    config = ModelConfig.from_hf_config(hf.config)
    prompts = distinct_prompts(config.vocab_size, [9, 4, 7], seed=1)  # 9 > mistral's window of 6
    layer = 1
    reference = hf_block_reference(hf, prompts, layer)
    hidden = pad_rows([r["input"] for r in reference])
    activation_bytes = hidden.numel() * hidden.element_size()
    for tp in (1, 2, 4, 8):
        ranks = launch(decoder_block_rank, tp, args=(config, layer_state(hf, layer), layer, prompts, hidden))
        for r in ranks:
            for b, (prompt, ref) in enumerate(zip(prompts, reference)):
                for name in ("attn", "mlp", "output"):
                    torch.testing.assert_close(r[name][b, -len(prompt):], ref[name], atol=2e-5, rtol=1e-5)
            assert [(op, nbytes) for op, _, nbytes in r["records"]] == [("all_reduce", activation_bytes)] * 2
        heads = [r["q_heads"] for r in ranks]
        assert sum(heads, []) == list(range(config.num_heads))
        assert all(len(r["kv_heads"]) == max(1, config.num_kv_heads // tp) for r in ranks)


def test_pad_rows_left_pads_with_zeros():
    rows = [torch.ones(3, 2), 2 * torch.ones(1, 2)]
    batch = pad_rows(rows)
    assert batch.shape == (2, 3, 2)
    assert torch.equal(batch[1], torch.tensor([[0.0, 0.0], [0.0, 0.0], [2.0, 2.0]]))


@pytest.fixture(scope="module")
def llama31(tmp_path_factory):
    return make_checkpoint("llama31", tmp_path_factory.mktemp("llama31"), seed=2)


@torch.no_grad()
def test_prefill_cache_holds_hf_keys_and_values_of_the_rank_heads(llama31):
    path, hf = llama31
    config = ModelConfig.from_hf_config(hf.config)
    prompts = distinct_prompts(config.vocab_size, [6, 3], seed=4)
    hf_caches = [hf(torch.tensor([p]), use_cache=True).past_key_values for p in prompts]
    for tp in (1, 2, 4):
        ranks = launch(prefill_cache_rank, tp, args=(str(path), prompts))
        for r in ranks:
            assert r["bytes_per_token"] == 2 * config.num_layers * len(r["kv_heads"]) * config.head_dim * 4
            assert r["total_bytes"] == r["bytes_per_token"] * len(prompts) * max(map(len, prompts))
            for b, (prompt, cache) in enumerate(zip(prompts, hf_caches)):
                for layer in range(config.num_layers):
                    hf_k = cache.layers[layer].keys[0, r["kv_heads"]]
                    hf_v = cache.layers[layer].values[0, r["kv_heads"]]
                    torch.testing.assert_close(r["k"][layer, b, :, -len(prompt):], hf_k, atol=2e-5, rtol=1e-5)
                    torch.testing.assert_close(r["v"][layer, b, :, -len(prompt):], hf_v, atol=2e-5, rtol=1e-5)


def test_timeline_labels_every_collective_and_tokens_match_hf_on_gloo(llama31):
    path, hf = llama31
    config = ModelConfig.from_hf_config(hf.config)
    prompts = distinct_prompts(config.vocab_size, [5, 8], seed=5)
    steps = 4
    ranks = launch(timed_generation_rank, 2, backend="gloo", args=(str(path), prompts, steps))
    labels = forward_labels(config.num_layers)
    assert labels == ["embed", "L0 attn", "L0 mlp", "L1 attn", "L1 mlp", "lm_head"]
    for r in ranks:
        events = r["events"]
        assert [e["label"] for e in events] == labels * steps
        assert [e["op"] for e in events] == (["all_reduce"] * (len(labels) - 1) + ["all_gather"]) * steps
        assert [e["phase"] for e in events] == ["prefill"] * len(labels) + ["decode"] * len(labels) * (steps - 1)
        assert all(0 <= e["start"] <= e["end"] for e in events)
        assert all(a["end"] <= b["end"] for a, b in zip(events, events[1:]))
        for row, prompt in zip(r["result"].tokens, prompts):
            assert row == hf_greedy(hf, prompt, steps)[0]
