"""Measurement: sweeps on real ranks (or one emulated 70B rank), against a baseline timed in the same run.

* ``sweep``: :func:`run_bench` over a :class:`BenchSpec`; ``plan`` and ``preview`` check and size it first;
* ``point``, ``timing``: one point's timed prefill and decode steps, through the generation loop;
* ``models``: the model a sweep runs, and HF's eager twin of one shard;
* ``roofline``, ``emulation``: copy bandwidth and matmul peak measured; collectives that move no data;
* ``records``, ``env``: JSON-lines records with their hardware, versions, date and commit;
* ``calibration``, ``vs_model``: the cost model's efficiencies fitted to records, and records beside the model;
* ``comm``: a timed all-reduce sweep and its α-β fit.
"""
from tplab.bench.sweep import BenchSpec, run_bench

__all__ = ["BenchSpec", "run_bench"]
