"""ModelConfig: the one description of a Llama-family decoder, read once from its config.json or a shipped name.

The decoder, the loader, the KV cache, the cost model and the benchmark all
read this one object. Two modes:

* **strict** (the default): what tplab's decoder can run: ``model_type``
  llama (Llama 2, Llama 3/3.1, TinyLlama), mistral, qwen2 or qwen3, and the mixtures of experts mixtral,
  qwen2_moe and qwen3_moe; a SiLU-gated MLP, RoPE of type default, linear or llama3. Anything else is a
  ValueError.
* **shapes only** (``strict=False``): what the cost model can estimate: any
  dense decoder with a gated MLP and the five sizes; ``unsupported`` then says
  why the decoder would refuse it (None when it would not).

The tensor-parallel arithmetic lives here once: :meth:`ModelConfig.check_tp`
(which tp can shard it, listing the valid ones when it refuses),
:meth:`ModelConfig.kv_heads_per_rank` and :meth:`ModelConfig.kv_bytes_per_token`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from tplab.checks import check_int
from tplab.paths import DATA_DIR
from tplab.specs import tiny
from tplab.specs.config_fields import (
    QK_NORM_MODEL_TYPES,
    RopeConfig,
    as_ids,
    bool_field,
    check_sizes,
    number_field,
    parse_experts,
    parse_quantization,
    parse_rope,
    parse_windows,
    size_field,
    unsupported,
)
from tplab.specs.dtypes import element_bytes
from tplab.specs.reading import read_json, unknown_name
from tplab.specs.sharding import check_tp, divisors, gqa_tp_problem

MODEL_DIR = DATA_DIR / "model_configs"


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and options of a decoder-only Llama-family model.

    H = ``num_heads`` query heads and K = ``num_kv_heads`` key/value heads of
    ``head_dim`` each, ``num_layers`` decoder layers of width ``hidden_size``
    with an MLP of ``intermediate_size``, a vocabulary of ``vocab_size``.
    """

    name: str
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
    quantization: str | None = None  # "fp8": the checkpoint stores fp8 weights and their scales
    qk_norm: bool = False  # Qwen3: an RMSNorm over each query and key head (head_dim) before RoPE
    num_experts: int = 0  # E experts per MoE layer (every layer); 0 for a dense MLP
    experts_per_token: int = 0  # k: each token's router picks k of the E experts
    expert_intermediate_size: int = 0  # each expert's SwiGLU width
    normalize_expert_weights: bool = True  # the k chosen probabilities renormalised to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's gated shared expert (0: none)
    unsupported: str | None = None  # why tplab's decoder cannot run it; None when it can
    source: str = field(default="config dict", compare=False)  # where it was read
    directory: Path | None = field(default=None, compare=False)  # the checkpoint directory holding config.json

    # --- reading ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, strict: bool = True, name: str = "model",
                  source: str = "config.json", directory: Path | None = None) -> "ModelConfig":
        """Parse a config.json dictionary; ValueError for what it lacks, and (strict) for what tplab cannot run."""
        if not isinstance(d, Mapping):
            raise ValueError(f"{source} must hold a JSON object, got a {type(d).__name__}")
        try:
            return cls._parse(d, strict, name, source, directory)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def _parse(cls, d: Mapping[str, Any], strict: bool, name: str, source: str,
               directory: Path | None) -> "ModelConfig":
        check_sizes(d)
        why_not = unsupported(d)
        if strict and why_not:
            raise ValueError(why_not)
        num_layers, num_heads = d["num_hidden_layers"], d["num_attention_heads"]
        model_type = str(d.get("model_type"))
        attention_bias = bool_field(d, "attention_bias")
        qkv_bias = {"qwen2": True, "qwen2_moe": bool_field(d, "qkv_bias", True)}.get(model_type, attention_bias)
        return cls(
            name=name, model_type=model_type, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_layers=num_layers, num_heads=num_heads,
            num_kv_heads=size_field(d, "num_key_value_heads", num_heads),
            head_dim=size_field(d, "head_dim") or _default_head_dim(d["hidden_size"], num_heads),
            max_position_embeddings=size_field(d, "max_position_embeddings", 2048),
            rms_norm_eps=number_field(d, "rms_norm_eps", 1e-6), rope=parse_rope(d),
            tie_word_embeddings=bool_field(d, "tie_word_embeddings"),
            qkv_bias=qkv_bias, o_bias=attention_bias and model_type not in ("qwen2", "qwen2_moe"),
            qk_norm=model_type in QK_NORM_MODEL_TYPES,
            mlp_bias=bool_field(d, "mlp_bias"), layer_windows=parse_windows(d, num_layers),
            eos_token_ids=as_ids(d.get("eos_token_id")), dtype=d.get("dtype") or d.get("torch_dtype"),
            quantization=parse_quantization(d)[0], **parse_experts(d),
            unsupported=why_not, source=str(d.get("_source", source)), directory=directory)

    @classmethod
    def from_file(cls, path: str | Path, *, strict: bool = True) -> "ModelConfig":
        """Read ``path/config.json`` (or ``path`` itself when it is the file)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no config.json at {path}: pass a Hugging Face checkpoint directory")
        try:
            d = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from None
        except OSError as e:  # permission denied, a device, ...
            raise ValueError(f"{file} cannot be read: {e.strerror or e}") from None
        return cls.from_dict(d, strict=strict, name=file.parent.name or str(path), source=str(file),
                             directory=file.parent if path.is_dir() else None)

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> "ModelConfig":
        """From an in-memory transformers ``PretrainedConfig``."""
        return cls.from_dict(hf_config.to_dict(), name=getattr(hf_config, "name_or_path", "") or "model",
                             source="an in-memory transformers config")

    def check_runnable(self) -> None:
        """ValueError when this (shapes-only) description is one tplab's decoder cannot run."""
        if self.unsupported:
            raise ValueError(f"{self.source}: {self.unsupported}")

    def with_layers(self, layers: int | None) -> "ModelConfig":
        """The same model with only its first ``layers`` decoder layers (None: all of them)."""
        if layers is None or layers == self.num_layers:
            return self
        check_int("layers", layers)
        if layers > self.num_layers:
            raise ValueError(f"layers must be at most num_hidden_layers={self.num_layers}, got {layers}")
        return dataclasses.replace(self, num_layers=layers, layer_windows=self.layer_windows[:layers])

    def to_config_dict(self) -> dict[str, Any]:
        """The Hugging Face config.json fields of the shapes, as every measurement record carries them (a mixture's
        experts in its family's spelling)."""
        shapes = {"model_type": self.model_type, "hidden_size": self.hidden_size,
                  "intermediate_size": self.intermediate_size, "num_attention_heads": self.num_heads,
                  "num_key_value_heads": self.num_kv_heads, "num_hidden_layers": self.num_layers,
                  "vocab_size": self.vocab_size, "head_dim": self.head_dim,
                  "max_position_embeddings": self.max_position_embeddings,
                  "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.qkv_bias}
        if self.model_type == "mixtral":
            shapes.update(num_local_experts=self.num_experts, num_experts_per_tok=self.experts_per_token)
        elif self.num_experts:
            shapes.update(num_experts=self.num_experts, num_experts_per_tok=self.experts_per_token,
                          moe_intermediate_size=self.expert_intermediate_size,
                          norm_topk_prob=self.normalize_expert_weights,
                          shared_expert_intermediate_size=self.shared_expert_intermediate_size)
        return shapes

    # --- tensor parallelism ------------------------------------------------------
    def tp_problem(self, tp: int, ep: int = 1) -> str | None:
        """Why ``tp`` cannot shard this model, or None when it can.

        tp must divide the query heads H and every width split across the ranks: the MLP's I, or in a mixture
        each expert's (unless ``ep`` = tp places the experts whole) and the shared expert's; the KV heads K split
        evenly (tp divides K) or replicate evenly (K divides tp).
        """
        problem = gqa_tp_problem(self.num_heads, self.num_kv_heads, tp)
        widths = [("intermediate_size", self.intermediate_size)] if not self.num_experts else \
            [("moe_intermediate_size", self.expert_intermediate_size)] * (ep == 1) + \
            [("shared_expert_intermediate_size", self.shared_expert_intermediate_size)] * \
            bool(self.shared_expert_intermediate_size)
        for name, width in widths:
            if problem is None and width % tp:
                problem = f"{name}={width} is not divisible by tp={tp}"
        return problem

    def valid_tp(self, limit: int | None = None, ep: int = 1) -> list[int]:
        """Every tp degree that can shard this model, up to ``limit`` (the padded vocabulary never limits tp)."""
        return [t for t in divisors(self.num_heads)
                if self.tp_problem(t, t if ep > 1 else 1) is None and (limit is None or t <= limit)]

    def check_tp(self, tp: int, ep: int = 1) -> None:
        """ValueError naming the failing dimension and listing the valid tp values (and the ep problem, if any)."""
        check_tp(tp)
        self.check_ep(tp, ep)
        problem = self.tp_problem(tp, ep)
        if problem:
            raise ValueError(f"{problem}; valid tp: {', '.join(str(t) for t in self.valid_tp(ep=ep))}")

    def check_ep(self, tp: int, ep: int) -> None:
        """ValueError unless ``ep`` experts groups fit: 1 (every expert split over the tp ranks), or, in a mixture
        whose E experts divide by it, tp itself (whole experts, E/tp on each rank of the TP group)."""
        check_int("ep", ep)
        if ep == 1:
            return
        if not self.num_experts:
            raise ValueError(f"ep={ep} spreads experts over ranks, and {self.name} is a dense model: leave ep at 1")
        valid = [e for e in sorted({1, tp}) if self.num_experts % e == 0]
        if ep != tp or self.num_experts % ep:
            why = (f"the {self.num_experts} experts do not divide by ep={ep}" if self.num_experts % ep else
                   f"ep={ep} with tp={tp}: experts are whole on every rank of the TP group (ep = tp) or split over "
                   "all of them (ep = 1)")
            raise ValueError(f"{why}; valid ep at tp={tp}: {', '.join(map(str, valid))}")

    def kv_heads_per_rank(self, tp: int) -> int:
        """max(1, K/tp): KV heads are split while tp <= K, then each is replicated on tp/K ranks."""
        return max(1, self.num_kv_heads // tp)

    def kv_bytes_per_token(self, tp: int = 1, dtype: Any = "bf16", layers: int | None = None) -> int:
        """KV-cache bytes one rank stores per token: 2 (K and V) · layers · max(1, K/tp) · head_dim · bytes.

        ``dtype``: a precision name in either spelling ("bf16", "bfloat16", "fp8") or a torch dtype.
        """
        layers = self.num_layers if layers is None else layers
        return int(2 * layers * self.kv_heads_per_rank(tp) * self.head_dim * element_bytes(dtype))


def _default_head_dim(hidden_size: int, num_heads: int) -> int:
    """hidden_size // num_heads (as transformers takes it) where config.json gives no head_dim; at least 1."""
    if hidden_size < num_heads:
        raise ValueError(f"no head_dim, and hidden_size={hidden_size} is smaller than num_attention_heads="
                         f"{num_heads}: give head_dim")
    return hidden_size // num_heads


def model_names() -> list[str]:
    """The shipped model configs, e.g. ``["llama-2-13b", "llama-2-70b", ..., "qwen2-72b"]``."""
    return sorted(p.stem for p in MODEL_DIR.glob("*.json"))


def resolve_model(model: str | Path | ModelConfig, *, strict: bool = True) -> ModelConfig:
    """``tiny`` or ``tiny-moe`` (the bundled checkpoints, checksum verified), a shipped config name, a checkpoint directory,
    a config.json path, or a ModelConfig as it is.

    The result's ``directory`` is the checkpoint directory when there is one
    (``tiny`` or a directory), None for a shipped name or a lone config.json.
    """
    if isinstance(model, ModelConfig):
        return model
    name = str(model)
    if name in tiny.BUNDLED:
        try:
            directory = tiny.verify_bundled(name)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"the {name} model failed its check: {e}; or pass another model") from None
        return dataclasses.replace(ModelConfig.from_file(directory, strict=strict), name=name)
    if name.lower() in model_names():
        return ModelConfig.from_dict(read_json(MODEL_DIR / f"{name.lower()}.json"), strict=strict, name=name.lower(),
                                     source=f"shipped config {name.lower()}")
    path = Path(name)
    if path.is_dir() or path.is_file():
        return ModelConfig.from_file(path, strict=strict)
    raise unknown_name("model", model, model_names(),
                       "; or pass the path of a Hugging Face config.json, a checkpoint directory, or a bundled model "
                       f"({', '.join(tiny.BUNDLED)})")
