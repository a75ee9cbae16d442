"""Precisions by name: one table, and both spellings accepted everywhere (``bf16`` and ``bfloat16``).

The short names (fp32, bf16, fp16, fp8, int8, int4) are the cost model's and
the command line's; the long ones are torch's (``torch.bfloat16``). Records
keep torch's names for what ran.
"""
from __future__ import annotations

from typing import Any

# short name: (torch's name, or None where torch has no such element type; bytes per element)
PRECISIONS: dict[str, tuple[str | None, float]] = {
    "fp32": ("float32", 4), "bf16": ("bfloat16", 2), "fp16": ("float16", 2),
    "fp8": ("float8_e4m3fn", 1), "int8": ("int8", 1), "int4": (None, 0.5),
}
ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
           "float8_e4m3fn": "fp8", "e4m3": "fp8"}
RUNTIME = ("fp32", "bf16", "fp16")  # what tplab's decoder computes in


def canonical(name: str) -> str:
    """The short spelling of a precision name ("bfloat16" -> "bf16", "torch.float16" -> "fp16"), unchecked."""
    name = str(name).lower().removeprefix("torch.")
    return ALIASES.get(name, name)


def precision(name: str, allowed: tuple[str, ...] | None = None) -> str:
    """The short name of ``name`` in either spelling ("bfloat16" -> "bf16"); ValueError listing the choices."""
    short = canonical(name)
    choices = tuple(PRECISIONS) if allowed is None else allowed
    if short not in choices:
        spelled = ", ".join(f"{c} ({PRECISIONS[c][0]})" if PRECISIONS[c][0] else c for c in choices)
        raise ValueError(f"unknown dtype {name!r}; choose one of {spelled}")
    return short


def torch_name(name: str) -> str:
    """torch's name of a runtime precision in either spelling: "bf16" -> "bfloat16"."""
    return PRECISIONS[precision(name, RUNTIME)][0]


def element_bytes(dtype: Any) -> float:
    """Bytes per element of a precision name (either spelling) or of a torch dtype (its ``itemsize``)."""
    if isinstance(dtype, str):
        return PRECISIONS[precision(dtype)][1]
    return dtype.itemsize
