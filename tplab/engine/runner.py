"""ModelRunner: one rank's model shard, its cache and its steps, the one thing every loop drives.

The generation loop (:func:`tplab.engine.generate`), the serving engine (:mod:`tplab.serving.engine`) and the
benchmark (:mod:`tplab.bench.timing`, through ``generate``) all run the model through a runner, and every step is
the model's one forward pass, :meth:`tplab.model.TPCausalLM.forward`, over one view of a cache:

* :meth:`ModelRunner.prefill`: the prompts (batch, T) at slots [0, T) of the static cache. Its time is the TTFT.
* :meth:`ModelRunner.decode`: one new token per row (batch, 1) at slot ``start``, in one of three variants
  (``mode``, :data:`DECODE_MODES`):

  - ``"eager"``: the model called on the step's tensors; attention reads slots [0, start + 1), so the shapes
    grow by one each step;
  - ``"static"``: the same shapes at every step: the tokens, positions, slot and valid keys are copied into
    buffers the runner owns, the slot is a one-element device tensor, and attention reads every slot of the
    cache, the causal mask hiding those not written yet;
  - ``"compiled"``: the static step through ``torch.compile`` (inductor fuses the norms, RoPE, SiLU·mul and the
    residual adds into generated C++ or Triton kernels, and on the CPU each layer's attention of the one new token,
    :func:`~tplab.model.attention.decode_attention`), compiled at the first decode of a shape; the all-reduces
    stay in the graph as one operator each (:mod:`tplab.comm.compiled`), so a TP step is one graph, and they are
    recorded as in eager. The weights are frozen into the graph as constants, which lets inductor hold them in
    oneDNN's blocked layout on a CPU that supports it (:func:`compile_options`); the eager prefill keeps the
    module's own copy, so a packed weight is held twice. Each shape's graph is compiled from its own copy of the
    step's code (:func:`own_code`), so no shape or rank runs eagerly under the label, and is freed with its frozen
    weights when the runner moves to another shape or is collected (:func:`release_compiled`; torch would keep
    them until the process ends);
  - ``"autotuned"``: the same, and inductor's ``max_autotune`` benchmarks its own GEMM kernels (on the CPU, C++
    templates with micro-kernels for the CPU's vector ISA) against the library's for every shape while compiling
    (tens of seconds more), and keeps the fastest;
  - ``"graph"``: the static step captured once in a CUDA graph and replayed, one launch per token, as gpt-fast
    and vLLM decode. NOT RUN IN THIS REPOSITORY'S TESTS where no GPU is visible; the static step runs eagerly
    on the CPU there. Under a graph the step's collectives are captured too (NCCL supports capture): ``stats``
    records them once, at capture (:attr:`ModelRunner.captured_records`), and their seconds cannot be timed.

* :meth:`ModelRunner.paged`: the serving engine's step, sequences at their own positions packed in one row over
  the paged cache (decodes and prefill chunks in one pass, no padding, :mod:`tplab.model.paged_cache`). Its shapes
  change at every step, so it runs eagerly; with ``compiled_attention`` its decodes' attention is one compiled
  function, :func:`compiled_paged_attention`, a paged-attention kernel that reads the keys in their blocks.
* :meth:`ModelRunner.next_tokens`: the LM head's vocab-parallel argmax, or a seeded draw from the gathered logits.

On a pipeline stage (``launch(..., pp=P)``) the runner holds that stage's layers and their cache; the model's forward
pass receives from the stage before and sends to the next, and :meth:`~ModelRunner.prefill` and
:meth:`~ModelRunner.decode` return the hidden states on the last stage only (None elsewhere). The last stage
chooses the tokens, and :meth:`~ModelRunner.next_tokens` returns them to every stage (one broadcast of the
pipeline group). A stage is eager: the static and graph variants run one group's step as one piece.
"""
from __future__ import annotations

import functools
import sys
import types
import weakref
from collections.abc import Callable

import torch

from tplab.errors import InputError
from tplab.model.attention import paged_decode_attention
from tplab.model.decoder import TPCausalLM
from tplab.model.paged_cache import PagedKVCache
from tplab.model.sampling import SamplingParams, sample
from tplab.specs import cpu

DECODE_MODES = ("eager", "static", "compiled", "autotuned", "graph")
COMPILED_MODES = ("compiled", "autotuned")


def compile_options(dtype: torch.dtype, device: torch.device, autotune: bool = False) -> dict[str, object]:
    """Inductor's options for the decode step: weights frozen as constants (``freezing``) and prepacked
    (``cpp.weight_prepack``: oneDNN's or MKL's layout, and with ``max_autotune`` inductor's C++ GEMM templates, which
    need frozen weights), bfloat16 roundings as eager's (``emulate_precision_casts``), and ``max_autotune`` when
    ``autotune``.

    Prepacking is off in bfloat16 on a CPU whose oneDNN is capped below what the CPU has
    (:func:`tplab.specs.cpu.bf16_prepack`): inductor packs bf16 weights by the CPU's flags, and the capped oneDNN
    cannot reorder them. On a CPU without AVX-512 inductor packs no bf16 weight, and its C++ templates read the bf16
    weights and compute in float32 (AVX2 micro-kernels)."""
    options: dict[str, object] = {"freezing": True, "emulate_precision_casts": True, "max_autotune": autotune}
    if device.type == "cpu" and dtype == torch.bfloat16 and cpu.bf16_prepack(follow_caps=False) \
            and not cpu.bf16_prepack():
        options["cpp.weight_prepack"] = False
    return options


def compile_note(dtype: torch.dtype, device: torch.device, autotune: bool = False) -> str:
    """One line: what the compiled step does on this device, from :func:`compile_options`."""
    options = compile_options(dtype, device, autotune)
    unpacked_bf16 = dtype == torch.bfloat16 and not cpu.bf16_prepack()  # inductor's own GEMM kernels, if any
    if device.type != "cpu":
        layout = "weights frozen as constants"
    elif not options.get("cpp.weight_prepack", True) or (unpacked_bf16 and not autotune):
        layout = f"weights frozen, not prepacked ({cpu.describe()})"
    elif unpacked_bf16:
        layout = "bf16 weights frozen as they are; GEMMs in inductor's C++ kernels, computing in float32"
    else:
        layout = "weights frozen in oneDNN's blocked layout"
    tuned = "; GEMM kernels autotuned per shape" if autotune else ""
    return f"compiled decode step ({str(dtype).removeprefix('torch.')} on {device.type}): {layout}{tuned}"


def own_code(fn: Callable[..., object]) -> Callable[..., object]:
    """``fn`` (a function or a bound method) over a copy of its code object. Dynamo keeps its compiled graphs per
    code object and, past ``torch._dynamo.config.recompile_limit`` of them (8), runs that code eagerly with a
    warning only: one shared ``_fixed_step`` for every runner made the ninth shape or thread rank of a process
    decode eagerly while its records said compiled."""
    f = getattr(fn, "__func__", fn)
    copy = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    copy.__kwdefaults__ = f.__kwdefaults__
    return types.MethodType(copy, fn.__self__) if isinstance(fn, types.MethodType) else copy


def generated_modules() -> list[types.ModuleType]:
    """The Python modules inductor has generated and keeps (each compiled graph's code, its frozen constants as
    attributes) in the order it made them; an empty list where torch keeps no such list."""
    from torch._inductor.codecache import PyCodeCache
    return getattr(PyCodeCache, "modules", [])


def release_compiled(code: types.CodeType, modules: list[types.ModuleType]) -> None:
    """Free a compiled step: dynamo's graphs for its own ``code`` and inductor's ``modules`` made while it
    compiled. Torch keeps both until the process ends, and with them a frozen copy of the weights per graph
    (measured: about 270 MB per shape for 245 MB of float32 weights). A module another thread rank made meanwhile
    is only forgotten by the cache: its graph holds what it runs."""
    from torch._dynamo import eval_frame
    if hasattr(eval_frame, "reset_code"):  # torch's own releases differ; without it the graphs stay
        eval_frame.reset_code(code)
    kept = generated_modules()
    for module in modules:
        if module in kept:
            kept.remove(module)
        if sys.modules.get(module.__name__) is module:
            del sys.modules[module.__name__]


def weight_copies(compiled: bool, runs: int) -> int:
    """Copies of the weights a process holds at its peak over ``runs`` runners one after another: the module's,
    and with ``compiled`` steps the frozen copy of the running one, and from the second run on the last one's until
    its runner is collected (:func:`release_compiled`)."""
    return 1 if not compiled else 2 if runs == 1 else 3


@functools.cache
def compiled_paged_attention() -> Callable[..., torch.Tensor]:
    """:func:`~tplab.model.attention.paged_decode_attention` through ``torch.compile``: inductor fuses each gather
    into the reduction that reads it, so the generated kernel reads the keys and values in their blocks.

    The rows and keys of a step change at every step: they enter the graph as sizes it may not specialize on (not
    even on 1, ``mark_unbacked``), so one graph serves every step of a cache; it compiles at its first call
    (seconds). Each cache layout (the blocks' shape, dtype and device, the query heads, the scale) is a graph of
    its own, compiled from its own copy of the code (:func:`own_code`), so that no layout of a long process runs
    eagerly; every runner of the process shares them."""
    # imported here, not at the top: torch._dynamo adds ~1.6 s to every ``import tplab``
    from torch._dynamo.decorators import mark_unbacked

    compiled: dict[tuple, Callable[..., torch.Tensor]] = {}

    def kernel(q: torch.Tensor, store_k: torch.Tensor, store_v: torch.Tensor, read_slots: torch.Tensor,
               valid: torch.Tensor, scale: float) -> torch.Tensor:
        layout = (tuple(store_k.shape), store_k.dtype, store_k.device, q.shape[1], scale)
        if layout not in compiled:
            compiled[layout] = torch.compile(own_code(paged_decode_attention))
        for tensor, dims in ((q, (0,)), (read_slots, (0, 1)), (valid, (0, 1))):
            for dim in dims:
                mark_unbacked(tensor, dim)
        return compiled[layout](q, store_k, store_v, read_slots, valid, scale)

    return kernel


class ModelRunner:
    """This rank's shard, its static cache (:meth:`start`) or paged cache (:meth:`start_paged`), and its steps."""

    def __init__(self, model: TPCausalLM, mode: str = "eager") -> None:
        if mode not in DECODE_MODES:
            raise ValueError(f"unknown decode mode {mode!r}; choose one of {DECODE_MODES}")
        if mode in ("graph", *COMPILED_MODES) and model.config.num_experts:
            raise ValueError(f"decode mode {mode!r} needs the same shapes at every step, and a mixture's router sends "
                             "a different number of tokens to each expert at every step: use mode 'static' or 'eager'")
        if mode == "graph" and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {model.device}: use mode 'static'")
        if mode != "eager" and model.pipe is not None:
            raise ValueError(f"decode mode {mode!r} runs the whole model as one step; with pipeline stages use 'eager'")
        self.model, self.mode = model, mode
        self.cache = self.paged_cache = None
        self.captured_records: list = []  # the collectives of the captured step (mode "graph")
        self._graph = self._compiled = self._release = None

    def __repr__(self) -> str:
        return f"ModelRunner(mode={self.mode!r}, rank={self.model.dist.rank}, device={self.model.device})"

    # --- the static cache: generate and the benchmark --------------------------------------------------------
    def start(self, batch: int, max_len: int) -> None:
        """A static cache for ``batch`` rows of up to ``max_len`` positions; kept (with a captured graph) when the
        next request has the same shape. Nothing needs clearing: prefill writes slots [0, T), and each step
        writes its slot before attention reads it. A new shape frees the compiled step: the next decode compiles
        one for it (under the same options)."""
        if self.cache is not None and (self.cache.batch, self.cache.max_len) == (batch, max_len):
            return
        if self._release is not None:
            self._release()  # the last shape's compiled step, with its frozen weights, before the new cache
        model, device = self.model, self.model.device
        self.cache, self._graph, self._compiled = model.new_cache(batch, max_len), None, None
        if self.mode != "eager":
            self._slot = torch.zeros(1, dtype=torch.long, device=device)
            self._tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
            self._positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
            self._key_valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, positions: torch.Tensor | None = None,
                key_valid: torch.Tensor | None = None) -> torch.Tensor | None:
        """Fill slots [0, T) with the prompts ``ids`` (batch, T); the last position's hidden state (batch, hidden)
        (None on a pipeline stage before the last).

        :class:`~tplab.errors.InputError` when that state is not finite although every weight was (activations
        overflowed in the model's dtype).
        """
        hidden = self.model(ids, self.cache.step(0, ids.shape[1], positions, key_valid))
        if hidden is None:  # a pipeline stage before the last: its states went to the next stage
            return None
        hidden = hidden[:, -1]
        if not torch.isfinite(hidden).all():
            raise InputError(f"the prefill's last hidden state is not finite on rank {self.model.dist.rank} although "
                             f"every weight was finite: activations overflowed in {hidden.dtype}; try --dtype "
                             "float32 or bfloat16")
        return hidden

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, start: int, positions: torch.Tensor | None = None,
               key_valid: torch.Tensor | None = None) -> torch.Tensor | None:
        """One new token per row, ``tokens`` (batch, 1), at slot ``start``; its hidden state (batch, hidden).

        ``positions`` (batch, 1): RoPE positions (default: the slot); ``key_valid`` (batch, max_len): the slots
        holding real tokens (default: all). In modes "static" and "graph" the result is the runner's own buffer,
        overwritten by the next step.
        """
        if self.mode == "eager":
            hidden = self.model(tokens, self.cache.step(start, 1, positions, key_valid))
            return None if hidden is None else hidden[:, -1]
        self._tokens.copy_(tokens)
        self._slot.fill_(start)
        self._positions.copy_(self._slot.expand(tokens.shape[0], 1) if positions is None else positions)
        if key_valid is None:
            self._key_valid.fill_(True)
        else:
            self._key_valid.copy_(key_valid[:, :self.cache.max_len])
        if self.mode == "static":
            self._fixed_step()
        elif self.mode in COMPILED_MODES:
            if self._compiled is None:
                options = compile_options(self.model.dtype, self.model.device, self.mode == "autotuned")
                step, first_module = own_code(self._fixed_step), len(generated_modules())
                self._compiled = torch.compile(step, dynamic=False, options=options)
                # the tracer reads freezing from the global config (to keep the weights out of the graph's
                # inputs), the options reach inductor only: set both while the first call compiles
                with torch._inductor.config.patch(freezing=True):
                    self._compiled()
                self._release = weakref.finalize(self, release_compiled, step.__func__.__code__,
                                                 generated_modules()[first_module:])
            else:
                self._compiled()
        else:
            if self._graph is None:
                self._capture()
            self._graph.replay()
        return self._hidden

    def _fixed_step(self) -> None:
        """One step with fixed shapes from the runner's buffers; its hidden state lands in ``_hidden``."""
        step = self.cache.step(self._slot, 1, self._positions, self._key_valid)
        self._hidden = self.model(self._tokens, step)[:, -1]

    def _capture(self) -> None:
        """Warm up on a side stream, then capture one step (the warm-up writes the same slot the step will).

        ``dist.time_collectives`` is off meanwhile (timing synchronizes the device, which a capture forbids) and
        restored after, so the eager prefills around the graph still time their collectives.
        """
        dist, device = self.model.dist, self.model.device
        stats = dist.stats
        timed, tag, dist.time_collectives = dist.time_collectives, stats.tag, False
        try:
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(2):
                    self._fixed_step()
            torch.cuda.current_stream(device).wait_stream(stream)
            stats.tag, first = "graph-capture", len(stats.records)
            self._graph = torch.cuda.CUDAGraph()
            # thread_local: only this thread's unsafe calls break the capture, not those of other threads
            # (NCCL's watchdog querying events of earlier collectives, in torch versions before 2.7)
            with torch.cuda.graph(self._graph, capture_error_mode="thread_local"), torch.no_grad():
                self._fixed_step()
            self.captured_records = stats.records[first:]
        finally:
            dist.time_collectives, stats.tag = timed, tag

    # --- the paged cache: the serving engine -----------------------------------------------------------------
    @torch.no_grad()
    def start_paged(self, num_blocks: int, block_size: int, compiled_attention: bool = False) -> PagedKVCache:
        """This rank's slice of ``num_blocks`` KV blocks of ``block_size`` tokens; with ``compiled_attention`` the
        decodes attend through :func:`compiled_paged_attention`, compiled here so that no step pays for it."""
        model = self.model
        kernel = compiled_paged_attention() if compiled_attention else None
        cache = PagedKVCache.for_model(model.config, model.dist.world_size, num_blocks, block_size, model.dtype,
                                       model.device, layers=len(model.layers), decode_kernel=kernel)
        if kernel is not None:  # two rows of two keys, with this rank's heads and the layers' own scale
            attn = model.layers[0].attn
            kernel(torch.zeros(2, len(attn.qkv.q_heads), attn.head_dim, dtype=model.dtype, device=model.device),
                   cache.k[0], cache.v[0], torch.zeros(2, 2, dtype=torch.long, device=model.device),
                   torch.ones(2, 2, dtype=torch.bool, device=model.device), attn.scale)
        self.paged_cache = cache
        return cache

    @torch.no_grad()
    def paged(self, ids: torch.Tensor, tables: list[list[int]], context_lens: list[int],
              new_lens: list[int]) -> torch.Tensor | None:
        """Feed sequence b its ``new_lens[b]`` tokens, packed in one row ``ids`` (1, N), after its
        ``context_lens[b]`` cached ones (block table ``tables[b]``); the hidden state of each sequence's last new
        token (sequences, hidden), or None on a pipeline stage before the last."""
        batch = self.paged_cache.batch(tables, context_lens, new_lens)
        hidden = self.model(ids, batch)
        return None if hidden is None else hidden[0, batch.last_index]

    # --- the next token ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def next_tokens(self, hidden: torch.Tensor | None, sampling: SamplingParams, generator: torch.Generator | None,
                    rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(token ids (rows,), the full logits when they were gathered): greedy by the LM head's vocab-parallel
        argmax (no full logits), else a seeded draw from the all-gathered logits, the same on every rank.

        With pipeline stages the last stage chooses (``hidden``: its states; None on the other stages) and one
        broadcast of the pipeline group, the token return, gives the ids to every stage; logits stay on the last.
        """
        model, chosen, logits = self.model, None, None
        if model.is_last_stage:
            if sampling.greedy:
                chosen = model.greedy(hidden)
            else:
                logits = model.logits(hidden)
                chosen = sample(logits, sampling, generator)
        if model.pipe is None:
            return chosen, logits
        if chosen is None:
            chosen = torch.empty(rows, dtype=torch.long, device=model.device)
        return model.pipe.broadcast(chosen, model.pipe.world_size - 1), logits
