"""The generation loop: prefill the prompts, then decode one token per step, on every rank in lockstep.

Batching: prompts of different lengths are left-padded to the longest, T.
Row b's padding takes cache slots [0, pad_b); its tokens sit at positions
0, 1, ... from slot pad_b on, and ``key_valid`` hides the padding from
attention. So every row computes exactly what it would alone, and all rows'
last prompt token is at slot T-1.

* Prefill: one forward pass over (batch, T) fills the KV cache and gives the
  first token (its time is the TTFT, time to first token).
* Decode: each step feeds the batch's last tokens (batch, 1) at the next slot.
  A row that produced an EOS token or completed a stop sequence is finished:
  it keeps its place in the batch, but its outputs are discarded. The loop
  ends when every row is finished or after ``max_new_tokens``.

Every rank runs this same loop. The next token comes from the LM head's
vocab-parallel argmax (greedy) or from the all-gathered logits (sampling, see
:mod:`tplab.model.sampling`); either way every rank gets the same ids, so every
rank takes the same branches and issues the same collectives.

Communication is labelled: ``dist.stats.tag`` is "prefill" then "decode",
and the result keeps a per-step digest.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tplab.checkpoint.sources import LoadStats
from tplab.checks import check_int
from tplab.comm.group import Dist
from tplab.comm.stats import CommStats
from tplab.engine.runner import ModelRunner
from tplab.model.decoder import TPCausalLM
from tplab.model.loading import from_pretrained
from tplab.model.sampling import SamplingParams
from tplab.specs.model import ModelConfig


@dataclass
class GenerationResult:
    """What one rank saw. ``tokens[b]``: the new token ids of row b (EOS or stop sequence included)."""

    tokens: list[list[int]]
    finish_reasons: list[str]  # per row: "eos", "stop" or "length"
    ttft_s: float
    decode_s: float
    step_seconds: list[float]
    comm: dict[str, dict[str, dict[str, float]]]  # {"prefill"/"decode": CommStats.summary()}
    step_comm: list[dict] = field(default_factory=list)  # per step: phase, seconds, {op: count}, bytes
    tp: int = 1
    device: str = "cpu"  # where the rank computed, e.g. "cuda:0"
    threads: int = 1  # torch intra-op threads of the rank
    weight_bytes: int = 0  # this rank's weights as stored (quantized values and scales included)
    load: LoadStats | None = None
    logits: list[torch.Tensor] | None = None  # per step, (batch, V) on the CPU, when keep_logits=True

    @property
    def decode_steps(self) -> int:
        return len(self.step_seconds) - 1

    @property
    def ms_per_token(self) -> float | None:
        """Mean decode step time in ms (one new token per row per step); None when no decode step ran."""
        return 1000 * self.decode_s / self.decode_steps if self.decode_steps else None

    def to_dict(self) -> dict:
        """A JSON-ready dict (with ``ttft_ms`` and ``ms_per_token``)."""
        out = {k: v for k, v in asdict(self).items() if k != "logits"}
        return {**out, "ttft_ms": 1000 * self.ttft_s, "ms_per_token": self.ms_per_token}


def check_prompts(prompts: list[list[int]], vocab_size: int, max_new_tokens: int, context: int) -> None:
    """ValueError unless every prompt is non-empty, its ids are < vocab_size, and it fits the context with the new tokens."""
    check_int("max_new_tokens", max_new_tokens)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("give at least one prompt, each with at least one token")
    for b, prompt in enumerate(prompts):
        bad = [t for t in prompt if not 0 <= int(t) < vocab_size]
        if bad:
            raise ValueError(f"prompt {b} has token ids outside [0, {vocab_size}): {bad[:5]}")
        if len(prompt) + max_new_tokens > context:
            raise ValueError(f"prompt {b} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} that is "
                             f"{len(prompt) + max_new_tokens} positions, more than the model's context "
                             f"(max_position_embeddings={context})")


def _stopped(row: list[int], eos: set[int], stop_sequences: list[list[int]]) -> str | None:
    if row[-1] in eos:
        return "eos"
    if any(s and row[-len(s):] == s for s in stop_sequences):
        return "stop"
    return None


def left_pad(prompts: list[list[int]], extra_slots: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, positions, key_valid) for prompts left-padded to the longest, T, plus ``extra_slots`` to decode into.

    ids (batch, T), padding id 0; positions (batch, T + extra_slots): slot s of
    row b holds position s - pad_b (0 on padding); key_valid (batch, T +
    extra_slots): True from slot pad_b on.
    """
    prompt_len = max(len(p) for p in prompts)
    pad = torch.tensor([prompt_len - len(p) for p in prompts], device=device)
    ids = torch.tensor([[0] * (prompt_len - len(p)) + list(p) for p in prompts], device=device)
    slots = torch.arange(prompt_len + extra_slots, device=device)
    return ids, (slots[None, :] - pad[:, None]).clamp_min(0), slots[None, :] >= pad[:, None]


@torch.no_grad()
def generate(model: TPCausalLM | ModelRunner, prompts: list[list[int]], max_new_tokens: int,
             sampling: SamplingParams | None = None, eos_token_ids: tuple[int, ...] | None = None,
             stop_sequences: list[list[int]] = (), keep_logits: bool = False) -> GenerationResult:
    """Continue every prompt (a list of token ids) by up to ``max_new_tokens`` tokens; run on every rank.

    ``model``: this rank's shard (decoded eagerly), or a :class:`~tplab.engine.runner.ModelRunner` (its decode
    mode; its cache and captured graph are kept for the next call of the same shape).
    ``sampling``: None or temperature 0 is greedy. ``eos_token_ids``: default
    the checkpoint's; () never stops a row early. ``stop_sequences``: token-id sequences that end a row.
    ``keep_logits``: keep each step's full logits in the result; greedy
    decoding then all-gathers them for inspection only, recorded under the
    tag "inspect" so the "prefill" and "decode" counts stay those of plain
    generation.
    """
    runner = model if isinstance(model, ModelRunner) else ModelRunner(model)
    model = runner.model
    sampling = sampling or SamplingParams()
    eos = set(model.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
    stop_sequences = [list(s) for s in stop_sequences]
    check_prompts(prompts, model.config.vocab_size, max_new_tokens, model.config.max_position_embeddings)
    dist, device, batch = model.dist, model.device, len(prompts)
    ids, positions, key_valid = left_pad(prompts, max_new_tokens - 1, device)
    runner.start(batch, key_valid.shape[1])
    if key_valid.all():  # no row is padded: slots are positions, every key is real (and a decode needs no mask)
        positions = key_valid = None
    generator = None if sampling.greedy else sampling.generator()
    stats, old_tag = dist.stats, dist.stats.tag
    first_record = len(stats.records)
    tokens: list[list[int]] = [[] for _ in prompts]
    reasons: list[str | None] = [None] * batch
    step_seconds, step_comm, kept_logits = [], [], []
    start, width, fed = 0, ids.shape[1], ids
    try:
        for step in range(max_new_tokens):
            stats.tag = "prefill" if step == 0 else "decode"
            step_first_record, t0 = len(stats.records), time.perf_counter()
            if step == 0:
                hidden = runner.prefill(fed, None if positions is None else positions[:, :width], key_valid)
            else:
                hidden = runner.decode(fed, start, None if positions is None else positions[:, start:start + 1],
                                       key_valid)
            chosen, logits = runner.next_tokens(hidden, sampling, generator)
            chosen = chosen.tolist()  # waits for the device: the step's timing is complete
            step_seconds.append(time.perf_counter() - t0)
            records = stats.records[step_first_record:]
            step_comm.append({"phase": stats.tag, "seconds": step_seconds[-1],
                              "counts": CommStats(records=records).counts(),
                              "bytes": sum(r.bytes for r in records)})
            if keep_logits:
                stats.tag = "inspect"
                kept_logits.append((model.logits(hidden) if logits is None else logits).cpu())
            for b, token in enumerate(chosen):
                if reasons[b] is None:
                    tokens[b].append(token)
                    reasons[b] = _stopped(tokens[b], eos, stop_sequences)
            if all(r is not None for r in reasons):
                break
            start += width if step == 0 else 1
            fed = torch.tensor(chosen, device=device)[:, None]
    finally:
        stats.tag = old_tag
    records = CommStats(records=stats.records[first_record:])
    return GenerationResult(
        tokens=tokens, finish_reasons=[r or "length" for r in reasons],
        ttft_s=step_seconds[0], decode_s=sum(step_seconds[1:]), step_seconds=step_seconds,
        comm={phase: records.summary(phase) for phase in ("prefill", "decode")},
        step_comm=step_comm, tp=dist.world_size, device=str(dist.device),
        logits=kept_logits if keep_logits else None)


def checkpoint_eos_ids(path: str | Path, model: TPCausalLM) -> tuple[int, ...]:
    """EOS ids of config.json, plus those of generation_config.json when the checkpoint has one."""
    ids = set(model.config.eos_token_ids)
    gen_file = Path(path) / "generation_config.json"
    if gen_file.is_file():
        value = json.loads(gen_file.read_text()).get("eos_token_id")
        ids |= set([value] if isinstance(value, int) else value or [])
    return tuple(sorted(ids))


def generate_rank_program(dist: Dist, model: str | Path | ModelConfig, prompts: list[list[int]], max_new_tokens: int,
                          sampling: SamplingParams | None = None, dtype: torch.dtype | str | None = None,
                          eos_token_ids: tuple[int, ...] | None = None, stop_sequences: list[list[int]] = (),
                          keep_logits: bool = False, warmup: bool = False, quant: str | None = None,
                          quant_embeddings: bool = False, prepack: bool = False) -> GenerationResult:
    """Load this rank's shard of ``model`` and generate: ``launch(generate_rank_program, tp, backend, kwargs=...)``.

    ``model``: a checkpoint directory, or its :class:`~tplab.specs.ModelConfig`
    already read (the rank then reads no config.json). ``sampling`` and
    ``dtype`` arrive as they are (see :func:`~tplab.model.loading.resolve_dtype`).
    Works on threads, gloo, and under torchrun (NCCL on GPUs). ``warmup``: first
    run the same prompts for two tokens, untimed, so the reported TTFT and
    ms/token do not include first-call costs (allocations, kernel selection).
    ``quant``: "int8" or "fp8" weight-only quantization of the decoder's linears (see
    :meth:`~tplab.model.TPCausalLM.quantize_`); ``quant_embeddings`` quantizes the embedding and the LM head too.
    ``prepack``: the linears in oneDNN's layout (:meth:`~tplab.model.TPCausalLM.prepack_`; CPU).
    """
    shard = from_pretrained(model, dist, dtype=dtype, quant=quant, quant_embeddings=quant_embeddings, prepack=prepack)
    directory = shard.config.directory
    eos = checkpoint_eos_ids(directory, shard) if eos_token_ids is None else eos_token_ids
    if warmup:
        generate(shard, prompts, min(2, max_new_tokens), sampling, eos, stop_sequences)
    result = generate(shard, prompts, max_new_tokens, sampling, eos, stop_sequences, keep_logits)
    result.load, result.threads, result.weight_bytes = shard.load_stats, torch.get_num_threads(), shard.parameter_bytes()
    return result
