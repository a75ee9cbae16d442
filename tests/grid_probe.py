"""A rank program that exercises every group of a tp x pp grid, for the tests of every backend.

``python -m grid_probe TP PP EP``, from this folder, runs it under torchrun (one process per rank) and prints, on
global rank 0, every rank's result as JSON.
"""
from __future__ import annotations

import json
import sys

import torch

from tplab.comm.launch import launch


def grid_exchanges(dist) -> dict:
    """Per group: an all-reduce, the stage-to-stage hop and its return, all-to-alls of equal and uneven splits.

    Every tensor depends on the global rank only, so each backend must return the same bits; the chunk rank r
    addresses to rank j in the uneven all-to-all has r + j + 1 rows.
    """
    grid = dist.grid
    g = grid.rank
    out = {"rank": g, "stage": grid.stage, "tp_rank": grid.tp.rank, "ep_rank": grid.ep.rank,
           "sizes": [grid.tp.world_size, grid.pp.world_size, grid.ep.world_size]}
    out["tp_sum"] = grid.tp.all_reduce(torch.tensor([g + 1.0, 0.5 * g])).tolist()
    out["pp_sum"] = grid.pp.all_reduce(torch.tensor([g + 1.0])).tolist()
    if grid.next_stage is not None:  # activations forward, one hop per stage
        grid.pp.send(torch.full((2, 3), g + 0.25), grid.next_stage)
    if grid.prev_stage is not None:
        out["from_prev_stage"] = grid.pp.recv(torch.empty(2, 3), grid.prev_stage)[0].tolist()
    if grid.num_stages > 1:  # the chosen tokens back from the last stage to the first
        if grid.is_last_stage:
            grid.pp.send(torch.tensor([100 + g], dtype=torch.int64), 0)
        elif grid.is_first_stage:
            out["token_back"] = grid.pp.recv(torch.empty(1, dtype=torch.int64), grid.num_stages - 1).tolist()
    n, r = grid.tp.world_size, grid.tp.rank
    equal = [torch.full((2, 4), 10.0 * g + j) for j in range(n)]
    out["a2a_equal"] = [c[:, 0].tolist() for c in grid.tp.all_to_all(equal)]
    gen = torch.Generator().manual_seed(g)
    uneven = [torch.randn(r + j + 1, 3, generator=gen) for j in range(n)]
    received = grid.tp.all_to_all(uneven)
    out["a2a_uneven"] = [c.tolist() for c in received]
    out["a2a_ep"] = [c.tolist() for c in grid.ep.all_to_all([torch.full((1,), g * 1.0 + k)
                                                             for k in range(grid.ep.world_size)])]
    out["counts"] = {kind: stats.summary() for kind, stats in grid.stats().items()}
    for kind in out["counts"].values():
        for op in kind.values():
            op.pop("seconds")
    out["groups"] = sorted({rec.group for stats in grid.stats().values() for rec in stats.records})
    return out


def main(argv: list[str] | None = None) -> None:
    tp, pp, ep = (int(a) for a in (argv if argv is not None else sys.argv[1:]))
    results = launch(grid_exchanges, tp, pp=pp, ep=ep, timeout=120)
    if grid_rank_zero():
        print(json.dumps(results))


def grid_rank_zero() -> bool:
    import torch.distributed as td
    return not td.is_initialized() or td.get_rank() == 0


if __name__ == "__main__":
    main()
