"""Hardware, model and efficiency specifications for the cost model, read from ``data/``.

* GPUs: ``data/hardware/gpus/<name>.json``. Every figure is ``{"value", "source"}``:
  the vendor's published number and where it was published. A precision the
  tensor cores lack (FP8 on A100) is stored as ``null`` and is absent here.
* Links: ``data/hardware/links.json``, the per-hop latency α of each kind of
  link (an assumption, with its reasoning) and the inter-node networks.
  Bandwidths are one direction, in GB/s; published figures that count both
  directions are halved.
* Models: a shipped ``data/model_configs/<name>.json`` or any Hugging Face
  ``config.json`` of a dense decoder (Llama, Mistral, Qwen2 style: gated MLP).
* Efficiencies: ``data/efficiency.json``, the achieved fractions of peak and
  the runtime allowances, overridable by a dict or a JSON file.

Units: GB = 10^9 bytes, GB/s = 10^9 bytes/s, TFLOP/s = 10^12 FLOP/s.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from tplab.paths import DATA_DIR, INCOMPLETE_DATA

GPU_DIR = DATA_DIR / "hardware" / "gpus"
MODEL_DIR = DATA_DIR / "model_configs"
EFFICIENCY_FILE = DATA_DIR / "efficiency.json"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path} does not exist: {INCOMPLETE_DATA}")
    return json.loads(path.read_text())


def _unknown(kind: str, name: object, known: list[str], hint: str = "") -> ValueError:
    return ValueError(f"unknown {kind} {name!r}; known: {', '.join(known)}{hint}")


@dataclass(frozen=True)
class Link:
    """A link between GPUs in the α-β model: one message of S bytes costs α + S/β."""

    name: str
    kind: str  # "nvlink", "pcie" or "network"
    bandwidth_gb_s: float  # β, one direction
    alpha_us: float  # α, per hop
    max_gpus: int | None  # how many GPUs the link joins (None: any number, a network)
    source: str


@dataclass(frozen=True)
class GpuSpec:
    """One GPU's published figures; ``sources`` maps each figure to where it was published."""

    name: str
    label: str
    memory_gb: float
    memory_bandwidth_gb_s: float
    dense_tflops: dict[str, float]  # only precisions the tensor cores support
    interconnects: dict[str, Link]
    datasheet: str
    sources: dict[str, str]
    device_names: tuple[str, ...] = ()  # what torch.cuda.get_device_name() reports for this part

    def tflops(self, dtype: str) -> float | None:
        """Dense tensor-core TFLOP/s for ``dtype`` (bf16/fp16, fp8, int8), None where unsupported."""
        return self.dense_tflops.get("bf16" if dtype == "fp16" else dtype)

    def link(self, interconnect: str | None = None, tp: int = 1) -> Link:
        """The named link: one of this GPU's interconnects, or an inter-node network.

        None picks the fastest of the GPU's links that joins ``tp`` GPUs (an A100
        PCIe pair uses its NVLink bridge, a group of 4 falls back to PCIe).
        """
        if interconnect is None:
            reach = [link for link in self.interconnects.values() if link.max_gpus is None or link.max_gpus >= tp]
            return max(reach or self.interconnects.values(), key=lambda link: link.bandwidth_gb_s)
        if interconnect in self.interconnects:
            return self.interconnects[interconnect]
        networks = _networks()
        if interconnect in networks:
            return networks[interconnect]
        raise _unknown(f"interconnect for {self.name}", interconnect, [*self.interconnects, *networks])


def _link_latency_us() -> dict[str, float]:
    table = _read_json(DATA_DIR / "hardware" / "links.json")["latency_us"]
    return {kind: entry["value"] for kind, entry in table.items()}


def _networks() -> dict[str, Link]:
    data = _read_json(DATA_DIR / "hardware" / "links.json")
    alpha = data["latency_us"]["network"]["value"]
    return {name: Link(name, "network", n["bandwidth_gb_s"], alpha, None, n["source"]) for name, n in data["networks"].items()}


def gpu_names() -> list[str]:
    """The shipped GPUs, e.g. ``["a100-pcie-80gb", "a100-sxm-80gb", "h100-pcie", ...]``."""
    return sorted(p.stem for p in GPU_DIR.glob("*.json"))


def network_names() -> list[str]:
    """The shipped inter-node networks, e.g. ``["ib-hdr-200", "ib-ndr-400"]``."""
    return sorted(_networks())


def load_gpu(gpu: str | GpuSpec) -> GpuSpec:
    """The GpuSpec of a shipped GPU name (case-insensitive); an unknown name lists the known ones."""
    if isinstance(gpu, GpuSpec):
        return gpu
    name = str(gpu).lower()
    if name not in gpu_names():
        raise _unknown("GPU", gpu, gpu_names())
    data = _read_json(GPU_DIR / f"{name}.json")
    alpha = _link_latency_us()
    sources = {"memory_gb": data["memory_gb"]["source"], "memory_bandwidth_gb_s": data["memory_bandwidth_gb_s"]["source"]}
    tflops = {}
    for dtype, entry in data["dense_tflops"].items():
        sources[f"tflops_{dtype}"] = entry["source"]
        if entry["value"] is not None:
            tflops[dtype] = float(entry["value"])
    links = {}
    for kind, entry in data["interconnects"].items():
        sources[f"link_{kind}"] = entry["source"]
        links[kind] = Link(kind, kind, float(entry["bandwidth_gb_s"]), alpha[kind], entry["max_gpus"], entry["source"])
    datasheet = f"{data['datasheet']['title']} ({data['datasheet']['url']})"
    sources["device_names"] = data["device_names"]["source"]
    return GpuSpec(name, data["label"], float(data["memory_gb"]["value"]), float(data["memory_bandwidth_gb_s"]["value"]),
                   tflops, links, datasheet, sources, tuple(data["device_names"]["value"]))


def gpu_for_device(device_name: str) -> str | None:
    """The shipped GPU spec whose ``device_names`` include ``device_name`` (as torch reports it), or None."""
    wanted = device_name.strip().lower()
    return next((name for name in gpu_names() if wanted in (n.lower() for n in load_gpu(name).device_names)), None)


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
        raise ValueError(f"{source} lacks {', '.join(missing)}: tplab.perf models Llama/Mistral/Qwen2-style decoders")
    if any(config.get(k) for k in _MOE_KEYS):
        raise ValueError(f"{source} describes a mixture-of-experts model, which tplab.perf does not model")
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
        return model_from_config(_read_json(MODEL_DIR / f"{name.lower()}.json"), name.lower())
    path = Path(name)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return model_from_config(json.loads(path.read_text()), path.parent.name or name, str(path))
    raise _unknown("model", model, model_names(), "; or pass the path of a Hugging Face config.json")


@dataclass(frozen=True)
class Efficiency:
    """What a real engine achieves, as fractions of the datasheet peaks, and its memory allowances.

    Defaults and their provenance live in ``data/efficiency.json``.
    """

    memory_bandwidth: float  # achieved / peak memory bandwidth
    compute: float  # achieved / peak dense tensor-core FLOP/s
    link: float  # achieved / line-rate link bandwidth
    collective_base_us: float  # fixed cost of launching one collective
    runtime_overhead_gb: float  # per-GPU CUDA context, workspaces, graphs
    memory_headroom_fraction: float  # share of memory left unused
    prefill_chunk_tokens: int  # tokens in one forward pass (sizes activations)


_FRACTIONS = ("memory_bandwidth", "compute", "link")


def efficiency_provenance() -> dict[str, str]:
    """Each default efficiency's provenance, as written in data/efficiency.json."""
    data = _read_json(EFFICIENCY_FILE)
    return {f.name: data[f.name]["provenance"] for f in dataclasses.fields(Efficiency)}


def load_efficiency(override: Mapping[str, float] | str | Path | Efficiency | None = None) -> Efficiency:
    """The default efficiencies, with ``override`` (a dict, or a JSON file of data/efficiency.json's shape) on top."""
    if isinstance(override, Efficiency):
        return override
    values = {k: v["value"] for k, v in _read_json(EFFICIENCY_FILE).items() if isinstance(v, dict)}
    if isinstance(override, (str, Path)):
        override = _read_json(Path(override))
    known = [f.name for f in dataclasses.fields(Efficiency)]
    for key, value in (override or {}).items():
        if key == "about":
            continue
        if key not in known:
            raise _unknown("efficiency", key, known)
        values[key] = value["value"] if isinstance(value, dict) else value
    for key in known:
        value = values[key]
        if not isinstance(value, (int, float)) or value < 0 or (key in _FRACTIONS and not 0 < value <= 1):
            bound = "a fraction in (0, 1]" if key in _FRACTIONS else "a number >= 0"
            raise ValueError(f"efficiency {key}={value!r} must be {bound}")
    values["prefill_chunk_tokens"] = max(1, int(values["prefill_chunk_tokens"]))
    return Efficiency(**{k: values[k] for k in known})
