"""What this CPU does natively: its flags, read once, less what the environment caps or a test forces off.

Two features decide which CPU path tplab takes:

* **native bf16 matmul** (``avx512_bf16`` or ``amx_bf16``): without it a bfloat16 GEMM runs through a slow emulated
  path (on an AVX2-only CPU, several times the float32 time), so the CPU defaults to float32 compute;
* **oneDNN's bf16 prepacking** (AVX-512 BW, VL and DQ, or AVX-NE-CONVERT): without it ``--prepack`` in bfloat16
  cannot reorder the weights, so it is refused in one line (float32 prepacking works on any x86 CPU), and a compiled
  bfloat16 step leaves its GEMMs to inductor's own C++ kernels, which read bf16 weights and compute in float32.

The environment can cap what the libraries use below what the CPU has, and tplab follows it:
``ATEN_CPU_CAPABILITY=avx2`` (or ``default``), ``ONEDNN_MAX_CPU_ISA=AVX2`` (or lower) and
``MKL_ENABLE_INSTRUCTIONS=AVX2`` all mean "no AVX-512 and nothing above it". ``TPLAB_CPU_FLAGS_OFF=a,b`` removes
flags by name, so a test can take the side of a CPU that lacks them.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

FORCE_OFF = "TPLAB_CPU_FLAGS_OFF"
CAPS = {"ATEN_CPU_CAPABILITY": ("default", "avx2"), "ONEDNN_MAX_CPU_ISA": ("sse41", "avx", "avx2"),
        "MKL_ENABLE_INSTRUCTIONS": ("sse4_2", "avx", "avx2")}
ABOVE_AVX2 = ("avx512", "amx", "avx_ne_convert", "avx_vnni")
NATIVE_BF16 = ("avx512_bf16", "amx_bf16")
PREPACK_BF16 = (("avx512bw", "avx512vl", "avx512dq"), ("avx_ne_convert",))


@functools.lru_cache(maxsize=1)
def _cpuinfo_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def capped_to_avx2() -> str | None:
    """The variable that caps the libraries at AVX2 or below (``NAME=value``), or None."""
    for name, low in CAPS.items():
        if os.environ.get(name, "").strip().lower() in low:
            return f"{name}={os.environ[name]}"
    return None


def cpu_flags(follow_caps: bool = True) -> frozenset[str]:
    """This CPU's flags (empty where /proc/cpuinfo is absent), less what the environment caps (unless not
    ``follow_caps``) or forces off."""
    flags = _cpuinfo_flags()
    if follow_caps and capped_to_avx2():
        flags = frozenset(f for f in flags if not f.startswith(ABOVE_AVX2))
    off = {f.strip() for f in os.environ.get(FORCE_OFF, "").split(",") if f.strip()}
    return flags - off


def native_bf16() -> bool:
    """Whether a bfloat16 matmul runs natively (AVX-512 BF16 or AMX), not emulated."""
    return any(f in cpu_flags() for f in NATIVE_BF16)


def bf16_prepack(follow_caps: bool = True) -> bool:
    """Whether oneDNN can hold bfloat16 weights prepacked on this CPU. ``follow_caps=False``: what the CPU itself
    has, whatever the environment caps, as torch's own check reads it (inductor packs bf16 weights by that check)."""
    flags = cpu_flags(follow_caps)
    return any(all(f in flags for f in need) for need in PREPACK_BF16)


def describe() -> str:
    """One line: what decides the CPU paths here."""
    cap = capped_to_avx2()
    return (f"native bf16 matmul: {'yes' if native_bf16() else 'no'}; bf16 prepacking: "
            f"{'yes' if bf16_prepack() else 'no'}" + (f" (libraries capped by {cap})" if cap else ""))
