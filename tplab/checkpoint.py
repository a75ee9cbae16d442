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

import json
import struct
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from tplab.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class TensorSource(ABC):
    """Reads blocks of named tensors into preallocated destinations, counting the bytes."""

    where = "memory"

    def __init__(self) -> None:
        self.bytes_read = 0

    @abstractmethod
    def has(self, name: str) -> bool:
        """Whether the source holds a tensor called ``name``."""

    @abstractmethod
    def shape(self, name: str) -> tuple[int, ...]:
        """The full shape of tensor ``name``."""

    @abstractmethod
    def _view(self, name: str, dim: int, start: int, stop: int) -> AbstractContextManager[torch.Tensor]:
        """A context that yields a view of the block [start, stop) of ``name`` along ``dim``."""

    def copy_into(self, dst: torch.Tensor, name: str, dim: int = 0, start: int = 0, stop: int | None = None) -> None:
        """dst <- name[..., start:stop, ...] (block along ``dim``; the whole tensor when stop is None).

        Converts dtype and device on the way. :class:`CheckpointError` when the
        tensor is missing, when the block's shape differs from ``dst``'s, or
        when the block holds NaN or infinity, naming the tensor. A ``dst`` on
        the meta device is only checked, nothing is read (see
        :func:`tplab.loading.check_checkpoint`).
        """
        if not self.has(name):
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint at {self.where}: the checkpoint "
                                  "does not match its config.json (fewer layers stored? a file missing?)")
        full = self.shape(name)
        stop = full[dim] if stop is None else stop
        expected = tuple(stop - start if d == dim else s for d, s in enumerate(full))
        if not 0 <= start <= stop <= full[dim] or expected != tuple(dst.shape):
            raise CheckpointError(f"{name} in {self.where} has shape {full}, which does not fit what config.json "
                                  f"describes: block [{start}, {stop}) of dim {dim} should have shape {tuple(dst.shape)}")
        if dst.is_meta:
            return
        with self._view(name, dim, start, stop) as view:
            dst.copy_(view)
            self.bytes_read += view.numel() * view.element_size()
        if dst.is_floating_point() and not torch.isfinite(dst).all():
            raise CheckpointError(f"{name} in {self.where} holds {int((~torch.isfinite(dst)).sum())} NaN or infinite "
                                  "values in this rank's block: the weights are damaged")


class StateDictSource(TensorSource):
    """Blocks of the tensors of an in-memory state dict (e.g. ``hf_model.state_dict()``)."""

    def __init__(self, state_dict: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.state_dict = state_dict

    def has(self, name: str) -> bool:
        return name in self.state_dict

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state_dict[name].shape)

    @contextmanager
    def _view(self, name, dim, start, stop):
        yield self.state_dict[name].detach().narrow(dim, start, stop - start)


class SafetensorsSource(TensorSource):
    """Blocks of the tensors of a safetensors checkpoint directory (one file, or sharded with an index)."""

    def __init__(self, directory: str | Path) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.where = str(self.directory)
        self.files = self._tensor_files(self.directory)
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file in sorted(set(self.files.values())):
            for name, shape in _read_header(file).items():
                if self.files.get(name) == file:
                    self._shapes[name] = shape

    @staticmethod
    def _tensor_files(directory: Path) -> dict[str, Path]:
        index = directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                files = {name: directory / file for name, file in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError):
                raise CheckpointError(f"{index} is not a safetensors index (a JSON object with a weight_map of "
                                      "tensor name -> file)") from None
            missing = sorted({f.name for f in files.values() if not f.is_file()})
            if missing:
                raise CheckpointError(f"{index} lists {len(missing)} file(s) that are not in {directory}: "
                                      f"{', '.join(missing)}; download the missing shard(s)")
            return files
        single = directory / SINGLE_FILE
        if single.is_file():
            return {name: single for name in _read_header(single)}
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}: tplab reads safetensors "
                              "checkpoints (save with save_pretrained(..., safe_serialization=True))")

    def has(self, name: str) -> bool:
        return name in self._shapes

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    @contextmanager
    def _view(self, name, dim, start, stop):
        """The block as a view of the memory-mapped file, unmapped when the file closes after the copy."""
        index = tuple(slice(start, stop) if d == dim else slice(None) for d in range(len(self._shapes[name])))
        with safe_open(self.files[name], framework="pt") as f:
            yield f.get_slice(name)[index]


def _read_header(file: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape from a safetensors file's header; CheckpointError if the file is damaged or cut short.

    A safetensors file is an 8-byte little-endian header length N, N bytes of
    JSON (name -> dtype, shape, [begin, end) offsets), then the data. A file
    shorter than its header says is truncated.
    """
    try:
        with open(file, "rb") as raw:
            (length,) = struct.unpack("<Q", raw.read(8))
            header = json.loads(raw.read(length))
        data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, struct.error, KeyError, TypeError, AttributeError, IndexError) as e:
        raise _unreadable(file, e) from None
    size, expected = file.stat().st_size, 8 + length + data_end
    if size < expected:
        raise CheckpointError(f"{file} is truncated: {size} bytes, its header describes {expected}; "
                              "re-download or re-save it")
    try:
        with safe_open(file, framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except SafetensorError as e:
        raise _unreadable(file, e) from None


def _unreadable(file: Path, cause: Exception) -> CheckpointError:
    return CheckpointError(f"{file} is not a readable safetensors file ({cause}); re-download or re-save it")
