"""The device's roofline, measured in the same run: copy bandwidth and matmul throughput.

A decode step streams the rank's weights and its KV cache from memory, so its
floor is bytes / bandwidth. Which bandwidth? Not the datasheet's peak, which
no kernel reaches, but what a large device-to-device copy achieves on this
device right now:

    copy bandwidth = 2 · S / t     (a copy of S bytes reads S and writes S)

timed with CUDA events on a GPU (buffers of 1 GiB by default) and with the
wall clock on a CPU (a large memcpy, 256 MiB). The decode step then reports

    achieved bandwidth = bytes the step must read / step time,  fraction = achieved / copy bandwidth

where the bytes are the rank's weights except the embedding (a decode step
reads only ``batch`` of its rows) plus the KV cache it attends to.
:func:`measure_matmul_tflops` does the same for compute (a square matmul),
the roof of a prefill. :func:`roofline_ms` turns both roofs into the cost
model's prediction for a record's point, to set against what was measured.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from tplab.bench.records import record_shapes
from tplab.model.decoder import TPCausalLM
from tplab.model.loading import check_checkpoint, checkpoint_config
from tplab.perf.estimate import step_seconds
from tplab.perf.shapes import step_work
from tplab.specs.efficiency import load_efficiency
from tplab.specs.hardware import GpuSpec, Link
from tplab.specs.model import ModelConfig

GIB = 2 ** 30


def _time_best(fn, device: torch.device, repeats: int) -> float:
    """Best of ``repeats`` seconds of fn() after one warm-up call; CUDA events on a GPU."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            best = min(best, start.elapsed_time(stop) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


def measure_copy_bandwidth(device: torch.device | str, nbytes: int | None = None, repeats: int = 5) -> dict:
    """{"gb_s", "bytes", "method"}: the best copy bandwidth (read + write bytes) of one large buffer."""
    device = torch.device(device)
    nbytes = nbytes or (GIB if device.type == "cuda" else GIB // 4)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = _time_best(lambda: dst.copy_(src), device, repeats)
    timer = "CUDA events" if device.type == "cuda" else "wall clock"
    return {"gb_s": 2 * nbytes / seconds / 1e9, "bytes": nbytes,
            "method": f"best of {repeats} copies of {nbytes / GIB:g} GiB on {device.type} ({timer}); "
                      "GB/s counts the bytes read plus the bytes written"}


def measure_matmul_tflops(device: torch.device | str, dtype: torch.dtype, size: int | None = None,
                          repeats: int = 3, budget_s: float = 2.0) -> dict:
    """{"tflops", "size", "method"}: the best throughput of a (size x size) @ (size x size) matmul, 2·size³ FLOPs.

    Without ``size`` the measurement is bounded by time, not by a size: from 256 the side doubles (8 times the
    work) while the next size's ``repeats + 1`` runs still fit ``budget_s``, up to 8192 on a GPU and 4096 on a CPU.
    A CPU that emulates the dtype (bfloat16 without AVX-512 BF16) thus stops at a small matrix in about
    ``budget_s`` seconds instead of minutes.
    """
    device = torch.device(device)
    generator = torch.Generator(device).manual_seed(0)  # random data: a GPU runs constant data faster

    def operands(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.randn(n, n, dtype=dtype, device=device, generator=generator) for _ in range(2))

    if size is None:
        size, largest = 256, 8192 if device.type == "cuda" else 4096
        while size < largest:
            a, b = operands(size)
            if 8 * _time_best(lambda: a @ b, device, 1) * (repeats + 1) > budget_s:
                break
            size *= 2
    a, b = operands(size)
    seconds = _time_best(lambda: a @ b, device, repeats)
    return {"tflops": 2 * size ** 3 / seconds / 1e12, "size": size,
            "method": f"best of {repeats} {size}x{size} {str(dtype).removeprefix('torch.')} matmuls of random "
                      f"N(0, 1) data on {device.type}"}


def decode_bytes(model: TPCausalLM, batch: int, context: float) -> dict[str, float]:
    """{"weights", "kv_cache"}: bytes one decode step must read on this rank at ``context`` cached positions.

    Weights: every parameter but the embedding (only ``batch`` rows of it are
    looked up); with tied embeddings the LM head reads the shared matrix.
    KV cache: 2 · layers · local KV heads · head_dim · element size per position, for every row.
    """
    embedding = model.embed.weight
    tied = model.lm_head.weight is embedding
    weights = model.parameter_bytes() - (0 if tied else embedding.nbytes)
    layers, heads, dim = model.config.num_layers, len(model.layers[0].attn.qkv.kv_heads), model.config.head_dim
    element = torch.empty((), dtype=model.dtype).element_size()
    return {"weights": float(weights), "kv_cache": 2.0 * layers * heads * dim * element * batch * context}


def streamed_weight_bytes(model: str | Path | ModelConfig, element_bytes: int) -> int:
    """The weight bytes one decode step of the whole model (tp 1) reads, from the checkpoint's headers: every
    parameter but the embedding table (a step looks up only its rows), which an LM head tied to it reads whole."""
    config = checkpoint_config(model)
    table = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    return (check_checkpoint(config) - table) * element_bytes


def device_spec(record: dict) -> GpuSpec:
    """The record's device as the cost model sees it: peaks = the roofs measured in its run, shared by its ranks.

    Memory bandwidth = measured copy bandwidth / ranks sharing the device, FLOP/s
    = measured matmul throughput / ranks. The cost model then runs at
    efficiency 1 (:data:`ROOFLINE_EFFICIENCY`): a roofline of this machine, not of a datasheet.
    """
    roof, device = record["roofline"], record["env"]["device"]
    ranks = roof["ranks_sharing_memory"]
    return GpuSpec(name=device["type"], label=f"{device['name']} (measured roofs)",
                   memory_gb=(device["memory_bytes"] or 0) / 1e9, memory_bandwidth_gb_s=roof["copy_gb_s"] / ranks,
                   dense_tflops={"bf16": roof["matmul_tflops"] / ranks}, interconnects={},
                   datasheet="measured in the run", sources={"memory_bandwidth_gb_s": roof["copy_method"],
                                                             "tflops_bf16": roof["matmul_method"]})


ROOFLINE_EFFICIENCY = {"memory_bandwidth": 1.0, "compute": 1.0, "compute_fp8": 1.0, "gemm_half_tokens": 0.0}  # roofs only
_NO_LINK = Link("none", "none", 1.0, 0.0, None, "collectives are not part of the roofline")


def roofline_ms(record: dict) -> dict[str, float]:
    """{"decode_ms", "ttft_ms"}: the cost model's compute time (weights, KV cache, FLOPs beyond memory) of the
    record's point, for the layers built, on :func:`device_spec`; collectives excluded. Modelled, not measured."""
    x = record_shapes(record)
    if x.dtype is None:
        raise ValueError(f"the cost model has no precision for {record['setting']['dtype']}: use bfloat16/float16 records")
    gpu, eff = device_spec(record), load_efficiency(ROOFLINE_EFFICIENCY)
    out = {}
    for key, (tokens, context) in {"decode_ms": (1, x.decode_context), "ttft_ms": (x.prompt_len, 0)}.items():
        work = step_work(x.spec, x.tp, x.dtype, "bf16", x.batch, tokens, context, layers=x.layers)
        parts = step_seconds(work, gpu, _NO_LINK, 1, "bf16", eff)
        out[key] = 1e3 * (parts["weights"] + parts["kv_cache"] + parts["compute"])
    return out
