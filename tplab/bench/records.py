"""Measurement records: one JSON object per benchmark point, appended to JSON-lines files.

Layout of ``data/measurements/``: one file per run,
``<date>_<hardware>_<kind>_<run id>.jsonl``, one line per point (tp, batch,
prompt length), appended as soon as the point is done, so an interrupted
sweep keeps what it finished. Every line is self-contained:

* ``kind``: "measured" (real ranks, real collectives) or "emulated" (rank 0
  alone, collectives modelled, see :mod:`tplab.bench.emulation`); ``label`` says
  it in words.
* ``env`` (:mod:`tplab.bench.env`), ``model`` (shapes, layers built/full,
  weights), ``setting`` (tp, batch, prompt_len, decode_steps, repeats, ...).
* times in ms, each a spread over the repeats {median, p10, p90, min, max, n}:
  ``ttft_ms`` and ``decode_ms_per_token`` (the total: compute + collectives),
  their ``*_compute_ms`` part, and ``ttft_comm_ms`` / ``decode_comm_ms``
  (medians: measured wall time, or modelled; ``comm.source`` says which).
* ``throughput_tok_s`` = B·O / (TTFT + (O-1)·t) with O = decode_steps + 1
  output tokens per row, ``decode_tok_s`` = B / t, ``decode_comm_share``.
* ``scaled``: when fewer layers were built than the model has, the same
  figures extrapolated to all of them (:func:`scale_to_full`).
* ``memory``, ``roofline``, ``baseline`` (HF's eager decode, same shapes).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tplab.files import check_writable, read_user_text
from tplab.perf.shapes import KV_BYTES, WEIGHT_BYTES
from tplab.specs.dtypes import canonical
from tplab.specs.model import ModelConfig

SCHEMA = 1
KINDS = ("measured", "emulated")


def spread(values_ms: list[float]) -> dict[str, float]:
    """{median, p10, p90, min, max, n} of repeated measurements (linear-interpolated percentiles)."""
    if not values_ms:
        raise ValueError("spread needs at least one value")
    v = np.asarray(values_ms, dtype=float)
    return {"median": float(np.median(v)), "p10": float(np.percentile(v, 10)), "p90": float(np.percentile(v, 90)),
            "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def throughput(batch: int, decode_steps: int, ttft_ms: float, step_ms: float) -> float:
    """Output tokens/s of a request: B·O / (TTFT + (O-1)·t), O = decode_steps + 1 (the prefill gives the first)."""
    return batch * (decode_steps + 1) / ((ttft_ms + decode_steps * step_ms) / 1e3)


def all_reduce_scale(layers_built: int, layers_full: int) -> float:
    """(2L+1)/(2N+1): a forward pass runs 2 all-reduces per layer plus one in the embedding."""
    return (2 * layers_full + 1) / (2 * layers_built + 1)


def scale_to_full(compute_ms: float, edges_ms: float, comm: dict[str, dict[str, float]], layers_built: int,
                  layers_full: int) -> dict[str, float]:
    """A phase of a model built with N of its L layers, extrapolated to L.

    compute_L = edges + (L/N)(compute_N - edges), edges being the embedding,
    final norm and LM head (timed alone); all-reduce seconds scale by (2L+1)/(2N+1),
    other collectives (the LM head's all-gather) stay. Returns {"compute_ms", "comm_ms", "total_ms"}.
    """
    compute = edges_ms + layers_full / layers_built * (compute_ms - edges_ms)
    scale = all_reduce_scale(layers_built, layers_full)
    comm = sum(1e3 * s["seconds"] * (scale if op == "all_reduce" else 1.0) for op, s in comm.items())
    return {"compute_ms": compute, "comm_ms": comm, "total_ms": compute + comm}


def modelled_precision(torch_dtype_name: str) -> str | None:
    """The cost model's precision for a record's dtype ("bfloat16" -> "bf16"), None where it has none (float32)."""
    short = canonical(torch_dtype_name)
    return short if short in WEIGHT_BYTES and short in KV_BYTES else None


def full_model_ms(record: dict, field: str) -> float:
    """``decode_ms_per_token`` or ``ttft_ms`` of the whole model: extrapolated when fewer layers were built."""
    return record["scaled"][field] if record["scaled"] else record[field]["median"]


@dataclass(frozen=True)
class RecordShapes:
    """What the cost model needs to evaluate a record's point: model shapes, tp, precision, sizes, layers built."""

    spec: ModelConfig
    tp: int
    dtype: str | None  # the cost model's name ("bf16"), None for a precision it does not model (float32)
    batch: int
    prompt_len: int
    decode_context: float  # cached positions a decode step attends to, on average over the steps
    layers: int


def record_shapes(record: dict) -> RecordShapes:
    """The point of a record as the cost model sees it.

    A decode step attends to the positions before it: with eager decode, step s
    (0-based) of a prompt of P tokens sees P + s, so P + (steps-1)/2 on average;
    a fixed-shape (static or graph) step reads the whole cache, P + steps - 1.
    """
    s, m = record["setting"], record["model"]
    steps = s["decode_steps"]
    context = s["prompt_len"] + ((steps - 1) / 2 if s["decode_mode"] == "eager" else steps - 1)
    precision = s.get("quant") or modelled_precision(s["dtype"])  # quantized weights: the cost model's 8-bit layout
    return RecordShapes(ModelConfig.from_dict(m["config"], strict=False, name=m["name"]), s["tp"], precision,
                        s["batch"], s["prompt_len"], context, m["layers_built"])


def label(record: dict) -> str:
    """One line saying what a record is: measured or emulated, where, and how the collectives were costed."""
    s, device = record["setting"], record["env"]["device"]
    where = f"{device['type']} {device['name']}"
    if record["kind"] == "emulated":
        return (f"EMULATED: rank 0 of tp={s['tp']} timed alone on {where}; collectives modelled "
                f"({record['comm']['source']})")
    return f"MEASURED: tp={s['tp']} real ranks ({s['backend']}) on {where}; collectives {record['comm']['source']}"


def run_file_name(env: dict, kind: str, run_id: str, slug: str) -> str:
    """``<date>_<hardware>_<kind>_<run id>.jsonl``."""
    return f"{env['date'][:10]}_{slug}_{kind}_{run_id}.jsonl"


def check_record_target(out: str | Path) -> Path:
    """Before anything is measured, that records can go to ``out``: a .jsonl file (new, or already holding tplab
    records only, which it appends to) or a folder (a new run file inside it). A ValueError in one line otherwise:
    a measurement that cannot be written is lost, and a user's other file is never appended to."""
    out = Path(out)
    if out.suffix != ".jsonl":
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file, not a folder: give a folder or a .jsonl record file")
        check_writable(out / ".tplab-write-check")
        return out
    if out.exists():
        try:
            lines = [json.loads(line) for line in read_user_text(out, "--out").splitlines() if line.strip()]
        except json.JSONDecodeError:
            lines = [None]
        if not all(isinstance(r, dict) and "schema" in r and "kind" in r for r in lines):
            raise ValueError(f"--out {out} exists and holds other things than tplab records: give a new .jsonl file "
                             "or a folder")
    check_writable(out)
    return out


class RecordLog:
    """Appends records, one JSON line each, to a file (created with its folder on the first append)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, record: dict) -> None:
        if record.get("kind") not in KINDS:
            raise ValueError(f"a record's kind must be one of {KINDS}, got {record.get('kind')!r}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def load_records(*paths: str | Path) -> list[dict]:
    """Every record of the given .jsonl files, or of the .jsonl files in the given folders, in file order.

    Each record gets ``source_file`` (the file's name) for provenance.
    """
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(path.glob("*.jsonl"))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no measurement file or folder at {path}")
    records = []
    for file in files:
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{file}:{number} is not valid JSON: {e}") from None
            if record.get("schema") != SCHEMA:
                raise ValueError(f"{file}:{number} has schema {record.get('schema')!r}; tplab reads schema {SCHEMA}")
            records.append({**record, "source_file": file.name})
    return records
