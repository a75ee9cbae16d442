"""The shared-memory transport of gloo ranks: the same results as thread ranks, bit for bit, exact counts, a
fallback to gloo for what a slot cannot hold, and nothing left in /dev/shm."""
import os

import pytest
import torch

from tplab import launch
from tplab.comm import shm

pytestmark = pytest.mark.skipif(not shm.available(), reason="shared memory is used on Linux x86-64 only")


def collectives(dist):
    """Every collective the transport carries, on inputs that differ per rank (bf16 and fp32), and a large one."""
    g = torch.Generator().manual_seed(dist.rank)
    x32, x16 = torch.randn(5, 7, generator=g), torch.randn(3, 33, generator=g).bfloat16()
    big = torch.randn(shm.SLOT_BYTES // 4 + 10, generator=g)  # one slot cannot hold it: gloo carries it
    out = {
        "all_reduce_fp32": dist.all_reduce(x32.clone()), "all_reduce_bf16": dist.all_reduce(x16.clone()),
        "all_gather": dist.all_gather(x32, dim=1), "reduce_scatter": dist.reduce_scatter(x16.repeat(dist.world_size, 1), 0),
        "broadcast": dist.broadcast(x32.clone(), src=dist.world_size - 1), "big": dist.all_reduce(big.clone()),
        "transport": type(dist._transport).__name__,
    }
    for _ in range(50):  # many collectives in a row: the double-buffered slots are reused safely
        x32 = dist.all_reduce(x32 / dist.world_size)
    out["repeated"] = x32
    out["counts"] = dist.stats.counts()
    return out


@pytest.mark.parametrize("tp", [2, 3])
def test_shared_memory_collectives_equal_thread_ranks_bit_for_bit(tp):
    threads, shared = launch(collectives, tp, "threads"), launch(collectives, tp, "gloo")
    assert {r["transport"] for r in shared} == {"SharedMemoryTransport"}
    for a, b in zip(threads, shared):
        for key in ("all_reduce_fp32", "all_reduce_bf16", "all_gather", "reduce_scatter", "broadcast", "repeated"):
            assert torch.equal(a[key], b[key]), key  # the same sum in the same rank order
        torch.testing.assert_close(a["big"], b["big"])  # gloo's own summation order
        assert a["counts"] == b["counts"] == {"all_reduce": 53, "all_gather": 1, "reduce_scatter": 1, "broadcast": 1}


def test_gloo_tcp_keeps_plain_gloo_for_every_collective():
    assert {r["transport"] for r in launch(collectives, 2, "gloo-tcp")} == {"TorchTransport"}


def test_no_segment_outlives_its_launch():
    before = {n for n in os.listdir(shm.SHM_DIR) if n.startswith("tplab-")}
    launch(collectives, 2, "gloo")
    assert {n for n in os.listdir(shm.SHM_DIR) if n.startswith("tplab-")} - before == set()


@pytest.mark.skipif(not shm.available(), reason="shared memory needs Linux x86-64")
def test_a_planted_segment_name_stops_the_launch_in_one_line_and_is_left_alone(monkeypatch):
    from tplab.comm import gloo
    from tplab.errors import InputError
    monkeypatch.setattr(gloo.secrets, "token_hex", lambda n: "planted" + "0" * 17)
    planted = shm.SHM_DIR / ("tplab-planted" + "0" * 17)
    planted.write_bytes(b"someone else's")
    try:
        with pytest.raises(InputError, match="already exists, though its name was drawn at random"):
            launch(collectives, 2, "gloo", timeout=30)
        assert planted.read_bytes() == b"someone else's"
    finally:
        planted.unlink()
