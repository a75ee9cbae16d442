"""The models a benchmark runs: tplab shards with real shapes, and Hugging Face's eager twin of one shard.

* :func:`bench_model`: ``--model`` is ``tiny`` (the bundled checkpoint), a
  checkpoint directory (config.json + safetensors: real weights), a shipped
  config name of ``data/model_configs`` (e.g. ``llama-3-70b``) or a
  config.json path (shapes only: random weights).
* :func:`build_shard`: rank r's :class:`~tplab.model.TPCausalLM`, optionally
  with only the first N decoder layers (``layers``), its weights read from
  the checkpoint or drawn at random (norms 1, everything else N(0, 0.02²)).
* :func:`build_hf_shard`: the baseline. A transformers causal LM of the model's family (Llama for the Llama-style
  ones, Qwen3's, Mixtral's, Qwen2-MoE's, Qwen3-MoE's) whose config has one rank's shapes: H/tp query heads,
  max(1, KV/tp) KV heads, I/tp MLP width (each expert's I_e/tp, every expert kept, in a mixture), V'/tp vocabulary
  rows (V' the vocabulary padded to a multiple of tp), the same hidden size and head_dim. It runs HF's own eager
  code and cache, with no collectives, over the same work as one tplab rank.
* :func:`rank_bytes`: the bytes of weights and KV cache a rank will allocate,
  computed from shapes, so a sweep that cannot fit fails before allocating.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tplab.checkpoint.safetensors_files import SafetensorsSource
from tplab.comm.group import Dist
from tplab.model.decoder import TPCausalLM
from tplab.perf.shapes import rank_params
from tplab.specs.model import ModelConfig, resolve_model
from tplab.specs.sharding import padded_size, stage_layers

if TYPE_CHECKING:  # transformers is imported where a baseline is built: it adds ~1 s to every command's start
    import transformers

INIT_STD = 0.02
POOL_SIZE = 1_048_573  # a prime


@dataclass(frozen=True)
class BenchModel:
    """A model to benchmark: its config, and the checkpoint holding its weights (None: random weights)."""

    name: str
    config: ModelConfig
    checkpoint: Path | None

    @property
    def weights(self) -> str:
        return "random" if self.checkpoint is None else f"checkpoint {self.checkpoint}"


def bench_model(name: str) -> BenchModel:
    """The model of ``--model`` (:func:`tplab.specs.model.resolve_model`): real weights where its directory has them."""
    config = resolve_model(name)
    directory = config.directory
    has_weights = directory is not None and any(directory.glob("*.safetensors"))
    return BenchModel(config.name, config, directory if has_weights else None)


def fill_random_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Norm weights 1; every other parameter gets N(0, 0.02²) values, drawn on its device from ``seed``.

    For speed (billions of weights on a CPU) the values are copied from one
    pool of POOL_SIZE draws, starting at a different offset for each parameter:
    a copy costs ~1/10 of a random draw per element. The pool's length is
    prime, so the pattern does not line up with rows. The values only need to
    be realistic in scale: timings do not depend on them.
    """
    params = list(module.named_parameters())
    if not params:
        return module
    generator = torch.Generator().manual_seed(seed)
    draws = INIT_STD * torch.randn(2 * POOL_SIZE, generator=generator)
    pools: dict[tuple, torch.Tensor] = {}
    with torch.no_grad():
        for i, (name, p) in enumerate(params):
            if "norm" in name:
                p.fill_(1.0)
                continue
            key = (p.device, p.dtype)
            if key not in pools:
                pools[key] = draws.to(p.device, p.dtype)
            offset = (i * 7919) % POOL_SIZE
            pool, flat = pools[key][offset:offset + POOL_SIZE], p.view(-1)
            rows = flat.numel() // POOL_SIZE
            flat[:rows * POOL_SIZE].view(rows, POOL_SIZE).copy_(pool.expand(rows, POOL_SIZE))
            flat[rows * POOL_SIZE:].copy_(pool[:flat.numel() - rows * POOL_SIZE])
    return module


def build_shard(model: BenchModel, dist: Dist, dtype: torch.dtype, layers: int | None = None,
                seed: int = 0, expert_dispatch: str = "all-reduce") -> TPCausalLM:
    """Rank ``dist.rank``'s shard with the first ``layers`` layers: checkpoint slices, or random weights (a
    mixture's whole experts, with an expert group, reached by ``expert_dispatch``)."""
    config = model.config.with_layers(layers)
    shard = TPCausalLM(config, dist, dtype, expert_dispatch=expert_dispatch)
    if model.checkpoint is not None:
        shard.load(SafetensorsSource(model.checkpoint))
    else:
        fill_random_(shard, seed + dist.rank)
    return shard.eval()


HF_FAMILY = {"qwen3": "Qwen3Config", "mixtral": "MixtralConfig", "qwen2_moe": "Qwen2MoeConfig",
             "qwen3_moe": "Qwen3MoeConfig"}  # the rest run as Llama: the same work at one rank's shapes


def hf_class_name(model_type: str) -> str:
    """The transformers causal LM the baseline runs for a model type, e.g. "MixtralForCausalLM"."""
    return HF_FAMILY.get(model_type, "LlamaConfig").removesuffix("Config") + "ForCausalLM"


def hf_shard_config(config: ModelConfig, tp: int) -> transformers.PretrainedConfig:
    """A transformers config of the model's family with rank 0's shapes at ``tp`` (see the module docstring);
    attention is SDPA."""
    import transformers
    config.check_tp(tp)
    shapes = dict(
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size // tp,
        num_attention_heads=config.num_heads // tp, num_key_value_heads=config.kv_heads_per_rank(tp),
        head_dim=config.head_dim, num_hidden_layers=config.num_layers,
        vocab_size=padded_size(config.vocab_size, tp) // tp, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=config.qkv_bias, rope_theta=config.rope.theta)
    family = HF_FAMILY.get(config.model_type, "LlamaConfig")
    if family == "LlamaConfig":
        shapes["mlp_bias"] = config.mlp_bias
    if family == "MixtralConfig":
        shapes.update(intermediate_size=config.expert_intermediate_size // tp, num_local_experts=config.num_experts,
                      num_experts_per_tok=config.experts_per_token, sliding_window=None)
    elif config.num_experts:
        shapes.update(moe_intermediate_size=config.expert_intermediate_size // tp, num_experts=config.num_experts,
                      num_experts_per_tok=config.experts_per_token, norm_topk_prob=config.normalize_expert_weights)
        if config.shared_expert_intermediate_size:
            shapes["shared_expert_intermediate_size"] = config.shared_expert_intermediate_size // tp
    hf = getattr(transformers, family)(**shapes)
    hf._attn_implementation = "sdpa"
    return hf


def build_hf_shard(config: ModelConfig, tp: int, dtype: torch.dtype, device: torch.device | str,
                   seed: int = 0) -> transformers.PreTrainedModel:
    """HF's causal LM of the family with one rank's shapes and random weights, built without HF's slow
    initialisation."""
    import transformers
    hf_config = hf_shard_config(config, tp)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config).to(dtype)
    model = model.to_empty(device=device)
    model.model.rotary_emb = type(model.model.rotary_emb)(hf_config).to(device)  # its buffers were left empty
    return fill_random_(model, seed).eval()


def rank_bytes(config: ModelConfig, tp: int, dtype: torch.dtype, batch: int, max_len: int,
               pp: int = 1) -> dict[str, int]:
    """{"weights", "kv_cache"}: bytes rank 0 allocates for ``config`` at ``tp`` (shapes only, nothing allocated);
    with ``pp`` stages, those of stage 0: its layers and the embedding (the LM head too when pp = 1)."""
    layers = len(stage_layers(config.num_layers, pp)[0])
    return {"weights": sum(rank_params(config, tp, layers, embedding=True, lm_head=pp == 1).values()) * dtype.itemsize,
            "kv_cache": config.kv_bytes_per_token(tp, dtype, layers) * batch * max_len}


def describe(model: BenchModel, layers: int | None) -> dict:
    """The JSON-ready description of the model that every measurement record carries."""
    return {"name": model.name, "config": model.config.to_config_dict(), "layers_built": layers or model.config.num_layers,
            "layers_full": model.config.num_layers, "weights": model.weights}
