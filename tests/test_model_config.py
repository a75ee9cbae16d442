"""Config parsing, TP validation at config time, and the pure GQA / vocabulary maps."""
import json
from pathlib import Path

import pytest
import torch

from tplab.specs.model import ModelConfig
from tplab.specs.sharding import gqa_heads, kv_replicas, padded_size, valid_gqa_tp, vocab_shard
from tplab.testing import SPECS, hf_config


def parsed(name: str, **overrides) -> ModelConfig:
    return ModelConfig.from_hf_config(hf_config(name, **overrides))


def base(**changes) -> dict:
    d = dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=2)
    d.update(changes)
    return d


def test_every_spec_parses_with_its_features():
    configs = {name: parsed(name) for name in SPECS}
    assert configs["llama31"].rope.type == "llama3" and configs["llama31"].rope.original_max_position_embeddings == 32
    assert configs["mistral"].layer_windows == (6, 6)
    assert configs["llama"].layer_windows == (None, None)
    qwen = configs["qwen2"]
    assert (qwen.qkv_bias, qwen.o_bias, qwen.tie_word_embeddings, qwen.layer_windows) == (True, False, True, (None, None))
    tied = configs["tied"]
    assert (tied.qkv_bias, tied.o_bias, tied.mlp_bias, tied.num_kv_heads) == (True, True, True, 1)
    assert all(c.head_dim == 8 and c.eos_token_ids == (2,) for c in configs.values())


def test_transformers_4_style_rope_fields():
    config = ModelConfig.from_dict(base(rope_theta=500000.0, max_position_embeddings=64, rope_scaling=dict(
        type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)))
    assert (config.rope.type, config.rope.theta, config.rope.original_max_position_embeddings) == ("llama3", 500000.0, 64)
    older_qwen = ModelConfig.from_dict(base(model_type="qwen2", use_sliding_window=True, sliding_window=4,
                                            max_window_layers=1))
    assert older_qwen.layer_windows == (None, 4)


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="gpt2"), "unsupported architecture"),
    (dict(hidden_act="gelu"), "unsupported hidden_act"),
    (dict(rope_parameters=dict(rope_type="yarn", factor=2.0)), "unsupported rope_type"),
])
def test_unsupported_configs_are_rejected(changes, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(base(**changes))


def test_check_tp_names_the_dimension_and_lists_valid_tp():
    mha52 = ModelConfig.from_dict(base(num_attention_heads=52, num_key_value_heads=52, hidden_size=52 * 4,
                                       intermediate_size=52 * 8))
    with pytest.raises(ValueError, match=r"^num_attention_heads=52 is not divisible by tp=3; valid tp: 1, 2, 4, 13, 26, 52$"):
        mha52.check_tp(3)
    gqa = ModelConfig.from_dict(base(num_attention_heads=12, num_key_value_heads=4, intermediate_size=96))
    with pytest.raises(ValueError, match=r"^tp=6 > num_key_value_heads=4 must be a multiple of 4.*valid tp: 1, 2, 4, 12$"):
        gqa.check_tp(6)
    narrow_mlp = ModelConfig.from_dict(base(intermediate_size=36))  # 36 is not divisible by 8
    with pytest.raises(ValueError, match=r"^intermediate_size=36 is not divisible by tp=8; valid tp: 1, 2, 4$"):
        narrow_mlp.check_tp(8)
    with pytest.raises(ValueError, match="positive integer"):
        gqa.check_tp(0)
    parsed("llama31").check_tp(8)  # tp > KV heads (2) is fine: KV heads are replicated
    assert parsed("llama31").valid_tp() == [1, 2, 4, 8]


@pytest.mark.parametrize("heads, kv", [(8, 8), (8, 2), (8, 1), (32, 8), (12, 4)])
def test_gqa_heads_cover_every_query_head_once_with_the_kv_head_it_reads(heads, kv):
    group = heads // kv
    for tp in valid_gqa_tp(heads, kv):
        seen = []
        for rank in range(tp):
            q_heads, kv_heads = gqa_heads(heads, kv, tp, rank)
            seen += list(q_heads)
            assert {h // group for h in q_heads} <= set(kv_heads), "a rank must hold the KV heads its queries read"
            assert len(kv_heads) == max(1, kv // tp)
        assert seen == list(range(heads))
        holders = [gqa_heads(heads, kv, tp, r)[1].start for r in range(tp)]
        assert all(holders.count(g) == kv_replicas(kv, tp) for g in set(holders))


def test_vocab_shards_cover_the_vocabulary_once_with_padding_at_the_end():
    for vocab, tp in [(250, 1), (250, 4), (300, 8), (5, 4), (256, 8)]:
        shards = [vocab_shard(vocab, tp, r) for r in range(tp)]
        assert shards[0][0] == 0 and shards[-1][1] == padded_size(vocab, tp)
        assert all(a[1] == b[0] for a, b in zip(shards, shards[1:]))
        assert sum(real - start for start, _, real in shards) == vocab
    assert vocab_shard(5, 4, 3) == (6, 8, 6)  # a rank can own padding only


REAL_CONFIGS = sorted(p for p in (Path(__file__).resolve().parent.parent / "data" / "model_configs").glob("*.json")
                      if json.loads(p.read_text()).get("num_key_value_heads") == 8)  # the GQA configs


@pytest.mark.skipif(not REAL_CONFIGS, reason="data/model_configs is absent")
def test_real_published_configs_parse_and_shard():
    for file in REAL_CONFIGS:
        config = ModelConfig.from_file(file)
        assert 8 in config.valid_tp() and config.num_kv_heads == 8, file.name
        with pytest.raises(ValueError, match="tp=3; valid tp: 1, 2, 4, 8"):
            config.check_tp(3)
    llama3_70b = ModelConfig.from_file(REAL_CONFIGS[0].parent / "llama-3-70b.json")
    # 2 (k, v) * 80 layers * 8 KV heads * 128 * 2 bytes = 320 KiB per token unsharded; tp=8 holds one KV head
    assert llama3_70b.kv_bytes_per_token(1, torch.bfloat16) == 320 * 1024
    assert llama3_70b.kv_bytes_per_token(8, torch.bfloat16) == llama3_70b.kv_bytes_per_token(16, torch.bfloat16) == 40 * 1024
