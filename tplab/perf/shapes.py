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

A mixture of experts (:mod:`tplab.perf.experts`): the MLP's weights are every expert's (E · 3·h·I_e/tp per rank,
whole or split), a step reads the share of them its tokens touch and computes its active pairs; with whole
experts the busiest rank sets the pace, and dispatched tokens replace the MLP's all-reduce by three all-to-alls
and an all-gather.

Precisions: weights bf16/fp16 (2 B), fp8 and int8 (1 B plus one fp32 scale per
output row of every linear, the layout of :mod:`tplab.layers.weights`), int4
(0.5 B plus one fp16 scale per group of 128 weights, an AWQ/GPTQ-style layout, assumed).
Only the linear layers of the decoder blocks are quantized; embedding, lm_head
and norms stay 16-bit, as in common fp8/int4 checkpoints. Activations and
collectives are bf16.
"""
from __future__ import annotations

from dataclasses import dataclass

from tplab.perf.experts import ExpertSplit, expert_layer_params, layer_payload, routed_shares
from tplab.specs.dtypes import canonical
from tplab.specs.model import ModelConfig
from tplab.specs.sharding import padded_size

WEIGHT_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5 + 2 / 128}
ROW_SCALE_BYTES = {"fp8": 4, "int8": 4}  # one fp32 scale per output row of each quantized linear
KV_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1}
ACT_BYTES = 2
LOGIT_BYTES = 4  # sampling works on fp32 logits


def check_precision(dtype: str, kv_dtype: str) -> tuple[str, str]:
    """The short names of a weight and a KV-cache precision, in either spelling ("bfloat16" -> "bf16");
    a ValueError for one the cost model does not know."""
    dtype, kv_dtype = canonical(dtype), canonical(kv_dtype)
    if dtype not in WEIGHT_BYTES:
        raise ValueError(f"unknown weight dtype {dtype!r}; known: {', '.join(WEIGHT_BYTES)}")
    if kv_dtype not in KV_BYTES:
        raise ValueError(f"unknown kv_dtype {kv_dtype!r}; known: {', '.join(KV_BYTES)}")
    return dtype, kv_dtype


def padded_vocab(model: ModelConfig, tp: int) -> int:
    """V rounded up to a multiple of tp, the rows a vocab-parallel embedding allocates."""
    return padded_size(model.vocab_size, tp)


def rank_params(model: ModelConfig, tp: int, layers: int | None = None,
                embedding: bool = True, lm_head: bool = True) -> dict[str, int]:
    """Parameters one rank stores: ``linear`` (quantizable), ``embedding``, ``lm_head``, ``other`` (norms, biases).

    ``layers`` decoder layers (all by default) plus, where asked, the embedding
    and the lm_head with the final norm (a pipeline stage holds a subset). A
    tied lm_head shares the embedding's storage when both are on the rank.
    """
    layers = model.num_layers if layers is None else layers
    h, d, heads = model.hidden_size, model.head_dim, model.num_heads // tp
    kv = model.kv_heads_per_rank(tp)
    attention = h * heads * d + 2 * h * kv * d + heads * d * h
    mlp = expert_layer_params(model, tp) if model.num_experts else 3 * h * model.intermediate_size // tp
    bias = (heads + 2 * kv) * d if model.qkv_bias else 0
    bias += 2 * d if model.qk_norm else 0  # Qwen3's per-head q and k norms
    bias += model.num_experts * h + (h if model.shared_expert_intermediate_size else 0)  # routers, replicated
    vocab_rows = padded_vocab(model, tp) // tp * h
    stored_head = lm_head and not (model.tie_word_embeddings and embedding)
    return {
        "linear": layers * (attention + mlp),
        "embedding": vocab_rows if embedding else 0,
        "lm_head": vocab_rows if stored_head else 0,
        "other": layers * (2 * h + bias) + (h if lm_head else 0),
    }


def scale_bytes(model: ModelConfig, tp: int, dtype: str, layers: int | None = None) -> int:
    """Bytes of the per-row scales of 8-bit linears on one rank: 4 per output row of q/k/v, gate/up (this rank's
    rows) and o, down (every row: a row-parallel layer keeps the full row's scale); 0 for other precisions."""
    layers = model.num_layers if layers is None else layers
    h = model.hidden_size
    mlp = [(model.intermediate_size, 1)] if not model.num_experts else \
        [(model.expert_intermediate_size, model.num_experts), (model.shared_expert_intermediate_size, 1)]
    rows = (model.num_heads // tp + 2 * model.kv_heads_per_rank(tp)) * model.head_dim + h \
        + sum(count * (2 * width // tp + h) for width, count in mlp if width)
    return layers * rows * ROW_SCALE_BYTES.get(dtype, 0)


def linear_bytes(model: ModelConfig, tp: int, dtype: str, layers: int | None = None) -> float:
    """Bytes of one rank's decoder linears at ``dtype``, their scales included."""
    return rank_params(model, tp, layers)["linear"] * WEIGHT_BYTES[dtype] + scale_bytes(model, tp, dtype, layers)


def weight_bytes(model: ModelConfig, tp: int, dtype: str, **slice_kw) -> float:
    """Bytes of weights one rank stores: linear layers at ``dtype`` (with their scales), the rest at 16 bits."""
    p = rank_params(model, tp, **slice_kw)
    layers = slice_kw.get("layers")
    return linear_bytes(model, tp, dtype, layers) + 2.0 * (p["embedding"] + p["lm_head"] + p["other"])


def activation_bytes(model: ModelConfig, tp: int, tokens: int, batch: int) -> float:
    """A rough peak of transient activations on one rank for one forward pass of ``tokens`` tokens.

    Per token: the residual stream and its normed copy (2h) plus the widest
    intermediate, the MLP's gate, up and activated outputs (3·I/tp; a mixture's k experts and its shared one); then fp32
    logits of the last token of each sequence, V_pad/tp before and V after the
    all-gather. Attention is assumed flash-style (no tokens × tokens matrix).
    """
    width = model.intermediate_size if not model.num_experts else \
        model.experts_per_token * model.expert_intermediate_size + model.shared_expert_intermediate_size
    per_token = ACT_BYTES * (2 * model.hidden_size + 3 * width // tp)
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
    layers: int  # decoder layers in the pass
    tokens: int  # tokens the linear layers multiply: batch · new tokens
    sequences: int  # the batch
    expert_flops: float = 0.0  # a mixture's expert GEMMs on the busiest rank (not in linear_flops)
    expert_tokens: float = 0.0  # tokens per expert GEMM: the N k pairs over the experts they touch
    all_to_alls: int = 0  # dispatched tokens: 3 all-to-alls per layer (ids, tokens, results)
    all_to_all_bytes: float = 0.0  # per layer, the bytes that leave the busiest rank in them
    expert_gather_bytes: float = 0.0  # per layer, the all-gather that gives every rank every token back


def step_work(model: ModelConfig, tp: int, dtype: str, kv_dtype: str, batch: int, new_tokens: int, context: int,
              layers: int | None = None, embedding: bool = True, lm_head: bool = True,
              experts: ExpertSplit | None = None) -> StepWork:
    """One forward pass of ``new_tokens`` per sequence after ``context`` cached ones, for ``batch`` sequences.

    Decode is new_tokens=1 after the context; prefill is new_tokens=prompt, context=0.
    FLOPs count 2 per multiply-add: linear 2·params·tokens (lm_head only for the
    last token of each sequence); attention 4·(H/tp)·d·Σ_i (context + i) per layer
    and sequence. KV bytes are the cache touched: batch·(context + new)·per-token bytes.
    A mixture's experts (``experts``, default split over the tp ranks): see the module docstring.
    """
    layers = model.num_layers if layers is None else layers
    p = rank_params(model, tp, layers, embedding, lm_head)
    head_rows = padded_vocab(model, tp) // tp * model.hidden_size if lm_head else 0
    tokens = batch * new_tokens
    attended = new_tokens * context + new_tokens * (new_tokens + 1) // 2
    heads = model.num_heads // tp
    work = dict(linear_flops=2.0 * (p["linear"] * tokens + head_rows * batch), all_reduces=2 * layers + embedding)
    weights = linear_bytes(model, tp, dtype, layers)
    if model.num_experts:
        work, weights = _with_experts(model, tp, dtype, layers, tokens, experts or ExpertSplit(), work, weights)
    return StepWork(
        weight_bytes=weights + 2.0 * (p["other"] + head_rows),
        kv_bytes=batch * (context + new_tokens) * model.kv_bytes_per_token(tp, kv_dtype, layers),
        attention_flops=4.0 * heads * model.head_dim * layers * batch * attended,
        all_reduce_bytes=ACT_BYTES * tokens * model.hidden_size,
        gather_bytes=ACT_BYTES * batch * padded_vocab(model, tp) if lm_head else 0.0,
        layers=layers, tokens=tokens, sequences=batch, **work,
    )


def _with_experts(model: ModelConfig, tp: int, dtype: str, layers: int, tokens: int, split: ExpertSplit,
                  work: dict, weights: float) -> tuple[dict, float]:
    """A mixture's share of a pass: expert FLOPs apart from the dense linears, the expert weights touched instead
    of all of them, and the dispatch's collectives (:mod:`tplab.perf.experts`)."""
    split.check(model, tp)
    k, experts = model.experts_per_token, model.num_experts
    touched, imbalance = routed_shares(split, tokens, k, experts)
    per_expert = tokens * k / (experts * touched)  # the pairs each touched expert's GEMM takes
    touched = min(1.0, touched * imbalance)  # the busiest rank's own experts (imbalance 1: split over the ranks)
    expert_params = layers * expert_layer_params(model, tp)
    h, shared = model.hidden_size, model.shared_expert_intermediate_size
    expert_flops = 2.0 * layers * 3 * h * (tokens * k * model.expert_intermediate_size * imbalance + tokens * shared) / tp
    work = {**work, "linear_flops": work["linear_flops"] - 2.0 * expert_params * tokens,
            "expert_flops": expert_flops, "expert_tokens": per_expert}
    if split.dispatch == "all-to-all":
        payload = layer_payload(tokens, h, k, tp, "all-to-all", ACT_BYTES)
        work.update(all_reduces=work["all_reduces"] - layers, all_to_alls=3 * layers,
                    all_to_all_bytes=(tp - 1) / tp * payload["all_to_all"] * imbalance,
                    expert_gather_bytes=payload["all_gather"])
    return work, weights - (1 - touched) * expert_params * WEIGHT_BYTES[dtype]
