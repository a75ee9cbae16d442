"""Wall-clock timings of one benchmark point: tplab's prefill and decode steps, HF's, and the model's edges.

Each repeat is one request of the point, run by the generation loop itself: prefill ``batch`` prompts of
``prompt_len`` tokens (its time is the TTFT: until the first tokens are on
the host), then ``decode_steps`` decode steps, each timed until its tokens
are on the host (the latency a client sees per token). ``warmup`` repeats
run first and are dropped (allocator, caches, kernel selection, graph capture).

Collectives are read from ``dist.stats``: per repeat, the seconds the prefill
and the decode steps spent in them (wall time measured by
:class:`~tplab.comm.Dist`), and the records of the last repeat (op, bytes),
from which the emulation models their seconds.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from tplab.checks import is_positive_int
from tplab.comm.launch import launch
from tplab.comm.stats import CommRecord
from tplab.engine.generate import generate, generate_rank_program
from tplab.engine.runner import ModelRunner
from tplab.model.decoder import TPCausalLM


@dataclass
class Timing:
    """Seconds per repeat: TTFT, the mean decode step, and (tplab only) the collectives inside them."""

    ttft_s: list[float] = field(default_factory=list)
    decode_step_s: list[float] = field(default_factory=list)
    prefill_comm_s: list[float] = field(default_factory=list)
    decode_comm_step_s: list[float] = field(default_factory=list)
    prefill_records: list[CommRecord] = field(default_factory=list)  # of the last repeat
    decode_step_records: list[CommRecord] = field(default_factory=list)  # of one decode step
    comm_timed: bool = True  # False under a CUDA graph: the collectives ran inside the replay


def check_counts(decode_steps: int, repeats: int, warmup: int) -> None:
    """ValueError unless decode_steps >= 1, repeats >= 1 and warmup >= 0 (integers)."""
    for name, value, low in (("decode_steps", decode_steps, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if not is_positive_int(value, low):
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _seconds(records: list[CommRecord]) -> float:
    return sum(r.seconds for r in records)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_tplab(model: TPCausalLM, ids: torch.Tensor, decode_steps: int, repeats: int, warmup: int,
               mode: str = "eager") -> Timing:
    """Time ``warmup + repeats`` requests of the prompts ``ids`` (batch, prompt_len); keep the last ``repeats``.

    Each request is :func:`tplab.engine.generate` of ``decode_steps + 1`` greedy tokens with no EOS, through one
    :class:`~tplab.engine.runner.ModelRunner` in ``mode`` (its cache, and a captured graph, serve every repeat):
    the benchmark times the generation loop users run, not a copy of it.
    """
    check_counts(decode_steps, repeats, warmup)
    if mode == "graph" and warmup < 1:
        raise ValueError("mode='graph' captures the CUDA graph in the first request: use warmup >= 1")
    runner, prompts = ModelRunner(model, mode), ids.tolist()
    stats, timing = model.dist.stats, Timing()
    for repeat in range(warmup + repeats):
        synchronize(model.device)
        first = len(stats.records)
        result = generate(runner, prompts, decode_steps + 1, eos_token_ids=())
        records = stats.records[first:]
        prefill_records = [r for r in records if r.tag == "prefill"]
        decode_records = [r for r in records if r.tag == "decode"]
        if repeat >= warmup:
            timing.ttft_s.append(result.ttft_s)
            timing.decode_step_s.append(result.decode_s / decode_steps)
            timing.prefill_comm_s.append(_seconds(prefill_records))
            timing.decode_comm_step_s.append(_seconds(decode_records) / decode_steps)
            timing.prefill_records = prefill_records
            timing.decode_step_records = decode_records[:len(decode_records) // decode_steps]
    if mode == "graph":  # the step's collectives ran inside the replay; the LM head's pick ran outside it
        timing.decode_step_records = list(runner.captured_records) + timing.decode_step_records
        timing.comm_timed = False
    return timing


@torch.no_grad()
def time_edges(model: TPCausalLM, batch: int, prompt_len: int, repeats: int = 3) -> dict[str, float]:
    """Median seconds of the parts outside the decoder layers: embedding, final norm, greedy LM head.

    {"prefill": for (batch, prompt_len) tokens, "decode": for (batch, 1)}. With
    these, a model built with N of its L layers scales to all of them:
    t_L = t_edges + (L/N)(t_N - t_edges).
    """
    out = {}
    for phase, tokens in (("prefill", prompt_len), ("decode", 1)):
        ids = torch.zeros(batch, tokens, dtype=torch.long, device=model.device)
        times = []
        for _ in range(repeats + 1):
            synchronize(model.device)
            t0 = time.perf_counter()
            model.greedy(model.without_layers(ids)[:, -1]).cpu()
            times.append(time.perf_counter() - t0)
        out[phase] = statistics.median(times[1:])
    return out


@torch.no_grad()
def time_hf(model: torch.nn.Module, ids: torch.Tensor, decode_steps: int, repeats: int, warmup: int) -> Timing:
    """The same requests through a transformers causal LM: its eager forward, its own cache, greedy argmax.

    ``logits_to_keep=1`` computes the logits of the last position only, as HF's
    own ``generate`` does.
    """
    check_counts(decode_steps, repeats, warmup)
    device, timing = ids.device, Timing()
    for repeat in range(warmup + repeats):
        synchronize(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        tokens = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.cpu()
        ttft = time.perf_counter() - t0
        cache, steps = out.past_key_values, []
        for _ in range(decode_steps):
            t0 = time.perf_counter()
            out = model(input_ids=tokens, past_key_values=cache, use_cache=True, logits_to_keep=1)
            tokens = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.cpu()
            steps.append(time.perf_counter() - t0)
        if repeat >= warmup:
            timing.ttft_s.append(ttft)
            timing.decode_step_s.append(statistics.fmean(steps))
    return timing


def fastest_generation(repeats: int, tp: int, backend: str = "threads", threads: int | None = 1, pp: int = 1,
                       ep: int = 1, **kwargs) -> list:
    """Every rank's :class:`~tplab.engine.generate.GenerationResult` of the fastest of ``repeats`` launches of
    :func:`~tplab.engine.generate.generate_rank_program` (``kwargs``; each after its untimed warm-up), by rank 0's
    decode time: the repeat least disturbed by other work on the machine."""
    best = None
    for _ in range(repeats):
        results = launch(generate_rank_program, tp, backend, pp=pp, ep=ep, threads=threads,
                         kwargs=dict(kwargs, eos_token_ids=(), warmup=True))
        if best is None or results[0].decode_s < best[0].decode_s:
            best = results
    return best
