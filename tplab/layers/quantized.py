"""Weight-only int8 and fp8 (e4m3) for the parallel linears: quantize before you shard, with tp-invariant scales.

Every output channel (a row i of W, shape out × in) gets one scale,
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

from tplab.errors import InputError

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


def prepack_supported(weight: torch.Tensor) -> bool:
    """Whether oneDNN can hold ``weight`` prepacked: float32 or bfloat16, on the CPU, in a build with oneDNN."""
    return (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class QuantizableLinear(nn.Module):
    """A parallel linear whose ``weight`` can be replaced by int8/fp8 values and per-row scales.

    Subclasses call :meth:`matmul` in their forward; ``quantize_``
    swaps the full-precision ``weight`` for the ``qweight`` and ``scale``
    buffers (and frees it).
    """

    scheme: str | None = None
    packed: torch.Tensor | None = None  # the weight in oneDNN's blocked layout, after prepack_()

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Y = X Wᵀ + b with this rank's weight: stored, prepacked for oneDNN, dequantized, through the CPU's int8
        weight-only kernel, or on a GPU with FP8 tensor cores as an fp8 GEMM (:func:`fp8_gemm`)."""
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")
        if self.scheme == "fp8" and fp8_gemm_supported(x.device):
            return fp8_gemm(x, self.qweight, self.scale, bias)
        if self.scheme == "int8" and x.device.type == "cpu" and x.dtype == torch.bfloat16:
            flat = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.qweight, self.scale.to(x.dtype))
            y = flat.reshape(*x.shape[:-1], flat.shape[-1])
            return y if bias is None else y + bias
        return F.linear(x, self.matmul_weight(), bias)

    def matmul_weight(self) -> torch.Tensor:
        """The weight of Y = X Wᵀ: as stored, or dequantized from qweight and scale."""
        if self.scheme is None:
            return self.weight
        return dequantize(self.qweight, self.scale, self.compute_dtype)

    @property
    def local_shape(self) -> torch.Size:
        """The shape of this rank's weight, stored full, prepacked or quantized."""
        if self.packed is not None:
            return self.packed.shape
        return (self.weight if self.scheme is None else self.qweight).shape

    def prepack_(self) -> "QuantizableLinear":
        """Store the weight in oneDNN's blocked layout (:func:`prepack_supported`) and free the plain one: the same
        Y = X Wᵀ + b through a kernel that streams the weight faster (the last bits may differ)."""
        if not prepack_supported(self.weight):
            raise InputError(f"--prepack needs unquantized float32 or bfloat16 weights on the CPU with oneDNN; "
                             f"these are {self.weight.dtype} on {self.weight.device}: drop --prepack")
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.data, 1)
        self.weight.data = torch.empty(0, dtype=self.weight.dtype)
        return self

    def full_row_absmax(self) -> torch.Tensor:
        """The max |W| of every row this rank's scales must cover: its own rows (row-parallel layers override)."""
        return row_absmax(self.weight)

    def quantize_(self, scheme: str) -> "QuantizableLinear":
        """Replace ``weight`` by ``qweight`` (int8 or e4m3) and ``scale`` (float32, one per local row)."""
        if self.scheme is not None:
            raise ValueError(f"this layer is already quantized ({self.scheme})")
        return self._store(*quantize_rows(self.weight.data, scheme, self.full_row_absmax()), scheme)

    def prepare_quantized_(self, scheme: str) -> "QuantizableLinear":
        """Empty ``qweight`` and ``scale`` in place of ``weight``, for a checkpoint stored quantized (see :meth:`load_block`)."""
        rows = self.weight.shape[0]
        q = torch.empty(self.weight.shape, dtype=STORAGE[check_scheme(scheme)], device=self.weight.device)
        return self._store(q, torch.empty(rows, dtype=torch.float32, device=self.weight.device), scheme)

    def _store(self, q: torch.Tensor, scale: torch.Tensor, scheme: str) -> "QuantizableLinear":
        self.compute_dtype = self.weight.dtype
        del self.weight
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.scheme = scheme
        return self

    def load_block(self, source, name: str, rows: slice, dim: int = 0, start: int = 0, stop: int | None = None) -> None:
        """Local rows ``rows`` of the weight <- ``<name>.weight``'s block [start, stop) along ``dim``.

        Stored quantized (an fp8 checkpoint: ``weight`` in e4m3 and ``weight_scale``, one per tensor or per
        output row), the values go to ``qweight`` as they are and the scales to ``scale``: the rows' own
        (dim 0, a column-parallel block) or every row's (dim 1, a row-parallel one, which keeps all rows).
        """
        if self.scheme is None:
            source.copy_into(self.weight[rows], f"{name}.weight", dim, start, stop)
            return
        source.copy_into(self.qweight[rows], f"{name}.weight", dim, start, stop)
        scale_name = f"{name}.weight_scale"
        shape = source.shape(scale_name)
        target = self.scale[rows]
        if len(shape) == 0 or shape == (1,):
            one = torch.empty(shape, dtype=torch.float32, device=target.device)
            source.copy_into(one, scale_name)
            target.copy_(one.reshape(()).expand_as(target))
        else:
            view = target.view(-1, 1) if len(shape) == 2 else target
            source.copy_into(view, scale_name, 0, *((start, stop) if dim == 0 else (0, None)))
