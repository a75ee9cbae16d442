"""Rank programs that tests and notebooks launch to look inside a TP run (importable, so gloo can run them)."""
from __future__ import annotations

from pathlib import Path

import torch

from tplab.comm.group import Dist
from tplab.engine.generate import generate
from tplab.model.loading import from_pretrained

PROC_STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def equivalence_probe(dist: Dist, jobs: list[dict]) -> list[dict]:
    """For each job {path, prompts, max_new_tokens, score_ids}: load, generate greedily, score.

    Returns per job: ``tokens``, ``logits`` (per step, (batch, V)), ``comm``
    (the generation's per-phase summary), ``score`` (full logits of
    ``score_ids``, a (batch, T) tensor without padding) and ``bytes_read``.
    """
    out = []
    for job in jobs:
        model = from_pretrained(job["path"], dist)
        result = generate(model, job["prompts"], job["max_new_tokens"], eos_token_ids=(), keep_logits=True)
        out.append({"tokens": result.tokens, "logits": result.logits, "comm": result.comm,
                    "score": model.score(torch.tensor(job["score_ids"])), "bytes_read": model.load_stats.bytes_read})
    return out


def generation_comm(comm: dict) -> dict[str, dict[str, tuple[int, int]]]:
    """A generation's per-phase comm summary as {phase: {op: (count, bytes)}}."""
    return {phase: {op: (s["count"], s["bytes"]) for op, s in ops.items()} for phase, ops in comm.items()}


def expected_greedy_comm(num_layers: int, hidden: int, batch: int, prompt_len: int, new_tokens: int, tp: int,
                         element_bytes: int = 4) -> dict[str, dict[str, tuple[int, int]]]:
    """The collectives of one greedy generation, {phase: {op: (count, bytes)}}, bytes as nccl-tests count them.

    Every forward: 2 all-reduces per layer (attention and MLP outputs) + 1 (the
    vocab-parallel embedding), each of batch x tokens x hidden activations; then
    one all-gather of every rank's (max logit, token id) pair per row, in
    float64. The prefill is one forward of the prompts (padded to
    ``prompt_len``); each of the ``new_tokens - 1`` decode steps one forward of
    one token per row.
    """
    per_forward, steps, pair_bytes = 2 * num_layers + 1, new_tokens - 1, batch * 2 * 8 * tp
    return {
        "prefill": {"all_reduce": (per_forward, per_forward * batch * prompt_len * hidden * element_bytes),
                    "all_gather": (1, pair_bytes)},
        "decode": {"all_reduce": (per_forward * steps, per_forward * steps * batch * hidden * element_bytes),
                   "all_gather": (steps, steps * pair_bytes)},
    }


def memory_status() -> dict[str, int]:
    """This process's VmRSS, VmHWM (peak RSS), RssAnon (private) and RssFile (file-backed) in bytes (Linux)."""
    fields = {}
    for line in PROC_STATUS.read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def load_memory_probe(dist: Dist, path: str, warmup_path: str | None = None) -> dict[str, int]:
    """Load ``path`` and report how this rank's memory grew: peak RSS and private (anonymous) memory.

    Writing 5 to /proc/self/clear_refs resets the peak (VmHWM) to the current
    RSS, so ``peak_growth`` is the peak reached while loading, above where it
    started. ``anon_growth`` is the private memory the rank kept (its shards);
    RSS also counts file pages of the memory-mapped checkpoint while they are
    mapped: clean page cache, shared by the ranks, reclaimable.

    ``warmup_path`` (a small checkpoint of the same architecture) is loaded
    first, so the library code a first load runs is already resident and is not
    counted as the big load's growth.
    """
    if warmup_path is not None:
        from_pretrained(warmup_path, dist)
    CLEAR_REFS.write_text("5")
    before = memory_status()
    model = from_pretrained(path, dist)
    after = memory_status()
    return {"peak_growth": after["VmHWM"] - before["VmRSS"], "anon_growth": after["RssAnon"] - before["RssAnon"],
            "bytes_read": model.load_stats.bytes_read, "parameter_bytes": model.parameter_bytes()}


STAGE_FAILURE = "the last stage failed on purpose"


def serve_with_a_failing_last_stage(dist: Dist, requests: list, config, fail_at: int) -> dict:
    """Serve on a pp grid whose last stage raises in its ``fail_at``-th forward pass, while rank 0 has steps in
    flight; every other rank is then waiting for it (a plan, activations, the tokens)."""
    from tplab.serving.engine import serve
    from tplab.specs.tiny import TINY_DIR

    shard = from_pretrained(TINY_DIR, dist)
    if shard.is_last_stage:
        forward, calls = shard.forward, [0]

        def failing(*args, **kwargs):
            calls[0] += 1
            if calls[0] == fail_at:
                raise RuntimeError(STAGE_FAILURE)
            return forward(*args, **kwargs)
        shard.forward = failing
    return serve(shard, requests, config, frozenset({1}))
