"""The CPU at hand decides the path: a CPU without native bf16 computes a bf16 checkpoint in float32 by default (and
says so in one line), the benchmark's default dtype follows it, and the matmul roof is bounded by time. The
"missing" side is taken through tplab's own capability check (TPLAB_CPU_FLAGS_OFF), whatever this CPU has."""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from tplab.bench.roofline import measure_matmul_tflops
from tplab.commands.bench import default_dtype
from tplab.model.loading import dtype_note, resolve_dtype
from tplab.specs import cpu
from tplab.specs.model import resolve_model

NO_NATIVE_BF16 = "avx512_bf16,amx_bf16"


@pytest.fixture
def bf16_checkpoint():
    return dataclasses.replace(resolve_model("tiny"), dtype="bfloat16")


def test_a_cpu_without_native_bf16_computes_a_bf16_checkpoint_in_float32(monkeypatch, bf16_checkpoint):
    monkeypatch.setenv(cpu.FORCE_OFF, NO_NATIVE_BF16)
    assert not cpu.native_bf16()
    assert resolve_dtype(None, bf16_checkpoint, "cpu") == resolve_dtype("auto", bf16_checkpoint) == torch.float32
    assert resolve_dtype(None, bf16_checkpoint, "cuda") == torch.bfloat16  # a GPU rank keeps the checkpoint's
    assert resolve_dtype("bf16", bf16_checkpoint, "cpu") == torch.bfloat16  # asked for: kept
    note = dtype_note(None, bf16_checkpoint, torch.float32)
    assert "\n" not in note and "computing in float32" in note and "--dtype bfloat16" in note
    assert dtype_note("bf16", bf16_checkpoint, torch.bfloat16) is None


def test_a_cpu_with_native_bf16_keeps_the_checkpoints_dtype(monkeypatch, bf16_checkpoint):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx512_bf16", "avx512bw", "avx512vl", "avx512dq"}))
    assert resolve_dtype(None, bf16_checkpoint, "cpu") == torch.bfloat16
    assert dtype_note(None, bf16_checkpoint, torch.bfloat16) is None


def test_the_benchmarks_default_dtype_follows_the_cpu(monkeypatch):
    monkeypatch.setenv(cpu.FORCE_OFF, NO_NATIVE_BF16)
    dtype, note = default_dtype("cpu")
    assert dtype == "float32" and "\n" not in note and "benchmarked in float32" in note
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    assert default_dtype("cpu") == ("bfloat16", None)


def test_the_matmul_roof_is_bounded_by_time_not_by_size():
    start = time.monotonic()
    roof = measure_matmul_tflops("cpu", torch.float32, budget_s=0.05)
    assert time.monotonic() - start < 5 and 256 <= roof["size"] < 4096 and roof["tflops"] > 0
    assert measure_matmul_tflops("cpu", torch.float32, size=64)["size"] == 64  # a size given is kept
