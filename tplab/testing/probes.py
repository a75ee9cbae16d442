"""Rank programs that tests and notebooks launch to look inside a TP run (importable, so gloo can run them)."""
from __future__ import annotations

from pathlib import Path

import torch

from tplab.dist import Dist
from tplab.generate import generate
from tplab.loading import from_pretrained

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
