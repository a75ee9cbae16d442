"""The per-rank KV cache: only this rank's KV heads, 2 * layers * local_kv_heads * head_dim * bytes per token."""
import pytest
import torch

from tplab import launch
from tplab.model.kv_cache import KVCache
from tplab.model.loading import from_hf_model
from tplab.specs.model import ModelConfig
from tplab.testing import build_hf_model, hf_config


@pytest.mark.parametrize("name, kv_heads", [("llama", 8), ("mistral", 4), ("llama31", 2), ("tied", 1)])
@pytest.mark.parametrize("dtype, element", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_bytes_per_token_formula(name, kv_heads, dtype, element):
    config = ModelConfig.from_hf_config(hf_config(name))
    for tp in (1, 2, 4, 8):
        local = max(1, kv_heads // tp)  # tp > KV heads: one replicated head per rank
        assert config.kv_heads_per_rank(tp) == local
        expected = 2 * config.num_layers * local * config.head_dim * element
        assert config.kv_bytes_per_token(tp, dtype) == expected
        cache = KVCache.for_model(config, tp, batch=3, max_len=10, dtype=dtype)
        assert cache.bytes_per_token == expected
        assert cache.total_bytes == expected * 3 * 10 == 2 * cache.k.numel() * element
        assert cache.k.shape == (config.num_layers, 3, local, 10, config.head_dim)


def test_each_rank_caches_only_its_kv_heads():
    """The keys a rank caches are exactly HF's keys for that rank's KV heads."""
    hf = build_hf_model("llama31", seed=1)  # 2 KV heads
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        hf_keys = hf(ids, use_cache=True).past_key_values.layers[1].keys  # (batch, kv_heads, T, head_dim)

    def rank(dist):
        model = from_hf_model(hf, dist)
        cache = model.new_cache(2, 4)
        model(ids, cache.step(0, 4))
        return cache.k[1], model.layers[0].attn.qkv.kv_heads

    for tp in (1, 2, 4):
        for keys, kv_heads in launch(rank, tp, "threads"):
            assert keys.shape[1] == len(kv_heads)
            torch.testing.assert_close(keys, hf_keys[:, kv_heads.start:kv_heads.stop], rtol=0, atol=1e-5)


def test_cache_refuses_bad_sizes_and_overflow():
    config = ModelConfig.from_hf_config(hf_config("llama"))
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        KVCache.for_model(config, 1, batch=1, max_len=129)
    with pytest.raises(ValueError, match="positive integers"):
        KVCache(2, 0, 8, 1, 4)
    cache = KVCache(1, 1, 4, 1, 2)
    cache.write(0, torch.ones(1, 1, 3, 2), torch.ones(1, 1, 3, 2), start=0)
    with pytest.raises(ValueError, match="overflows"):
        cache.write(0, torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2), start=3)
