"""Where weights come from: a safetensors checkpoint directory, or an in-memory state dict.

A parallel layer never asks for a whole tensor. It asks a :class:`TensorSource`
to copy one block, rows or columns [start, stop) along ``dim``, straight into
its own preallocated shard (``copy_into``). So the same slicing code serves a
checkpoint on disk and a Hugging Face model in memory, and a rank holds only
its 1/tp of the weights:

* :class:`SafetensorsSource` opens the file for each read, slices it with
  ``safe_open(...).get_slice(name)[...]`` (a view of the memory-mapped file),
  copies the block into the shard, and closes the file, which unmaps the pages
  it touched. Nothing but the shards stays in the rank's private memory.
  A sharded checkpoint (``model.safetensors.index.json``) maps each tensor
  name to its file.
* :class:`StateDictSource` narrows tensors of a state dict.

Each source counts ``bytes_read``: the bytes it materialised for this rank.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch

from tplab.errors import CheckpointError


@dataclass(frozen=True)
class LoadStats:
    """What one rank read while loading: bytes copied out of the checkpoint, and wall seconds."""

    bytes_read: int
    seconds: float


class TensorSource(ABC):
    """Reads blocks of named tensors into preallocated destinations, counting the bytes."""

    where = "memory"

    def __init__(self) -> None:
        self.bytes_read = 0

    @abstractmethod
    def has(self, name: str) -> bool:
        """Whether the source holds a tensor called ``name``."""

    def shape(self, name: str) -> tuple[int, ...]:
        """The full shape of tensor ``name``; :class:`CheckpointError` when the source lacks it."""
        if not self.has(name):
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint at {self.where}: the checkpoint "
                                  "does not match its config.json (fewer layers stored? a file missing?)")
        return self._shape(name)

    @abstractmethod
    def _shape(self, name: str) -> tuple[int, ...]:
        """The full shape of tensor ``name``, which the source holds."""

    @abstractmethod
    def _view(self, name: str, dim: int, start: int, stop: int) -> AbstractContextManager[torch.Tensor]:
        """A context that yields a view of the block [start, stop) of ``name`` along ``dim``."""

    def copy_into(self, dst: torch.Tensor, name: str, dim: int = 0, start: int = 0, stop: int | None = None) -> None:
        """dst <- name[..., start:stop, ...] (block along ``dim``; the whole tensor when stop is None).

        Converts dtype and device on the way. :class:`CheckpointError` when the
        tensor is missing, when the block's shape differs from ``dst``'s, or
        when the block holds NaN or infinity, naming the tensor. A ``dst`` on
        the meta device is only checked, nothing is read (see
        :func:`tplab.model.loading.check_checkpoint`).
        """
        full = self.shape(name)
        if not full:  # a scalar (a per-tensor scale) is read whole
            start = stop = 0
        stop = full[dim] if stop is None else stop
        expected = tuple(stop - start if d == dim else s for d, s in enumerate(full))
        if (full and not 0 <= start <= stop <= full[dim]) or expected != tuple(dst.shape):
            raise CheckpointError(f"{name} in {self.where} has shape {full}, which does not fit what config.json "
                                  f"describes: block [{start}, {stop}) of dim {dim} should have shape {tuple(dst.shape)}")
        if dst.is_meta:
            return
        with self._view(name, dim, start, stop) as view:
            dst.copy_(view)
            self.bytes_read += view.numel() * view.element_size()
        values = dst.float() if dst.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else dst  # no fp8 isfinite
        if values.is_floating_point() and not torch.isfinite(values).all():
            raise CheckpointError(f"{name} in {self.where} holds {int((~torch.isfinite(values)).sum())} NaN or "
                                  "infinite values in this rank's block: the weights are damaged")


class StateDictSource(TensorSource):
    """Blocks of the tensors of an in-memory state dict (e.g. ``hf_model.state_dict()``)."""

    def __init__(self, state_dict: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.state_dict = state_dict

    def has(self, name: str) -> bool:
        return name in self.state_dict

    def _shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state_dict[name].shape)

    @contextmanager
    def _view(self, name, dim, start, stop):
        t = self.state_dict[name].detach()
        yield t if t.dim() == 0 else t.narrow(dim, start, stop - start)
