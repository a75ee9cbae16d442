"""A request, and the sequence the scheduler keeps for it while it runs.

A :class:`Request` is what a user sends: prompt token ids, how many tokens to
generate at most, when it arrives, and how to pick its tokens. A
:class:`Sequence` is the scheduler's state for it: every known token (prompt,
then outputs), how many of them have their keys and values in the cache
(``num_computed``), its block table, and the times a serving metric needs.

The tokens still to compute are ``tokens[num_computed:]``: the rest of the
prompt while it prefills (a chunk at a time), then the one token sampled last
(a decode). A preempted sequence drops its blocks and ``num_computed`` goes
back to 0: it recomputes prompt and outputs when it is scheduled again.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tplab.checks import is_positive_int

MAX_ARRIVAL_S = 86_400.0  # a load replays at most a day: a later arrival is a typo or a unit error


@dataclass(frozen=True)
class Request:
    """``prompt`` token ids, up to ``max_new_tokens`` outputs, arriving ``arrival_s`` after the start.

    ``temperature`` 0 is greedy; otherwise a draw seeded by ``seed`` (top-k and
    top-p as in :class:`tplab.model.SamplingParams`). ``stop``: token-id
    sequences that end it, besides the model's EOS ids.
    """

    id: int
    prompt: tuple[int, ...]
    max_new_tokens: int
    arrival_s: float = 0.0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError(f"request {self.id} has an empty prompt")
        if not is_positive_int(self.max_new_tokens):
            raise ValueError(f"request {self.id}: max_new_tokens must be a positive integer, "
                             f"got {self.max_new_tokens!r}")
        if not 0 <= self.arrival_s <= MAX_ARRIVAL_S:  # NaN and infinity too
            raise ValueError(f"request {self.id}: arrival_s must be in [0, {MAX_ARRIVAL_S:g}] s (a day), got "
                             f"{self.arrival_s!r}")

    @property
    def max_tokens(self) -> int:
        """Prompt plus every output: the most positions the request can occupy."""
        return len(self.prompt) + self.max_new_tokens


@dataclass(eq=False)
class Sequence:
    """The scheduler's state of one request (times in seconds from the start of the run). Two sequences are the
    same only if they are one object (the scheduler's queues look them up by identity, not by comparing tokens)."""

    request: Request
    tokens: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_ids: list[int] = field(default_factory=list)
    registered_blocks: int = 0  # leading blocks already named by their prefix hash (BlockManager.register_full)
    finish_reason: str | None = None  # "eos", "stop", "length", or "rejected: ..."
    first_scheduled_s: float | None = None
    token_times_s: list[float] = field(default_factory=list)
    finished_s: float | None = None
    preemptions: int = 0
    prefix_hit_tokens: int = 0  # tokens whose cached blocks it reused instead of computing them
    in_flight: bool = False  # scheduled in a step whose result has not come back (pipeline stages)

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.request.prompt)

    @property
    def id(self) -> int:
        return self.request.id

    @property
    def outputs(self) -> list[int]:
        return self.tokens[len(self.request.prompt):]

    @property
    def to_compute(self) -> int:
        """Known tokens whose keys and values are not in the cache yet."""
        return len(self.tokens) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
