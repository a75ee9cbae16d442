"""Fused QKV / gate-up layers and the vocabulary-parallel embedding and LM head, against dense PyTorch (threads)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tplab import launch
from tplab.layers.linear import MergedColumnParallelLinear, QKVParallelLinear
from tplab.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from tplab.model.attention import attention_mask, grouped_query_attention
from tplab.specs.sharding import gqa_heads

TPS = (1, 2, 4, 8)


def dense(in_features: int, out_features: int, bias: bool, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


@pytest.mark.parametrize("heads, kv", [(8, 8), (8, 2), (8, 1)])
def test_qkv_shards_are_the_ranks_heads(heads, kv):
    head_dim, hidden = 4, 16
    q, k, v = (dense(hidden, n * head_dim, True, s) for s, n in enumerate((heads, kv, kv)))
    x = torch.randn(3, 5, hidden)
    with torch.no_grad():
        ref_q, ref_k, ref_v = (t.view(3, 5, -1, head_dim) for t in (q(x), k(x), v(x)))

    def rank(dist):
        return QKVParallelLinear.from_linears(q, k, v, heads, kv, dist)(x), dist.stats.count()

    for tp in TPS:
        for r, ((q_r, k_r, v_r), collectives) in enumerate(launch(rank, tp, "threads")):
            q_heads, kv_heads = gqa_heads(heads, kv, tp, r)
            assert collectives == 0
            torch.testing.assert_close(q_r.view(3, 5, -1, head_dim), ref_q[:, :, q_heads.start:q_heads.stop])
            torch.testing.assert_close(k_r.view(3, 5, -1, head_dim), ref_k[:, :, kv_heads.start:kv_heads.stop])
            torch.testing.assert_close(v_r.view(3, 5, -1, head_dim), ref_v[:, :, kv_heads.start:kv_heads.stop])


def test_merged_gate_up_shards_concatenate_to_the_dense_swiglu():
    gate, up = dense(16, 64, False, 0), dense(16, 64, False, 1)
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        ref = nn.functional.silu(gate(x)) * up(x)

    def rank(dist):
        g, u = MergedColumnParallelLinear.from_linears(gate, up, dist)(x)
        return nn.functional.silu(g) * u

    for tp in TPS:
        torch.testing.assert_close(torch.cat(launch(rank, tp, "threads"), dim=-1), ref)


@pytest.mark.parametrize("vocab", [256, 250, 5])
def test_vocab_parallel_embedding_is_one_all_reduce(vocab):
    table = torch.randn(vocab, 8)
    ids = torch.tensor([[0, vocab - 1, vocab // 2], [1, vocab - 2, 3 % vocab]])

    def rank(dist):
        return VocabParallelEmbedding.from_dense(table, dist)(ids), dist.stats.summary()

    for tp in TPS:
        for out, comm in launch(rank, tp, "threads"):
            assert torch.equal(out, table[ids])  # exactly one rank contributes each row: no rounding
            assert comm == {"all_reduce": {"count": 1, "bytes": ids.numel() * 8 * 4, "seconds": comm["all_reduce"]["seconds"]}}


def test_lm_head_gather_and_greedy_match_dense_argmax_with_ties_and_padding():
    vocab, hidden = 250, 4  # 250 is not divisible by 4 or 8: the last ranks hold padding rows
    weight = torch.randn(vocab, hidden)
    h = torch.randn(6, hidden)
    # rows 0-1: ties across rank boundaries (tokens 3, 100 and 240 share the best row of the weight);
    # rows 2-3: every real logit negative, so a zero padding logit would win if it were not excluded.
    weight[[3, 100, 240]] = torch.tensor([5.0, 5.0, 5.0, 5.0])
    h[0] = h[1] = torch.tensor([1.0, 1.0, 1.0, 1.0])
    weight_neg = -weight.abs() - 0.1
    cases = [(weight, h), (weight_neg, h.abs())]

    def rank(dist):
        out = []
        for w, x in cases:
            head = ParallelLMHead.from_dense(w, dist)
            dist.stats.reset()
            out.append((head.gather_logits(x), head.greedy(x), dist.stats.summary()))
        return out

    for tp in TPS:
        for per_case in launch(rank, tp, "threads"):
            for (w, x), (logits, greedy, comm) in zip(cases, per_case):
                ref = x @ w.T
                torch.testing.assert_close(logits, ref)
                assert torch.equal(greedy, ref.argmax(-1))
                assert comm["all_gather"]["count"] == 2
                padded = -(-vocab // tp) * tp
                assert comm["all_gather"]["bytes"] == x.shape[0] * padded * 4 + x.shape[0] * 2 * 8 * tp
    assert (cases[0][1] @ cases[0][0].T).argmax(-1)[0] == 3  # the tie really is there, won by the lowest id


def test_tied_head_shares_the_embedding_shard():
    table = torch.randn(250, 8)

    def rank(dist):
        embed = VocabParallelEmbedding.from_dense(table, dist)
        head = ParallelLMHead(250, 8, dist).tie_to(embed)
        return head.weight is embed.weight

    assert all(launch(rank, 4, "threads"))


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("tokens", [1, 5])
def test_grouped_query_attention_equals_attention_over_copied_kv_heads(groups, tokens):
    """Stacking a KV head's G query heads along the query axis == repeating K and V G times."""
    batch, kv_heads, slots, head_dim = 3, 2, 9, 8
    gen = torch.Generator().manual_seed(groups * 10 + tokens)
    q = torch.randn(batch, kv_heads * groups, tokens, head_dim, generator=gen)
    keys, values = (torch.randn(batch, kv_heads, slots, head_dim, generator=gen) for _ in range(2))
    # every row its own left padding, so a mask mixed across rows or heads would show
    pads = torch.tensor([0, 3, 6])
    key_valid = torch.arange(slots)[None, :] >= pads[:, None]
    mask = attention_mask(torch.arange(slots - tokens, slots), key_valid, window=None)
    expected = F.scaled_dot_product_attention(q, keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1),
                                              attn_mask=mask, scale=head_dim ** -0.5)
    got = grouped_query_attention(q, keys, values, mask, head_dim ** -0.5)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_gqa_attention_benchmark_script_runs_and_checks_its_two_forms():
    """scripts/bench_gqa_attention.py (small shapes, nothing saved): both forms agree and a ratio is printed."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_gqa_attention.py"
    done = subprocess.run([sys.executable, str(script), "--no-save", "--repeats", "1", "--tp", "8", "--batch", "1,3",
                           "--context", "64", "--dtype", "float32"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.strip().startswith("8 ")]
    assert [r[2] for r in rows] == ["1", "3"] and all(r[-1].endswith("x") for r in rows), done.stdout
