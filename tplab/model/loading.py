"""Build one rank's :class:`~tplab.model.TPCausalLM` from a checkpoint directory or an in-memory HF model.

Order of work, so that mistakes cost nothing:

1. read config.json and check the TP degree (:meth:`ModelConfig.check_tp`):
   an impossible tp fails here, before any weight is touched;
2. allocate this rank's shards only (about 1/tp of the weights) on
   ``dist.device``;
3. fill them block by block from the checkpoint
   (:class:`~tplab.checkpoint.safetensors_files.SafetensorsSource`): each rank reads only its
   own rows or columns, copied straight from the memory-mapped file into the
   shard, so its private memory peaks at its shards, not the checkpoint.

``model.load_stats`` records what the rank read: bytes materialised and seconds.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tplab.checkpoint.safetensors_files import SafetensorsSource
from tplab.checkpoint.sources import StateDictSource, TensorSource
from tplab.dist.group import Dist
from tplab.model.decoder import TPCausalLM
from tplab.specs.model import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoadStats:
    """What one rank read while loading: bytes copied out of the checkpoint, and wall seconds."""

    bytes_read: int
    seconds: float


def resolve_dtype(dtype: torch.dtype | str | None, config: ModelConfig) -> torch.dtype:
    """An explicit dtype (torch.dtype or "float32"/"bfloat16"/"float16"); None or "auto": the checkpoint's, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = config.dtype if dtype in (None, "auto") else dtype
    if name is None:
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def read_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint directory; FileNotFoundError / ValueError with a clear message."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model path {str(path)!r} is not a directory: pass a Hugging Face checkpoint "
                                "directory (config.json + *.safetensors)")
    return ModelConfig.from_file(path)


def check_checkpoint(path: str | Path, config: ModelConfig | None = None) -> int:
    """The model's parameter count; :class:`~tplab.errors.CheckpointError` unless every tensor config.json
    describes is in the checkpoint.

    Reads the safetensors headers only: the model is built on the meta device
    (no memory), and loading it checks each tensor's presence and shape without
    reading data. Truncated files and missing shards fail here too, before any
    rank starts.
    """
    config = config or read_config(path)
    model = TPCausalLM(config, Dist(0, 1, torch.device("meta"), transport=None), torch.float32)
    model.load(SafetensorsSource(path))
    return sum(p.numel() for p in model.parameters())


def _build(config: ModelConfig, source: TensorSource, dist: Dist, dtype: torch.dtype) -> TPCausalLM:
    start = time.perf_counter()
    model = TPCausalLM(config, dist, dtype).load(source)
    model.load_stats = LoadStats(source.bytes_read, time.perf_counter() - start)
    return model.eval()


def from_pretrained(path: str | Path, dist: Dist, dtype: torch.dtype | str | None = None) -> TPCausalLM:
    """This rank's shard of the checkpoint at ``path``, on ``dist.device``.

    ``path`` holds config.json and model.safetensors, or several safetensors
    files with model.safetensors.index.json. ``dtype``: see :func:`resolve_dtype`.
    """
    config = read_config(path)
    config.check_tp(dist.world_size)
    return _build(config, SafetensorsSource(path), dist, resolve_dtype(dtype, config))


def from_hf_model(hf_model: torch.nn.Module, dist: Dist, dtype: torch.dtype | str | None = None) -> TPCausalLM:
    """This rank's shard of an in-memory transformers model (e.g. LlamaForCausalLM), same slicing as on disk."""
    config = ModelConfig.from_hf_config(hf_model.config)
    config.check_tp(dist.world_size)
    dtype = next(hf_model.parameters()).dtype if dtype is None else resolve_dtype(dtype, config)
    return _build(config, StateDictSource(hf_model.state_dict()), dist, dtype)
