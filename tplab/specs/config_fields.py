"""What a Hugging Face ``config.json`` says, field by field, for a Llama-family decoder.

Both spellings of RoPE are read: transformers 5 (``rope_parameters``) and 4
(``rope_theta`` + ``rope_scaling``). Sliding windows follow Mistral (every
layer) and the Qwen family (``use_sliding_window``, from ``max_window_layers`` on, or
``layer_types``). Mixtures of experts follow Mixtral (``num_local_experts``, experts as wide as the dense MLP,
top-k weights renormalised) and Qwen2-MoE / Qwen3-MoE (``num_experts``, ``moe_intermediate_size``,
``norm_topk_prob``; Qwen2-MoE's gated shared expert).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from tplab.checks import is_positive_int

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")  # mixture-of-experts decoders tplab runs
QWEN_MODEL_TYPES = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")  # sliding windows only with use_sliding_window
QK_NORM_MODEL_TYPES = ("qwen3", "qwen3_moe")  # an RMSNorm over each query and key head before RoPE
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
REQUIRED_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
LAYER_TYPES = ("full_attention", "sliding_attention")
# Larger than any published decoder by 10x or more: a bigger value is a typo, refused before anything is sized by it.
SIZE_LIMITS = {"vocab_size": 10**7, "hidden_size": 10**6, "intermediate_size": 10**7, "num_hidden_layers": 10**4,
               "num_attention_heads": 10**5, "num_key_value_heads": 10**5, "head_dim": 10**5,
               "max_position_embeddings": 10**8, "sliding_window": 10**8, "max_window_layers": 10**4,
               "original_max_position_embeddings": 10**8, "num_local_experts": 10**5, "num_experts": 10**5,
               "num_experts_per_tok": 10**5, "moe_intermediate_size": 10**7,
               "shared_expert_intermediate_size": 10**7, "decoder_sparse_step": 10**4}


def size_field(d: Mapping, key: str, default: int | None = None) -> int | None:
    """``d[key]`` as a size: a positive integer (not a string, a float or a bool) within SIZE_LIMITS; ``default``
    when it is absent or null. ValueError naming the field otherwise."""
    value = d.get(key)
    if value is None:
        return default
    if not is_positive_int(value):
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if value > SIZE_LIMITS.get(key, math.inf):
        raise ValueError(f"{key}={value:,} is more than {SIZE_LIMITS[key]:,}: larger than any model")
    return value


def number_field(d: Mapping, key: str, default: float) -> float:
    """``d[key]`` as a finite number > 0 (``default`` when absent); ValueError naming the field otherwise (null,
    a string, NaN, an infinity, zero or a negative number)."""
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key} must be a finite number > 0, got {value!r}")
    return float(value)


def bool_field(d: Mapping, key: str, default: bool = False) -> bool:
    """``d[key]`` as true or false (``default`` when absent or null); a string such as "false" is refused."""
    value = d.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (see :mod:`tplab.layers.rope`)."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


def check_sizes(d: Mapping) -> None:
    """ValueError naming every required size that is absent, and the first that is not a sensible positive
    integer; mixture-of-experts refused outside :data:`MOE_MODEL_TYPES`."""
    missing = [k for k in REQUIRED_SIZES if k not in d]
    if missing:
        raise ValueError(f"lacks {', '.join(missing)}: tplab describes Llama/Mistral/Qwen-style decoders")
    for key in REQUIRED_SIZES:
        size_field(d, key)
    if any(d.get(k) for k in MOE_KEYS) and d.get("model_type") not in MOE_MODEL_TYPES:
        raise ValueError(f"describes a mixture-of-experts model of model_type={d.get('model_type')!r}; tplab runs "
                         f"the experts of model_type in {MOE_MODEL_TYPES}")


def unsupported(d: Mapping) -> str | None:
    """Why tplab's decoder cannot run this config (architecture, activation, RoPE type, quantization), or None."""
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = d.get("architectures") or model_type
        return f"unsupported architecture {arch!r} (model_type={model_type!r}); tplab runs model_type in " \
               f"{SUPPORTED_MODEL_TYPES}"
    act = d.get("hidden_act", "silu")
    if act != "silu":
        return f"unsupported hidden_act={act!r}; tplab's MLP is SwiGLU (silu)"
    params = _rope_params(d)
    if params and all(isinstance(v, dict) for v in params.values()):
        return "per-layer-type rope_parameters are not supported"
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        return f"unsupported rope_type={rope_type!r}; tplab implements {SUPPORTED_ROPE_TYPES}"
    return parse_quantization(d)[1]


def parse_experts(d: Mapping) -> dict[str, Any]:
    """The mixture-of-experts fields of :class:`~tplab.specs.ModelConfig` (none for a dense model):

    * ``num_experts`` E and ``experts_per_token`` k (1 <= k <= E);
    * ``expert_intermediate_size``: each expert's SwiGLU width (Mixtral: ``intermediate_size``; Qwen:
      ``moe_intermediate_size``);
    * ``normalize_expert_weights``: the k chosen softmax probabilities are renormalised to sum to 1 (Mixtral
      always, as its softmax over the top-k logits equals it; Qwen when ``norm_topk_prob``);
    * ``shared_expert_intermediate_size``: Qwen2-MoE's shared expert, which every token passes through, scaled
      by sigmoid(x · g) (0: none).

    Every layer must be sparse: ``mlp_only_layers`` empty and ``decoder_sparse_step`` 1 (every published Qwen MoE).
    ValueError otherwise."""
    model_type = d.get("model_type")
    if model_type not in MOE_MODEL_TYPES:
        return {}
    key = "num_local_experts" if model_type == "mixtral" or d.get("num_local_experts") else "num_experts"
    experts, top_k = size_field(d, key), size_field(d, "num_experts_per_tok")
    if experts is None or top_k is None or top_k > experts:
        raise ValueError(f"a mixture of experts needs {key} and num_experts_per_tok with 1 <= "
                         f"num_experts_per_tok <= {key}, got {experts!r} and {top_k!r}")
    if d.get("mlp_only_layers") or size_field(d, "decoder_sparse_step", 1) != 1:
        raise ValueError("dense layers among the sparse ones (mlp_only_layers, decoder_sparse_step > 1) are not "
                         "supported: tplab's mixtures have experts in every layer")
    mixtral = model_type == "mixtral"
    return dict(
        num_experts=experts, experts_per_token=top_k,
        expert_intermediate_size=size_field(d, "intermediate_size" if mixtral else "moe_intermediate_size"),
        normalize_expert_weights=mixtral or bool_field(d, "norm_topk_prob"),
        shared_expert_intermediate_size=(size_field(d, "shared_expert_intermediate_size", 0)
                                         if model_type == "qwen2_moe" else 0))


def parse_quantization(d: Mapping) -> tuple[str | None, str | None]:
    """(scheme, why it is unsupported): ("fp8", None) for a checkpoint stored as fp8 weights with per-tensor or
    per-row ``weight_scale`` (``quantization_config.quant_method == "fp8"``); (None, None) when unquantized."""
    q = d.get("quantization_config")
    if not q:
        return None, None
    if not isinstance(q, Mapping):
        raise ValueError(f"quantization_config must be a JSON object, got {q!r}")
    method = q.get("quant_method")
    if method != "fp8" or q.get("weight_block_size"):
        return None, (f"unsupported quantization_config (quant_method={method!r}"
                      f"{', block-wise scales' if q.get('weight_block_size') else ''}); tplab loads fp8 checkpoints "
                      "with per-tensor or per-row weight_scale")
    return "fp8", None


def as_ids(value: Any) -> tuple[int, ...]:
    """An ``eos_token_id`` field (null, one id or a list of ids) as a tuple of ids; ValueError for anything else."""
    ids = [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
    if not all(is_positive_int(i, low=0) for i in ids):
        raise ValueError(f"eos_token_id must be a token id or a list of them, got {value!r}")
    return tuple(ids)


def _rope_params(d: Mapping) -> dict:
    for key in ("rope_parameters", "rope_scaling"):
        if d.get(key) is not None and not isinstance(d[key], Mapping):
            raise ValueError(f"{key} must be a JSON object, got {d[key]!r}")
    return dict(d.get("rope_parameters") or d.get("rope_scaling") or {})


def parse_rope(d: Mapping) -> RopeConfig:
    """The RoPE parameters of either spelling (per-layer-type parameters read as the default); every number finite
    and positive."""
    params = _rope_params(d)
    if params and all(isinstance(v, dict) for v in params.values()):
        params = {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    original = size_field(params, "original_max_position_embeddings")
    if rope_type == "llama3" and original is None:
        original = size_field(d, "max_position_embeddings")
    return RopeConfig(
        theta=number_field(params, "rope_theta", number_field(d, "rope_theta", 10000.0)),
        type=str(rope_type),
        factor=number_field(params, "factor", 1.0),
        low_freq_factor=number_field(params, "low_freq_factor", 1.0),
        high_freq_factor=number_field(params, "high_freq_factor", 4.0),
        original_max_position_embeddings=original,
    )


def parse_windows(d: Mapping, num_layers: int) -> tuple[int | None, ...]:
    """Per layer: the sliding attention window (keys with q_pos - k_pos < window), or None for full attention."""
    model_type, layer_types = d.get("model_type"), d.get("layer_types")
    if layer_types is not None and (not isinstance(layer_types, list) or len(layer_types) != num_layers
                                    or not set(layer_types) <= set(LAYER_TYPES)):
        raise ValueError(f"layer_types must list one of {LAYER_TYPES} for each of the {num_layers} layers, got "
                         f"{layer_types!r}")
    sliding = model_type in ("mistral", "mixtral") or (model_type in QWEN_MODEL_TYPES
                                                         and bool_field(d, "use_sliding_window"))
    window = size_field(d, "sliding_window") if sliding else None
    if window is None:
        return (None,) * num_layers
    if not layer_types:  # older configs: Mistral slides every layer, Qwen the layers from max_window_layers on
        first = size_field(d, "max_window_layers", 0) if model_type in QWEN_MODEL_TYPES else 0
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    return tuple(window if t == "sliding_attention" else None for t in layer_types)
