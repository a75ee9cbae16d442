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

Pipeline stages (``launch(..., pp=P)``): every stage runs this same loop. The batch is cut into m micro-batches of
contiguous rows (:func:`micro_batch_rows`, each with its own runner and cache), fed one after another, so that
stage s works on micro-batch j while stage s+1 works on j-1. The last stage chooses every row's token at the end of
the step, and one broadcast returns them to every stage. So each step fills and drains the pipeline: with p stages
of equal time t per micro-batch, a step takes (m + p - 1) t of which a stage computes m t, an idle share (the
bubble) of (p - 1) / (m + p - 1). A stage's idle time is what it spends blocked in its pipeline group (recv, send,
the token return): ``GenerationResult.bubble`` measures it.
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
from tplab.engine.runner import COMPILED_MODES, ModelRunner
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
    pp: int = 1
    stage: int = 0  # this rank's pipeline stage
    micro_batches: int = 1
    pipeline_comm: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # the pp group's, per phase
    ep: int = 1  # ranks the experts are spread over (a mixture's whole experts); 1 otherwise
    expert_comm: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # the ep group's, per phase
    step_expert_tokens: list[list[list[int]]] = field(default_factory=list)  # per step, layer, expert: pairs computed
    step_pipeline_s: list[float] = field(default_factory=list)  # per step: seconds blocked in the pipeline group
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

    @property
    def bubble(self) -> float | None:
        """The share of the decode steps' time this stage spent blocked in its pipeline group (recv, send, the
        token return): idle, waiting for the other stages. None at pp = 1 or without a decode step."""
        if self.pp == 1 or not self.decode_steps:
            return None
        return sum(self.step_pipeline_s[1:]) / self.decode_s

    def to_dict(self) -> dict:
        """A JSON-ready dict (with ``ttft_ms`` and ``ms_per_token``)."""
        out = {k: v for k, v in asdict(self).items() if k != "logits"}
        return {**out, "ttft_ms": 1000 * self.ttft_s, "ms_per_token": self.ms_per_token, "bubble": self.bubble}


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


def micro_batch_rows(batch: int, micro_batches: int) -> list[slice]:
    """The rows of each of ``micro_batches`` micro-batches: contiguous, in order, sizes differing by at most one
    (the first ones larger). 5 rows in 2: [0, 3), [3, 5)."""
    check_int("micro_batches", micro_batches)
    if micro_batches > batch:
        raise ValueError(f"micro_batches={micro_batches} is more than the batch of {batch} prompt(s): a micro-batch "
                         f"needs at least one row; valid: 1 to {batch}")
    sizes = [batch // micro_batches + (j < batch % micro_batches) for j in range(micro_batches)]
    return [slice(sum(sizes[:j]), sum(sizes[:j + 1])) for j in range(micro_batches)]


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
             stop_sequences: list[list[int]] = (), keep_logits: bool = False,
             micro_batches: int | None = None) -> GenerationResult:
    """Continue every prompt (a list of token ids) by up to ``max_new_tokens`` tokens; run on every rank.

    ``model``: this rank's shard (decoded eagerly), or a :class:`~tplab.engine.runner.ModelRunner` (its decode
    mode; its cache and captured graph are kept for the next call of the same shape).
    ``sampling``: None or temperature 0 is greedy. ``eos_token_ids``: default
    the checkpoint's; () never stops a row early. ``stop_sequences``: token-id sequences that end a row.
    ``keep_logits``: keep each step's full logits in the result (on the last pipeline stage); greedy
    decoding then all-gathers them for inspection only, recorded under the
    tag "inspect" so the "prefill" and "decode" counts stay those of plain
    generation. ``micro_batches``: how many pieces the batch is cut into on its way through the pipeline
    stages (default: as many as stages, at most one per row; 1 without stages).
    """
    runner = model if isinstance(model, ModelRunner) else ModelRunner(model)
    model = runner.model
    sampling = sampling or SamplingParams()
    eos = set(model.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
    stop_sequences = [list(s) for s in stop_sequences]
    check_prompts(prompts, model.config.vocab_size, max_new_tokens, model.config.max_position_embeddings)
    dist, pipe, device, batch = model.dist, model.pipe, model.device, len(prompts)
    pp = 1 if pipe is None else pipe.world_size
    parts = micro_batch_rows(batch, min(pp, batch) if micro_batches is None else micro_batches)
    runners = [runner] + [ModelRunner(model, runner.mode) for _ in parts[1:]]
    ids, positions, key_valid = left_pad(prompts, max_new_tokens - 1, device)
    for part_runner, rows in zip(runners, parts):
        part_runner.start(rows.stop - rows.start, key_valid.shape[1])
    if key_valid.all():  # no row is padded: slots are positions, every key is real (and a decode needs no mask)
        positions = key_valid = None
    generator = None if sampling.greedy else sampling.generator()
    experts = dist.grid.ep if model.config.num_experts and dist.grid is not None else None
    named = {"tp": dist, "pp": pipe, "ep": experts if experts is not None and experts.world_size > 1 else None}
    groups = [g for g in named.values() if g is not None]
    old_tags = [g.stats.tag for g in groups]
    first_records = {name: len(g.stats.records) for name, g in named.items() if g is not None}
    tokens: list[list[int]] = [[] for _ in prompts]
    reasons: list[str | None] = [None] * batch
    step_seconds, step_comm, step_pipeline_s, kept_logits, step_experts = [], [], [], [], []
    routed = model.expert_tokens()
    start, width, fed = 0, ids.shape[1], ids
    try:
        for step in range(max_new_tokens):
            for g in groups:
                g.stats.tag = "prefill" if step == 0 else "decode"
            step_first = {name: len(g.stats.records) for name, g in named.items() if g is not None}
            t0 = time.perf_counter()
            cols = slice(0, width) if step == 0 else slice(start, start + 1)
            hiddens = []
            for part_runner, rows in zip(runners, parts):
                at = None if positions is None else positions[rows, cols]
                valid = None if key_valid is None else key_valid[rows]
                hiddens.append(part_runner.prefill(fed[rows], at, valid) if step == 0 else
                               part_runner.decode(fed[rows], start, at, valid))
            hidden = None if hiddens[0] is None else hiddens[0] if len(hiddens) == 1 else torch.cat(hiddens)
            chosen, logits = runner.next_tokens(hidden, sampling, generator, batch)
            chosen = chosen.tolist()  # waits for the device: the step's timing is complete
            step_seconds.append(time.perf_counter() - t0)
            records = dist.stats.records[step_first["tp"]:]
            step_comm.append({"phase": dist.stats.tag, "seconds": step_seconds[-1],
                              "counts": CommStats(records=records).counts(),
                              "bytes": sum(r.bytes for r in records)})
            if pipe is not None:
                step_pipeline_s.append(sum(r.seconds for r in pipe.stats.records[step_first["pp"]:]))
            if routed is not None:
                now = model.expert_tokens()
                step_experts.append((now - routed).tolist())
                routed = now
            if keep_logits and model.is_last_stage:
                dist.stats.tag = "inspect"
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
        for g, tag in zip(groups, old_tags):
            g.stats.tag = tag
    phases = ("prefill", "decode")
    summaries = {name: {phase: CommStats(records=named[name].stats.records[first:]).summary(phase)
                        for phase in phases} for name, first in first_records.items()}
    return GenerationResult(
        tokens=tokens, finish_reasons=[r or "length" for r in reasons],
        ttft_s=step_seconds[0], decode_s=sum(step_seconds[1:]), step_seconds=step_seconds,
        comm=summaries["tp"],
        step_comm=step_comm, tp=dist.world_size, pp=pp, stage=0 if pipe is None else pipe.rank,
        micro_batches=len(parts),
        pipeline_comm=summaries.get("pp", {}), step_pipeline_s=step_pipeline_s, device=str(dist.device),
        ep=1 if experts is None else experts.world_size, expert_comm=summaries.get("ep", {}),
        step_expert_tokens=step_experts,
        logits=kept_logits if keep_logits and model.is_last_stage else None)


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
                          quant_embeddings: bool = False, prepack: bool = False, pp_layers: list[int] | None = None,
                          micro_batches: int | None = None, expert_dispatch: str = "all-reduce",
                          decode_mode: str = "eager") -> GenerationResult:
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
    Launched with ``pp=P``: this rank's stage of ``pp_layers`` layers per stage (default the even split), the batch
    in ``micro_batches`` (see :func:`generate`). Launched with ``ep=tp``: a mixture's experts whole, E/ep per rank,
    their tokens reaching them by ``expert_dispatch`` (:mod:`tplab.model.moe`). ``decode_mode``: the runner's
    (:data:`~tplab.engine.runner.DECODE_MODES`; "compiled" and "autotuned" compile during the warm-up, untimed,
    which then runs the whole request once).
    """
    shard = from_pretrained(model, dist, dtype=dtype, quant=quant, quant_embeddings=quant_embeddings, prepack=prepack,
                            pp_layers=pp_layers, expert_dispatch=expert_dispatch)
    directory = shard.config.directory
    eos = checkpoint_eos_ids(directory, shard) if eos_token_ids is None else eos_token_ids
    runner = ModelRunner(shard, decode_mode)
    if warmup:  # a compiled step is compiled for the run's shapes here: its cache's length too, so the whole run
        warm = max_new_tokens if decode_mode in COMPILED_MODES else min(2, max_new_tokens)
        generate(runner, prompts, warm, sampling, eos, stop_sequences, micro_batches=micro_batches)
    result = generate(runner, prompts, max_new_tokens, sampling, eos, stop_sequences, keep_logits, micro_batches)
    result.load, result.threads, result.weight_bytes = shard.load_stats, torch.get_num_threads(), shard.parameter_bytes()
    return result
