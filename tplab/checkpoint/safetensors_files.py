"""A safetensors checkpoint directory as a :class:`~tplab.checkpoint.sources.TensorSource`, damage checked.

One file (``model.safetensors``) or several with ``model.safetensors.index.json``,
which maps each tensor name to its file. Headers are read and checked before
any data: a truncated file, a missing shard or an unreadable header is a
:class:`~tplab.errors.CheckpointError` naming the file and what to do.
"""
from __future__ import annotations

import json
import struct
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError, safe_open

from tplab.checkpoint.sources import TensorSource
from tplab.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit on a header


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
            outside = sorted({str(f) for f in weight_map.values() if Path(f).name != f or f in (".", "..")})
            if outside:
                raise CheckpointError(f"{index} maps tensors to files outside {directory} ({', '.join(outside)}): "
                                      "an index names shard files in its own folder")
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

    def _shape(self, name: str) -> tuple[int, ...]:
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
            if length > min(file.stat().st_size - 8, MAX_HEADER_BYTES):  # read nothing an absurd length asks for
                raise ValueError(f"its header length field says {length:,} bytes, more than the file or "
                                 f"{MAX_HEADER_BYTES:,} bytes holds")
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
