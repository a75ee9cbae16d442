"""tplab: tensor parallelism for LLM inference, taught, proven and measured.

The core vocabulary:

* :func:`launch` runs a rank program ``fn(dist, ...)`` on N ranks (threads,
  gloo processes, or the processes of torchrun).
* :class:`Dist` is one rank's view: ``rank``, ``world_size``, ``device``, the
  collectives, and ``stats``, the record of every collective it ran.
* :class:`ColumnParallelLinear` and :class:`RowParallelLinear` are the two
  ways to split a linear layer.
"""
from tplab.comm_stats import CommRecord, CommStats
from tplab.dist import CollectiveTimeout, Dist, PeerFailure
from tplab.launch import RankDiedError, launch, under_torchrun
from tplab.layers import ColumnParallelLinear, RowParallelLinear

__version__ = "0.1.0"

__all__ = [
    "launch", "under_torchrun", "Dist", "CommStats", "CommRecord",
    "ColumnParallelLinear", "RowParallelLinear",
    "RankDiedError", "PeerFailure", "CollectiveTimeout", "__version__",
]
