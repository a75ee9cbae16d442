"""What is run and on what: the one model description, GPU and link specs, efficiencies, sharding arithmetic.

Pure Python (no torch), so the cost model and the command line read the same
description the decoder is built from.

* ``model``: :class:`ModelConfig`, from a ``config.json`` or a shipped name;
* ``hardware``: :class:`GpuSpec` and :class:`Link`, published figures with their sources;
* ``efficiency``: :class:`Efficiency`, the achieved fractions of peak;
* ``sharding``: which block rank r owns, which tp values are valid;
* ``tiny``: the bundled model's directory and checksum.
"""
from tplab.specs.efficiency import Efficiency, load_efficiency
from tplab.specs.hardware import GpuSpec, Link, gpu_names, load_gpu
from tplab.specs.model import ModelConfig

__all__ = ["Efficiency", "GpuSpec", "Link", "ModelConfig", "gpu_names", "load_efficiency", "load_gpu"]
