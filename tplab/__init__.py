"""tplab: tensor parallelism for LLM inference, taught, proven and measured.

The core vocabulary:

* :func:`launch` runs a rank program ``fn(dist, ...)`` on N ranks (threads,
  gloo processes, or the processes of torchrun).
* :class:`Dist` is one rank's view: ``rank``, ``world_size``, ``device``, the
  collectives, and ``stats``, the record of every collective it ran.
* :class:`ColumnParallelLinear` and :class:`RowParallelLinear` are the two
  ways to split a linear layer.
* :func:`from_pretrained` builds this rank's :class:`TPCausalLM` from a
  Hugging Face checkpoint, reading only its slices; :func:`generate` runs the
  prefill and decode loop on it.

The names load on first use (PEP 562): ``python -m tplab`` then imports torch inside its own entry point, where a
Ctrl-C is answered in one line like any other.
"""
import importlib

from tplab.version import __version__

_EXPORTS = {
    "tplab.comm": ("launch", "under_torchrun", "Dist", "CommStats", "CommRecord", "RankDiedError", "PeerFailure",
                   "CollectiveTimeout"),
    "tplab.engine": ("generate", "generate_rank_program", "GenerationResult"),
    "tplab.layers": ("ColumnParallelLinear", "RowParallelLinear"),
    "tplab.model": ("TPCausalLM", "from_pretrained", "from_hf_model", "SamplingParams"),
}
_MODULE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [*_MODULE, "__version__"]


def __getattr__(name: str) -> object:
    if name not in _MODULE:
        raise AttributeError(f"module 'tplab' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULE])
