"""Loading, kept under its first name: it lives in :mod:`tplab.model.loading`."""
from tplab.model.loading import from_hf_model, from_pretrained

__all__ = ["from_hf_model", "from_pretrained"]
