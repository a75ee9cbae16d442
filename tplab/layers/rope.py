"""Rotary position embeddings (RoPE), including Llama 3.1's frequency scaling.

A head vector x of size d is split into halves (x1, x2) (the "rotate half"
layout of Hugging Face checkpoints). Pair i, made of x1[i] and x2[i], turns
by the angle p * f_i at position p, with inverse frequencies

    f_i = theta^(-2i/d),   i = 0 .. d/2 - 1

    rope(x, p) = x * cos(p f) + rotate_half(x) * sin(p f),  rotate_half(x) = (-x2, x1)

so q(p)·k(p') depends only on p - p'. RoPE acts on each head independently,
so under TP every rank rotates its own heads with the same cos/sin: no
communication.

Scalings of the frequencies (``rope_type``):

* ``linear``: f_i / factor (positions interpolated by ``factor``).
* ``llama3`` (Llama 3.1): with wavelength w_i = 2π / f_i and L the original
  context, w_i < L / high_freq_factor keeps f_i; w_i > L / low_freq_factor uses
  f_i / factor; in between, s = (L / w_i - low) / (high - low) blends them:
  (1 - s) f_i / factor + s f_i.
"""
from __future__ import annotations

import math

import torch

from tplab.specs.model import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """The d/2 inverse frequencies f_i (float32), after the configured scaling."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.type == "default":
        return inv_freq
    if rope.type == "linear":
        return inv_freq / rope.factor
    if rope.type == "llama3":
        return _llama3_scaling(inv_freq, rope)
    raise ValueError(f"unsupported rope_type={rope.type!r}")


def _llama3_scaling(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    context = rope.original_max_position_embeddings
    low, high = rope.low_freq_factor, rope.high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > context / low, inv_freq / rope.factor, inv_freq)
    blend = (context / wavelength - low) / (high - low)
    smoothed = (1 - blend) * scaled / rope.factor + blend * scaled
    medium = (wavelength >= context / high) & (wavelength <= context / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    """cos(p f) and sin(p f) for given positions, each of shape (*positions.shape, head_dim).

    Both are tabulated once for p = 0 .. ``max_positions`` - 1 (float32, (max_positions, d/2) each: 64 MiB for
    Llama 3.1's 131,072 positions and d = 128) and looked up by position. Computed at every step instead, the angles
    would be recomputed by every kernel torch.compile fuses them into, among them each key's score in a compiled
    step's attention. Positions must lie in [0, ``max_positions``) (prompts are checked against the model's context
    before they get here).
    """

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int, device: torch.device | str = "cpu"
                 ) -> None:
        super().__init__()
        angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * inverse_frequencies(rope, head_dim)
        self.register_buffer("cos_table", angles.cos().to(device), persistent=False)
        self.register_buffer("sin_table", angles.sin().to(device), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.cos_table[positions], self.sin_table[positions]
        return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((sin, sin), dim=-1).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, for x of shape (batch, heads, seq, head_dim) and cos/sin (batch, seq, head_dim)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
