"""The cost model's efficiencies: achieved fractions of peak and runtime allowances, from ``data/efficiency.json``.

Overridable by a dict or a JSON file of the same shape.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from tplab.files import read_user_text
from tplab.paths import DATA_DIR
from tplab.specs.reading import read_json, unknown_name

EFFICIENCY_FILE = DATA_DIR / "efficiency.json"


@dataclass(frozen=True)
class Efficiency:
    """What a real engine achieves, as fractions of the datasheet peaks, and its memory allowances.

    Defaults and their provenance live in ``data/efficiency.json``.
    """

    memory_bandwidth: float  # achieved / peak memory bandwidth
    compute: float  # achieved / peak dense BF16/FP16 tensor-core FLOP/s of a large GEMM (and of attention)
    compute_fp8: float  # the same for FP8 and INT8 GEMMs
    gemm_half_tokens: float  # n½: a GEMM over n tokens reaches compute · n / (n + n½)
    link: float  # achieved / line-rate link bandwidth
    collective_base_us: float  # fixed cost of one collective, on top of the per-hop latency
    layer_overhead_us: float  # fixed time per decoder layer per forward pass, CUDA-graph / compiled engine
    step_overhead_us: float  # fixed time per forward pass (embedding, LM head, sampling, scheduling), same engine
    served_step_overhead_us: float  # the same for that engine behind an HTTP server, timed at the client
    served_request_overhead_us: float  # and once per request, in its TTFT (HTTP, tokenization, first chunk)
    eager_layer_overhead_us: float  # the same two for an eager engine (a kernel launch per op)
    eager_step_overhead_us: float
    sequence_overhead_us: float  # time per sequence per decoder layer per pass (per-sequence attention work)
    runtime_overhead_gb: float  # per-GPU CUDA context, workspaces, graphs
    memory_headroom_fraction: float  # share of memory left unused
    prefill_chunk_tokens: int  # tokens in one forward pass (sizes activations)


_FRACTIONS = ("memory_bandwidth", "compute", "compute_fp8", "link")


def efficiency_provenance() -> dict[str, str]:
    """Each default efficiency's provenance, as written in data/efficiency.json."""
    data = read_json(EFFICIENCY_FILE)
    return {f.name: data[f.name]["provenance"] for f in dataclasses.fields(Efficiency)}


def load_efficiency(override: Mapping[str, float] | str | Path | Efficiency | None = None) -> Efficiency:
    """The default efficiencies, with ``override`` (a dict, or a JSON file of data/efficiency.json's shape) on top."""
    if isinstance(override, Efficiency):
        return override
    values = {k: v["value"] for k, v in read_json(EFFICIENCY_FILE).items() if isinstance(v, dict)}
    if isinstance(override, (str, Path)):
        try:
            override = json.loads(read_user_text(override, "--efficiency"))
        except json.JSONDecodeError as e:
            raise ValueError(f"--efficiency {override} is not JSON ({e.msg})") from None
        if not isinstance(override, dict):
            raise ValueError(f"--efficiency takes a JSON object of data/efficiency.json's shape, got a "
                             f"{type(override).__name__}")
    known = [f.name for f in dataclasses.fields(Efficiency)]
    for key, value in (override or {}).items():
        if key == "about":
            continue
        if key not in known:
            raise unknown_name("efficiency", key, known)
        values[key] = value.get("value") if isinstance(value, dict) else value
    for key in known:
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (
                key in _FRACTIONS and not 0 < value <= 1):
            bound = "a fraction in (0, 1]" if key in _FRACTIONS else "a number >= 0"
            raise ValueError(f"efficiency {key}={value!r} must be {bound}")
    values["prefill_chunk_tokens"] = max(1, int(values["prefill_chunk_tokens"]))
    return Efficiency(**{k: values[k] for k in known})
