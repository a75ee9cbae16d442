"""Where weights come from: a rank's block of a named tensor, read from safetensors files or a state dict.

* ``sources``: :class:`TensorSource` (``copy_into`` one block) and :class:`StateDictSource`;
* ``safetensors_files``: :class:`SafetensorsSource`, single or sharded, damage checked from the headers.
"""
from tplab.checkpoint.safetensors_files import SafetensorsSource
from tplab.checkpoint.sources import LoadStats, StateDictSource, TensorSource

__all__ = ["LoadStats", "SafetensorsSource", "StateDictSource", "TensorSource"]
