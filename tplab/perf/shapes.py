"""What one tensor-parallel rank holds, reads, computes and sends: counts from model shapes.

Megatron-style TP of a Llama-style decoder over ``tp`` ranks. With Y = XA and
A = [A_1 … A_p] split by columns (column-parallel) or by rows (row-parallel):

* attention: q, k, v column-parallel by head. Rank r holds H/tp query heads and
  max(1, K/tp) KV heads: when tp > K, each KV head is replicated on tp/K ranks,
  so weights and KV cache of k and v no longer shrink with tp. o is row-parallel.
* MLP: gate and up column-parallel, down row-parallel: 3·h·I/tp weights per rank.
* embedding and lm_head are vocab-parallel: the vocabulary V is padded up to a
  multiple of tp (as a vocab-parallel embedding does) and each rank holds
  V_pad/tp rows of h.
* norms and q/k/v biases of replicated heads stay whole on every rank.

One forward pass needs 2 all-reduces per layer (after o and after down), one
after the vocab-parallel embedding, and one all-gather of the logits.

Precisions: weights bf16/fp16 (2 B), fp8 and int8 (1 B), int4 (0.5 B plus one
fp16 scale per group of 128 weights, an AWQ/GPTQ-style layout, assumed).
Only the linear layers of the decoder blocks are quantized; embedding, lm_head
and norms stay 16-bit, as in common fp8/int4 checkpoints. Activations and
collectives are bf16.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tplab.specs.sharding import check_divisible, check_tp, divisors
from tplab.specs.model import ModelSpec

WEIGHT_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5 + 2 / 128}
KV_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1}
ACT_BYTES = 2
LOGIT_BYTES = 4  # sampling works on fp32 logits


def check_precision(dtype: str, kv_dtype: str) -> None:
    """Reject a weight or KV-cache precision the model does not know."""
    if dtype not in WEIGHT_BYTES:
        raise ValueError(f"unknown weight dtype {dtype!r}; known: {', '.join(WEIGHT_BYTES)}")
    if kv_dtype not in KV_BYTES:
        raise ValueError(f"unknown kv_dtype {kv_dtype!r}; known: {', '.join(KV_BYTES)}")


def check_model_tp(model: ModelSpec, tp: int) -> None:
    """Raise a ValueError saying why ``model`` cannot be split over ``tp`` ranks.

    tp must divide the query heads and the MLP width; KV heads must split evenly
    (tp divides K) or replicate evenly (K divides tp).
    """
    check_tp(tp)
    check_divisible("num_attention_heads", model.num_attention_heads, tp)
    kv = model.num_key_value_heads
    if tp <= kv:
        check_divisible("num_key_value_heads", kv, tp)
    elif tp % kv:
        raise ValueError(f"tp={tp} > num_key_value_heads={kv} must be a multiple of {kv} to replicate KV heads evenly; "
                         f"valid tp: {', '.join(map(str, valid_tps(model)))}")
    check_divisible("intermediate_size", model.intermediate_size, tp)


def valid_tps(model: ModelSpec, limit: int | None = None) -> list[int]:
    """The tp degrees ``model`` can use (divisors of its query heads that pass :func:`check_model_tp`), up to ``limit``."""
    kv, inter = model.num_key_value_heads, model.intermediate_size
    ok = [t for t in divisors(model.num_attention_heads)
          if (kv % t == 0 if t <= kv else t % kv == 0) and inter % t == 0]
    return [t for t in ok if limit is None or t <= limit]


def kv_heads_per_rank(model: ModelSpec, tp: int) -> int:
    """max(1, K/tp): KV heads are split while tp <= K, then replicated."""
    return max(1, model.num_key_value_heads // tp)


def padded_vocab(model: ModelSpec, tp: int) -> int:
    """V rounded up to a multiple of tp, the rows a vocab-parallel embedding allocates."""
    return math.ceil(model.vocab_size / tp) * tp


def rank_params(model: ModelSpec, tp: int, layers: int | None = None,
                embedding: bool = True, lm_head: bool = True) -> dict[str, int]:
    """Parameters one rank stores: ``linear`` (quantizable), ``embedding``, ``lm_head``, ``other`` (norms, biases).

    ``layers`` decoder layers (all by default) plus, where asked, the embedding
    and the lm_head with the final norm (a pipeline stage holds a subset). A
    tied lm_head shares the embedding's storage when both are on the rank.
    """
    layers = model.num_hidden_layers if layers is None else layers
    h, d, heads = model.hidden_size, model.head_dim, model.num_attention_heads // tp
    kv = kv_heads_per_rank(model, tp)
    attention = h * heads * d + 2 * h * kv * d + heads * d * h
    mlp = 3 * h * model.intermediate_size // tp
    bias = (heads + 2 * kv) * d if model.qkv_bias else 0
    vocab_rows = padded_vocab(model, tp) // tp * h
    stored_head = lm_head and not (model.tie_word_embeddings and embedding)
    return {
        "linear": layers * (attention + mlp),
        "embedding": vocab_rows if embedding else 0,
        "lm_head": vocab_rows if stored_head else 0,
        "other": layers * (2 * h + bias) + (h if lm_head else 0),
    }


def weight_bytes(model: ModelSpec, tp: int, dtype: str, **slice_kw) -> float:
    """Bytes of weights one rank stores: linear layers at ``dtype``, the rest at 16 bits."""
    p = rank_params(model, tp, **slice_kw)
    return p["linear"] * WEIGHT_BYTES[dtype] + 2.0 * (p["embedding"] + p["lm_head"] + p["other"])


def kv_bytes_per_token(model: ModelSpec, tp: int = 1, kv_dtype: str = "bf16", layers: int | None = None) -> int:
    """KV-cache bytes one rank stores per token: 2 (K and V) · layers · max(1, K/tp) · head_dim · bytes."""
    layers = model.num_hidden_layers if layers is None else layers
    return 2 * layers * kv_heads_per_rank(model, tp) * model.head_dim * KV_BYTES[kv_dtype]


def activation_bytes(model: ModelSpec, tp: int, tokens: int, batch: int) -> float:
    """A rough peak of transient activations on one rank for one forward pass of ``tokens`` tokens.

    Per token: the residual stream and its normed copy (2h) plus the widest
    intermediate, the MLP's gate, up and activated outputs (3·I/tp); then fp32
    logits of the last token of each sequence, V_pad/tp before and V after the
    all-gather. Attention is assumed flash-style (no tokens × tokens matrix).
    """
    per_token = ACT_BYTES * (2 * model.hidden_size + 3 * model.intermediate_size // tp)
    vocab = padded_vocab(model, tp)
    return tokens * per_token + batch * LOGIT_BYTES * (vocab // tp + vocab)


@dataclass(frozen=True)
class StepWork:
    """What one rank reads, computes and communicates in one forward pass."""

    weight_bytes: float  # weights streamed from memory
    kv_bytes: float  # KV cache read (decode) or written (prefill)
    linear_flops: float  # matrix multiplies of the linear layers and lm_head
    attention_flops: float  # QKᵀ and PV
    all_reduces: int
    all_reduce_bytes: float  # size of each all-reduce
    gather_bytes: float  # the logits all-gather (0 without an lm_head)


def step_work(model: ModelSpec, tp: int, dtype: str, kv_dtype: str, batch: int, new_tokens: int, context: int,
              layers: int | None = None, embedding: bool = True, lm_head: bool = True) -> StepWork:
    """One forward pass of ``new_tokens`` per sequence after ``context`` cached ones, for ``batch`` sequences.

    Decode is new_tokens=1 after the context; prefill is new_tokens=prompt, context=0.
    FLOPs count 2 per multiply-add: linear 2·params·tokens (lm_head only for the
    last token of each sequence); attention 4·(H/tp)·d·Σ_i (context + i) per layer
    and sequence. KV bytes are the cache touched: batch·(context + new)·per-token bytes.
    """
    layers = model.num_hidden_layers if layers is None else layers
    p = rank_params(model, tp, layers, embedding, lm_head)
    head_rows = padded_vocab(model, tp) // tp * model.hidden_size if lm_head else 0
    tokens = batch * new_tokens
    attended = new_tokens * context + new_tokens * (new_tokens + 1) // 2
    heads = model.num_attention_heads // tp
    return StepWork(
        weight_bytes=p["linear"] * WEIGHT_BYTES[dtype] + 2.0 * (p["other"] + head_rows),
        kv_bytes=batch * (context + new_tokens) * kv_bytes_per_token(model, tp, kv_dtype, layers),
        linear_flops=2.0 * (p["linear"] * tokens + head_rows * batch),
        attention_flops=4.0 * heads * model.head_dim * layers * batch * attended,
        all_reduces=2 * layers + (1 if embedding else 0),
        all_reduce_bytes=ACT_BYTES * tokens * model.hidden_size,
        gather_bytes=ACT_BYTES * batch * padded_vocab(model, tp) if lm_head else 0.0,
    )
