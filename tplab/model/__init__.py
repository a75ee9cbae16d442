"""One rank's Llama-family decoder: its layers, its KV cache, how it is loaded, how a token is drawn.

* ``decoder``: :class:`TPCausalLM`, 2·layers + 1 all-reduces per forward pass;
* ``kv_cache``: :class:`KVCache`, this rank's KV heads only;
* ``loading``: :func:`from_pretrained` (a checkpoint directory) and :func:`from_hf_model`;
* ``sampling``: :class:`SamplingParams`, the same seeded draw on every rank.

The model's description is :class:`tplab.specs.ModelConfig`.
"""
from tplab.model.decoder import TPCausalLM
from tplab.model.kv_cache import KVCache
from tplab.model.loading import from_hf_model, from_pretrained
from tplab.model.sampling import SamplingParams

__all__ = ["KVCache", "SamplingParams", "TPCausalLM", "from_hf_model", "from_pretrained"]
