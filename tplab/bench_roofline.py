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
the roof of a prefill.
"""
from __future__ import annotations

import time

import torch

from tplab.model import TPCausalLM

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
                          repeats: int = 3) -> dict:
    """{"tflops", "size", "method"}: the best throughput of a (size x size) @ (size x size) matmul, 2·size³ FLOPs."""
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.ones(size, size, dtype=dtype, device=device)
    b = torch.ones(size, size, dtype=dtype, device=device)
    seconds = _time_best(lambda: a @ b, device, repeats)
    return {"tflops": 2 * size ** 3 / seconds / 1e12, "size": size,
            "method": f"best of {repeats} {size}x{size} {str(dtype).removeprefix('torch.')} matmuls on {device.type}"}


def decode_bytes(model: TPCausalLM, batch: int, context: float) -> dict[str, float]:
    """{"weights", "kv_cache"}: bytes one decode step must read on this rank at ``context`` cached positions.

    Weights: every parameter but the embedding (only ``batch`` rows of it are
    looked up); with tied embeddings the LM head reads the shared matrix.
    KV cache: 2 · layers · local KV heads · head_dim · element size per position, for every row.
    """
    embedding = model.embed.weight
    tied = model.lm_head.weight is embedding
    weights = model.parameter_bytes() - (0 if tied else embedding.numel() * embedding.element_size())
    layers, heads, dim = model.config.num_layers, len(model.layers[0].attn.qkv.kv_heads), model.config.head_dim
    element = torch.empty((), dtype=model.dtype).element_size()
    return {"weights": float(weights), "kv_cache": 2.0 * layers * heads * dim * element * batch * context}
