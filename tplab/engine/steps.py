"""One forward pass, two uses: prefill the prompts, then decode one token per row per step.

Both call the model's own forward pass (:meth:`tplab.model.TPCausalLM.forward`)
and return the final hidden state of each row's last position, (batch, hidden);
the LM head turns it into the next tokens (:func:`next_tokens`). The generation
loop (:func:`tplab.engine.generate`), the benchmark's eager, static-cache and
CUDA-graph decoders (:mod:`tplab.bench.decoders`) all run these two functions,
so there is no second copy of the decoder's forward pass to drift from the first.

* :func:`prefill`: the prompts (batch, T) at cache slots [0, T). Its time is the
  TTFT, the time to the first token.
* :func:`decode_step`: one new token per row (batch, 1) at slot ``start``. With
  ``start`` a one-element device tensor, every step has the same shapes and
  reads its slot from device memory: a CUDA graph can capture it once and replay it.
* :func:`paged_step`: the serving engine's step, sequences at their own positions
  packed in one row over a paged cache (decodes and prefill chunks in one pass,
  no padding, :mod:`tplab.model.paged_cache`).
"""
from __future__ import annotations

import torch

from tplab.errors import InputError
from tplab.model.decoder import TPCausalLM
from tplab.model.kv_cache import KVCache
from tplab.model.paged_cache import PagedBatch
from tplab.model.sampling import SamplingParams, sample


@torch.no_grad()
def prefill(model: TPCausalLM, ids: torch.Tensor, cache: KVCache, positions: torch.Tensor | None = None,
            key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Fill cache slots [0, T) with the prompts ``ids`` (batch, T); the last position's hidden state (batch, hidden).

    :class:`~tplab.errors.InputError` when that state is not finite although
    every weight was (activations overflowed in the model's dtype).
    """
    hidden = model(ids, cache, 0, positions, key_valid)[:, -1]
    if not torch.isfinite(hidden).all():
        raise InputError(f"the prefill's last hidden state is not finite on rank {model.dist.rank} although every "
                         f"weight was finite: activations overflowed in {hidden.dtype}; try --dtype float32 or bfloat16")
    return hidden


@torch.no_grad()
def decode_step(model: TPCausalLM, tokens: torch.Tensor, cache: KVCache, start: int | torch.Tensor,
                positions: torch.Tensor | None = None, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Feed one new token per row, ``tokens`` (batch, 1), at cache slot ``start``; its hidden state (batch, hidden)."""
    return model(tokens, cache, start, positions, key_valid)[:, -1]


@torch.no_grad()
def paged_step(model: TPCausalLM, ids: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
    """Feed every sequence its new tokens, packed in one row ``ids`` (1, N), after its cached ones; the hidden
    state of each sequence's last new token (sequences, hidden)."""
    return model(ids, batch)[0, batch.last_index]


@torch.no_grad()
def next_tokens(model: TPCausalLM, hidden: torch.Tensor, sampling: SamplingParams,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(token ids (batch,), the full logits when they were gathered): greedy by the LM head's vocab-parallel
    argmax (no full logits), else a seeded draw from the all-gathered logits, the same on every rank."""
    if sampling.greedy:
        return model.greedy(hidden), None
    logits = model.logits(hidden)
    return sample(logits, sampling, generator), logits
