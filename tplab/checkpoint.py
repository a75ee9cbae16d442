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
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class TensorSource(ABC):
    """Reads blocks of named tensors into preallocated destinations, counting the bytes."""

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

        Converts dtype and device on the way. ValueError when the block's shape
        differs from ``dst``'s, naming the tensor.
        """
        if not self.has(name):
            raise KeyError(f"tensor {name!r} is missing from the checkpoint")
        full = self.shape(name)
        stop = full[dim] if stop is None else stop
        expected = tuple(stop - start if d == dim else s for d, s in enumerate(full))
        if not 0 <= start <= stop <= full[dim] or expected != tuple(dst.shape):
            raise ValueError(f"{name}: block [{start}, {stop}) of dim {dim} of a tensor of shape {full} "
                             f"does not fit a shard of shape {tuple(dst.shape)}")
        with self._view(name, dim, start, stop) as view:
            dst.copy_(view)
            self.bytes_read += view.numel() * view.element_size()


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
        self.files = self._tensor_files(self.directory)
        self._shapes: dict[str, tuple[int, ...]] = {}
        for file in sorted(set(self.files.values())):
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    self._shapes[name] = tuple(f.get_slice(name).get_shape())

    @staticmethod
    def _tensor_files(directory: Path) -> dict[str, Path]:
        index = directory / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: directory / file for name, file in weight_map.items()}
        single = directory / SINGLE_FILE
        if single.is_file():
            with safe_open(single, framework="pt") as f:
                return {name: single for name in f.keys()}
        raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}: tplab reads safetensors "
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
