"""The modelled time of one serving step: rows at their own contexts, decodes and prefill chunks together.

A continuous-batching step feeds row i ``n_i`` tokens after ``c_i`` cached ones
(a decode: n_i = 1; a prefill chunk: n_i > 1). Its work is that of each row
alone, except that the weights are read once for the whole step and the
all-reduces are one per layer for the step's tokens, not one per row:

    W = W_row,   KV = Σ KV_i,   F_lin = Σ F_lin,i,   F_att = Σ F_att,i,   S = Σ S_i

and :func:`tplab.perf.estimate.step_seconds` turns that into time with the
fitted efficiencies. Every figure is modelled, not measured.
"""
from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from pathlib import Path

from tplab.perf.estimate import GB, check_link, compute_dtype_for, step_seconds
from tplab.perf.shapes import StepWork, activation_bytes, check_precision, step_work, weight_bytes
from tplab.specs.efficiency import Efficiency, load_efficiency
from tplab.specs.hardware import load_gpu
from tplab.specs.model import ModelConfig, resolve_model


def batch_work(row_works: list[StepWork]) -> StepWork:
    """One pass over all rows: their works summed, the weights (and the number of all-reduces) counted once."""
    first = row_works[0]
    total = lambda name: sum(getattr(w, name) for w in row_works)  # noqa: E731
    return replace(first, kv_bytes=total("kv_bytes"), linear_flops=total("linear_flops"),
                   attention_flops=total("attention_flops"), all_reduce_bytes=total("all_reduce_bytes"),
                   gather_bytes=total("gather_bytes"), tokens=total("tokens"), sequences=total("sequences"))


class ModelledStepCost:
    """Seconds of a step of rows [(context, new tokens), ...] on ``tp`` GPUs (modelled, not measured)."""

    def __init__(self, model: str | Path | ModelConfig, gpu: str, tp: int, dtype: str = "bf16",
                 kv_dtype: str = "bf16", interconnect: str | None = None, engine: str = "graph",
                 efficiency: Efficiency | None = None) -> None:
        self.dtype, self.kv_dtype = check_precision(dtype, kv_dtype)
        self.model, self.gpu, self.tp, self.engine = resolve_model(model, strict=False), load_gpu(gpu), tp, engine
        self.model.check_tp(tp)
        self.link = self.gpu.link(interconnect, tp)
        check_link(self.link, self.gpu, tp)
        self.compute_dtype, self.notes = compute_dtype_for(self.gpu, self.dtype)
        self.efficiency = efficiency or load_efficiency(None)
        self._row = lru_cache(maxsize=65536)(self._row_work)

    def _row_work(self, context: int, new_tokens: int) -> StepWork:
        return step_work(self.model, self.tp, self.dtype, self.kv_dtype, 1, new_tokens, context)

    def parts(self, rows: list[tuple[int, int]]) -> dict[str, float]:
        """The step's parts in seconds (weights, kv_cache, compute, fixed, per_sequence, communication)."""
        work = batch_work([self._row(c, n) for c, n in rows])
        return step_seconds(work, self.gpu, self.link, self.tp, self.compute_dtype, self.efficiency, self.engine)

    def __call__(self, rows: list[tuple[int, int]]) -> float:
        return sum(self.parts(rows).values())

    def kv_blocks(self, block_size: int, max_num_seqs: int, max_batched_tokens: int) -> int:
        """KV blocks of ``block_size`` tokens one GPU holds: what is left of its usable memory after the weights,
        a full step's activations and the runtime, over one block's bytes on one rank."""
        eff = self.efficiency
        usable = self.gpu.memory_gb * (1 - eff.memory_headroom_fraction) * GB
        taken = (weight_bytes(self.model, self.tp, self.dtype)
                 + activation_bytes(self.model, self.tp, max_batched_tokens, max_num_seqs)
                 + eff.runtime_overhead_gb * GB)
        per_block = block_size * self.model.kv_bytes_per_token(self.tp, self.kv_dtype)
        blocks = int((usable - taken) // per_block)
        if blocks < 1:
            raise ValueError(f"{self.model.name} in {self.dtype} at tp={self.tp} leaves no memory for a KV cache on "
                             f"{self.gpu.name} ({taken / GB:.1f} GB of {usable / GB:.1f} GB usable); raise --tp")
        return blocks
