"""The teaching collectives, kept under their first name: they live in :mod:`tplab.comm.collectives`."""
from tplab.comm.collectives import naive_all_reduce, ring_all_reduce, ring_contributions, ring_schedule

__all__ = ["naive_all_reduce", "ring_all_reduce", "ring_contributions", "ring_schedule"]
