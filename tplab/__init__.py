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
"""
from tplab.comm import (
    CollectiveTimeout,
    CommRecord,
    CommStats,
    Dist,
    PeerFailure,
    RankDiedError,
    launch,
    under_torchrun,
)
from tplab.engine import GenerationResult, generate, generate_rank_program
from tplab.layers import ColumnParallelLinear, RowParallelLinear
from tplab.model import SamplingParams, TPCausalLM, from_hf_model, from_pretrained
from tplab.version import __version__

__all__ = [
    "launch", "under_torchrun", "Dist", "CommStats", "CommRecord",
    "ColumnParallelLinear", "RowParallelLinear",
    "TPCausalLM", "from_pretrained", "from_hf_model", "generate", "generate_rank_program",
    "GenerationResult", "SamplingParams",
    "RankDiedError", "PeerFailure", "CollectiveTimeout", "__version__",
]
