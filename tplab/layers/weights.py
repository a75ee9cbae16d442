"""Weight formats: how a rank stores its block of a matrix W (out × in) and multiplies by it.

A parallel layer (:mod:`tplab.layers.linear`, :mod:`tplab.layers.vocab`) owns the split and the collective; its
``weight`` is one of these formats, which owns the bytes and the GEMM, Y = X Wᵀ + b:

* :class:`DenseWeight`: W as it is, in the model's dtype (``F.linear``);
* :class:`PrepackedWeight`: W in oneDNN's blocked layout (CPU, float32 or bfloat16): the same Y through a kernel
  that streams the weight faster (the last bits may differ);
* :class:`QuantizedWeight`: weight-only int8 or fp8 (e4m3), quantized before it is sharded, with scales that do
  not depend on tp (below).

Each has ``matmul(x, bias)``, ``rows(ids)`` (an embedding's lookup), ``shape``, ``dtype`` (of the computation),
``nbytes`` and ``load_block`` (its block of a checkpoint tensor). The format is chosen at load time
(:func:`tplab.model.loading.from_pretrained`): dense, or quantized as a checkpoint stores it, then
quantized or prepacked in place when asked (:meth:`DenseWeight.quantized`, :meth:`DenseWeight.prepacked`).

Quantization. Every output channel (a row i of W, shape out × in) gets one scale,
s_i = max_j |W_ij| / q_max (q_max = 127 for int8, 448 for e4m3), and
W_ij ≈ s_i · q_ij with q_ij = round(W_ij / s_i) (int8) or its nearest e4m3 value.
Matmuls dequantize on the fly: Y = X (s ⊙ Q)ᵀ, computed in the layer's dtype; int8 with bfloat16
activations on the CPU instead runs torch's int8 weight-only kernel, Y = (X Qᵀ) ⊙ s, which
``scripts/bench_quant.py`` measured faster than dequantizing (and than the bf16 matmul) on this machine.

Why the scales never depend on tp:

* column-parallel layers (q/k/v, gate/up) hold whole rows, so each rank's
  scales are exactly the rows' scales: they are sliced with the rows, one set
  per part of a fused layer, and replicated with a replicated KV head;
* a row-parallel layer (o_proj, down) holds a slice of every row's columns. A
  scale taken over that slice would change with tp (and so would the rounded
  weights). Instead each rank takes the max over its columns and the ranks
  all-gather those maxima at load time (one all_gather of ``out`` floats per
  layer, recorded like every collective): every rank then scales by the max
  over the full row, and Q is the same at every tp.

So the dequantized weights are identical at every tp, and a quantized model's
results differ between tp degrees only by summation order, as an unquantized one's do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tplab.checkpoint.sources import TensorSource
from tplab.errors import InputError
from tplab.specs import cpu

SCHEMES = ("int8", "fp8")
Q_MAX = {"int8": 127.0, "fp8": 448.0}
STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


def check_scheme(scheme: str) -> str:
    """``scheme`` if it is one of SCHEMES; a ValueError naming them otherwise."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r}; choose one of {', '.join(SCHEMES)}")
    return scheme


def row_absmax(weight: torch.Tensor) -> torch.Tensor:
    """max_j |W_ij| per row, in float32."""
    return weight.detach().float().abs().amax(dim=1)


def quantize_rows(weight: torch.Tensor, scheme: str, absmax: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, s): ``weight`` (out × in) as int8 or e4m3 values and one float32 scale per row.

    ``absmax``: the rows' max |W| when it must cover more columns than ``weight`` holds (a row-parallel shard).
    """
    absmax = row_absmax(weight) if absmax is None else absmax.float()
    scale = torch.where(absmax > 0, absmax / Q_MAX[check_scheme(scheme)], torch.ones_like(absmax))
    scaled = weight.detach().float() / scale[:, None]
    if scheme == "int8":
        return scaled.round().clamp(-127, 127).to(torch.int8), scale
    return scaled.clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """s ⊙ Q in ``dtype``: each row of ``q`` (any leading shape) times its scale, the weight the matmul uses."""
    return (q.to(torch.float32) * scale[..., None]).to(dtype)


def fp8_gemm_supported(device: torch.device) -> bool:
    """Whether ``device`` runs fp8 GEMMs: a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, ...)."""
    return device.type == "cuda" and hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_gemm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Y = (X_q Qᵀ) ⊙ (t sᵀ) + b on the tensor cores: X quantized to e4m3 per token (scale t), Q per row (scale s).

    NOT RUN IN THIS REPOSITORY'S TESTS: it needs a GPU with FP8 tensor cores (tests/test_gpu.py checks it
    against the dequantized weights where one is visible).
    """
    flat = x.reshape(-1, x.shape[-1])
    token_scale = (flat.abs().amax(dim=-1, keepdim=True).float() / Q_MAX["fp8"]).clamp_min(1e-12)
    x_q = (flat.float() / token_scale).clamp(-Q_MAX["fp8"], Q_MAX["fp8"]).to(torch.float8_e4m3fn)
    y = torch._scaled_mm(x_q, q.t(), scale_a=token_scale, scale_b=scale[None, :].float(), out_dtype=x.dtype)
    y = y.reshape(*x.shape[:-1], q.shape[0])
    return y if bias is None else y + bias


def prepack_problem(dtype: torch.dtype, device: torch.device | str = "cpu") -> str | None:
    """Why oneDNN cannot hold weights of ``dtype`` on ``device`` prepacked here (one line, what to do), or None.

    It needs float32 or bfloat16 on the CPU, a torch build with oneDNN, and for bfloat16 a CPU whose oneDNN can
    reorder it (AVX-512 BW/VL/DQ or AVX-NE-CONVERT, :func:`tplab.specs.cpu.bf16_prepack`).
    """
    if torch.device(device).type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return (f"--prepack needs unquantized float32 or bfloat16 weights on the CPU; these are "
                f"{str(dtype).removeprefix('torch.')} on {device}: drop --prepack")
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return "--prepack needs a torch build with oneDNN, and this one has none: drop --prepack"
    if dtype == torch.bfloat16 and not cpu.bf16_prepack():
        return ("--prepack in bfloat16 needs a CPU with AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, and this one has "
                f"neither ({cpu.describe()}): use --dtype float32 with --prepack, or drop --prepack")
    return None


class WeightFormat(nn.Module):
    """What every format has: ``shape`` of the block as stored, ``dtype`` of the computation, ``nbytes`` stored."""

    stored = "tensor"  # the attribute holding the block

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    @property
    def shape(self) -> torch.Size:
        return getattr(self, self.stored).shape

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.parameters(), *self.buffers()])

    def extra_repr(self) -> str:
        return f"{tuple(self.shape)}, computed in {str(self.dtype).removeprefix('torch.')}"


class DenseWeight(WeightFormat):
    """W as it is: ``tensor`` (out × in) in the model's dtype; Y = X Wᵀ + b."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype | None, device: torch.device,
                 fill: float | None = None) -> None:
        tensor = torch.empty(rows, cols, dtype=dtype, device=device)
        super().__init__(tensor.dtype)
        self.tensor = nn.Parameter(tensor if fill is None else tensor.fill_(fill), requires_grad=False)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, self.tensor, bias)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """W[ids]: an embedding's lookup."""
        return F.embedding(ids, self.tensor)

    def load_block(self, source: TensorSource, name: str, rows: slice, dim: int = 0, start: int = 0,
                   stop: int | None = None) -> None:
        """Local rows ``rows`` <- ``<name>``'s block [start, stop) along ``dim``."""
        source.copy_into(self.tensor[rows], name, dim, start, stop)

    def row_absmax(self) -> torch.Tensor:
        """max_j |W_ij| of every local row, in float32."""
        return row_absmax(self.tensor)

    def quantized(self, scheme: str, absmax: torch.Tensor | None = None) -> "QuantizedWeight":
        """This weight as int8 or e4m3 values and per-row scales; ``absmax``: the rows' max over more columns than
        this block holds (a row-parallel shard's full rows)."""
        q, scale = quantize_rows(self.tensor.data, scheme, absmax)
        return QuantizedWeight(q, scale, scheme, self.dtype)

    def prepacked(self) -> "PrepackedWeight":
        """This weight in oneDNN's blocked layout; :class:`~tplab.errors.InputError` where oneDNN cannot hold it."""
        if problem := prepack_problem(self.dtype, self.tensor.device):
            raise InputError(problem)
        return PrepackedWeight(torch.ops.mkldnn._reorder_linear_weight(self.tensor.data, 1), self.dtype)


class PrepackedWeight(WeightFormat):
    """W in oneDNN's blocked layout (``packed``): Y = X Wᵀ + b through ``mkldnn._linear_pointwise``."""

    stored = "packed"

    def __init__(self, packed: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__(dtype)
        self.register_buffer("packed", packed)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


class QuantizedWeight(WeightFormat):
    """W ≈ s ⊙ Q: ``qweight`` Q (int8 or e4m3, out × in) and ``scale`` s (float32, one per row); computed in
    ``dtype``. Y = X (s ⊙ Q)ᵀ + b, dequantized on the fly, or through the CPU's int8 weight-only kernel (bfloat16
    activations), or on a GPU with FP8 tensor cores as an fp8 GEMM (:func:`fp8_gemm`)."""

    stored = "qweight"

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, scheme: str, dtype: torch.dtype) -> None:
        super().__init__(dtype)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.scheme = check_scheme(scheme)

    @classmethod
    def empty(cls, rows: int, cols: int, scheme: str, dtype: torch.dtype, device: torch.device) -> "QuantizedWeight":
        """Room for a block stored quantized in a checkpoint (filled by :meth:`load_block`)."""
        q = torch.empty(rows, cols, dtype=STORAGE[check_scheme(scheme)], device=device)
        return cls(q, torch.empty(rows, dtype=torch.float32, device=device), scheme, dtype)

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """s ⊙ Q in ``dtype`` (default: the computation's)."""
        return dequantize(self.qweight, self.scale, dtype or self.dtype)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.scheme == "fp8" and fp8_gemm_supported(x.device):
            return fp8_gemm(x, self.qweight, self.scale, bias)
        if self.scheme == "int8" and x.device.type == "cpu" and x.dtype == torch.bfloat16:
            flat = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.qweight, self.scale.to(x.dtype))
            y = flat.reshape(*x.shape[:-1], flat.shape[-1])
            return y if bias is None else y + bias
        return F.linear(x, self.dequantized(), bias)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """s_t ⊙ Q_t for the looked-up rows only."""
        return dequantize(self.qweight[ids], self.scale[ids], self.dtype)

    def load_block(self, source: TensorSource, name: str, rows: slice, dim: int = 0, start: int = 0,
                   stop: int | None = None) -> None:
        """A checkpoint stored quantized (fp8: ``<name>`` in e4m3 and ``<name>_scale``, one per tensor or per
        output row): the values go to ``qweight`` as they are, the scales to ``scale``: the rows' own (dim 0, a
        column-parallel block) or every row's (dim 1, a row-parallel one, which keeps all rows)."""
        source.copy_into(self.qweight[rows], name, dim, start, stop)
        scale_name = f"{name}_scale"
        shape = source.shape(scale_name)
        target = self.scale[rows]
        if len(shape) == 0 or shape == (1,):
            one = torch.empty(shape, dtype=torch.float32, device=target.device)
            source.copy_into(one, scale_name)
            target.copy_(one.reshape(()).expand_as(target))
        else:
            view = target.view(-1, 1) if len(shape) == 2 else target
            source.copy_into(view, scale_name, 0, *((start, stop) if dim == 0 else (0, None)))
