"""The cost model: what a tensor-parallel deployment needs and how fast it runs, on GPUs nobody here has.

Every figure is modelled (not measured) from the shapes of :mod:`tplab.specs`
and the published GPU and link figures:

* ``shapes``: what one rank stores, reads, computes and sends;
* ``comm``: α-β cost of naive and ring collectives, bus bandwidth;
* ``estimate``: :func:`estimate`, :func:`min_tp`, :func:`max_batch`, :func:`throughput_curve`;
* ``replicas``: replicas against TP for a fixed number of GPUs;
* ``pipeline``: TP × PP across nodes.
"""
from tplab.perf.estimate import MODELLED, Estimate, estimate, max_batch, min_tp, step_seconds, throughput_curve
from tplab.perf.pipeline import compare_tp_pp, estimate_pipeline
from tplab.perf.replicas import compare_replicas

__all__ = ["MODELLED", "Estimate", "compare_replicas", "compare_tp_pp", "estimate", "estimate_pipeline",
           "max_batch", "min_tp", "step_seconds", "throughput_curve"]
