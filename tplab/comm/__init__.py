"""How ranks talk: one rank's view of its group, the instrumented collectives, and how ranks are started.

* :class:`Dist` (``group``): rank, world size, device, the collectives, and ``stats``.
* :class:`CommStats` (``stats``): op, bytes and seconds of every collective a rank ran.
* ``transports``: how tensors move (thread ranks in one process, or torch.distributed).
* :func:`launch` (``launch``, ``gloo``, ``torchrun``): run ``fn(dist, ...)`` on N ranks.
* ``collectives``: the teaching all-reduces built from send/recv (naive and ring).
"""
from tplab.comm.group import CollectiveTimeout, Dist, PeerFailure
from tplab.comm.launch import BACKENDS, RankDiedError, launch, under_torchrun
from tplab.comm.stats import CommRecord, CommStats

__all__ = ["BACKENDS", "CollectiveTimeout", "CommRecord", "CommStats", "Dist", "PeerFailure", "RankDiedError",
           "launch", "under_torchrun"]
