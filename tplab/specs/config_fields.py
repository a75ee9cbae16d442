"""What a Hugging Face ``config.json`` says, field by field, for a Llama-family decoder.

Both spellings of RoPE are read: transformers 5 (``rope_parameters``) and 4
(``rope_theta`` + ``rope_scaling``). Sliding windows follow Mistral (every
layer) and Qwen2 (``use_sliding_window``, from ``max_window_layers`` on, or
``layer_types``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from tplab.checks import is_positive_int

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
REQUIRED_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (see :mod:`tplab.layers.rope`)."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


def check_sizes(d: Mapping, source: str) -> None:
    """ValueError naming ``source`` and every required size that is absent or not a positive integer; MoE refused."""
    missing = [k for k in REQUIRED_SIZES if k not in d]
    if missing:
        raise ValueError(f"{source} lacks {', '.join(missing)}: tplab describes Llama/Mistral/Qwen2-style decoders")
    for key in REQUIRED_SIZES:
        if not is_positive_int(d[key]):
            raise ValueError(f"{source}: {key} must be a positive integer, got {d[key]!r}")
    if any(d.get(k) for k in MOE_KEYS):
        raise ValueError(f"{source} describes a mixture-of-experts model, which tplab does not model")


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


def parse_quantization(d: Mapping) -> tuple[str | None, str | None]:
    """(scheme, why it is unsupported): ("fp8", None) for a checkpoint stored as fp8 weights with per-tensor or
    per-row ``weight_scale`` (``quantization_config.quant_method == "fp8"``); (None, None) when unquantized."""
    q = d.get("quantization_config")
    if not q:
        return None, None
    method = q.get("quant_method")
    if method != "fp8" or q.get("weight_block_size"):
        return None, (f"unsupported quantization_config (quant_method={method!r}"
                      f"{', block-wise scales' if q.get('weight_block_size') else ''}); tplab loads fp8 checkpoints "
                      "with per-tensor or per-row weight_scale")
    return "fp8", None


def as_ids(value: Any) -> tuple[int, ...]:
    """An ``eos_token_id`` field (None, one id or a list) as a tuple of ids."""
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def _rope_params(d: Mapping) -> dict:
    return dict(d.get("rope_parameters") or d.get("rope_scaling") or {})


def parse_rope(d: Mapping) -> RopeConfig:
    """The RoPE parameters of either spelling (per-layer-type parameters read as the default)."""
    params = _rope_params(d)
    if params and all(isinstance(v, dict) for v in params.values()):
        params = {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    original = params.get("original_max_position_embeddings")
    if rope_type == "llama3" and original is None:
        original = d.get("max_position_embeddings")
    return RopeConfig(
        theta=float(params.get("rope_theta", d.get("rope_theta", 10000.0))),
        type=str(rope_type),
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=None if original is None else int(original),
    )


def parse_windows(d: Mapping, num_layers: int) -> tuple[int | None, ...]:
    """Per layer: the sliding attention window (keys with q_pos - k_pos < window), or None for full attention."""
    model_type = d.get("model_type")
    window = d.get("sliding_window") if model_type in ("mistral", "qwen2") else None
    if model_type == "qwen2" and not d.get("use_sliding_window", False):
        window = None
    if window is None:
        return (None,) * num_layers
    layer_types = d.get("layer_types")
    if not layer_types:  # older configs: Mistral slides every layer, Qwen2 the layers from max_window_layers on
        first = int(d.get("max_window_layers", 0)) if model_type == "qwen2" else 0
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
