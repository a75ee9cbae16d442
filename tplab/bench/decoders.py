"""Greedy prefill-then-decode loops for timing, eager or with fixed shapes (CUDA graphs).

The benchmark's prompts are unpadded (every row has ``prompt_len`` tokens,
different tokens per row), so slot = position for every row, and greedy
decoding needs no EOS handling: these loops are :func:`tplab.engine.generate.generate`
reduced to what a timing needs (tests check that they produce its tokens).
Every step is :func:`tplab.engine.steps.prefill` or
:func:`tplab.engine.steps.decode_step`, the model's one forward pass.

* :class:`EagerDecoder`: each step calls the model on (batch, 1) new tokens
  at slot ``start``; the cache returns keys up to that slot, so shapes grow
  by one each step (as in ``generate``).
* :class:`StaticDecoder`: each step has the same shapes and reads the
  position from a device tensor ``slot``. The cache then writes at ``slot``
  (``index_copy_``) and returns the whole (max_len) cache; the causal mask
  (``keys <= slot``) hides the slots not written yet. So one step is a fixed
  sequence of kernels on fixed buffers, the step ends with ``slot += 1`` and
  the new tokens written in place, and on CUDA it is captured once in a
  CUDA graph (``graph=True``) and replayed: one launch per token, as
  gpt-fast and vLLM decode. NOT RUN IN THIS REPOSITORY'S TESTS: the graph
  path needs a GPU; the same static step runs eagerly on the CPU in the tests.

Under a CUDA graph the collectives are captured too (NCCL supports capture):
``dist.stats`` records them once, at capture, so per-step counts are read
from the captured records, and their seconds cannot be timed: the step
time includes them. The prefill runs eagerly, so its collectives are timed
as in eager mode.
"""
from __future__ import annotations

import torch

from tplab.engine.steps import decode_step, prefill
from tplab.model.decoder import TPCausalLM


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EagerDecoder:
    """prefill(ids) then step() -> next tokens, the model called eagerly with growing shapes."""

    def __init__(self, model: TPCausalLM, batch: int, max_len: int) -> None:
        self.model, self.batch = model, batch
        self.cache = model.new_cache(batch, max_len)
        self.start, self.tokens = 0, None

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Fill the cache with the prompts (batch, T); return the first new tokens (batch, 1)."""
        self.tokens = self.model.greedy(prefill(self.model, ids, self.cache))[:, None]
        self.start = ids.shape[1]
        return self.tokens

    def step(self) -> torch.Tensor:
        """One decode step for every row; returns the new tokens (batch, 1)."""
        hidden = decode_step(self.model, self.tokens, self.cache, self.start)
        self.tokens, self.start = self.model.greedy(hidden)[:, None], self.start + 1
        return self.tokens


class StaticDecoder(EagerDecoder):
    """Decode steps with fixed shapes (see the module docstring); ``graph=True`` replays a CUDA graph."""

    def __init__(self, model: TPCausalLM, batch: int, max_len: int, graph: bool = False) -> None:
        super().__init__(model, batch, max_len)
        if graph and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {model.device}: use graph=False")
        device = model.device
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.static_tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.key_valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.graph, self._graph = graph, None

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        tokens = super().prefill(ids)
        self.static_tokens.copy_(tokens)
        self.slot.fill_(ids.shape[1])
        if self.graph and self._graph is None:
            self._capture()
        return tokens

    def _fixed_step(self) -> None:
        """One fixed-shape step: decode static_tokens at slot, write the next tokens in place, slot += 1."""
        hidden = decode_step(self.model, self.static_tokens, self.cache, self.slot, key_valid=self.key_valid)
        self.static_tokens.copy_(self.model.greedy(hidden)[:, None])
        self.slot.add_(1)

    def _capture(self) -> None:
        """Warm up on a side stream, capture one step, rewind the slot and tokens the warm-up advanced.

        ``dist.time_collectives`` is off meanwhile (timing synchronizes the
        device, which a capture forbids) and restored after, so the eager
        prefills around the graph still time their collectives.
        """
        dist, device = self.model.dist, self.model.device
        slot, tokens = self.slot.clone(), self.static_tokens.clone()
        timed, tag, dist.time_collectives = dist.time_collectives, dist.stats.tag, False
        try:
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(2):
                    self._fixed_step()
            torch.cuda.current_stream(device).wait_stream(stream)
            dist.stats.tag, self.captured_from = "graph-capture", len(dist.stats.records)
            self._graph = torch.cuda.CUDAGraph()
            # thread_local: only this thread's unsafe calls break the capture, not those of other threads
            # (NCCL's watchdog querying events of earlier collectives, in torch versions before 2.7)
            with torch.cuda.graph(self._graph, capture_error_mode="thread_local"), torch.no_grad():
                self._fixed_step()
        finally:
            dist.time_collectives, dist.stats.tag = timed, tag
        self.slot.copy_(slot)
        self.static_tokens.copy_(tokens)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """One decode step; returns the tokens buffer (batch, 1), overwritten by the next step."""
        if self._graph is not None:
            self._graph.replay()
        else:
            self._fixed_step()
        return self.static_tokens


DECODE_MODES = ("eager", "static", "graph")


def make_decoder(model: TPCausalLM, batch: int, max_len: int, mode: str) -> EagerDecoder:
    """An EagerDecoder ("eager"), a StaticDecoder run eagerly ("static") or replayed as a CUDA graph ("graph")."""
    if mode == "eager":
        return EagerDecoder(model, batch, max_len)
    if mode in ("static", "graph"):
        return StaticDecoder(model, batch, max_len, graph=mode == "graph")
    raise ValueError(f"unknown decode mode {mode!r}; choose one of {DECODE_MODES}")
