"""Build one rank's :class:`~tplab.model.TPCausalLM` from a checkpoint directory or an in-memory HF model.

Order of work, so that mistakes cost nothing:

1. the model's description, :class:`~tplab.specs.ModelConfig`, is read once
   (or handed in, already read); building the model checks the TP degree
   (:meth:`ModelConfig.check_tp`), so an impossible tp fails before any weight
   is touched;
2. allocate this rank's shards only (about 1/tp of the weights) on
   ``dist.device``;
3. fill them block by block from the checkpoint
   (:class:`~tplab.checkpoint.SafetensorsSource`): each rank reads only its
   own rows or columns, copied straight from the memory-mapped file into the
   shard, so its private memory peaks at its shards, not the checkpoint.

``model.load_stats`` records what the rank read: bytes materialised and seconds.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tplab.checkpoint.safetensors_files import SafetensorsSource
from tplab.checkpoint.sources import StateDictSource
from tplab.comm.group import Dist
from tplab.layers.weights import check_scheme
from tplab.model.decoder import TPCausalLM
from tplab.model.moe import unfused_experts
from tplab.specs import cpu
from tplab.specs.dtypes import torch_name
from tplab.specs.model import ModelConfig, resolve_model
from tplab.specs.tiny import BUNDLED


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a runtime precision in either spelling: "bf16" or "bfloat16" -> torch.bfloat16."""
    return getattr(torch, torch_name(name))


def resolve_dtype(dtype: torch.dtype | str | None, config: ModelConfig, device: torch.device | str = "cpu"
                  ) -> torch.dtype:
    """An explicit dtype (a torch.dtype, or a name in either spelling: "bf16" or "bfloat16"); None or "auto":
    the checkpoint's, else float32, and float32 for a bfloat16 checkpoint on a CPU that has no native bf16 matmul
    (:func:`tplab.specs.cpu.native_bf16`: emulated, it takes several times the float32 time)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = config.dtype if dtype in (None, "auto") else dtype
    resolved = torch.float32 if name is None else torch_dtype(name)
    if dtype in (None, "auto") and resolved == torch.bfloat16 and torch.device(device).type == "cpu" \
            and not cpu.native_bf16():
        return torch.float32
    return resolved


def dtype_note(requested: str | None, config: ModelConfig, resolved: torch.dtype) -> str | None:
    """One line when the default dtype is not the checkpoint's (a CPU without native bf16), else None."""
    if requested not in (None, "auto") or config.dtype is None or torch_dtype(config.dtype) == resolved:
        return None
    return (f"note: the checkpoint is {config.dtype} and this CPU has no native bf16 matmul ({cpu.describe()}): "
            f"computing in {str(resolved).removeprefix('torch.')}; pass --dtype {config.dtype} to insist")


def checkpoint_config(model: str | Path | ModelConfig) -> ModelConfig:
    """The ModelConfig of a checkpoint directory or of a bundled model (``tiny``, ``tiny-moe``; read once), or the one given, which must have
    a directory."""
    if isinstance(model, ModelConfig) or str(model) in BUNDLED:
        config = resolve_model(model)
    else:
        path = Path(model)
        if not path.is_dir():
            raise FileNotFoundError(f"model path {str(path)!r} is not a directory: pass a Hugging Face checkpoint "
                                    "directory (config.json + *.safetensors)")
        config = ModelConfig.from_file(path)
    if config.directory is None:
        raise FileNotFoundError(f"{config.source} is a config without weights: pass a Hugging Face checkpoint "
                                "directory (config.json + *.safetensors)")
    return config


def check_checkpoint(config: ModelConfig) -> int:
    """The model's parameter count; :class:`~tplab.errors.CheckpointError` unless every tensor config.json
    describes is in the checkpoint.

    Reads the safetensors headers only: the model is built on the meta device
    (no memory), and loading it checks each tensor's presence and shape without
    reading data. Truncated files and missing shards fail here too, before any
    rank starts.
    """
    config = checkpoint_config(config)
    model = TPCausalLM(config, Dist(0, 1, torch.device("meta"), transport=None), torch.float32)
    model.load(SafetensorsSource(config.directory))
    return sum(p.numel() for p in model.parameters())


def from_pretrained(model: str | Path | ModelConfig, dist: Dist, dtype: torch.dtype | str | None = None,
                    quant: str | None = None, quant_embeddings: bool = False, prepack: bool = False,
                    pp_layers: list[int] | None = None, expert_dispatch: str = "all-reduce") -> TPCausalLM:
    """This rank's shard of the checkpoint ``model`` (its directory, or its ModelConfig), on ``dist.device``.

    The directory holds config.json and model.safetensors, or several
    safetensors files with model.safetensors.index.json. ``dtype``: see
    :func:`resolve_dtype`. ``quant``: "int8" or "fp8" quantizes this rank's
    slices of the decoder's linears once they are read (:meth:`TPCausalLM.quantize_`), and of the embedding
    and the LM head too with ``quant_embeddings``. ``prepack``: the unquantized linears in oneDNN's layout
    (:meth:`TPCausalLM.prepack_`; CPU only). On a pipeline stage (``dist.grid``), only that stage's layers are read:
    ``pp_layers`` per stage, default the even split (:func:`tplab.specs.sharding.stage_layers`). With an expert
    group (``launch(..., ep=tp)``), only this rank's whole experts, reached by ``expert_dispatch``
    (:mod:`tplab.model.moe`).
    """
    config = checkpoint_config(model)
    if quant is not None:
        check_scheme(quant)
        if config.quantization and quant != config.quantization:
            raise ValueError(f"{config.directory} is stored in {config.quantization}: load it as it is (no --quant, "
                             f"or --quant {config.quantization}), not as {quant}")
    shard = TPCausalLM(config, dist, resolve_dtype(dtype, config, dist.device), pp_layers, expert_dispatch)
    shard.load(SafetensorsSource(config.directory)).eval()
    if quant_embeddings and not quant:
        raise ValueError("quantizing the embeddings needs a scheme: pass quant='int8' or 'fp8' with it")
    if quant and not config.quantization:
        shard.quantize_(quant, quant_embeddings)
    return shard.prepack_() if prepack else shard


def from_hf_model(hf_model: torch.nn.Module, dist: Dist, dtype: torch.dtype | str | None = None) -> TPCausalLM:
    """This rank's shard of an in-memory transformers model (e.g. LlamaForCausalLM), same slicing as on disk."""
    config = ModelConfig.from_hf_config(hf_model.config)
    dtype = next(hf_model.parameters()).dtype if dtype is None else resolve_dtype(dtype, config, dist.device)
    state = unfused_experts(hf_model.state_dict(), config.model_type)
    return TPCausalLM(config, dist, dtype).load(StateDictSource(state)).eval()
