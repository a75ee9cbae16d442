"""A TP group in which one rank fails: ``torchrun --nproc-per-node 2 -m failing_rank``, from this folder.

Rank 1 raises while rank 0 waits for it in an all-reduce. Tests use it to
check that under torchrun too a failure stops every rank (torchrun ends the
group when one process fails) and that torchrun's summary names the
original error.
"""
from __future__ import annotations

import torch

from tplab.comm.group import Dist
from tplab.comm.launch import launch
from tplab.comm.torchrun import report_errors_to_torchrun

MESSAGE = "rank 1 failed on purpose"


def fail_on_rank_1(dist: Dist) -> torch.Tensor:
    """Rank program: rank 1 raises RuntimeError(MESSAGE); the others wait for it in an all-reduce."""
    if dist.rank == 1:
        raise RuntimeError(MESSAGE)
    return dist.all_reduce(torch.ones(1))


def main() -> None:
    launch(fail_on_rank_1, 2)


if __name__ == "__main__":
    report_errors_to_torchrun(main)()
