"""TPCausalLM: a Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2/3; Mixtral's and Qwen's experts) split over tp
ranks.

One rank's model, Megatron-style. With H query heads, KV key/value heads,
intermediate size I and vocabulary V, rank r holds:

* embedding: rows [r V'/tp, (r+1) V'/tp) of the (padded) vocabulary;
  one all-reduce assembles each token's embedding (:mod:`tplab.layers.vocab`);
* per layer, attention: its H/tp query heads and their KV heads
  (QKV column parallel, :class:`~tplab.layers.linear.QKVParallelLinear`), the
  matching H/tp * head_dim columns of o_proj (row parallel): one all-reduce; Qwen3's per-head q/k RMSNorms act on
  one head each, so they are replicated;
* per layer, MLP: I/tp rows of gate and up (merged, column parallel) and I/tp
  columns of down (row parallel): one all-reduce; in a mixture of experts, the same slice of every expert (or
  E/ep whole experts, ``launch(..., ep=tp)``) and a replicated router, still one all-reduce, or all-to-alls
  when the tokens are dispatched (:mod:`tplab.model.moe`);
* RMSNorm weights and RoPE: replicated (they act on the full hidden vector, or per head);
* LM head: a vocabulary block of rows; the logits are all-gathered, or
  reduced to a greedy token id by a small all-gather.

So one forward pass runs exactly 2 * layers + 1 all-reduces, each of
(batch, tokens, hidden) elements, and one all-gather in the LM head.

Pipeline stages (``launch(..., pp=P)``): stage s of the grid holds a contiguous range of decoder layers
(:func:`tplab.specs.sharding.stage_layers`), each split over its own tp ranks as above; the first stage also holds
the embedding, the last the final norm and the LM head (with tied embeddings, the last stage reads the embedding
matrix as its head). The forward pass is the same one: a stage after the first receives the hidden states
(batch, T, hidden) from the stage before, instead of embedding, and a stage before the last sends its own to the
next, one send/recv of the pipeline group, instead of the norm. So stage s runs 2 * layers_s all-reduces (+1 for the
embedding on the first stage) and one hop of batch * T * hidden elements.

Left-padded batches: each row has its own positions, and ``key_valid`` marks
the cache slots holding real tokens; a query attends to the valid slots at or
before its own (and within the sliding window, for Mistral/Qwen2 layers that
have one). A padding query attends to itself only, so no row of the softmax is
empty.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from tplab.checkpoint.sources import LoadStats, TensorSource
from tplab.comm.group import Dist
from tplab.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear, load_row_parallel
from tplab.layers.rope import RotaryEmbedding, apply_rope
from tplab.layers.vocab import ParallelLMHead, VocabParallelEmbedding
from tplab.layers.weights import DenseWeight, WeightFormat
from tplab.model.kv_cache import KVCache, StaticStep
from tplab.model.moe import TPMoE
from tplab.model.paged_cache import PagedBatch
from tplab.specs.model import ModelConfig
from tplab.specs.sharding import stage_layers


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 (replicated on every rank)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype | None, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device), requires_grad=False)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class TPAttention(nn.Module):
    """softmax(Q_h K_g^T / sqrt(d)) V_g for this rank's heads h (KV head g = h // (H/KV)), then o_proj."""

    def __init__(self, config: ModelConfig, dist: Dist, window: int | None, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.head_dim, self.window = config.head_dim, window
        self.scale = config.head_dim ** -0.5  # 1 / sqrt(d)
        self.qkv = QKVParallelLinear(config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                                     dist, bias=config.qkv_bias, dtype=dtype)
        self.o_proj = RowParallelLinear(config.num_heads * config.head_dim, config.hidden_size, dist,
                                        bias=config.o_bias, dtype=dtype)
        self.q_norm = self.k_norm = None
        if config.qk_norm:
            self.q_norm, self.k_norm = (RMSNorm(config.head_dim, config.rms_norm_eps, dtype, dist.device)
                                        for _ in range(2))

    def load(self, source: TensorSource, prefix: str) -> None:
        self.qkv.load(source, f"{prefix}.q_proj", f"{prefix}.k_proj", f"{prefix}.v_proj")
        load_row_parallel(self.o_proj, source, f"{prefix}.o_proj")
        if self.q_norm is not None:
            source.copy_into(self.q_norm.weight.data, f"{prefix}.q_norm.weight")
            source.copy_into(self.k_norm.weight.data, f"{prefix}.k_norm.weight")

    def forward(self, x, cos, sin, mask, step: StaticStep | PagedBatch, layer: int) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = (t.view(batch, tokens, -1, self.head_dim) for t in self.qkv(x))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = step.attend(layer, apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, mask, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(batch, tokens, -1))


class TPMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): gate/up column parallel (merged), down row parallel, one all-reduce."""

    checkpoint_name = "mlp"  # the block's name in model.layers.{i}

    def __init__(self, config: ModelConfig, dist: Dist, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.gate_up = MergedColumnParallelLinear(config.hidden_size, config.intermediate_size, dist,
                                                  bias=config.mlp_bias, dtype=dtype)
        self.down = RowParallelLinear(config.intermediate_size, config.hidden_size, dist, bias=config.mlp_bias,
                                      dtype=dtype)

    def load(self, source: TensorSource, prefix: str) -> None:
        self.gate_up.load(source, f"{prefix}.gate_proj", f"{prefix}.up_proj")
        load_row_parallel(self.down, source, f"{prefix}.down_proj")

    def linears(self) -> list[nn.Module]:
        return [self.gate_up, self.down]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return self.down(F.silu(gate) * up)


class TPDecoderLayer(nn.Module):
    """h = x + attn(norm(x)); out = h + mlp(norm(h)), the MLP dense or a mixture of experts (:mod:`tplab.model.moe`)."""

    def __init__(self, config: ModelConfig, dist: Dist, window: int | None, dtype: torch.dtype | None,
                 expert_dispatch: str = "all-reduce") -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, dist.device)
        self.attn = TPAttention(config, dist, window, dtype)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, dist.device)
        self.mlp = (TPMoE(config, dist, dtype, expert_dispatch) if config.num_experts
                    else TPMLP(config, dist, dtype))

    def load(self, source: TensorSource, prefix: str) -> None:
        source.copy_into(self.input_norm.weight.data, f"{prefix}.input_layernorm.weight")
        source.copy_into(self.post_attention_norm.weight.data, f"{prefix}.post_attention_layernorm.weight")
        self.attn.load(source, f"{prefix}.self_attn")
        self.mlp.load(source, f"{prefix}.{self.mlp.checkpoint_name}")

    def forward(self, x, cos, sin, mask, step: StaticStep | PagedBatch, layer: int) -> torch.Tensor:
        h = x + self.attn(self.input_norm(x), cos, sin, mask, step, layer)
        return h + self.mlp(self.post_attention_norm(h))


class TPCausalLM(nn.Module):
    """One rank's shard of a Llama-family causal LM. Build it with :mod:`tplab.model.loading`."""

    def __init__(self, config: ModelConfig, dist: Dist, dtype: torch.dtype = torch.float32,
                 pp_layers: list[int] | None = None, expert_dispatch: str = "all-reduce") -> None:
        """``pp_layers``: decoder layers per pipeline stage (default: the even split); read only when
        ``dist.grid`` has more than one stage. ``expert_dispatch``: how a mixture's tokens reach experts placed
        whole (``launch(..., ep=tp)``): "all-reduce" or "all-to-all" (:mod:`tplab.model.moe`)."""
        super().__init__()
        config.check_runnable()
        self.ep = 1 if dist.grid is None else dist.grid.ep.world_size
        config.check_tp(dist.world_size, self.ep)
        self.config, self.dist, self.dtype = config, dist, dtype
        self.pipe = None if dist.grid is None or dist.grid.num_stages == 1 else dist.grid.pp
        stage, stages = (0, 1) if self.pipe is None else (self.pipe.rank, self.pipe.world_size)
        self.layer_ids = stage_layers(config.num_layers, stages, pp_layers)[stage]
        self.is_first_stage, self.is_last_stage = stage == 0, stage == stages - 1
        self.load_stats: LoadStats | None = None  # set by load(): what this rank read, and how long it took
        self.quant: str | None = None  # set by quantize_(): "int8" or "fp8"
        hidden = config.hidden_size
        self.embed = VocabParallelEmbedding(config.vocab_size, hidden, dist, dtype) if self.is_first_stage else None
        self.layers = nn.ModuleList(TPDecoderLayer(config, dist, config.layer_windows[i], dtype, expert_dispatch)
                                    for i in self.layer_ids)
        self.norm = self.lm_head = None
        if self.is_last_stage:
            self.norm = RMSNorm(hidden, config.rms_norm_eps, dtype, dist.device)
            self.lm_head = ParallelLMHead(config.vocab_size, hidden, dist, dtype)
            if config.tie_word_embeddings and self.embed is not None:
                self.lm_head.tie_to(self.embed)
        self.rotary = RotaryEmbedding(config.rope, config.head_dim, config.max_position_embeddings, dist.device)
        if config.quantization:  # stored quantized: load() fills qweight and scale as they are
            for linear in self.quantizable():
                linear.prepare_quantized_(config.quantization)
            self.quant = config.quantization

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def load(self, source: TensorSource) -> "TPCausalLM":
        """Fill every shard from Hugging Face tensor names (``model.layers.{i}.self_attn.q_proj.weight``, ...)."""
        started, already_read = time.perf_counter(), source.bytes_read
        if self.embed is not None:
            self.embed.load(source, "model.embed_tokens.weight")
        for i, layer in zip(self.layer_ids, self.layers):
            layer.load(source, f"model.layers.{i}")
        if self.is_last_stage:
            source.copy_into(self.norm.weight.data, "model.norm.weight")
            if not self.config.tie_word_embeddings:
                self.lm_head.load(source, "lm_head.weight")
            elif self.embed is None:  # tied, on a last stage that is not the first: the head reads the embedding
                self.lm_head.load(source, "model.embed_tokens.weight")
        self.load_stats = LoadStats(source.bytes_read - already_read, time.perf_counter() - started)
        return self

    def parameter_bytes(self) -> int:
        """Bytes of this rank's weights as stored, in whatever format (a tied matrix counted once): every weight
        format's bytes, and the norms and biases."""
        formats = {id(m): m for m in self.modules() if isinstance(m, WeightFormat)}
        inside = {id(t) for m in formats.values() for t in [*m.parameters(), *m.buffers()]}
        rest = [p for p in self.parameters() if id(p) not in inside]
        return sum(m.nbytes for m in formats.values()) + sum(p.numel() * p.element_size() for p in rest)

    def prepack_(self) -> "TPCausalLM":
        """Every dense decoder linear, and an untied dense LM head, in oneDNN's blocked layout (CPU, float32 or
        bfloat16): the same forward pass through faster GEMMs (:class:`~tplab.layers.weights.PrepackedWeight`).
        The readable path stays the default; this one must give the same tokens."""
        head = [] if self.config.tie_word_embeddings or self.lm_head is None else [self.lm_head]
        for linear in self.quantizable() + head:
            if isinstance(linear.weight, DenseWeight):
                linear.prepack_()
        return self

    def quantizable(self) -> list:
        """The decoder's linears, the layers weight-only quantization applies to: q/k/v, o, gate/up, down (every
        expert's, in a mixture)."""
        return [m for layer in self.layers for m in (layer.attn.qkv, layer.attn.o_proj, *layer.mlp.linears())]

    def quantize_(self, scheme: str, embeddings: bool = False) -> "TPCausalLM":
        """Weight-only int8 or fp8 for every decoder linear (q/k/v, o, gate/up, down) of this rank's shard, with
        per-row scales that do not depend on tp (:mod:`tplab.layers.weights`). The embedding and the LM head
        keep the model's dtype unless ``embeddings`` (one scale per vocabulary row); the norms always do. The
        row-parallel layers' scale maxima are all-gathered under the tag "quantize"."""
        stats, tag = self.dist.stats, self.dist.stats.tag
        stats.tag = "quantize"
        try:
            for linear in self.quantizable():
                linear.quantize_(scheme)
            if embeddings:
                tied = self.embed is not None and self.lm_head is not None and self.lm_head.weight is self.embed.weight
                if self.embed is not None:
                    self.embed.quantize_(scheme)
                if tied:
                    self.lm_head.tie_to(self.embed)  # the embedding's new format
                elif self.lm_head is not None:
                    self.lm_head.quantize_(scheme)
        finally:
            stats.tag = tag
        self.quant = scheme
        return self

    def expert_tokens(self) -> torch.Tensor | None:
        """(layers of this stage, E): how many (token, expert) pairs each of this rank's experts has computed so
        far, per layer (zeros for another rank's experts); None for a dense model."""
        if not self.config.num_experts:
            return None
        return torch.stack([layer.mlp.tokens_per_expert for layer in self.layers]).cpu()

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """A KV cache for this rank's KV heads, ``batch`` rows of up to ``max_len`` positions."""
        return KVCache.for_model(self.config, self.dist.world_size, batch, max_len,
                                 self.dtype, self.device, layers=len(self.layers))

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, step: StaticStep | PagedBatch | None = None) -> torch.Tensor | None:
        """Final-norm hidden states (batch, T, hidden) of the new tokens ``input_ids`` (batch, T).

        On a pipeline stage: the first embeds ``input_ids``, the others receive the hidden states of the stage
        before; the last returns the final-norm states, the others send theirs to the next stage and return None.
        Every stage passes the same ``input_ids`` (for their shape), the same ``step``.

        ``step``: the cache as this pass sees it, which says where the new tokens sit (``positions``), which keys
        each query reads (``mask``), and runs attention over what the cache holds (``attend``): a
        :class:`~tplab.model.kv_cache.StaticStep` (rows at slots [start, start + T)) or a
        :class:`~tplab.model.paged_cache.PagedBatch` (sequences packed in one row, ``input_ids`` (1, N)).
        None: a fresh cache, the tokens at positions [0, T).
        Collectives: 2 * layers + 1 all-reduces (a stage: 2 * its layers, +1 on the first; one recv, one send).
        """
        batch, tokens = input_ids.shape
        step = self.new_cache(batch, tokens).step(0, tokens) if step is None else step
        cos, sin = self.rotary(step.positions, self.dtype)
        masks = {w: step.mask(w) for w in {layer.attn.window for layer in self.layers}}
        if self.is_first_stage:
            h = self.embed(input_ids)
        else:
            h = torch.empty(batch, tokens, self.config.hidden_size, dtype=self.dtype, device=self.device)
            self.pipe.recv(h, self.pipe.rank - 1)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, masks[layer.attn.window], step, i)
        if not self.is_last_stage:
            self.pipe.send(h, self.pipe.rank + 1)
            return None
        return self.norm(h)

    @torch.no_grad()
    def without_layers(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The forward pass with no decoder layer: norm(embed(ids)), what the benchmark times to scale N layers to L."""
        return self.norm(self.embed(input_ids))

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits (..., V) on every rank: one all-gather."""
        return self.lm_head.gather_logits(hidden)

    @torch.no_grad()
    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """argmax token ids (...,), without building the full logits: one small all-gather."""
        return self.lm_head.greedy(hidden)

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (batch, T, V) at every position of ``input_ids`` (no padding, fresh cache)."""
        return self.logits(self.forward(input_ids))
