"""Size before allocating: refuse, with the number and the limit, what cannot fit in this machine's free memory.

Checks run on the caller before any rank starts, from shapes alone, so a
request that would swap or be killed by the kernel's OOM killer ends in one
line instead. They are estimates of the big allocations (weights, KV cache,
message buffers, one process per gloo rank), not a bound on everything.
"""
from __future__ import annotations

from pathlib import Path

from tplab.errors import InputError

MEMINFO = Path("/proc/meminfo")
GLOO_RANK_BYTES = 220 * 10**6  # VmRSS of an idle gloo rank process (torch imported), measured on the development VM


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping); None where unknown (not Linux)."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(nbytes: int, what: str, hint: str) -> None:
    """InputError when ``nbytes`` exceed the free memory; ``what`` names the request, ``hint`` what to change."""
    free = available_bytes()
    if free is not None and nbytes > free:
        raise InputError(f"{what} needs {nbytes / 1e9:.2f} GB, but this machine has {free / 1e9:.2f} GB free; {hint}")


def rank_processes_bytes(backend: str, tp: int) -> int:
    """The memory of the rank processes themselves: one per rank on gloo (either transport), none on threads."""
    return tp * GLOO_RANK_BYTES if backend.startswith("gloo") else 0
