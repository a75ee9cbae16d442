"""A load generator: when requests arrive, how long their prompts are, how many tokens each asks for.

* Arrivals: a Poisson process at ``rate`` requests/s (gaps drawn from an
  exponential of mean 1/rate), or all at time 0 (``rate=None``).
* Lengths: fixed (``"64"``) or drawn uniformly from an inclusive range (``"16:128"``).
* Prompts: random token ids (the model's special ids left out). With
  ``prefix_share`` s, the first floor(s · prompt_len) tokens of every prompt
  come from one shared system prompt, so the prefix cache can hit.
* Or a replayed file of JSON lines, each ``{"prompt_ids": [...], "max_new_tokens": N, "arrival_s": t}``
  (``arrival_s`` optional: then the rate's process, or 0).
* Bounded: at most ``num_requests``, and none arriving after ``duration_s``.

Everything is drawn from one ``random.Random(seed)``: the same load every run.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

from tplab.files import read_user_text
from tplab.serving.requests import Request


def parse_range(flag: str, text: str) -> tuple[int, int]:
    """"64" -> (64, 64); "16:128" -> (16, 128); ValueError naming ``flag`` otherwise."""
    parts = str(text).split(":")
    try:
        low, high = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (None, None)
    except ValueError:
        low = high = None
    if low is None or not 1 <= low <= high:
        raise ValueError(f"{flag} takes N or LOW:HIGH with 1 <= LOW <= HIGH, got {text!r}")
    return low, high


def arrival_times(count: int, rate: float | None, rng: random.Random) -> list[float]:
    """``count`` arrival times (s): a Poisson process at ``rate`` requests/s, or all 0 when ``rate`` is None."""
    if rate is None:
        return [0.0] * count
    if not rate > 0:
        raise ValueError(f"--rate must be > 0 requests/s, got {rate}")
    times, t = [], 0.0
    for _ in range(count):
        t += rng.expovariate(rate)
        times.append(t)
    return times


def synthetic_load(num_requests: int, rate: float | None, prompt_len: tuple[int, int], output_len: tuple[int, int],
                   vocab_size: int, seed: int = 0, prefix_share: float = 0.0, duration_s: float | None = None,
                   special_ids: frozenset[int] = frozenset()) -> list[Request]:
    """Requests with random prompts (see the module docstring); ids in input order 0, 1, ..."""
    if not 0 <= prefix_share < 1:
        raise ValueError(f"--prefix-share must be in [0, 1), got {prefix_share}")
    rng = random.Random(seed)
    ids = [t for t in range(vocab_size) if t not in special_ids]
    shared = [rng.choice(ids) for _ in range(int(prefix_share * prompt_len[1]))]
    requests = []
    for i, arrival in enumerate(arrival_times(num_requests, rate, rng)):
        length = rng.randint(*prompt_len)
        head = shared[:int(prefix_share * length)]
        prompt = tuple(head + rng.choices(ids, k=length - len(head)))
        requests.append(Request(i, prompt, rng.randint(*output_len), arrival))
    return bounded(requests, duration_s)


def bounded(requests: list[Request], duration_s: float | None) -> list[Request]:
    """The requests arriving by ``duration_s`` (all of them when None)."""
    if duration_s is not None and not duration_s > 0:
        raise ValueError(f"--duration must be > 0 s, got {duration_s}")
    return [r for r in requests if duration_s is None or r.arrival_s <= duration_s]


def read_requests(path: str | Path, rate: float | None = None, seed: int = 0,
                  tokenize: Callable[[str], list[int]] | None = None, max_requests: int | None = None) -> list[Request]:
    """Requests replayed from a JSON-lines file; ValueError naming the line for anything malformed."""
    path = Path(path)
    lines = [(n, line) for n, line in enumerate(read_user_text(path, "--requests").splitlines(), 1) if line.strip()]
    if not lines:
        raise ValueError(f"--requests {path} holds no request")
    if max_requests is not None and len(lines) > max_requests:
        raise ValueError(f"--requests {path} holds {len(lines)} requests, more than --num-requests={max_requests}")
    times = arrival_times(len(lines), rate, random.Random(seed))
    requests = []
    for i, (n, line) in enumerate(lines):
        where = f"{path}:{n}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not JSON ({e.msg})") from None
        if not isinstance(item, dict) or "max_new_tokens" not in item or not ("prompt_ids" in item or "prompt" in item):
            raise ValueError(f"{where} needs max_new_tokens and prompt_ids (or prompt)")
        if "prompt_ids" in item:
            prompt = item["prompt_ids"]
        elif tokenize is None:
            raise ValueError(f"{where} gives prompt text but the model has no tokenizer; give prompt_ids")
        else:
            prompt = tokenize(str(item["prompt"]))
        if not isinstance(prompt, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError(f"{where}: prompt_ids must be a list of integers")
        try:
            requests.append(Request(i, tuple(prompt), item["max_new_tokens"], float(item.get("arrival_s", times[i]))))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
    return requests
