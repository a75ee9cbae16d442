"""tplab.layers.rope against Hugging Face's own rotary embedding (default, linear and llama3 scaling)."""
import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from tplab.layers.rope import RotaryEmbedding, apply_rope, inverse_frequencies
from tplab.specs.model import ModelConfig

ROPES = {
    "default": dict(rope_theta=10000.0, rope_type="default"),
    "linear": dict(rope_theta=10000.0, rope_type="linear", factor=4.0),
    "llama3": dict(rope_theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=32),
}


def configs(kind: str, head_dim: int = 16):
    hf = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim, num_hidden_layers=1,
                     intermediate_size=8, vocab_size=16, max_position_embeddings=256, rope_parameters=dict(ROPES[kind]))
    return hf, ModelConfig.from_hf_config(hf)


@pytest.mark.parametrize("kind", sorted(ROPES))
def test_cos_sin_and_rotation_match_hf(kind):
    hf_config, config = configs(kind)
    hf_rope = LlamaRotaryEmbedding(hf_config)
    torch.testing.assert_close(inverse_frequencies(config.rope, config.head_dim), hf_rope.inv_freq, rtol=0, atol=0)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 7, 8, 100, 255]])  # two rows, different positions
    x = torch.randn(2, 4, 6, config.head_dim)
    hf_cos, hf_sin = hf_rope(x, positions)
    cos, sin = RotaryEmbedding(config.rope, config.head_dim, config.max_position_embeddings)(positions, x.dtype)
    torch.testing.assert_close(cos, hf_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, hf_sin, rtol=0, atol=1e-6)
    q, k = torch.randn(2, 4, 6, config.head_dim), torch.randn(2, 2, 6, config.head_dim)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    torch.testing.assert_close(apply_rope(q, cos, sin), hf_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(apply_rope(k, cos, sin), hf_k, rtol=0, atol=1e-6)


def test_llama3_scaling_changes_only_low_frequencies():
    _, plain = configs("default")
    _, scaled = configs("llama3")
    base = inverse_frequencies(plain.rope.__class__(theta=500000.0), 16)
    llama3 = inverse_frequencies(scaled.rope, 16)
    wavelength = 2 * torch.pi / base
    assert torch.equal(llama3[wavelength < 32 / 4], base[wavelength < 32 / 4])  # high frequencies untouched
    torch.testing.assert_close(llama3[wavelength > 32], base[wavelength > 32] / 8)  # low ones divided by factor
    assert (wavelength > 32).any() and (wavelength < 8).any()


def test_scores_depend_only_on_relative_position():
    _, config = configs("default")
    rope = RotaryEmbedding(config.rope, config.head_dim, config.max_position_embeddings)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq: int, pk: int) -> torch.Tensor:
        cq, sq = rope(torch.tensor([[pq]]), torch.float32)
        ck, sk = rope(torch.tensor([[pk]]), torch.float32)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(7, 3), score(14, 10), rtol=0, atol=1e-5)
    assert not torch.allclose(score(7, 3), score(7, 4))


def test_odd_head_dim_is_rejected():
    _, config = configs("default")
    with pytest.raises(ValueError, match="even head_dim"):
        inverse_frequencies(config.rope, 15)
