"""ModelConfig: the facts about a Llama-family checkpoint that TP needs, from its config.json.

Supported: ``model_type`` llama (Llama 2, Llama 3/3.1, TinyLlama), mistral and
qwen2, with SiLU-gated MLPs and RoPE of type default, linear or llama3. Both
config spellings are read: transformers 5 (``rope_parameters``) and 4
(``rope_theta`` + ``rope_scaling``).

:meth:`ModelConfig.check_tp` is the single place that decides whether a TP
degree can shard this model. It runs at config time, before any weight is
read, and lists the valid tp values when it refuses.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping
from pathlib import Path

from tplab.paths import DATA_DIR
from tplab.specs.reading import read_json, unknown_name
from tplab.specs.sharding import check_tp, divisors, gqa_tp_problem

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
REQUIRED_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (see :mod:`tplab.layers.rope`)."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and options of a decoder-only Llama-family model."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    layer_windows: tuple[int | None, ...] = ()
    eos_token_ids: tuple[int, ...] = ()
    dtype: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Parse a config.json dictionary; ValueError for anything tplab cannot run."""
        if not isinstance(d, dict):
            raise ValueError(f"config.json must hold a JSON object, got a {type(d).__name__}")
        for key in REQUIRED_SIZES:
            value = d.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"config.json: {key} must be a positive integer, got "
                                 f"{'nothing' if key not in d else repr(value)}")
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            arch = d.get("architectures") or model_type
            raise ValueError(f"unsupported architecture {arch!r} (model_type={model_type!r}); "
                             f"tplab runs model_type in {SUPPORTED_MODEL_TYPES}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act={act!r}; tplab's MLP is SwiGLU (silu)")
        num_layers = int(d["num_hidden_layers"])
        num_heads = int(d["num_attention_heads"])
        attention_bias = bool(d.get("attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(d.get("head_dim") or d["hidden_size"] // num_heads),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope=_parse_rope(d),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(d.get("mlp_bias", False)),
            layer_windows=_parse_windows(d, model_type, num_layers),
            eos_token_ids=_as_ids(d.get("eos_token_id")),
            dtype=d.get("dtype") or d.get("torch_dtype"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        """Read ``path/config.json`` (or ``path`` itself when it is the file)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no config.json at {path}: pass a Hugging Face checkpoint directory")
        try:
            d = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{file}: {str(e).removeprefix('config.json: ')}") from None

    @classmethod
    def from_hf_config(cls, hf_config) -> "ModelConfig":
        """From an in-memory transformers ``PretrainedConfig``."""
        return cls.from_dict(hf_config.to_dict())

    # --- tensor parallelism ----------------------------------------------------
    def tp_problem(self, tp: int) -> str | None:
        """Why ``tp`` cannot shard this model, or None when it can."""
        problem = gqa_tp_problem(self.num_heads, self.num_kv_heads, tp)
        if problem is None and self.intermediate_size % tp:
            problem = f"intermediate_size={self.intermediate_size} is not divisible by tp={tp}"
        return problem

    def valid_tp(self) -> list[int]:
        """Every tp degree that can shard this model (the vocabulary is padded, so it never limits tp)."""
        return [t for t in divisors(self.num_heads) if self.tp_problem(t) is None]

    def check_tp(self, tp: int) -> None:
        """ValueError naming the failing dimension and listing the valid tp values."""
        check_tp(tp)
        problem = self.tp_problem(tp)
        if problem:
            raise ValueError(f"{problem}; valid tp: {', '.join(str(t) for t in self.valid_tp())}")


def _as_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def _parse_rope(d: dict) -> RopeConfig:
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_type={rope_type!r}; tplab implements {SUPPORTED_ROPE_TYPES}")
    original = params.get("original_max_position_embeddings")
    if rope_type == "llama3" and original is None:
        original = d.get("max_position_embeddings")
    return RopeConfig(
        theta=float(params.get("rope_theta", d.get("rope_theta", 10000.0))),
        type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=None if original is None else int(original),
    )


def _parse_windows(d: dict, model_type: str, num_layers: int) -> tuple[int | None, ...]:
    """Per layer: the sliding attention window (keys with q_pos - k_pos < window), or None for full attention."""
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


MODEL_DIR = DATA_DIR / "model_configs"


@dataclass(frozen=True)
class ModelSpec:
    """The shapes of a dense decoder-only transformer with a gated (SwiGLU) MLP."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    vocab_size: int
    head_dim: int
    max_position_embeddings: int | None
    tie_word_embeddings: bool
    qkv_bias: bool
    source: str


_REQUIRED = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def model_names() -> list[str]:
    """The shipped model configs, e.g. ``["llama-2-70b", "llama-3-70b", "llama-3-8b", "qwen2-72b"]``."""
    return sorted(p.stem for p in MODEL_DIR.glob("*.json"))


def model_from_config(config: Mapping, name: str = "model", source: str = "config dict") -> ModelSpec:
    """A ModelSpec from the fields of a Hugging Face config.json.

    num_key_value_heads defaults to num_attention_heads (no GQA), head_dim to
    hidden_size / num_attention_heads; q/k/v carry a bias where
    ``attention_bias`` says so or, for Qwen2 (which has no such field), always.
    """
    missing = [k for k in _REQUIRED if k not in config]
    if missing:
        raise ValueError(f"{source} lacks {', '.join(missing)}: tplab.perf.estimate models Llama/Mistral/Qwen2-style decoders")
    if any(config.get(k) for k in _MOE_KEYS):
        raise ValueError(f"{source} describes a mixture-of-experts model, which tplab.perf.estimate does not model")
    heads = int(config["num_attention_heads"])
    return ModelSpec(
        name=name, hidden_size=int(config["hidden_size"]), intermediate_size=int(config["intermediate_size"]),
        num_attention_heads=heads, num_key_value_heads=int(config.get("num_key_value_heads") or heads),
        num_hidden_layers=int(config["num_hidden_layers"]), vocab_size=int(config["vocab_size"]),
        head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
        max_position_embeddings=config.get("max_position_embeddings"),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
        source=str(config.get("_source", source)),
    )


def load_model(model: str | Path | ModelSpec) -> ModelSpec:
    """A shipped model name, a path to a config.json (or to the folder holding one), or a ModelSpec."""
    if isinstance(model, ModelSpec):
        return model
    name = str(model)
    if name.lower() in model_names():
        return model_from_config(read_json(MODEL_DIR / f"{name.lower()}.json"), name.lower())
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return model_from_config(json.loads(path.read_text()), path.parent.name or name, str(path))
    raise unknown_name("model", model, model_names(), "; or pass the path of a Hugging Face config.json")


